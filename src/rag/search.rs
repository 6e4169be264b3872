//! Retrieval: nearest chunks by embedding, best chunks by full text (BM25), or both fused by a
//! weighted sum of their scores, each first put on the same [0, 1] scale. The weight leans towards
//! the text side when the query holds rare tokens (codes, numbers) or is a bare name, where exact
//! words say more than meaning. Every mode's `score` is on that scale, so one relevance threshold
//! ([`RELEVANCE_THRESHOLD`]) serves them all. Weights and threshold were tuned on the dev set in
//! `tests/fixtures/ragdev` (`aitier rag eval`; figures in the README).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{Rag, RagError};
use crate::store::{Hit, Scope};

/// Cosine similarity at and above which a chunk counts as fully similar (score 1); MiniLM gives
/// close paraphrases 0.6 and more, unrelated text 0.1 or less. Negative cosines score 0.
const FULL_COSINE: f32 = 0.6;
/// The vector side's weight in hybrid scores, for a question in words.
const VECTOR_WEIGHT: f32 = 0.7;
/// ... for a query holding a rare token (a digit, or a code in capitals such as `GF`): the exact
/// token is the best evidence there is.
const VECTOR_WEIGHT_RARE: f32 = 0.4;
/// ... for a query of at most [`SHORT_QUERY`] words (a bare name or term): an embedding of two
/// words says little.
const VECTOR_WEIGHT_SHORT: f32 = 0.3;
const SHORT_QUERY: usize = 2;

/// The score under which `/api/rag/query` finds nothing relevant and answers 404. On the dev set it
/// refuses 80 % of the questions the documents cannot answer and 2 % of those they can (hybrid).
pub const RELEVANCE_THRESHOLD: f32 = 0.35;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[derive(clap::ValueEnum)]
pub enum Mode {
    /// Nearest chunks by cosine similarity of the embeddings.
    Vector,
    /// Best chunks by full-text rank.
    Text,
    /// Both, fused by a weighted sum of their scores on one scale.
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

#[derive(Debug, Clone)]
pub struct SearchParams {
    pub query: String,
    pub collection: String,
    pub top_k: usize,
    pub mode: Mode,
    pub filter: Map<String, Value>,
    /// When set, nothing is found unless the best score reaches it: a question the collection
    /// knows nothing about gets no sources rather than the least bad.
    pub min_score: Option<f32>,
}

/// A cosine similarity on the common [0, 1] scale.
pub fn vector_score(cosine: f32) -> f32 {
    (cosine / FULL_COSINE).clamp(0.0, 1.0)
}

/// Whether a query holds a token rare in prose: one with a digit, or two or more capitals.
fn has_rare_token(query: &str) -> bool {
    query.split(|c: char| !c.is_alphanumeric()).any(|t| {
        t.chars().any(|c| c.is_ascii_digit()) || t.chars().filter(|c| c.is_uppercase()).count() >= 2
    })
}

/// The vector side's weight for this query; the text side has the rest.
pub fn vector_weight(query: &str) -> f32 {
    if has_rare_token(query) {
        VECTOR_WEIGHT_RARE
    } else if query.split_whitespace().count() <= SHORT_QUERY {
        VECTOR_WEIGHT_SHORT
    } else {
        VECTOR_WEIGHT
    }
}

/// Fuses a vector ranking (scores: cosine) and a text ranking (scores: normalised BM25, [0, 1])
/// into one, best first: each chunk scores `w * vector_score + (1 - w) * text`. A chunk missing
/// from a list that was cut at `depth` scores no more than that list's last entry there; missing
/// from a list that was not cut, it scores 0 on that side.
pub fn fuse(
    by_vector: &[Hit],
    by_text: &[Hit],
    weight: f32,
    depth: usize,
    limit: usize,
) -> Vec<Hit> {
    let floor = |list: &[Hit]| {
        if list.len() < depth {
            None
        } else {
            list.last().map(|h| h.score)
        }
    };
    let (vector_floor, text_floor) = (floor(by_vector), floor(by_text));
    let mut sides: HashMap<i64, (Option<f32>, Option<f32>, &Hit)> = HashMap::new();
    for hit in by_vector {
        sides
            .entry(hit.chunk_id)
            .or_insert((Some(hit.score), None, hit));
    }
    for hit in by_text {
        sides.entry(hit.chunk_id).or_insert((None, None, hit)).1 = Some(hit.score);
    }
    let mut hits: Vec<Hit> = sides
        .into_values()
        .map(|(cosine, text, hit)| {
            let v = cosine.or(vector_floor).map_or(0.0, vector_score);
            let t = text.or(text_floor).unwrap_or(0.0);
            Hit {
                score: weight * v + (1.0 - weight) * t,
                ..hit.clone()
            }
        })
        .collect();
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
        let mut hits = match (params.mode, vector) {
            (Mode::Vector, Some(v)) => {
                let mut hits = store.vector_search(scope, &v).await?;
                for hit in &mut hits {
                    hit.score = vector_score(hit.score);
                }
                hits
            }
            (Mode::Hybrid, Some(v)) => {
                let (by_vector, by_text) = futures::try_join!(
                    store.vector_search(scope, &v),
                    store.text_search(scope, &params.query)
                )?;
                let weight = vector_weight(&params.query);
                fuse(&by_vector, &by_text, weight, depth, params.top_k)
            }
            _ => store.text_search(scope, &params.query).await?,
        };
        if params
            .min_score
            .is_some_and(|min| hits.first().is_none_or(|h| h.score < min))
        {
            hits.clear();
        }
        hits.truncate(params.top_k);
        Ok(hits)
    }

    /// Whether `/api/rag/query` would answer from these hits (else it answers 404).
    pub fn relevant(hits: &[Hit]) -> bool {
        hits.first().is_some_and(|h| h.score >= RELEVANCE_THRESHOLD)
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

    fn scored(id: i64, score: f32) -> Hit {
        Hit { score, ..hit(id) }
    }

    #[test]
    fn fusion_weighs_both_sides_on_one_scale() {
        // Chunk 1: close in meaning, no words in common; chunk 2: every word, middling meaning.
        let vector = vec![scored(1, 0.6), scored(2, 0.3)];
        let text = vec![scored(2, 1.0)];
        // Leaning on the words (a query with a code), the exact match wins.
        let words = fuse(&vector, &text, 0.4, 20, 2);
        assert_eq!(words[0].chunk_id, 2);
        assert!((words[0].score - (0.4 * 0.5 + 0.6)).abs() < 1e-6);
        assert!((words[1].score - 0.4).abs() < 1e-6);
        // Leaning on meaning alone, the paraphrase wins.
        let meaning = fuse(&vector, &text, 1.0, 20, 2);
        assert_eq!(meaning[0].chunk_id, 1);
    }

    #[test]
    fn a_chunk_below_a_cut_list_scores_at_most_its_last_entry() {
        let vector = vec![scored(1, 0.6), scored(2, 0.3)];
        let text = vec![scored(3, 0.9)];
        // The vector list was cut at 2: chunk 3's cosine is at most 0.3 there.
        let fused = fuse(&vector, &text, 0.5, 2, 3);
        let three = fused.iter().find(|h| h.chunk_id == 3).unwrap();
        assert!((three.score - (0.5 * 0.5 + 0.45)).abs() < 1e-6, "{fused:?}");
    }

    #[test]
    fn codes_numbers_and_bare_names_lean_on_the_text_side() {
        assert_eq!(vector_weight("What weighs 1.9 kg?"), VECTOR_WEIGHT_RARE);
        assert_eq!(vector_weight("error E-2210"), VECTOR_WEIGHT_RARE);
        assert_eq!(vector_weight("Jonas Ekdahl"), VECTOR_WEIGHT_SHORT);
        assert_eq!(
            vector_weight("How do I wash my down jacket?"),
            VECTOR_WEIGHT
        );
    }
}
