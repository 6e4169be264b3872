//! The production store: PostgreSQL with pgvector (an HNSW index, cosine distance, per vector
//! length) and full text in a generated tsvector column with a GIN index.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Mutex;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Map, Value};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{
    PgArgumentBuffer, PgConnectOptions, PgHasArrayType, PgPool, PgPoolOptions, PgRow, PgTypeInfo,
};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Encode, Postgres, Row, SqlSafeStr, Type};

use super::{
    ACQUIRE_TIMEOUT, BM25_B, BM25_K1, Collection, Document, DocumentPage, Hit, Inserted,
    NewDocument, Scope, Store, StoreError, StoreResult, query_words,
};

/// HNSW's candidate list while searching: recall against speed. On 100k clustered vectors
/// (benches/rag) 100 gave recall@10 0.94; 200 is the default here.
const EF_SEARCH: usize = 200;
/// Full-text matches (by ts_rank_cd) that BM25 re-scores: enough that the BM25 order is not
/// ts_rank_cd's on any realistic query, few enough to bound the work on a common word.
const CANDIDATES: usize = 1000;

/// A pgvector `vector`, sent in its binary format (the pgvector crate targets sqlx 0.8).
#[derive(Debug, Clone)]
pub struct PgVector<'a>(pub &'a [f32]);

impl Type<Postgres> for PgVector<'_> {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_name("vector")
    }
}

impl PgHasArrayType for PgVector<'_> {
    fn array_type_info() -> PgTypeInfo {
        PgTypeInfo::with_name("_vector")
    }
}

impl Encode<'_, Postgres> for PgVector<'_> {
    fn encode_by_ref(
        &self,
        buf: &mut PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        // pgvector's `vector_recv`: int16 dimensions, int16 unused, then float4s, big-endian.
        let dims = i16::try_from(self.0.len())?;
        buf.extend_from_slice(&dims.to_be_bytes());
        buf.extend_from_slice(&0i16.to_be_bytes());
        for x in self.0 {
            buf.extend_from_slice(&x.to_be_bytes());
        }
        Ok(sqlx::encode::IsNull::No)
    }
}

pub struct PgStore {
    pool: PgPool,
    /// Vector lengths whose HNSW index is known to exist.
    indexes: Mutex<HashSet<usize>>,
}

fn migrator() -> Migrator {
    Migrator::with_migrations(vec![Migration::new(
        1,
        "rag".into(),
        MigrationType::Simple,
        include_str!("../../migrations/postgres/0001_rag.sql").into_sql_str(),
        false,
    )])
}

const DOCUMENT_COLUMNS: &str = "d.id, c.name AS collection, d.title, d.source, d.metadata, d.content_hash, \
    to_char(d.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS created_at, \
    (SELECT count(*) FROM chunks k WHERE k.document_id = d.id) AS chunks";

fn document(row: &PgRow) -> StoreResult<Document> {
    let Json(metadata): Json<Map<String, Value>> = row.try_get("metadata")?;
    Ok(Document {
        id: row.try_get("id")?,
        collection: row.try_get("collection")?,
        title: row.try_get("title")?,
        source: row.try_get("source")?,
        metadata,
        content_hash: row.try_get("content_hash")?,
        chunks: row.try_get("chunks")?,
        created_at: row.try_get("created_at")?,
    })
}

fn hit(row: &PgRow, score: f32) -> StoreResult<Hit> {
    Ok(Hit {
        chunk_id: row.try_get("chunk_id")?,
        document_id: row.try_get("document_id")?,
        title: row.try_get("title")?,
        text: row.try_get("text")?,
        score,
    })
}

impl PgStore {
    pub async fn open(url: &str) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Url(e.to_string()))?
            .application_name("aitier")
            // sqlx prepares every statement; after five runs PostgreSQL may switch to a generic
            // plan that ignores the parameters' values, and for a full-text query that plan scans
            // the whole collection (measured: 260 ms instead of 20 ms at 100k chunks). Planning
            // each query costs well under a millisecond.
            .options([("plan_cache_mode", "force_custom_plan")]);
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        migrator().run(&pool).await?;
        Ok(Self {
            pool,
            indexes: Mutex::new(HashSet::new()),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The partial HNSW index over the chunks of this vector length. Built once per length; its
    /// `WHERE dims = N` and expression must match the search's for the planner to use it.
    #[tracing::instrument(skip(self))]
    async fn ensure_index(&self, dims: usize) -> StoreResult<()> {
        if self
            .indexes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&dims)
        {
            return Ok(());
        }
        let sql = format!(
            "CREATE INDEX IF NOT EXISTS chunks_embedding_{dims}_hnsw ON chunks \
             USING hnsw ((embedding::vector({dims})) vector_cosine_ops) WHERE dims = {dims}"
        );
        // Two servers on one database (replicas) may both see the index missing; `IF NOT EXISTS`
        // alone then fails one of them on the catalog's unique name. A transaction-scoped
        // advisory lock makes them take turns.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('aitier_chunks_hnsw'))")
            .execute(&mut *tx)
            .await?;
        sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
        tx.commit().await?;
        self.indexes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dims);
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    async fn find(&self, collection: &str, content_hash: &str) -> StoreResult<Option<Document>> {
        let sql = format!(
            "SELECT {DOCUMENT_COLUMNS} FROM documents d JOIN collections c ON c.id = d.collection_id \
             WHERE c.name = $1 AND d.content_hash = $2"
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
        self.ensure_index(dims).await?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO collections (name, dims) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&doc.collection)
        .bind(dims as i32)
        .execute(&mut *tx)
        .await?;
        let (collection_id, stored): (i64, i32) =
            sqlx::query_as("SELECT id, dims FROM collections WHERE name = $1")
                .bind(&doc.collection)
                .fetch_one(&mut *tx)
                .await?;
        if stored as usize != dims {
            return Err(StoreError::DimensionMismatch {
                collection: doc.collection,
                stored: stored.into(),
                model: dims,
            });
        }
        let inserted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO documents (collection_id, title, source, metadata, content_hash) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (collection_id, content_hash) DO NOTHING RETURNING id",
        )
        .bind(collection_id)
        .bind(&doc.title)
        .bind(&doc.source)
        .bind(Json(&doc.metadata))
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
        let ordinals: Vec<i32> = (0..doc.chunks.len() as i32).collect();
        let texts: Vec<&str> = doc.chunks.iter().map(|c| c.text.as_str()).collect();
        let starts: Vec<i32> = doc.chunks.iter().map(|c| c.start as i32).collect();
        let ends: Vec<i32> = doc.chunks.iter().map(|c| c.end as i32).collect();
        let vectors: Vec<PgVector<'_>> =
            doc.chunks.iter().map(|c| PgVector(&c.embedding)).collect();
        // One statement for every chunk: arrays unnested server-side.
        sqlx::query(
            "INSERT INTO chunks (document_id, collection_id, dims, ordinal, text, start_char, end_char, embedding) \
             SELECT $1, $2, $3, t.ordinal, t.text, t.start_char, t.end_char, t.embedding \
             FROM UNNEST($4::int4[], $5::text[], $6::int4[], $7::int4[], $8::vector[]) \
               AS t (ordinal, text, start_char, end_char, embedding)",
        )
        .bind(document_id)
        .bind(collection_id)
        .bind(dims as i32)
        .bind(ordinals)
        .bind(texts)
        .bind(starts)
        .bind(ends)
        .bind(vectors)
        .execute(&mut *tx)
        .await?;
        let sql = format!(
            "SELECT {DOCUMENT_COLUMNS} FROM documents d JOIN collections c ON c.id = d.collection_id WHERE d.id = $1"
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
        // The chunks go with their document (ON DELETE CASCADE).
        let deleted = sqlx::query("DELETE FROM documents WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(deleted.rows_affected() > 0)
    }

    #[tracing::instrument(skip(self))]
    async fn list_collections(&self) -> StoreResult<Vec<Collection>> {
        let rows = sqlx::query(
            "SELECT c.name, c.dims::int8 AS dims, \
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
            sqlx::query_scalar("SELECT dims::int8 FROM collections WHERE name = $1")
                .bind(collection)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    #[tracing::instrument(skip(self))]
    async fn page(&self, collection: &str, offset: i64, limit: i64) -> StoreResult<DocumentPage> {
        let total: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM documents d JOIN collections c ON c.id = d.collection_id WHERE c.name = $1",
        )
        .bind(collection)
        .fetch_one(&self.pool)
        .await?;
        let sql = format!(
            "SELECT {DOCUMENT_COLUMNS} FROM documents d JOIN collections c ON c.id = d.collection_id \
             WHERE c.name = $1 ORDER BY d.id DESC LIMIT $2 OFFSET $3"
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

    /// Nearest chunks on the HNSW index. Iterative scans keep walking the graph until enough rows
    /// pass the collection and metadata filters (pgvector 0.8), so a small collection in a large
    /// table still gets its k results.
    #[tracing::instrument(skip(self, scope, vector), fields(collection = scope.collection, k = scope.limit))]
    async fn knn(&self, scope: Scope<'_>, vector: &[f32], exact: bool) -> StoreResult<Vec<Hit>> {
        let dims = vector.len();
        let mut tx = self.pool.begin().await?;
        // SET LOCAL: these settings end with the transaction, not with the pooled connection.
        if exact {
            sqlx::query("SET LOCAL enable_indexscan = off")
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query(AssertSqlSafe(format!(
                "SET LOCAL hnsw.ef_search = {EF_SEARCH}"
            )))
            .execute(&mut *tx)
            .await?;
            sqlx::query("SET LOCAL hnsw.iterative_scan = relaxed_order")
                .execute(&mut *tx)
                .await?;
        }
        // The nearest chunks come from `chunks` alone, so that the planner walks the HNSW index
        // (a join inside would let it pick a join plan and an exact sort); titles are joined after.
        // The metadata filter is a semi-join, present only when there is a filter.
        let metadata = if scope.filter.is_empty() {
            ""
        } else {
            "AND k.document_id IN (SELECT id FROM documents WHERE metadata @> $3)"
        };
        let sql = format!(
            "SELECT n.chunk_id, n.document_id, d.title, n.text, n.distance FROM ( \
               SELECT k.id AS chunk_id, k.document_id, k.text, \
                 (k.embedding::vector({dims}) <=> $1) AS distance \
               FROM chunks k \
               WHERE k.dims = {dims} \
                 AND k.collection_id = (SELECT id FROM collections WHERE name = $2) \
                 {metadata} \
               ORDER BY k.embedding::vector({dims}) <=> $1 LIMIT $4 \
             ) n JOIN documents d ON d.id = n.document_id ORDER BY n.distance"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(PgVector(vector))
            .bind(scope.collection)
            .bind(Json(scope.filter))
            .bind(scope.limit as i64)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        // An iterative index scan gives up after `hnsw.max_scan_tuples` (20,000) rows: a small
        // collection, or a selective filter, in a large table can come back short. Then the exact
        // plan answers; for a small or selective set it is cheap (the collection and metadata
        // indexes find the rows).
        if !exact && rows.len() < scope.limit {
            return Box::pin(self.knn(scope, vector, true)).await;
        }
        rows.iter()
            .map(|row| {
                let distance: f64 = row.try_get("distance")?;
                hit(row, 1.0 - distance as f32)
            })
            .collect()
    }

    #[tracing::instrument(skip(self, scope), fields(collection = scope.collection, k = scope.limit))]
    async fn fts(&self, scope: Scope<'_>, query: &str) -> StoreResult<Vec<Hit>> {
        let words = query_words(query);
        if words.is_empty() {
            return Ok(Vec::new());
        }
        // Letters and digits only, joined by `|`: any word may match. ts_rank_cd is not BM25 (no
        // inverse document frequency: a common word weighs as much as a product code), so it only
        // picks the candidates; BM25 is computed here from the tsvector's term frequencies, each
        // query lexeme's document frequency in the collection (one GIN lookup per lexeme) and the
        // candidates' mean length, then divided by the query's ideal score as on SQLite.
        let tsquery = words.join(" | ");
        let sql = format!(
            "WITH col AS (SELECT id FROM collections WHERE name = $2), \
             n AS (SELECT count(*)::float8 AS n FROM chunks WHERE collection_id = (SELECT id FROM col)), \
             terms AS (SELECT DISTINCT lexeme FROM unnest(to_tsvector('english', $5))), \
             idf AS (SELECT t.lexeme, greatest(ln((n.n - f.df + 0.5) / (f.df + 0.5)), 1e-6) AS idf \
               FROM terms t CROSS JOIN n CROSS JOIN LATERAL ( \
                 SELECT count(*)::float8 AS df FROM chunks k \
                 WHERE k.collection_id = (SELECT id FROM col) AND k.tsv @@ quote_literal(t.lexeme)::tsquery) f), \
             cand AS (SELECT k.id, k.document_id, k.tsv, length(k.tsv)::float8 AS len \
               FROM chunks k JOIN documents d ON d.id = k.document_id, to_tsquery('english', $1) q \
               WHERE k.tsv @@ q AND k.collection_id = (SELECT id FROM col) AND d.metadata @> $3 \
               ORDER BY ts_rank_cd(k.tsv, q) DESC, k.id LIMIT {CANDIDATES}), \
             avgdl AS (SELECT greatest(avg(len), 1) AS avgdl FROM cand), \
             scored AS (SELECT c.id, c.document_id, sum(i.idf * cardinality(u.positions) * ({K1} + 1) \
                 / (cardinality(u.positions) + {K1} * (1 - {B} + {B} * c.len / a.avgdl))) AS bm25 \
               FROM cand c CROSS JOIN LATERAL unnest(c.tsv) u JOIN idf i ON i.lexeme = u.lexeme CROSS JOIN avgdl a \
               GROUP BY c.id, c.document_id) \
             SELECT s.id AS chunk_id, s.document_id, d.title, k.text, \
               least(s.bm25 / nullif((SELECT sum(idf) FROM idf), 0), 1)::float8 AS score \
             FROM scored s JOIN chunks k ON k.id = s.id JOIN documents d ON d.id = s.document_id \
             ORDER BY score DESC, s.id LIMIT $4",
            K1 = BM25_K1,
            B = BM25_B,
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(tsquery)
            .bind(scope.collection)
            .bind(Json(scope.filter))
            .bind(scope.limit as i64)
            .bind(words.join(" "))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let score: f64 = row.try_get("score")?;
                hit(row, score as f32)
            })
            .collect()
    }
}

impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
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
        self.knn(scope, vector, false).boxed()
    }

    fn exact_vector_search<'a>(
        &'a self,
        scope: Scope<'a>,
        vector: &'a [f32],
    ) -> BoxFuture<'a, StoreResult<Vec<Hit>>> {
        self.knn(scope, vector, true).boxed()
    }

    fn text_search<'a>(
        &'a self,
        scope: Scope<'a>,
        query: &'a str,
    ) -> BoxFuture<'a, StoreResult<Vec<Hit>>> {
        self.fts(scope, query).boxed()
    }
}
