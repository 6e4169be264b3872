//! A model that fills in once it is loaded and warm, shared by the routes that serve it.

use std::sync::{Arc, OnceLock};

use super::InferenceError;

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
        self.fill_shared(Arc::new(value));
    }

    pub fn fill_shared(&self, value: Arc<T>) {
        let _ = self.value.set(value);
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
