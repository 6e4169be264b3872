//! Models behind small sync traits, and the bounded, batching worker pools that run them off the
//! async runtime. The HTTP layer never touches a tensor.

mod batcher;
mod bert;
mod checkpoint;
mod classifier;
mod embeddings;
mod encoder;
#[doc(hidden)]
pub mod second_core;
mod slot;
pub mod source;

pub use batcher::{BatchConfig, Batcher, Pooled};
pub use bert::BertEmbedder;
pub use classifier::{SequenceClassifier, read_classifier_config};
pub use embeddings::{Embedding, EmbeddingService};
pub use encoder::{
    Batch, Encoder, Grad, LINEAR_NAMES, LayerWeights, NORM_NAMES, Packing, mean_pool,
};
pub use slot::Slot;

/// Makes candle run each forward pass on the calling thread alone, so that each worker is one
/// core's worth of compute. Measured here (2 cores, MiniLM, 32 sentences per request): one thread per
/// batch gave more sentences/s than two threads per batch, whose ops synchronise dozens of times per
/// layer. Leaves an explicit `RAYON_NUM_THREADS` alone. Call before any other thread starts.
pub fn use_one_compute_thread_per_worker() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: called from `main` before the runtime or any other thread exists, so nothing can
        // read the environment concurrently (the reason `set_var` is unsafe).
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
}

/// One text after tokenization and truncation to the model's maximum length.
#[derive(Debug, Clone)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// The text was longer than the model's maximum length and was cut.
    pub truncated: bool,
}

/// A model that turns each tokenized sequence into one vector (a pooled embedding, or logits).
/// Implementations are synchronous and CPU-bound; the [`Batcher`] calls them on its own thread.
pub trait SequenceModel: Send + Sync + 'static {
    fn tokenize(&self, text: &str) -> Result<Tokenized, ModelError>;
    /// One output per input, in order. The batch is never empty.
    fn forward(&self, batch: &[&Tokenized]) -> Result<Vec<Vec<f32>>, ModelError>;
    /// Length of each output vector.
    fn dims(&self) -> usize;
    /// The BERT embedder behind this model, when it is one (fine-tuned classifiers build on it).
    fn as_bert(&self) -> Option<&BertEmbedder> {
        None
    }
}

/// What can go wrong inside a model. `Clone`, because one failed forward pass fails every request
/// that shared the batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("could not load the model: {0}")]
    Load(String),
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    #[error("forward pass failed: {0}")]
    Forward(String),
    #[error("the model panicked: {0}")]
    Panic(String),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        Self::Forward(e.to_string())
    }
}

/// What can go wrong when asking a pool for work.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// The pool's queue is full; the client should retry shortly.
    #[error("the {model} queue is full")]
    Overloaded { model: String },
    /// The model is still loading or warming up.
    #[error("model {model} is not ready yet")]
    NotReady { model: String },
    /// The model failed on this input.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The worker thread is gone (it can only stop when the server shuts down).
    #[error("the {model} worker has stopped")]
    WorkerStopped { model: String },
}
