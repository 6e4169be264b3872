//! Retrieval-augmented answers: chunking and ingestion, hybrid retrieval (vector and full text,
//! fused by a weighted sum of scores on one [0, 1] scale), and the prompt that grounds a chat answer in what was found. Storage is
//! behind [`crate::store::Store`]; embeddings come from the embedding model's pool.

pub mod chunk;
pub mod eval;
pub mod ingest_files;
mod prompt;
mod search;

use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub use chunk::{Chunker, Piece};
pub use prompt::{LOCAL_CONTEXT_TOKENS, UPSTREAM_CONTEXT_TOKENS, excerpt, messages, passages};
pub use search::{Mode, RELEVANCE_THRESHOLD, SearchParams, fuse, vector_score, vector_weight};

use crate::inference::{EmbeddingService, InferenceError, Slot};
use crate::store::{Database, Inserted, NewChunk, NewDocument, StoreError};

/// Chunks sent to the embedding pool per job: long chunks make a full forward pass at 16 already.
const EMBED_BATCH: usize = 16;
/// Jobs of one document in the pool's queue at once: enough to keep every worker busy on a long
/// document, few enough that it never takes the whole queue from other clients.
const EMBED_JOBS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum RagError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Inference(#[from] InferenceError),
    /// The embedding model (and with it the chunker) is still loading.
    #[error("model {0} is loading")]
    NotReady(String),
    #[error("the document has no text to index")]
    Empty,
    #[error("chunking failed: {0}")]
    Chunking(String),
}

/// A document to ingest.
#[derive(Debug, Clone)]
pub struct NewText {
    pub collection: String,
    pub title: String,
    pub content: String,
    pub source: Option<String>,
    pub metadata: Map<String, Value>,
}

pub struct Rag {
    pub database: Arc<Database>,
    embeddings: Arc<Slot<EmbeddingService>>,
    /// Filled once the embedding model is loaded: chunks are sized by its tokenizer.
    chunker: OnceLock<Arc<Chunker>>,
}

/// White space as both the chunker (Rust's `char::is_whitespace`, which trims U+0085) and the
/// schema's pattern (JavaScript's `\s`, which holds U+FEFF) count it: a text of nothing else has
/// nothing to index.
fn blank(c: char) -> bool {
    c.is_whitespace() || c == '\u{feff}'
}

/// sha256 of the content, hex.
pub fn content_hash(content: &str) -> String {
    Sha256::digest(content.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Rag {
    pub fn new(database: Arc<Database>, embeddings: Arc<Slot<EmbeddingService>>) -> Self {
        Self {
            database,
            embeddings,
            chunker: OnceLock::new(),
        }
    }

    pub fn set_chunker(&self, chunker: Chunker) {
        let _ = self.chunker.set(Arc::new(chunker));
    }

    fn chunker(&self) -> Result<Arc<Chunker>, RagError> {
        self.chunker
            .get()
            .cloned()
            .ok_or_else(|| RagError::NotReady(self.embeddings.name().to_string()))
    }

    /// Embeds texts on the inference pool, a batch at a time.
    async fn embed(
        &self,
        service: &EmbeddingService,
        texts: Vec<String>,
    ) -> Result<Vec<Vec<f32>>, RagError> {
        use futures::{StreamExt, TryStreamExt};
        // `buffered` keeps the batches in order while several run on the pool's workers.
        let owned: Vec<Vec<String>> = texts.chunks(EMBED_BATCH).map(<[String]>::to_vec).collect();
        let batches: Vec<Vec<_>> = futures::stream::iter(owned)
            .map(|batch| service.embed(batch, true))
            .buffered(EMBED_JOBS)
            .try_collect()
            .await?;
        Ok(batches.into_iter().flatten().map(|e| e.vector).collect())
    }

    /// Chunks, embeds and stores a document, unless the collection holds the same content already.
    #[tracing::instrument(skip(self, text), fields(collection = %text.collection, chars = text.content.len()))]
    pub async fn ingest(&self, text: NewText) -> Result<Inserted, RagError> {
        if text.content.chars().all(blank) {
            return Err(RagError::Empty);
        }
        let store = self.database.store()?;
        let hash = content_hash(&text.content);
        if let Some(existing) = store.find_document(&text.collection, &hash).await? {
            return Ok(Inserted::Existing(existing));
        }
        let service = self.embeddings.get()?;
        // Refuse a mismatch before the expensive work; the insert checks again in its transaction.
        self.check_dims(&text.collection, service.dims()).await?;
        let chunker = self.chunker()?;
        let content = text.content.clone();
        let pieces = tokio::task::spawn_blocking(move || chunker.split(&content))
            .await
            .map_err(|e| RagError::Chunking(e.to_string()))?;
        if pieces.is_empty() {
            return Err(RagError::Empty);
        }
        let vectors = self
            .embed(&service, pieces.iter().map(|p| p.text.clone()).collect())
            .await?;
        let chunks = pieces
            .into_iter()
            .zip(vectors)
            .map(|(p, embedding)| NewChunk {
                text: p.text,
                start: p.start,
                end: p.end,
                embedding,
            })
            .collect();
        let document = NewDocument {
            collection: text.collection,
            title: text.title,
            source: text.source,
            metadata: text.metadata,
            content_hash: hash,
            chunks,
        };
        Ok(store.insert_document(document, service.dims()).await?)
    }

    async fn check_dims(&self, collection: &str, model: usize) -> Result<bool, RagError> {
        let store = self.database.store()?;
        match store.collection_dims(collection).await? {
            None => Ok(false),
            Some(stored) if stored == model as i64 => Ok(true),
            Some(stored) => Err(StoreError::DimensionMismatch {
                collection: collection.to_string(),
                stored,
                model,
            }
            .into()),
        }
    }
}
