//! `aitier rag eval`: how well retrieval finds the document that answers each question of a labelled
//! set, per mode and per kind of question, and how often `/api/rag/query` would refuse (404) the
//! questions the collection cannot answer — and, wrongly, those it can. Document-level: the chunks
//! a search returns are collapsed to their documents, in order of first appearance.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Map;

use super::{Mode, Rag, SearchParams};

/// Chunks asked of each search: deep enough that ten distinct documents usually remain.
const DEPTH: usize = 20;
/// Documents scored for MRR.
const MRR_AT: usize = 10;

/// One line of a questions file.
#[derive(Debug, Clone, Deserialize)]
pub struct Question {
    pub question: String,
    /// The title of the document that answers it; `null` (or absent, with no `id`) when the
    /// collection cannot answer it.
    #[serde(default)]
    pub title: Option<String>,
    /// The answering document's id, instead of its title.
    #[serde(default)]
    pub id: Option<i64>,
    /// Any label to break the figures down by (`paraphrase`, `keyword`, ...).
    #[serde(default)]
    pub kind: Option<String>,
}

impl Question {
    fn answerable(&self) -> bool {
        self.title.is_some() || self.id.is_some()
    }
}

/// Reads JSON lines of [`Question`]s; blank lines are skipped, a bad line is an error naming it.
pub fn read_questions(path: &std::path::Path) -> anyhow::Result<Vec<Question>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let questions: Vec<Question> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))
        })
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(!questions.is_empty(), "{} has no questions", path.display());
    Ok(questions)
}

/// Recall and rank figures over a set of answerable questions.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Ranks {
    pub questions: usize,
    pub recall_at_1: f64,
    pub recall_at_5: f64,
    pub mrr_at_10: f64,
}

impl Ranks {
    /// From the 1-based rank of the right document for each question (`None`: not found).
    pub fn of(ranks: &[Option<usize>]) -> Self {
        let n = ranks.len();
        if n == 0 {
            return Self::default();
        }
        let share = |f: &dyn Fn(usize) -> f64| {
            ranks.iter().map(|r| r.map_or(0.0, f)).sum::<f64>() / n as f64
        };
        Self {
            questions: n,
            recall_at_1: share(&|r| f64::from(u8::from(r == 1))),
            recall_at_5: share(&|r| f64::from(u8::from(r <= 5))),
            mrr_at_10: share(&|r| if r <= MRR_AT { 1.0 / r as f64 } else { 0.0 }),
        }
    }
}

/// The figures of one mode.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    pub mode: Mode,
    #[serde(flatten)]
    pub all: Ranks,
    /// Per `kind`, answerable questions only.
    pub kinds: BTreeMap<String, Ranks>,
    /// Questions without an answer in the collection.
    pub unanswerable: usize,
    /// Share of them that `/api/rag/query` would refuse with 404 (higher is better).
    pub refused_unanswerable: f64,
    /// Share of the answerable ones it would refuse (lower is better).
    pub refused_answerable: f64,
    /// Median and 99th percentile search time, in milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Top-1 scores: median over answerable and over unanswerable questions.
    pub median_top_score_answerable: f64,
    pub median_top_score_unanswerable: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub collection: String,
    pub modes: Vec<ModeReport>,
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let i = ((values.len() - 1) as f64 * p).round() as usize;
    values[i]
}

/// The documents of a ranked list of chunks, each once, in order of first appearance.
fn documents(hits: &[crate::store::Hit]) -> Vec<(i64, String)> {
    let mut seen = Vec::new();
    for hit in hits {
        if !seen.iter().any(|(id, _)| *id == hit.document_id) {
            seen.push((hit.document_id, hit.title.clone()));
        }
    }
    seen
}

impl Rag {
    /// Runs every question through each mode and measures where the right document ranks.
    pub async fn evaluate(
        &self,
        collection: &str,
        questions: &[Question],
        modes: &[Mode],
    ) -> anyhow::Result<Report> {
        let mut reports = Vec::new();
        for &mode in modes {
            let mut ranks = Vec::new();
            let mut by_kind: BTreeMap<String, Vec<Option<usize>>> = BTreeMap::new();
            let (mut refused_yes, mut refused_no) = (0usize, 0usize);
            let mut times = Vec::new();
            let (mut top_yes, mut top_no) = (Vec::new(), Vec::new());
            for q in questions {
                let params = SearchParams {
                    query: q.question.clone(),
                    collection: collection.to_string(),
                    top_k: DEPTH,
                    mode,
                    filter: Map::new(),
                    min_score: None,
                };
                let started = Instant::now();
                let hits = self.search(&params).await?;
                times.push(started.elapsed().as_secs_f64() * 1000.0);
                let refused = !Rag::relevant(&hits);
                let top = hits.first().map_or(0.0, |h| f64::from(h.score));
                if !q.answerable() {
                    refused_no += usize::from(refused);
                    top_no.push(top);
                    continue;
                }
                refused_yes += usize::from(refused);
                top_yes.push(top);
                let rank = documents(&hits)
                    .iter()
                    .position(|(id, title)| {
                        q.id.is_some_and(|want| want == *id) || q.title.as_deref() == Some(title)
                    })
                    .map(|i| i + 1);
                ranks.push(rank);
                if let Some(kind) = &q.kind {
                    by_kind.entry(kind.clone()).or_default().push(rank);
                }
            }
            let unanswerable = questions.len() - ranks.len();
            let share = |k: usize, n: usize| if n == 0 { 0.0 } else { k as f64 / n as f64 };
            reports.push(ModeReport {
                mode,
                all: Ranks::of(&ranks),
                kinds: by_kind
                    .iter()
                    .map(|(k, r)| (k.clone(), Ranks::of(r)))
                    .collect(),
                unanswerable,
                refused_unanswerable: share(refused_no, unanswerable),
                refused_answerable: share(refused_yes, ranks.len()),
                p50_ms: percentile(&mut times, 0.5),
                p99_ms: percentile(&mut times, 0.99),
                median_top_score_answerable: percentile(&mut top_yes, 0.5),
                median_top_score_unanswerable: percentile(&mut top_no, 0.5),
            });
        }
        Ok(Report {
            collection: collection.to_string(),
            modes: reports,
        })
    }
}

impl Rag {
    /// Writes, for each question, every candidate chunk of a deep vector and text search with both
    /// of its raw scores (cosine, normalised BM25): what fusion is tuned on.
    pub async fn dump_candidates(
        &self,
        collection: &str,
        questions: &[Question],
        path: &std::path::Path,
    ) -> anyhow::Result<()> {
        use std::io::Write;
        let store = self.database.store()?;
        let service = self.embeddings.get()?;
        let filter = Map::new();
        let scope = crate::store::Scope {
            collection,
            limit: 100,
            filter: &filter,
        };
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for q in questions {
            let vector = service
                .embed(vec![q.question.clone()], true)
                .await?
                .remove(0)
                .vector;
            let by_vector = store.vector_search(scope, &vector).await?;
            let by_text = store.text_search(scope, &q.question).await?;
            let mut rows: BTreeMap<i64, serde_json::Value> = BTreeMap::new();
            for h in &by_vector {
                rows.insert(h.chunk_id, serde_json::json!({"doc": h.document_id, "title": h.title, "cos": h.score, "text": 0.0}));
            }
            for h in &by_text {
                rows.entry(h.chunk_id).or_insert_with(
                    || serde_json::json!({"doc": h.document_id, "title": h.title, "cos": null}),
                )["text"] = h.score.into();
            }
            let line = serde_json::json!({"question": q.question, "title": q.title, "kind": q.kind,
                "candidates": rows.into_values().collect::<Vec<_>>()});
            writeln!(out, "{line}")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "collection '{}' (document level; 404 = what /api/rag/query would refuse)",
            self.collection
        )?;
        writeln!(
            f,
            "{:<7} {:>4} {:>6} {:>6} {:>7} {:>9} {:>10} {:>7} {:>7} {:>13}",
            "mode",
            "n",
            "r@1",
            "r@5",
            "MRR@10",
            "404 unans",
            "404 answer",
            "p50 ms",
            "p99 ms",
            "top1 yes/no"
        )?;
        for m in &self.modes {
            writeln!(
                f,
                "{:<7} {:>4} {:>6.3} {:>6.3} {:>7.3} {:>9.3} {:>10.3} {:>7.1} {:>7.1} {:>6.3}/{:.3}",
                m.mode.as_str(),
                m.all.questions,
                m.all.recall_at_1,
                m.all.recall_at_5,
                m.all.mrr_at_10,
                m.refused_unanswerable,
                m.refused_answerable,
                m.p50_ms,
                m.p99_ms,
                m.median_top_score_answerable,
                m.median_top_score_unanswerable,
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "{:<7} {:<14} {:>4} {:>6} {:>6} {:>7}",
            "mode", "kind", "n", "r@1", "r@5", "MRR@10"
        )?;
        for m in &self.modes {
            for (kind, r) in &m.kinds {
                writeln!(
                    f,
                    "{:<7} {:<14} {:>4} {:>6.3} {:>6.3} {:>7.3}",
                    m.mode.as_str(),
                    kind,
                    r.questions,
                    r.recall_at_1,
                    r.recall_at_5,
                    r.mrr_at_10
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_give_recall_and_reciprocal_rank() {
        let r = Ranks::of(&[Some(1), Some(3), None, Some(11)]);
        assert_eq!(r.questions, 4);
        assert!((r.recall_at_1 - 0.25).abs() < 1e-9);
        assert!((r.recall_at_5 - 0.5).abs() < 1e-9);
        assert!((r.mrr_at_10 - (1.0 + 1.0 / 3.0) / 4.0).abs() < 1e-9);
    }
}
