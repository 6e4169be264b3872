//! Text classification: one [`Classifier`] trait with two implementations (Hugging Face sequence
//! classifiers, embedding heads), the registry that finds and caches them, and the training of heads
//! from a labelled CSV.

mod head;
pub mod metrics;
mod registry;
mod rng;
pub mod segment;
pub mod soft;
pub mod train;
pub mod tune;

use std::sync::Arc;

use futures::future::BoxFuture;

pub use head::{HeadMeta, InferenceMode, LinearHead, META_FILE};
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

/// A loaded classifier: label probabilities for texts, computed on its own bounded pool.
pub trait Classifier: Send + Sync {
    /// Label names, lower-case, in probability order.
    fn labels(&self) -> &[String];
    /// `embedding-head` or `transformers`.
    fn kind(&self) -> &'static str;
    /// One probability vector per text. `mode` overrides how an embedding head reads texts (the
    /// evaluation command compares modes); other classifiers ignore it.
    fn probabilities(
        &self,
        texts: Vec<String>,
        mode: Option<InferenceMode>,
    ) -> BoxFuture<'_, Result<Vec<Vec<f32>>, ClassifyError>>;
}

impl dyn Classifier {
    /// Classifies each text.
    pub async fn classify(&self, texts: Vec<String>) -> Result<Vec<Prediction>, ClassifyError> {
        self.classify_with(texts, None).await
    }

    pub async fn classify_with(
        &self,
        texts: Vec<String>,
        mode: Option<InferenceMode>,
    ) -> Result<Vec<Prediction>, ClassifyError> {
        let labels = self.labels();
        Ok(self
            .probabilities(texts, mode)
            .await?
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

/// A Hugging Face sequence-classification checkpoint on its own batching pool.
pub struct TransformerClassifier {
    pub labels: Vec<String>,
    pub batcher: Batcher,
}

impl Classifier for TransformerClassifier {
    fn labels(&self) -> &[String] {
        &self.labels
    }

    fn kind(&self) -> &'static str {
        "transformers"
    }

    /// A text the model reads at once gets the model's own answer, as `transformers` gives it. A
    /// longer one, which the model would truncate, is read in windows of whole sentences that each
    /// fit, pooled as an embedding head pools sentences (`segment::pool`: polar windows outweigh
    /// neutral ones, the last counts twice), so that its end, where a review's verdict usually
    /// sits, is not dropped. `mode` `whole` truncates as the model alone does; `sentences` reads
    /// every text sentence by sentence.
    fn probabilities(
        &self,
        texts: Vec<String>,
        mode: Option<InferenceMode>,
    ) -> BoxFuture<'_, Result<Vec<Vec<f32>>, ClassifyError>> {
        Box::pin(async move {
            if mode == Some(InferenceMode::Sentences) {
                let parts = texts.iter().map(|t| segment::sentences(t)).collect();
                return self.pooled(parts).await;
            }
            let whole = self.batcher.run(texts.clone()).await?;
            let mut probabilities: Vec<Vec<f32>> =
                whole.iter().map(|p| head::softmax(&p.vector)).collect();
            let long: Vec<usize> = (0..texts.len()).filter(|&i| whole[i].truncated).collect();
            if long.is_empty() || mode == Some(InferenceMode::Whole) {
                return Ok(probabilities);
            }
            // The limit is what a truncated text was cut to; the specials are an empty text's.
            // One tokenizer call counts every sentence of every long text.
            let limit = whole[long[0]].tokens;
            let sentences: Vec<Vec<String>> = long
                .iter()
                .map(|&i| segment::sentences(&texts[i]))
                .collect();
            let all = std::iter::once(String::new())
                .chain(sentences.iter().flatten().cloned())
                .collect();
            let mut counts = self.batcher.token_counts(all).await?.into_iter();
            let specials = counts.next().unwrap_or(0);
            let parts = sentences
                .iter()
                .map(|s| {
                    let own: Vec<usize> = counts.by_ref().take(s.len()).collect();
                    segment::windows(s, &own, specials, limit)
                })
                .collect();
            for (i, p) in long.into_iter().zip(self.pooled(parts).await?) {
                probabilities[i] = p;
            }
            Ok(probabilities)
        })
    }
}

impl TransformerClassifier {
    /// Each text's parts read one by one, their probabilities pooled into the text's.
    async fn pooled(&self, parts: Vec<Vec<String>>) -> Result<Vec<Vec<f32>>, ClassifyError> {
        let flat: Vec<String> = parts.iter().flatten().cloned().collect();
        let outputs = self.batcher.run(flat).await?;
        let neutral = self.labels.iter().position(|l| l == "neutral");
        let read = outputs.iter().map(|o| head::softmax(&o.vector));
        Ok(segment::pool_parts(&parts, read, neutral, None))
    }
}

/// A softmax-regression head over an embedding model's sentence embeddings. `embeddings` is its own
/// pool over the embedding model's weights (with the classifier's tuned top layers, if it has any), so classification traffic queues apart from `/api/embed`.
pub struct HeadClassifier {
    pub head: LinearHead,
    pub meta: HeadMeta,
    pub embeddings: Arc<EmbeddingService>,
}

impl Classifier for HeadClassifier {
    fn labels(&self) -> &[String] {
        &self.meta.labels
    }

    fn kind(&self) -> &'static str {
        "embedding-head"
    }

    fn probabilities(
        &self,
        texts: Vec<String>,
        mode: Option<InferenceMode>,
    ) -> BoxFuture<'_, Result<Vec<Vec<f32>>, ClassifyError>> {
        Box::pin(async move {
            let segments: Vec<Vec<String>> = texts
                .iter()
                .map(|t| match mode.unwrap_or(self.meta.inference) {
                    InferenceMode::Whole => vec![t.clone()],
                    InferenceMode::Sentences => segment::sentences(t),
                })
                .collect();
            let flat: Vec<String> = segments.iter().flatten().cloned().collect();
            let vectors = self.embeddings.embed(flat, self.meta.normalize).await?;
            let neutral = self.meta.labels.iter().position(|l| l == "neutral");
            let read = vectors
                .iter()
                .map(|e| self.head.probabilities(&e.vector, &self.meta.logit_bias));
            Ok(segment::pool_parts(
                &segments,
                read,
                neutral,
                self.meta.text_sharpening,
            ))
        })
    }
}
