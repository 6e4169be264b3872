//! Shared application state: the models, each in a slot that fills once it is loaded and warm.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

use crate::aliases::ModelAliases;
use crate::classify::{Classifiers, RegistryConfig};
use crate::inference::{EmbeddingService, Slot};
use crate::llm::{ChatService, Upstream};
use crate::rag::Rag;

/// The classifier behind `/api/classify/sentiment`, loaded and warmed at start-up.
pub struct Sentiment {
    pub id: String,
    ready: AtomicBool,
}

impl Sentiment {
    pub fn mark_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }
}

/// Begun once, on SIGTERM or ctrl-c: readiness and new requests answer 503, and open streams end
/// with an `error` event saying so, which lets the drain finish.
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

impl Shutdown {
    pub fn begin(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_begun(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes when shutdown begins (at once if it has).
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            tx: watch::channel(false).0,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub embeddings: Arc<Slot<EmbeddingService>>,
    pub classifiers: Arc<Classifiers>,
    /// `None` when no sentiment classifier is configured (handler tests).
    pub sentiment: Option<Arc<Sentiment>>,
    /// The local chat models, each with its own engine, the default first; none when chat is
    /// turned off.
    pub chat: Vec<Arc<Slot<ChatService>>>,
    /// The OpenAI-compatible upstream for chat; `None` when none is configured.
    pub upstream: Option<Arc<Upstream>>,
    /// Most tokens a chat request generates, whatever it asks for.
    pub max_tokens_limit: Option<usize>,
    /// Documents and retrieval; `None` when no database is configured (handler tests).
    pub rag: Option<Arc<Rag>>,
    pub shutdown: Arc<Shutdown>,
    /// Other names for the served models (`--model-aliases`).
    pub aliases: Arc<ModelAliases>,
}

impl AppState {
    pub fn new(
        embedding_model_name: impl Into<String>,
        classifiers: RegistryConfig,
        sentiment: Option<String>,
    ) -> Self {
        let embeddings = Arc::new(Slot::empty(embedding_model_name));
        Self {
            classifiers: Arc::new(Classifiers::new(classifiers, embeddings.clone())),
            embeddings,
            sentiment: sentiment.map(|id| {
                Arc::new(Sentiment {
                    id,
                    ready: AtomicBool::new(false),
                })
            }),
            chat: Vec::new(),
            upstream: None,
            max_tokens_limit: None,
            rag: None,
            shutdown: Arc::default(),
            aliases: Arc::default(),
        }
    }

    /// Serves the RAG routes from this database.
    pub fn with_rag(mut self, database: Arc<crate::store::Database>) -> Self {
        self.rag = Some(Arc::new(Rag::new(database, self.embeddings.clone())));
        self
    }

    /// Serves chat with one more model, which will fill this slot; the first is the default.
    pub fn with_chat(mut self, name: impl Into<String>) -> Self {
        self.chat.push(Arc::new(Slot::empty(name)));
        self
    }

    /// The local chat model called `name` (its served name, aliases resolved), or the default
    /// one for `None`.
    pub fn chat_model(&self, name: Option<&str>) -> Option<&Arc<Slot<ChatService>>> {
        match name {
            None => self.chat.first(),
            Some(name) => self.chat.iter().find(|slot| slot.name() == name),
        }
    }

    /// Routes chat models this server does not run to `upstream`.
    pub fn with_upstream(mut self, upstream: Upstream) -> Self {
        self.upstream = Some(Arc::new(upstream));
        self
    }

    /// Names of the configured models that are not loaded and warm yet.
    pub fn not_ready(&self) -> Vec<String> {
        let mut pending = Vec::new();
        if !self.embeddings.is_ready() {
            pending.push(self.embeddings.name().to_string());
        }
        if let Some(sentiment) = &self.sentiment
            && !sentiment.ready.load(Ordering::Acquire)
        {
            pending.push(format!("classifier {}", sentiment.id));
        }
        for chat in &self.chat {
            match chat.get() {
                Err(_) => pending.push(format!("chat model {}", chat.name())),
                Ok(service) if service.restarting() => pending.push(format!(
                    "chat model {} (its engine restarts after a failure)",
                    chat.name()
                )),
                Ok(_) => {}
            }
        }
        pending
    }
}
