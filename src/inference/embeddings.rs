//! The embedding service: a loaded, warmed-up embedding model behind its batching worker.

use std::sync::Arc;

use super::source::ModelFiles;
use super::{BatchConfig, Batcher, BertEmbedder, InferenceError, ModelError, SequenceModel};

/// One text's embedding.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub vector: Vec<f32>,
    pub tokens: usize,
    pub truncated: bool,
}

pub struct EmbeddingService {
    name: String,
    dims: usize,
    max_tokens: usize,
    model: Arc<dyn SequenceModel>,
    batcher: Batcher,
}

impl EmbeddingService {
    /// Loads a BERT-family model off the runtime, warms it up with one forward pass and starts its
    /// worker.
    pub async fn load(files: ModelFiles, config: BatchConfig) -> Result<Self, ModelError> {
        let model = tokio::task::spawn_blocking(move || {
            let model = BertEmbedder::load(&files)?;
            let warm = model.tokenize("warm up")?;
            model.forward(&[&warm])?;
            Ok::<_, ModelError>(model)
        })
        .await
        .map_err(|e| ModelError::Load(format!("loader task failed: {e}")))??;
        let max_tokens = model.max_tokens();
        Self::with_model(Arc::new(model), max_tokens, config)
    }

    /// Serves any [`SequenceModel`] (tests use a fake one).
    pub fn with_model(
        model: Arc<dyn SequenceModel>,
        max_tokens: usize,
        config: BatchConfig,
    ) -> Result<Self, ModelError> {
        let name = config.name.clone();
        let dims = model.dims();
        let batcher = Batcher::spawn(model.clone(), config)
            .map_err(|e| ModelError::Load(format!("could not start the worker thread: {e}")))?;
        Ok(Self {
            name,
            dims,
            max_tokens,
            model,
            batcher,
        })
    }

    /// The same model (weights shared, not copied) behind a queue and workers of its own.
    pub fn with_own_pool(&self, config: BatchConfig) -> Result<Self, ModelError> {
        let mut service = Self::with_model(self.model.clone(), self.max_tokens, config)?;
        service.name = self.name.clone();
        Ok(service)
    }

    /// The model, to build on it (a fine-tuned classifier shares its weights).
    pub fn model(&self) -> &Arc<dyn SequenceModel> {
        &self.model
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Longest input in tokens; longer texts are truncated and flagged.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The tokens the model reads of `text`, as [`Self::embed`] would.
    pub fn tokenize(&self, text: &str) -> Result<super::Tokenized, ModelError> {
        self.model.tokenize(text)
    }

    /// Embeds `texts`, L2-normalising each vector when asked.
    pub async fn embed(
        &self,
        texts: Vec<String>,
        normalize: bool,
    ) -> Result<Vec<Embedding>, InferenceError> {
        let pooled = self.batcher.run(texts).await?;
        Ok(pooled
            .into_iter()
            .map(|p| {
                let mut vector = p.vector;
                if normalize {
                    l2_normalize(&mut vector);
                }
                Embedding {
                    vector,
                    tokens: p.tokens,
                    truncated: p.truncated,
                }
            })
            .collect())
    }
}

fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}
