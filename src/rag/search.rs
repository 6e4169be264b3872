//! Retrieval: nearest chunks by embedding, best chunks by full text, or both fused by reciprocal
//! rank (RRF), which needs no calibration between cosine similarities and text ranks.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{Rag, RagError};
use crate::store::{Hit, Scope};

/// RRF's constant: a hit at rank r scores 1 / (K + r). 60 is the value of the original paper
/// (Cormack et al., 2009); it keeps the first ranks from dominating.
const RRF_K: f32 = 60.0;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[derive(clap::ValueEnum)]
pub enum Mode {
    /// Nearest chunks by cosine similarity of the embeddings.
    Vector,
    /// Best chunks by full-text rank.
    Text,
    /// Both rankings fused by reciprocal rank.
    #[default]
    Hybrid,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vector => "vector",
            Self::Text => "text",
            Self::Hybrid => "hybrid",
        }
    }
}

/// The cosine similarity the nearest chunk needs for a question to count as covered by the
/// collection. MiniLM puts unrelated sentences below about 0.15 and paraphrases above 0.4.
pub const MIN_RELEVANCE: f32 = 0.25;

#[derive(Debug, Clone)]
pub struct SearchParams {
    pub query: String,
    pub collection: String,
    pub top_k: usize,
    pub mode: Mode,
    pub filter: Map<String, Value>,
    /// When set, nothing is found unless the nearest chunk has at least this cosine similarity:
    /// a question the collection knows nothing about gets no sources rather than the least bad.
    pub min_similarity: Option<f32>,
}

/// Fuses rankings by reciprocal rank: each chunk scores the sum of 1 / (K + rank) over the lists it
/// appears in; the best `limit` come first.
pub fn fuse(rankings: &[Vec<Hit>], limit: usize) -> Vec<Hit> {
    let mut fused: HashMap<i64, Hit> = HashMap::new();
    for ranking in rankings {
        for (rank, hit) in ranking.iter().enumerate() {
            let score = 1.0 / (RRF_K + rank as f32 + 1.0);
            fused
                .entry(hit.chunk_id)
                .and_modify(|h| h.score += score)
                .or_insert_with(|| Hit {
                    score,
                    ..hit.clone()
                });
        }
    }
    let mut hits: Vec<Hit> = fused.into_values().collect();
    hits.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(a.chunk_id.cmp(&b.chunk_id))
    });
    hits.truncate(limit);
    hits
}

impl Rag {
    /// The best chunks for a query, best first.
    #[tracing::instrument(skip(self, params), fields(collection = %params.collection, mode = ?params.mode, k = params.top_k))]
    pub async fn search(&self, params: &SearchParams) -> Result<Vec<Hit>, RagError> {
        let store = self.database.store()?;
        // Each list reaches deeper than top_k, so that fusion can promote what one list ranks low.
        let depth = match params.mode {
            Mode::Hybrid => (params.top_k * 4).max(20),
            _ => params.top_k,
        };
        let scope = Scope {
            collection: &params.collection,
            limit: depth,
            filter: &params.filter,
        };
        let vector = if params.mode == Mode::Text {
            None
        } else {
            let service = self.embeddings.get()?;
            if !self.check_dims(&params.collection, service.dims()).await? {
                return Ok(Vec::new());
            }
            let mut embedded = service.embed(vec![params.query.clone()], true).await?;
            Some(embedded.remove(0).vector)
        };
        let relevant = |by_vector: &[Hit]| {
            params
                .min_similarity
                .is_none_or(|min| by_vector.first().is_some_and(|h| h.score >= min))
        };
        let hits = match (params.mode, vector) {
            (Mode::Vector, Some(v)) => {
                let by_vector = store.vector_search(scope, &v).await?;
                if relevant(&by_vector) {
                    by_vector
                } else {
                    Vec::new()
                }
            }
            (Mode::Hybrid, Some(v)) => {
                let (by_vector, by_text) = futures::try_join!(
                    store.vector_search(scope, &v),
                    store.text_search(scope, &params.query)
                )?;
                if relevant(&by_vector) {
                    fuse(&[by_vector, by_text], params.top_k)
                } else {
                    Vec::new()
                }
            }
            _ => store.text_search(scope, &params.query).await?,
        };
        Ok(hits.into_iter().take(params.top_k).collect())
    }

    /// Whether `/api/rag/query` would answer from this search (else it answers 404).
    pub async fn relevant(&self, params: &SearchParams, _hits: &[Hit]) -> Result<bool, RagError> {
        let gated = SearchParams {
            min_similarity: Some(MIN_RELEVANCE),
            ..params.clone()
        };
        Ok(!self.search(&gated).await?.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(id: i64) -> Hit {
        Hit {
            chunk_id: id,
            document_id: id,
            title: String::new(),
            text: String::new(),
            score: 0.0,
        }
    }

    #[test]
    fn fusion_favours_what_both_rankings_agree_on() {
        let vector = vec![hit(1), hit(2), hit(3)];
        let text = vec![hit(3), hit(4)];
        let fused = fuse(&[vector, text], 3);
        let ids: Vec<i64> = fused.iter().map(|h| h.chunk_id).collect();
        // 3 is in both lists (ranks 3 and 1): it beats 1, first in one list only; 2 and 4 tie
        // (second in one list each) and the lower id wins.
        assert_eq!(ids, [3, 1, 2]);
        assert!((fused[0].score - (1.0 / 63.0 + 1.0 / 61.0)).abs() < 1e-6);
    }
}
