//! Shared application state: the models, each in a slot that fills once it is loaded and warm.

use std::sync::{Arc, OnceLock};

use crate::inference::{EmbeddingService, InferenceError};

/// A model that is loading in the background; requests before it is ready get 503.
pub struct Slot<T> {
    name: String,
    value: OnceLock<Arc<T>>,
}

impl<T> Slot<T> {
    pub fn empty(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value: OnceLock::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Fills the slot; a second fill is ignored.
    pub fn fill(&self, value: T) {
        let _ = self.value.set(Arc::new(value));
    }

    pub fn is_ready(&self) -> bool {
        self.value.get().is_some()
    }

    pub fn get(&self) -> Result<Arc<T>, InferenceError> {
        self.value
            .get()
            .cloned()
            .ok_or_else(|| InferenceError::NotReady {
                model: self.name.clone(),
            })
    }
}

#[derive(Clone)]
pub struct AppState {
    pub embeddings: Arc<Slot<EmbeddingService>>,
}

impl AppState {
    pub fn new(embedding_model_name: impl Into<String>) -> Self {
        Self {
            embeddings: Arc::new(Slot::empty(embedding_model_name)),
        }
    }

    /// Names of the configured models that are not loaded and warm yet.
    pub fn not_ready(&self) -> Vec<String> {
        let slots = [(self.embeddings.name(), self.embeddings.is_ready())];
        slots
            .into_iter()
            .filter(|(_, ready)| !ready)
            .map(|(name, _)| name.to_string())
            .collect()
    }
}
