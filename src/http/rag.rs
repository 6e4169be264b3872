//! `/api/rag/*`: ingest and manage documents, search them, and answer questions from them as a
//! Server-Sent Events stream whose first event lists the sources.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::chat::{self, ChatStreamEvent};
use super::error::{ApiError, HTTPValidationError, HttpError, LocItem, ValidationError};
use super::extract::{ApiJson, Validate, check_text, integral};
use crate::llm::GenerationParams;
use crate::rag::{self, Mode, NewText, Rag, RagError, SearchParams};
use crate::state::AppState;
use crate::store::{self, Inserted, StoreError};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(ingest, list_documents))
        .routes(routes!(delete_document))
        .routes(routes!(collections))
        .routes(routes!(search))
        .routes(routes!(query))
}

const DEFAULT_COLLECTION: &str = "documents";
const MAX_CONTENT: usize = 1_000_000;
const MAX_FILTER_KEYS: usize = 16;
/// The cosine similarity the nearest chunk needs for a question to count as covered by the
/// collection. MiniLM puts unrelated sentences below about 0.15 and paraphrases above 0.4.
const MIN_RELEVANCE: f32 = 0.25;

fn default_collection() -> String {
    DEFAULT_COLLECTION.into()
}

fn default_top_k() -> usize {
    5
}

fn default_max_tokens() -> u32 {
    512
}

fn body(rest: &[&str]) -> Vec<LocItem> {
    std::iter::once("body")
        .chain(rest.iter().copied())
        .map(LocItem::from)
        .collect()
}

/// PostgreSQL cannot store U+0000 in text or JSON; it is refused up front, for both backends.
fn check_nul(loc: Vec<LocItem>, text: &str) -> Option<ValidationError> {
    text.contains('\0').then(|| {
        ValidationError::new(
            loc,
            "String should not contain the NUL character (U+0000)",
            "string_pattern_mismatch",
        )
    })
}

fn json_has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(json_has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || json_has_nul(v)),
        _ => false,
    }
}

fn check_collection(loc: Vec<LocItem>, name: &str) -> Vec<ValidationError> {
    check_text(loc.clone(), name, 1, 128)
        .into_iter()
        .chain(check_nul(loc, name))
        .collect()
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({
    "collection": "handbook",
    "title": "Returns policy",
    "content": "Customers may return any product within 30 days of delivery...",
    "source": "https://example.com/returns",
    "metadata": {"lang": "en", "team": "support"}
}))]
pub struct IngestRequest {
    /// The collection to add the document to (created on first use).
    #[serde(default = "default_collection")]
    #[schema(
        min_length = 1,
        max_length = 128,
        default = "documents",
        pattern = r"^[^\u0000]*$"
    )]
    pub collection: String,
    #[schema(min_length = 1, max_length = 500, pattern = r"^[^\u0000]*$")]
    pub title: String,
    /// The text, split into token-sized overlapping chunks. The same content in the same collection
    /// is stored once.
    #[schema(
        min_length = 1,
        max_length = 1000000,
        pattern = r"^[^\u0000]*[^\u0000\s][^\u0000]*$"
    )]
    pub content: String,
    /// Where the document comes from (a URL, a path).
    #[serde(default)]
    #[schema(max_length = 2000, pattern = r"^[^\u0000]*$")]
    pub source: Option<String>,
    /// Any JSON object; searches can filter on its top-level keys.
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
}

impl Validate for IngestRequest {
    fn validate(&self) -> Vec<ValidationError> {
        let mut problems = check_collection(body(&["collection"]), &self.collection);
        problems.extend(check_text(body(&["title"]), &self.title, 1, 500));
        problems.extend(check_nul(body(&["title"]), &self.title));
        problems.extend(check_text(
            body(&["content"]),
            &self.content,
            1,
            MAX_CONTENT,
        ));
        problems.extend(check_nul(body(&["content"]), &self.content));
        if let Some(source) = &self.source {
            problems.extend(check_text(body(&["source"]), source, 0, 2000));
            problems.extend(check_nul(body(&["source"]), source));
        }
        if let Some(metadata) = &self.metadata
            && json_has_nul(&Value::Object(metadata.clone()))
        {
            problems.push(ValidationError::new(
                body(&["metadata"]),
                "Strings should not contain the NUL character (U+0000)",
                "string_pattern_mismatch",
            ));
        }
        problems
    }
}

/// A stored document.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "id": 42, "collection": "handbook", "title": "Returns policy",
    "source": "https://example.com/returns", "metadata": {"lang": "en"},
    "content_hash": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "chunks": 3, "created_at": "2026-01-31T12:00:00.000Z"
}))]
pub struct DocumentResponse {
    pub id: i64,
    pub collection: String,
    pub title: String,
    pub source: Option<String>,
    pub metadata: Map<String, Value>,
    /// sha256 of the content.
    pub content_hash: String,
    /// Number of chunks the content was split into.
    pub chunks: i64,
    /// When the document was stored (RFC 3339, UTC).
    pub created_at: String,
}

impl From<store::Document> for DocumentResponse {
    fn from(d: store::Document) -> Self {
        Self {
            id: d.id,
            collection: d.collection,
            title: d.title,
            source: d.source,
            metadata: d.metadata,
            content_hash: d.content_hash,
            chunks: d.chunks,
            created_at: d.created_at,
        }
    }
}

/// The one mapping from retrieval errors to HTTP.
fn api_error(e: RagError) -> ApiError {
    match e {
        RagError::Store(StoreError::Unavailable(why)) => {
            ApiError::Unavailable(format!("The database is unavailable: {why}"))
        }
        RagError::Store(e @ StoreError::DimensionMismatch { .. }) => {
            ApiError::validation(body(&["collection"]), e.to_string(), "value_error")
        }
        RagError::Store(
            e @ (StoreError::Url(_) | StoreError::Migrate(_) | StoreError::Database(_)),
        ) => ApiError::Internal(e.into()),
        RagError::Inference(e) => e.into(),
        RagError::NotReady(model) => {
            ApiError::Unavailable(format!("Model {model} is loading; retry after 1 s"))
        }
        RagError::Empty => ApiError::validation(
            body(&["content"]),
            "The content has no text to index",
            "value_error",
        ),
        e @ RagError::Chunking(_) => ApiError::Internal(e.into()),
    }
}

fn rag_of(state: &AppState) -> Result<Arc<Rag>, ApiError> {
    state
        .rag
        .clone()
        .ok_or_else(|| ApiError::NotFound("This server has no document store".into()))
}

/// Ingest a document.
///
/// Splits the content into overlapping chunks sized in the embedding model's tokens, embeds them,
/// and writes the document and its chunks in one transaction. Idempotent: the same content in the
/// same collection returns the stored document with 200 instead of a duplicate.
#[utoipa::path(
    post,
    path = "/api/rag/documents",
    tag = "rag",
    request_body = IngestRequest,
    responses(
        (status = 201, description = "Stored", body = DocumentResponse),
        (status = 200, description = "The collection already holds this content: the stored document", body = DocumentResponse),
        (status = 413, description = "The body is larger than the configured limit", body = HttpError,
            example = json!({"detail": "Request body is larger than the limit of 2097152 bytes"})),
        (status = 422, description = "The body is not valid, or the collection holds vectors of another length", body = HTTPValidationError),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = HttpError,
            example = json!({"detail": "Internal Server Error"})),
        (status = 503, description = "The database is unavailable, or the model is loading or busy: retry later", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
            example = json!({"detail": "The database is unavailable: pool timed out while waiting for an open connection"})),
    )
)]
pub async fn ingest(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<IngestRequest>,
) -> Result<Response, ApiError> {
    let rag = rag_of(&state)?;
    let inserted = rag
        .ingest(NewText {
            collection: req.collection,
            title: req.title,
            content: req.content,
            source: req.source,
            metadata: req.metadata.unwrap_or_default(),
        })
        .await
        .map_err(api_error)?;
    Ok(match inserted {
        Inserted::New(d) => (StatusCode::CREATED, Json(DocumentResponse::from(d))).into_response(),
        Inserted::Existing(d) => (StatusCode::OK, Json(DocumentResponse::from(d))).into_response(),
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// The collection to list.
    #[serde(default = "default_collection")]
    #[param(default = "documents", min_length = 1, max_length = 128)]
    pub collection: String,
    /// Most documents in the page.
    #[serde(default)]
    #[param(minimum = 1, maximum = 100, default = 20)]
    pub limit: Option<u32>,
    /// Documents to skip (newest first).
    #[serde(default)]
    #[param(minimum = 0, default = 0)]
    pub offset: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DocumentList {
    /// This page, newest first.
    pub documents: Vec<DocumentResponse>,
    /// Documents in the collection.
    pub total: i64,
    pub limit: u32,
    pub offset: u64,
}

fn query_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::validation(vec!["query".into()], e.to_string(), "value_error")
}

/// List a collection's documents, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/api/rag/documents",
    tag = "rag",
    params(ListParams),
    responses(
        (status = 200, description = "A page of documents (empty for an unknown collection)", body = DocumentList),
        (status = 422, description = "The query parameters are not valid", body = HTTPValidationError),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = HttpError),
        (status = 503, description = "The database is unavailable: retry later", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn list_documents(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<DocumentList>, ApiError> {
    let Query(params) = params.map_err(|e| query_error(e.body_text()))?;
    let mut problems = check_collection(
        vec!["query".into(), "collection".into()],
        &params.collection,
    );
    let limit = params.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        problems.push(ValidationError::new(
            vec!["query".into(), "limit".into()],
            "limit should be between 1 and 100",
            "value_error",
        ));
    }
    let offset = params.offset.unwrap_or(0);
    if offset > i64::MAX as u64 {
        problems.push(ValidationError::new(
            vec!["query".into(), "offset".into()],
            "offset is too large",
            "value_error",
        ));
    }
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let rag = rag_of(&state)?;
    let store = rag.database.store().map_err(|e| api_error(e.into()))?;
    let page = store
        .documents(&params.collection, offset as i64, limit.into())
        .await
        .map_err(|e| api_error(e.into()))?;
    Ok(Json(DocumentList {
        documents: page.documents.into_iter().map(Into::into).collect(),
        total: page.total,
        limit,
        offset,
    }))
}

/// Delete a document and its chunks.
#[utoipa::path(
    delete,
    path = "/api/rag/documents/{id}",
    tag = "rag",
    params(("id" = i64, Path, description = "The document's id")),
    responses(
        (status = 204, description = "Deleted, with its chunks"),
        (status = 404, description = "No such document", body = HttpError,
            example = json!({"detail": "Document 42 not found"})),
        (status = 422, description = "The id is not an integer", body = HTTPValidationError),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = HttpError),
        (status = 503, description = "The database is unavailable: retry later", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn delete_document(
    State(state): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(id) = id.map_err(|e| {
        ApiError::validation(
            vec!["path".into(), "id".into()],
            format!("Input should be a valid integer: {}", e.body_text()),
            "int_parsing",
        )
    })?;
    let rag = rag_of(&state)?;
    let store = rag.database.store().map_err(|e| api_error(e.into()))?;
    if store
        .delete_document(id)
        .await
        .map_err(|e| api_error(e.into()))?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("Document {id} not found")))
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"name": "handbook", "dims": 384, "documents": 20, "chunks": 57}))]
pub struct CollectionResponse {
    pub name: String,
    /// Length of the collection's vectors (the embedding model's).
    pub dims: i64,
    pub documents: i64,
    pub chunks: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CollectionList {
    pub collections: Vec<CollectionResponse>,
}

/// List the collections with their document and chunk counts.
#[utoipa::path(
    get,
    path = "/api/rag/collections",
    tag = "rag",
    responses(
        (status = 200, description = "Every collection, by name", body = CollectionList),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = HttpError),
        (status = 503, description = "The database is unavailable: retry later", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn collections(State(state): State<AppState>) -> Result<Json<CollectionList>, ApiError> {
    let rag = rag_of(&state)?;
    let store = rag.database.store().map_err(|e| api_error(e.into()))?;
    let collections = store.collections().await.map_err(|e| api_error(e.into()))?;
    Ok(Json(CollectionList {
        collections: collections
            .into_iter()
            .map(|c| CollectionResponse {
                name: c.name,
                dims: c.dims,
                documents: c.documents,
                chunks: c.chunks,
            })
            .collect(),
    }))
}

fn filter_schema() -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
    use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Type};
    let scalar = OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(r"^[^\u0000]*$")),
        )
        .item(ObjectBuilder::new().schema_type(Type::Number))
        .item(ObjectBuilder::new().schema_type(Type::Boolean));
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            Type::Object,
            Type::Null,
        ]))
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(r"^[A-Za-z0-9_.-]{1,128}$")),
        ))
        .additional_properties(Some(AdditionalProperties::RefOr(scalar.into())))
        .max_properties(Some(MAX_FILTER_KEYS))
        .into()
}

/// Scalar metadata values a filter can require.
fn check_filter(filter: &Map<String, Value>) -> Vec<ValidationError> {
    let mut problems = Vec::new();
    if filter.len() > MAX_FILTER_KEYS {
        problems.push(ValidationError::new(
            body(&["filter"]),
            format!("Dictionary should have at most {MAX_FILTER_KEYS} items"),
            "too_long",
        ));
    }
    for (key, value) in filter {
        let loc = body(&["filter", key]);
        let key_ok = !key.is_empty()
            && key.len() <= 128
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !key_ok {
            problems.push(ValidationError::new(
                loc.clone(),
                "Keys should be 1 to 128 letters, digits, '_', '-' or '.'",
                "value_error",
            ));
        }
        let value_ok = match value {
            Value::String(s) => !s.contains('\0'),
            Value::Number(_) | Value::Bool(_) => true,
            _ => false,
        };
        if !value_ok {
            problems.push(ValidationError::new(
                loc,
                "Input should be a string, a number or a boolean",
                "value_error",
            ));
        }
    }
    problems
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"query": "How long do I have to send a product back?", "collection": "handbook", "top_k": 5, "mode": "hybrid", "filter": {"lang": "en"}}))]
pub struct SearchRequest {
    /// What to look for, in any words.
    #[schema(min_length = 1, max_length = 2000, pattern = r"^[^\u0000]*$")]
    pub query: String,
    #[serde(default = "default_collection")]
    #[schema(
        min_length = 1,
        max_length = 128,
        default = "documents",
        pattern = r"^[^\u0000]*$"
    )]
    pub collection: String,
    /// Most results.
    #[serde(default = "default_top_k", deserialize_with = "integral")]
    #[schema(minimum = 1, maximum = 20, default = 5)]
    pub top_k: usize,
    /// `vector` (embeddings), `text` (full text) or `hybrid` (both, fused by reciprocal rank).
    #[serde(default)]
    #[schema(default = "hybrid")]
    pub mode: Mode,
    /// Metadata that must be equal: at most 16 top-level keys (letters, digits, `_`, `-`, `.`) and
    /// string, number or boolean values.
    #[serde(default)]
    #[schema(schema_with = filter_schema)]
    pub filter: Option<Map<String, Value>>,
}

impl Validate for SearchRequest {
    fn validate(&self) -> Vec<ValidationError> {
        let mut problems: Vec<ValidationError> = check_text(body(&["query"]), &self.query, 1, 2000)
            .into_iter()
            .chain(check_nul(body(&["query"]), &self.query))
            .collect();
        problems.extend(check_collection(body(&["collection"]), &self.collection));
        if !(1..=20).contains(&self.top_k) {
            problems.push(ValidationError::new(
                body(&["top_k"]),
                "top_k should be between 1 and 20",
                "value_error",
            ));
        }
        if let Some(filter) = &self.filter {
            problems.extend(check_filter(filter));
        }
        problems
    }
}

/// One search result.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"document_id": 42, "chunk_id": 108, "title": "Returns policy", "excerpt": "Customers may return any product within 30 days...", "score": 0.032}))]
pub struct SearchResult {
    pub document_id: i64,
    pub chunk_id: i64,
    pub title: String,
    /// The chunk's text, at most 500 characters.
    pub excerpt: String,
    /// Higher is better: cosine similarity (`vector`), full-text rank (`text`), or the reciprocal
    /// rank fusion score (`hybrid`).
    pub score: f32,
}

/// Search a collection.
///
/// Returns the best chunks, best first; an unknown or empty collection gives an empty list.
#[utoipa::path(
    post,
    path = "/api/rag/search",
    tag = "rag",
    request_body = SearchRequest,
    responses(
        (status = 200, description = "The best chunks, best first", body = Vec<SearchResult>),
        (status = 413, description = "The body is larger than the configured limit", body = HttpError),
        (status = 422, description = "The body is not valid, or the collection holds vectors of another length", body = HTTPValidationError),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = HttpError),
        (status = 503, description = "The database is unavailable, or the model is loading or busy: retry later", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn search(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<SearchRequest>,
) -> Result<Json<Vec<SearchResult>>, ApiError> {
    let rag = rag_of(&state)?;
    let hits = rag
        .search(&SearchParams {
            query: req.query,
            collection: req.collection,
            top_k: req.top_k,
            mode: req.mode,
            filter: req.filter.unwrap_or_default(),
            min_similarity: None,
        })
        .await
        .map_err(api_error)?;
    Ok(Json(
        hits.into_iter()
            .map(|h| SearchResult {
                document_id: h.document_id,
                chunk_id: h.chunk_id,
                excerpt: rag::excerpt(&h.text),
                title: h.title,
                score: h.score,
            })
            .collect(),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"question": "How long do I have to send a product back?", "collection": "handbook", "top_k": 5}))]
pub struct QueryRequest {
    /// The question.
    #[schema(min_length = 1, max_length = 2000, pattern = r"^[^\u0000]*$")]
    pub question: String,
    #[serde(default = "default_collection")]
    #[schema(
        min_length = 1,
        max_length = 128,
        default = "documents",
        pattern = r"^[^\u0000]*$"
    )]
    pub collection: String,
    /// Chunks given to the model as sources.
    #[serde(default = "default_top_k", deserialize_with = "integral")]
    #[schema(minimum = 1, maximum = 20, default = 5)]
    pub top_k: usize,
    /// Most tokens of the answer.
    #[serde(default = "default_max_tokens", deserialize_with = "integral")]
    #[schema(minimum = 1, maximum = 2048, default = 512)]
    pub max_tokens: u32,
}

impl Validate for QueryRequest {
    fn validate(&self) -> Vec<ValidationError> {
        let mut problems: Vec<ValidationError> =
            check_text(body(&["question"]), &self.question, 1, 2000)
                .into_iter()
                .chain(check_nul(body(&["question"]), &self.question))
                .collect();
        problems.extend(check_collection(body(&["collection"]), &self.collection));
        if !(1..=20).contains(&self.top_k) {
            problems.push(ValidationError::new(
                body(&["top_k"]),
                "top_k should be between 1 and 20",
                "value_error",
            ));
        }
        if !(1..=2048).contains(&self.max_tokens) {
            problems.push(ValidationError::new(
                body(&["max_tokens"]),
                "max_tokens should be between 1 and 2048",
                "value_error",
            ));
        }
        problems
    }
}

/// A source of an answer, as listed by the first event of `/api/rag/query`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"id": 42, "title": "Returns policy", "excerpt": "Customers may return any product within 30 days...", "score": 0.032}))]
pub struct Source {
    /// The document's id.
    pub id: i64,
    pub title: String,
    /// The chunk given to the model, at most 500 characters.
    pub excerpt: String,
    /// Hybrid (reciprocal rank fusion) score; higher is better.
    pub score: f32,
}

/// Answer a question from a collection's documents.
///
/// `text/event-stream` of `data: {json}` events: first `sources` (the numbered sources the model is
/// given, number n being the n-th), then `delta` events of the answer, which cites them as `[n]`,
/// then `done` with the usage (or `error`). When the collection holds nothing relevant (no chunk
/// with a cosine similarity of at least 0.25 to the question) the answer is 404 before any stream
/// starts.
#[utoipa::path(
    post,
    path = "/api/rag/query",
    tag = "rag",
    request_body = QueryRequest,
    responses(
        (status = 200, description = "Server-Sent Events, each `data:` line one event", content_type = "text/event-stream", body = chat::ChatSseEvent),
        (status = 404, description = "Nothing relevant in the collection", body = HttpError,
            example = json!({"detail": "No relevant documents found in the collection"})),
        (status = 413, description = "The body is larger than the configured limit", body = HttpError),
        (status = 422, description = "The body is not valid", body = HTTPValidationError),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = HttpError),
        (status = 503, description = "No chat model, the database is unavailable, or a model is loading or busy", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
            example = json!({"detail": "This server has no chat model (--chat-model none): /api/rag/query cannot answer; /api/rag/search still works"})),
    )
)]
pub async fn query(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<QueryRequest>,
) -> Result<Response, ApiError> {
    let rag = rag_of(&state)?;
    let chat_model = state.chat.as_ref().ok_or_else(|| {
        ApiError::Unavailable(
            "This server has no chat model (--chat-model none): /api/rag/query cannot answer; /api/rag/search still works".into(),
        )
    })?;
    chat_model.get()?;
    let hits = rag
        .search(&SearchParams {
            query: req.question.clone(),
            collection: req.collection,
            top_k: req.top_k,
            mode: Mode::Hybrid,
            filter: Map::new(),
            min_similarity: Some(MIN_RELEVANCE),
        })
        .await
        .map_err(api_error)?;
    if hits.is_empty() {
        return Err(ApiError::NotFound(
            "No relevant documents found in the collection".into(),
        ));
    }
    let sources = ChatStreamEvent::Sources {
        sources: hits
            .iter()
            .map(|h| Source {
                id: h.document_id,
                title: h.title.clone(),
                excerpt: rag::excerpt(&h.text),
                score: h.score,
            })
            .collect(),
    };
    let params = GenerationParams {
        max_tokens: req.max_tokens as usize,
        ..Default::default()
    };
    let messages = rag::messages(&req.question, &hits);
    let (_, rx) = chat::start(&state, None, messages, params).await?;
    let first = Event::default().json_data(sources).unwrap_or_else(|_| {
        Event::default().data(r#"{"type":"error","message":"unserialisable event"}"#)
    });
    let answer = futures::stream::unfold(rx, |mut rx| async move {
        let next = rx.recv().await?;
        Some((Ok::<_, Infallible>(chat::event(next)), rx))
    });
    let stream = futures::StreamExt::chain(
        futures::stream::once(async move { Ok::<_, Infallible>(first) }),
        answer,
    );
    Ok((
        chat::stream_headers(),
        Sse::new(stream).keep_alive(KeepAlive::default()),
    )
        .into_response())
}
