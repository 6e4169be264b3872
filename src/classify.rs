//! Text classification: Hugging Face sequence classifiers and embedding heads behind one type, the
//! registry that finds and caches them, and the training of heads from a labelled CSV.

mod head;
mod registry;
mod segment;
pub mod train;

use std::sync::Arc;

pub use head::{HeadMeta, InferenceMode, LinearHead};
pub use registry::{ClassifierInfo, Classifiers, RegistryConfig};

use crate::inference::{Batcher, EmbeddingService, InferenceError};

/// One text's classification.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub label: String,
    /// Probability of `label`.
    pub score: f32,
    /// Every label with its probability, in the classifier's label order.
    pub scores: Vec<(String, f32)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error("{0}")]
    NotFound(String),
    #[error("invalid classifier: {0}")]
    Invalid(String),
    #[error(transparent)]
    Inference(#[from] InferenceError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A loaded classifier of either kind.
pub enum Classifier {
    /// A softmax-regression head over an embedding model's sentence embeddings.
    Head {
        head: LinearHead,
        meta: HeadMeta,
        embeddings: Arc<EmbeddingService>,
    },
    /// A Hugging Face sequence-classification checkpoint on its own batching pool.
    Transformer {
        labels: Vec<String>,
        batcher: Batcher,
    },
}

impl Classifier {
    pub fn labels(&self) -> &[String] {
        match self {
            Self::Head { meta, .. } => &meta.labels,
            Self::Transformer { labels, .. } => labels,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Head { .. } => "embedding-head",
            Self::Transformer { .. } => "transformers",
        }
    }

    /// Classifies each text.
    pub async fn classify(&self, texts: Vec<String>) -> Result<Vec<Prediction>, ClassifyError> {
        self.classify_with(texts, None).await
    }

    /// Classifies with an explicit inference mode for heads (evaluation compares modes).
    pub async fn classify_with(
        &self,
        texts: Vec<String>,
        mode: Option<InferenceMode>,
    ) -> Result<Vec<Prediction>, ClassifyError> {
        let probabilities = match self {
            Self::Transformer { batcher, .. } => batcher
                .run(texts)
                .await?
                .into_iter()
                .map(|p| head::softmax(&p.vector))
                .collect(),
            Self::Head {
                head,
                meta,
                embeddings,
            } => {
                let mode = mode.unwrap_or(meta.inference);
                let segments: Vec<Vec<String>> = texts
                    .iter()
                    .map(|t| match mode {
                        InferenceMode::Whole => vec![t.clone()],
                        InferenceMode::Sentences => segment::sentences(t),
                    })
                    .collect();
                let flat: Vec<String> = segments.iter().flatten().cloned().collect();
                let vectors = embeddings.embed(flat, meta.normalize).await?;
                let mut vectors = vectors.into_iter();
                segments
                    .iter()
                    .map(|parts| {
                        let per: Vec<Vec<f32>> = vectors
                            .by_ref()
                            .take(parts.len())
                            .map(|e| head.probabilities(&e.vector, &meta.logit_bias))
                            .collect();
                        segment::mean(&per)
                    })
                    .collect::<Vec<_>>()
            }
        };
        let labels = self.labels();
        Ok(probabilities
            .into_iter()
            .map(|p| {
                let best = p
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i);
                Prediction {
                    label: labels[best].clone(),
                    score: p[best],
                    scores: labels.iter().cloned().zip(p).collect(),
                }
            })
            .collect())
    }
}
