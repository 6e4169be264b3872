//! The embedded store: one SQLite file (created on first run), vectors in sqlite-vec `vec0` tables
//! partitioned by collection, full text in FTS5. Nothing to install or run beside the binary.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Mutex, Once};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Map, Value};
use sqlx::migrate::{MigrateError, Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, SqlSafeStr};

use super::{
    ACQUIRE_TIMEOUT, Collection, Document, DocumentPage, Hit, Inserted, NewDocument, Scope, Store,
    StoreError, StoreResult, bm25_idf, query_words,
};

/// English stop words (PostgreSQL's `english` dictionary list, which the other backend uses): FTS5
/// has no stop words, and with any-word matching "my" or "if" would match nearly every chunk.
const STOP_WORDS: &str = "i me my myself we our ours ourselves you your yours yourself yourselves he him his himself \
    she her hers herself it its itself they them their theirs themselves what which who whom \
    this that these those am is are was were be been being have has had having do does did \
    doing a an the and but if or because as until while of at by for with about against \
    between into through during before after above below to from up down in out on off over \
    under again further then once here there when where why how all any both each few more \
    most other some such no nor not only own same so than too very s t can will just don \
    should now";

/// vec0 answers at most this many neighbours per query; a metadata filter is applied to them.
const MAX_KNN: usize = 4096;

pub struct SqliteStore {
    pool: SqlitePool,
    /// Vector lengths whose `chunk_vectors_<dims>` table is known to exist.
    vector_tables: Mutex<HashSet<usize>>,
}

fn migrator() -> Migrator {
    Migrator::with_migrations(vec![Migration::new(
        1,
        "rag".into(),
        MigrationType::Simple,
        include_str!("../../migrations/sqlite/0001_rag.sql").into_sql_str(),
        false,
    )])
}

/// Opens the pool and applies the migrations its file lacks. Servers opening one new file at once
/// race: SQLite's migrator takes no lock, so the one that commits second finds the tables it creates
/// already there (`table collections already exists`), and switching a new file to WAL can meet
/// another server's connection (`database is locked`). Each migration commits with its bookkeeping
/// row, so trying again a moment later finds the other server's work done and goes on.
async fn connect(options: SqliteConnectOptions) -> StoreResult<SqlitePool> {
    const ATTEMPTS: u32 = 5;
    // Another server's opening takes milliseconds; an attempt that failed after waiting out the
    // busy timeout met a lock held for longer, which trying again will not outlast.
    const RACE: Duration = Duration::from_secs(1);
    let mut attempt = 1;
    loop {
        let started = std::time::Instant::now();
        let error = match connect_once(options.clone()).await {
            Ok(pool) => return Ok(pool),
            Err(e) => e,
        };
        if attempt == ATTEMPTS || started.elapsed() > RACE || !raced(&error) {
            return Err(error.into());
        }
        tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
        attempt += 1;
    }
}

async fn connect_once(options: SqliteConnectOptions) -> Result<SqlitePool, MigrateError> {
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await?;
    migrator().run(&pool).await?;
    Ok(pool)
}

/// Whether `error` may be another server opening the same file: a migration that failed to
/// execute, or SQLite's busy or locked (primary codes 5 and 6, with their extended codes).
fn raced(error: &MigrateError) -> bool {
    match error {
        MigrateError::ExecuteMigration(..) => true,
        MigrateError::Execute(sqlx::Error::Database(db)) => db
            .code()
            .and_then(|code| code.parse::<u32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 5 | 6)),
        _ => false,
    }
}

/// Registers the statically linked sqlite-vec with SQLite, so that every connection opened after
/// this has the `vec0` module and `vec_*` functions. `sqlite3_auto_extension` is process-wide.
fn register_sqlite_vec() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: `sqlite3_vec_init` is sqlite-vec's extension entry point, which has exactly the
        // signature SQLite expects of an auto extension; the crate declares it without arguments,
        // hence the transmute. Both link the one SQLite that libsqlite3-sys bundles.
        unsafe {
            let init: unsafe extern "C" fn(
                *mut libsqlite3_sys::sqlite3,
                *mut *mut std::os::raw::c_char,
                *const libsqlite3_sys::sqlite3_api_routines,
            ) -> std::os::raw::c_int =
                std::mem::transmute(sqlite_vec::sqlite3_vec_init as *const ());
            libsqlite3_sys::sqlite3_auto_extension(Some(init));
        }
    });
}

fn vector_table(dims: usize) -> String {
    format!("chunk_vectors_{dims}")
}

fn to_blob(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `AND d.metadata -> '$."key"' = json(value)` per filter key, and the values to bind, in order.
fn filter_sql(filter: &Map<String, Value>) -> (String, Vec<String>) {
    let mut sql = String::new();
    let mut binds = Vec::new();
    for (key, value) in filter {
        sql.push_str(" AND d.metadata -> ? = json(?)");
        binds.push(format!("$.\"{}\"", key.replace('"', "\"\"")));
        binds.push(value.to_string());
    }
    (sql, binds)
}

fn document(row: &SqliteRow) -> StoreResult<Document> {
    let metadata: String = row.try_get("metadata")?;
    Ok(Document {
        id: row.try_get("id")?,
        collection: row.try_get("collection")?,
        title: row.try_get("title")?,
        source: row.try_get("source")?,
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
        content_hash: row.try_get("content_hash")?,
        chunks: row.try_get("chunks")?,
        created_at: row.try_get("created_at")?,
    })
}

fn hit(row: &SqliteRow, score: f32) -> StoreResult<Hit> {
    Ok(Hit {
        chunk_id: row.try_get("chunk_id")?,
        document_id: row.try_get("document_id")?,
        title: row.try_get("title")?,
        text: row.try_get("text")?,
        score,
    })
}

const DOCUMENT_COLUMNS: &str = "d.id, c.name AS collection, d.title, d.source, d.metadata, \
    d.content_hash, d.created_at, (SELECT count(*) FROM chunks k WHERE k.document_id = d.id) AS chunks";

impl SqliteStore {
    pub async fn open(url: &str) -> StoreResult<Self> {
        register_sqlite_vec();
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Url(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            // Writers take turns; a writer waits this long for its turn before failing.
            .busy_timeout(Duration::from_secs(10))
            // Vector search scans the collection's vectors: reading them through a memory map
            // instead of copying every page into SQLite's small page cache keeps a 100k-chunk scan
            // (150 MB of vectors) fast. Address space only; the OS page cache holds the data.
            .pragma("mmap_size", (1u64 << 34).to_string());
        if let Some(dir) = options.get_filename().parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Url(format!("cannot create the folder {}: {e}", dir.display()))
            })?;
        }
        let pool = connect(options).await?;
        Ok(Self {
            pool,
            vector_tables: Mutex::new(HashSet::new()),
        })
    }

    #[tracing::instrument(skip(self))]
    async fn ensure_vector_table(&self, dims: usize) -> StoreResult<()> {
        if self
            .vector_tables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&dims)
        {
            return Ok(());
        }
        let sql = format!(
            "CREATE VIRTUAL TABLE IF NOT EXISTS {} USING vec0(chunk_id INTEGER PRIMARY KEY, \
             collection_id INTEGER PARTITION KEY, embedding float[{dims}] distance_metric=cosine)",
            vector_table(dims)
        );
        sqlx::query(AssertSqlSafe(sql)).execute(&self.pool).await?;
        self.vector_tables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dims);
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    async fn find(&self, collection: &str, content_hash: &str) -> StoreResult<Option<Document>> {
        let sql = format!(
            "SELECT {DOCUMENT_COLUMNS} FROM documents d JOIN collections c ON c.id = d.collection_id \
             WHERE c.name = ? AND d.content_hash = ?"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(collection)
            .bind(content_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(document).transpose()
    }

    #[tracing::instrument(skip(self, doc), fields(collection = %doc.collection, chunks = doc.chunks.len()))]
    async fn insert(&self, doc: NewDocument, dims: usize) -> StoreResult<Inserted> {
        self.ensure_vector_table(dims).await?;
        // BEGIN IMMEDIATE takes the write lock now (waiting up to the busy timeout) rather than at
        // the first write, where a concurrent writer would make SQLite fail the transaction.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "INSERT INTO collections (name, dims) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&doc.collection)
        .bind(dims as i64)
        .execute(&mut *tx)
        .await?;
        let (collection_id, stored): (i64, i64) =
            sqlx::query_as("SELECT id, dims FROM collections WHERE name = ?")
                .bind(&doc.collection)
                .fetch_one(&mut *tx)
                .await?;
        if stored != dims as i64 {
            return Err(StoreError::DimensionMismatch {
                collection: doc.collection,
                stored,
                model: dims,
            });
        }
        let inserted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO documents (collection_id, title, source, metadata, content_hash) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (collection_id, content_hash) DO NOTHING RETURNING id",
        )
        .bind(collection_id)
        .bind(&doc.title)
        .bind(&doc.source)
        .bind(Value::Object(doc.metadata.clone()).to_string())
        .bind(&doc.content_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(document_id) = inserted else {
            drop(tx);
            let existing = self.find(&doc.collection, &doc.content_hash).await?;
            return existing.map(Inserted::Existing).ok_or_else(|| {
                StoreError::Database(sqlx::Error::Protocol(
                    "the document vanished while being inserted".into(),
                ))
            });
        };
        let vectors = format!(
            "INSERT INTO {} (chunk_id, collection_id, embedding) VALUES (?, ?, ?)",
            vector_table(dims)
        );
        for (ordinal, chunk) in doc.chunks.iter().enumerate() {
            let chunk_id: i64 = sqlx::query_scalar(
                "INSERT INTO chunks (document_id, collection_id, ordinal, text, start_char, end_char) \
                 VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            )
            .bind(document_id)
            .bind(collection_id)
            .bind(ordinal as i64)
            .bind(&chunk.text)
            .bind(chunk.start as i64)
            .bind(chunk.end as i64)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query(AssertSqlSafe(vectors.as_str()))
                .bind(chunk_id)
                .bind(collection_id)
                .bind(to_blob(&chunk.embedding))
                .execute(&mut *tx)
                .await?;
        }
        let sql = format!(
            "SELECT {DOCUMENT_COLUMNS} FROM documents d JOIN collections c ON c.id = d.collection_id WHERE d.id = ?"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(document_id)
            .fetch_one(&mut *tx)
            .await?;
        let stored = document(&row)?;
        tx.commit().await?;
        Ok(Inserted::New(stored))
    }

    #[tracing::instrument(skip(self))]
    async fn delete(&self, id: i64) -> StoreResult<bool> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let dims: Option<i64> = sqlx::query_scalar(
            "SELECT c.dims FROM documents d JOIN collections c ON c.id = d.collection_id WHERE d.id = ?",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(dims) = dims else {
            return Ok(false);
        };
        let chunk_ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM chunks WHERE document_id = ?")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
        let table = vector_table(dims as usize);
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?)",
        )
        .bind(&table)
        .fetch_one(&mut *tx)
        .await?;
        if exists {
            let sql = format!("DELETE FROM {table} WHERE chunk_id = ?");
            for chunk_id in chunk_ids {
                sqlx::query(AssertSqlSafe(sql.as_str()))
                    .bind(chunk_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        // The chunks (and through their trigger, the full-text index) go with the document.
        sqlx::query("DELETE FROM documents WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    #[tracing::instrument(skip(self))]
    async fn list_collections(&self) -> StoreResult<Vec<Collection>> {
        let rows = sqlx::query(
            "SELECT c.name, c.dims, \
               (SELECT count(*) FROM documents d WHERE d.collection_id = c.id) AS documents, \
               (SELECT count(*) FROM chunks k WHERE k.collection_id = c.id) AS chunks \
             FROM collections c ORDER BY c.name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Collection {
                    name: row.try_get("name")?,
                    dims: row.try_get("dims")?,
                    documents: row.try_get("documents")?,
                    chunks: row.try_get("chunks")?,
                })
            })
            .collect()
    }

    #[tracing::instrument(skip(self))]
    async fn dims(&self, collection: &str) -> StoreResult<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT dims FROM collections WHERE name = ?")
                .bind(collection)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    #[tracing::instrument(skip(self))]
    async fn page(&self, collection: &str, offset: i64, limit: i64) -> StoreResult<DocumentPage> {
        let total: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM documents d JOIN collections c ON c.id = d.collection_id WHERE c.name = ?",
        )
        .bind(collection)
        .fetch_one(&self.pool)
        .await?;
        let sql = format!(
            "SELECT {DOCUMENT_COLUMNS} FROM documents d JOIN collections c ON c.id = d.collection_id \
             WHERE c.name = ? ORDER BY d.id DESC LIMIT ? OFFSET ?"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(collection)
            .bind(limit)
            .bind(offset)
            .fetch_all(&self.pool)
            .await?;
        Ok(DocumentPage {
            documents: rows.iter().map(document).collect::<StoreResult<_>>()?,
            total,
        })
    }

    /// vec0's KNN is an exact scan of the collection's partition, so this is also the exact search.
    #[tracing::instrument(skip(self, scope, vector), fields(collection = scope.collection, k = scope.limit))]
    async fn knn(&self, scope: Scope<'_>, vector: &[f32]) -> StoreResult<Vec<Hit>> {
        let table = vector_table(vector.len());
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?)",
        )
        .bind(&table)
        .fetch_one(&self.pool)
        .await?;
        if !exists {
            return Ok(Vec::new());
        }
        let Some(collection_id) = self.collection_id(scope.collection).await? else {
            return Ok(Vec::new());
        };
        let (filter, binds) = filter_sql(scope.filter);
        // Filters apply after the KNN: ask for more neighbours then, so that enough survive.
        let k = if scope.filter.is_empty() {
            scope.limit
        } else {
            MAX_KNN
        };
        let sql = format!(
            "WITH knn AS (SELECT chunk_id, distance FROM {table} \
               WHERE embedding MATCH ? AND k = ? AND collection_id = ?) \
             SELECT k.id AS chunk_id, k.document_id, d.title, k.text, knn.distance \
             FROM knn JOIN chunks k ON k.id = knn.chunk_id JOIN documents d ON d.id = k.document_id \
             WHERE 1 = 1{filter} ORDER BY knn.distance LIMIT ?"
        );
        let mut query = sqlx::query(AssertSqlSafe(sql))
            .bind(to_blob(vector))
            .bind(k.min(MAX_KNN) as i64)
            .bind(collection_id);
        for value in binds {
            query = query.bind(value);
        }
        let mut rows = query.bind(scope.limit as i64).fetch_all(&self.pool).await?;
        // A selective filter may leave fewer than `limit` of the MAX_KNN neighbours: then scan the
        // filtered chunks themselves, looking each vector up by its chunk id (exact, and cheap
        // because the filter is selective).
        if !scope.filter.is_empty() && rows.len() < scope.limit {
            let (filter, binds) = filter_sql(scope.filter);
            let sql = format!(
                "SELECT k.id AS chunk_id, k.document_id, d.title, k.text, \
                   vec_distance_cosine(v.embedding, ?) AS distance \
                 FROM chunks k JOIN documents d ON d.id = k.document_id \
                 JOIN {table} v ON v.chunk_id = k.id \
                 WHERE k.collection_id = ?{filter} ORDER BY distance LIMIT ?"
            );
            let mut query = sqlx::query(AssertSqlSafe(sql))
                .bind(to_blob(vector))
                .bind(collection_id);
            for value in binds {
                query = query.bind(value);
            }
            rows = query.bind(scope.limit as i64).fetch_all(&self.pool).await?;
        }
        rows.iter()
            .map(|row| {
                let distance: f64 = row.try_get("distance")?;
                hit(row, 1.0 - distance as f32)
            })
            .collect()
    }

    async fn collection_id(&self, name: &str) -> StoreResult<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM collections WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    #[tracing::instrument(skip(self, scope), fields(collection = scope.collection, k = scope.limit))]
    async fn fts(&self, scope: Scope<'_>, query: &str) -> StoreResult<Vec<Hit>> {
        let mut words: Vec<String> = query_words(query)
            .into_iter()
            .filter(|w| !STOP_WORDS.split_whitespace().any(|s| s == w))
            .collect();
        // Each word once: a repeated word would count twice in bm25() and in the ideal score.
        let mut seen = HashSet::new();
        words.retain(|w| seen.insert(w.clone()));
        if words.is_empty() {
            return Ok(Vec::new());
        }
        // Each word quoted (a string, never an operator); any word may match, bm25 ranks.
        let quoted: Vec<String> = words.iter().map(|w| format!("\"{w}\"")).collect();
        let matcher = quoted.join(" OR ");
        // bm25() takes N and each term's document frequency over the whole index; the same
        // counts give the query's ideal score, which normalises it.
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM chunks")
            .fetch_one(&self.pool)
            .await?;
        let mut ideal = 0.0;
        for term in &quoted {
            let df: i64 =
                sqlx::query_scalar("SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH ?")
                    .bind(term)
                    .fetch_one(&self.pool)
                    .await?;
            // A word the tokenizer drops entirely matches nothing and adds nothing.
            ideal += bm25_idf(n as f64, df as f64);
        }
        let Some(collection_id) = self.collection_id(scope.collection).await? else {
            return Ok(Vec::new());
        };
        let (filter, binds) = filter_sql(scope.filter);
        // CROSS JOIN keeps the full-text index the outer loop (SQLite does not reorder it): the
        // matches are found first, then their chunks and documents looked up by key.
        let sql = format!(
            "SELECT k.id AS chunk_id, k.document_id, d.title, k.text, chunks_fts.rank AS rank \
             FROM chunks_fts CROSS JOIN chunks k ON k.id = chunks_fts.rowid \
             CROSS JOIN documents d ON d.id = k.document_id \
             WHERE chunks_fts MATCH ? AND k.collection_id = ?{filter} ORDER BY chunks_fts.rank LIMIT ?"
        );
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .bind(matcher)
            .bind(collection_id);
        for value in binds {
            q = q.bind(value);
        }
        let rows = q.bind(scope.limit as i64).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                // bm25() is lower-is-better and negative; flip it so that higher is better.
                let rank: f64 = row.try_get("rank")?;
                hit(row, (-rank / ideal).clamp(0.0, 1.0) as f32)
            })
            .collect()
    }
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn connections(&self) -> (u32, usize) {
        (self.pool.size(), self.pool.num_idle())
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.pool.close())
    }

    fn ping(&self) -> BoxFuture<'_, StoreResult<()>> {
        async move {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        }
        .boxed()
    }

    fn find_document<'a>(
        &'a self,
        collection: &'a str,
        content_hash: &'a str,
    ) -> BoxFuture<'a, StoreResult<Option<Document>>> {
        self.find(collection, content_hash).boxed()
    }

    fn insert_document(
        &self,
        document: NewDocument,
        dims: usize,
    ) -> BoxFuture<'_, StoreResult<Inserted>> {
        self.insert(document, dims).boxed()
    }

    fn delete_document(&self, id: i64) -> BoxFuture<'_, StoreResult<bool>> {
        self.delete(id).boxed()
    }

    fn collections(&self) -> BoxFuture<'_, StoreResult<Vec<Collection>>> {
        self.list_collections().boxed()
    }

    fn collection_dims<'a>(
        &'a self,
        collection: &'a str,
    ) -> BoxFuture<'a, StoreResult<Option<i64>>> {
        self.dims(collection).boxed()
    }

    fn documents<'a>(
        &'a self,
        collection: &'a str,
        offset: i64,
        limit: i64,
    ) -> BoxFuture<'a, StoreResult<DocumentPage>> {
        self.page(collection, offset, limit).boxed()
    }

    fn vector_search<'a>(
        &'a self,
        scope: Scope<'a>,
        vector: &'a [f32],
    ) -> BoxFuture<'a, StoreResult<Vec<Hit>>> {
        self.knn(scope, vector).boxed()
    }

    fn exact_vector_search<'a>(
        &'a self,
        scope: Scope<'a>,
        vector: &'a [f32],
    ) -> BoxFuture<'a, StoreResult<Vec<Hit>>> {
        self.knn(scope, vector).boxed()
    }

    fn text_search<'a>(
        &'a self,
        scope: Scope<'a>,
        query: &'a str,
    ) -> BoxFuture<'a, StoreResult<Vec<Hit>>> {
        self.fts(scope, query).boxed()
    }
}
