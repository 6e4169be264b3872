//! Document storage for retrieval: one [`Store`] trait, two backends chosen by `DATABASE_URL`
//! (`sqlite://…`, the embedded default with sqlite-vec and FTS5; `postgres://…`, pgvector HNSW and
//! a tsvector GIN index). Each backend runs its own migrations (`migrations/<backend>/`) on open.

mod postgres;
mod sqlite;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Map, Value};

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// How long a request waits for a database connection before it is answered 503. Short, so that a
/// database outage is reported at once instead of holding requests for sqlx's default 30 s.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// A document with its chunks, ready to be written in one transaction.
#[derive(Debug, Clone)]
pub struct NewDocument {
    pub collection: String,
    pub title: String,
    pub source: Option<String>,
    pub metadata: Map<String, Value>,
    /// sha256 of the content, hex: the same content in the same collection is stored once.
    pub content_hash: String,
    pub chunks: Vec<NewChunk>,
}

#[derive(Debug, Clone)]
pub struct NewChunk {
    pub text: String,
    /// Character (not byte) offsets of the chunk in the document's content.
    pub start: usize,
    pub end: usize,
    pub embedding: Vec<f32>,
}

/// A stored document.
#[derive(Debug, Clone)]
pub struct Document {
    pub id: i64,
    pub collection: String,
    pub title: String,
    pub source: Option<String>,
    pub metadata: Map<String, Value>,
    pub content_hash: String,
    pub chunks: i64,
    /// RFC 3339, UTC.
    pub created_at: String,
}

/// The outcome of an idempotent insert.
#[derive(Debug, Clone)]
pub enum Inserted {
    New(Document),
    /// The collection already held this content: nothing was written.
    Existing(Document),
}

#[derive(Debug, Clone)]
pub struct Collection {
    pub name: String,
    pub dims: i64,
    pub documents: i64,
    pub chunks: i64,
}

/// One page of a collection's documents, newest first.
#[derive(Debug, Clone)]
pub struct DocumentPage {
    pub documents: Vec<Document>,
    pub total: i64,
}

/// A chunk found by a search, best first. `score` is the cosine similarity for a vector search, and
/// for a text search BM25 divided by the query's ideal BM25 (the sum of its terms' IDF: what a
/// chunk of average length holding each query term once would score), capped at 1: the share of the
/// query's information the chunk matches, comparable across queries and backends.
#[derive(Debug, Clone)]
pub struct Hit {
    pub chunk_id: i64,
    pub document_id: i64,
    pub title: String,
    pub text: String,
    pub score: f32,
}

/// Where and how many: the collection, the most results, and metadata that must be equal.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub collection: &'a str,
    pub limit: usize,
    /// Top-level metadata keys and the scalar values they must hold.
    pub filter: &'a Map<String, Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (down, restarting, or every connection busy).
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The collection stores vectors of another length than the embedding model makes.
    #[error(
        "collection '{collection}' stores {stored}-dimensional vectors, but the embedding model makes {model}-dimensional ones; use another collection or the model it was built with"
    )]
    DimensionMismatch {
        collection: String,
        stored: i64,
        model: usize,
    },
    #[error("invalid DATABASE_URL: {0}")]
    Url(String),
    #[error("database migration failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => Self::Unavailable(e.to_string()),
            // Connection exceptions (08) and operator intervention (57: shutdown, starting up).
            sqlx::Error::Database(db)
                if db
                    .code()
                    .is_some_and(|c| c.starts_with("08") || c.starts_with("57")) =>
            {
                Self::Unavailable(e.to_string())
            }
            _ => Self::Database(e),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        match e {
            sqlx::migrate::MigrateError::Execute(inner) => inner.into(),
            e => Self::Migrate(e),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What retrieval needs from a database. Object-safe (boxed futures) so that the backend is picked
/// at run time from `DATABASE_URL`.
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;
    /// The pool's open connections and how many of them are idle (for `/metrics`).
    fn connections(&self) -> (u32, usize);
    /// Closes the pool at shutdown, waiting for checked-out connections to come back.
    fn close(&self) -> BoxFuture<'_, ()>;
    /// A round trip to the database.
    fn ping(&self) -> BoxFuture<'_, StoreResult<()>>;
    /// The document with this content in this collection, if any.
    fn find_document<'a>(
        &'a self,
        collection: &'a str,
        content_hash: &'a str,
    ) -> BoxFuture<'a, StoreResult<Option<Document>>>;
    /// Writes the document and its chunks in one transaction, creating the collection if needed;
    /// returns the existing document instead when the collection holds the same content already.
    /// Every embedding must have `dims` values.
    fn insert_document(
        &self,
        document: NewDocument,
        dims: usize,
    ) -> BoxFuture<'_, StoreResult<Inserted>>;
    /// Deletes a document and its chunks; `false` when there was none.
    fn delete_document(&self, id: i64) -> BoxFuture<'_, StoreResult<bool>>;
    fn collections(&self) -> BoxFuture<'_, StoreResult<Vec<Collection>>>;
    /// The collection's stored vector length, `None` when it does not exist.
    fn collection_dims<'a>(
        &'a self,
        collection: &'a str,
    ) -> BoxFuture<'a, StoreResult<Option<i64>>>;
    fn documents<'a>(
        &'a self,
        collection: &'a str,
        offset: i64,
        limit: i64,
    ) -> BoxFuture<'a, StoreResult<DocumentPage>>;
    /// Nearest chunks by cosine similarity (approximate on PostgreSQL's HNSW index).
    fn vector_search<'a>(
        &'a self,
        scope: Scope<'a>,
        vector: &'a [f32],
    ) -> BoxFuture<'a, StoreResult<Vec<Hit>>>;
    /// Exact nearest chunks by cosine similarity, without any index: the reference for recall.
    fn exact_vector_search<'a>(
        &'a self,
        scope: Scope<'a>,
        vector: &'a [f32],
    ) -> BoxFuture<'a, StoreResult<Vec<Hit>>>;
    /// Best chunks by full-text rank; any of the query's words may match.
    fn text_search<'a>(
        &'a self,
        scope: Scope<'a>,
        query: &'a str,
    ) -> BoxFuture<'a, StoreResult<Vec<Hit>>>;
}

/// Opens the store named by `url` and applies its migrations.
pub async fn open(url: &str) -> StoreResult<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(url).await?))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(PgStore::open(url).await?))
    } else {
        Err(StoreError::Url(format!(
            "'{}' is neither sqlite://… nor postgres://…",
            redact(url)
        )))
    }
}

/// The URL with any password replaced, for logs and error messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The words of a full-text query: runs of letters and digits, lower-cased. Everything else is
/// dropped, so that no query syntax of either backend can be injected.
pub fn query_words(query: &str) -> Vec<String> {
    query
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .take(64)
        .collect()
}

/// BM25's parameters, as SQLite's FTS5 fixes them; the PostgreSQL backend uses the same.
pub const BM25_K1: f64 = 1.2;
pub const BM25_B: f64 = 0.75;

/// BM25's inverse document frequency of a term found in `df` of `n` chunks, as FTS5 computes it
/// (never below a hair above zero, so that a very common word still counts a little).
pub fn bm25_idf(n: f64, df: f64) -> f64 {
    ((n - df + 0.5) / (df + 0.5)).ln().max(1e-6)
}

/// The database behind the RAG routes: opened (and migrated) in the background, retried until it
/// answers, so that the server starts and reports the outage instead of exiting.
pub struct Database {
    url: String,
    store: OnceLock<Arc<dyn Store>>,
    last_error: Mutex<Option<String>>,
}

impl Database {
    /// Closes the pool, if one is open.
    pub async fn close(&self) {
        if let Some(store) = self.store.get() {
            store.close().await;
        }
    }

    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            store: OnceLock::new(),
            last_error: Mutex::new(None),
        }
    }

    /// A database already open (tools and benchmarks).
    pub fn with_store(url: impl Into<String>, store: Arc<dyn Store>) -> Self {
        let database = Self::new(url);
        let _ = database.store.set(store);
        database
    }

    /// The URL, password redacted.
    pub fn url(&self) -> String {
        redact(&self.url)
    }

    /// Opens the store, retrying every `retry` while the database is unreachable.
    pub async fn connect(&self, retry: Duration) -> StoreResult<()> {
        loop {
            match open(&self.url).await {
                Ok(store) => {
                    tracing::info!(url = %self.url(), backend = store.backend(), "database open and migrated");
                    let _ = self.store.set(store);
                    *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    return Ok(());
                }
                Err(StoreError::Unavailable(why)) => {
                    tracing::warn!(url = %self.url(), error = %why, "database not available yet; retrying");
                    *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                    tokio::time::sleep(retry).await;
                }
                // A bad URL, a failed migration, a missing database: retrying will not help.
                Err(e) => return Err(e),
            }
        }
    }

    /// The open store, or why there is none yet.
    pub fn store(&self) -> StoreResult<Arc<dyn Store>> {
        self.store.get().cloned().ok_or_else(|| {
            let why = self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_else(|| "connecting".into());
            StoreError::Unavailable(why)
        })
    }

    /// `None` when the database answers within `timeout`, else why not.
    pub async fn problem(&self, timeout: Duration) -> Option<String> {
        let store = match self.store() {
            Ok(store) => store,
            Err(e) => return Some(e.to_string()),
        };
        match tokio::time::timeout(timeout, store.ping()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!(
                "the database did not answer within {} ms",
                timeout.as_millis()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/rag"),
            "postgres://app:***@db:5432/rag"
        );
        assert_eq!(redact("sqlite://data/aitier.db"), "sqlite://data/aitier.db");
    }

    #[test]
    fn query_words_drop_every_operator() {
        assert_eq!(
            query_words("What is \"XK-4471\" OR *? NEAR(a b)"),
            ["what", "is", "xk", "4471", "or", "near", "a", "b"]
        );
    }
}
