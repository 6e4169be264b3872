//! `/api/rag/*`: ingest and manage documents (here), search them and answer questions from them
//! as a Server-Sent Events stream whose first event lists the sources (`rag/search.rs`).

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, HTTPValidationError, HttpError, LocItem, ValidationError};
use super::extract::{ApiJson, Validate, body, check_range, check_text};
use crate::rag::{NewText, Rag, RagError};
use crate::state::AppState;
use crate::store::{self, Inserted, StoreError};

pub(super) mod search;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(ingest, list_documents))
        .routes(routes!(delete_document))
        .routes(routes!(collections))
        .routes(routes!(search::search))
        .routes(routes!(search::query))
}

const DEFAULT_COLLECTION: &str = "documents";
const MAX_CONTENT: usize = 1_000_000;
/// Most keys in a document's metadata.
const MAX_METADATA_KEYS: usize = 64;
/// Most characters in one metadata string: metadata is for filtering, not for content.
const MAX_METADATA_VALUE: usize = 1000;

fn metadata_schema() -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
    scalar_map_schema(MAX_METADATA_KEYS)
}

pub(super) fn default_collection() -> String {
    DEFAULT_COLLECTION.into()
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

/// The schema of a flat JSON object of scalars (metadata, and filters on it): at most `max` keys of
/// letters, digits, `_`, `-` and `.`, each a string, number or boolean. Flat, so that every key can
/// be filtered on; no U+0000, which PostgreSQL cannot store in JSON.
fn scalar_map_schema(max: usize) -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
    use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Type};
    let scalar = OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(MAX_METADATA_VALUE))
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
        .max_properties(Some(max))
        .into()
}

/// Checks what [`scalar_map_schema`] promises, reporting at `body.<field>.<key>`.
fn check_scalar_map(field: &str, map: &Map<String, Value>, max: usize) -> Vec<ValidationError> {
    let mut problems = Vec::new();
    if map.len() > max {
        problems.push(ValidationError::new(
            body(&[field]),
            format!("Dictionary should have at most {max} items"),
            "too_long",
        ));
    }
    for (key, value) in map {
        let loc = body(&[field, key]);
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
            Value::String(s) => !s.contains('\0') && s.chars().count() <= MAX_METADATA_VALUE,
            Value::Number(_) | Value::Bool(_) => true,
            _ => false,
        };
        if !value_ok {
            problems.push(ValidationError::new(
                loc,
                format!(
                    "Input should be a string (at most {MAX_METADATA_VALUE} characters), a number or a boolean"
                ),
                "value_error",
            ));
        }
    }
    problems
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
    /// is stored once. It needs a character that is not white space: JavaScript's `\s`, and U+0085,
    /// which Rust counts as white space and JavaScript does not.
    #[schema(
        min_length = 1,
        max_length = 1000000,
        pattern = r"^[^\u0000]*[^\u0000\s\u0085][^\u0000]*$"
    )]
    pub content: String,
    /// Where the document comes from (a URL, a path).
    #[serde(default)]
    #[schema(max_length = 2000, pattern = r"^[^\u0000]*$")]
    pub source: Option<String>,
    /// A flat object of at most 64 keys (letters, digits, `_`, `-`, `.`) with string, number or
    /// boolean values; searches can filter on any of them.
    #[serde(default)]
    #[schema(schema_with = metadata_schema)]
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
        if let Some(metadata) = &self.metadata {
            problems.extend(check_scalar_map("metadata", metadata, MAX_METADATA_KEYS));
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
            // The driver's message can name hosts and users: it stays in the log.
            tracing::warn!(error = %why, "database unavailable");
            ApiError::Unavailable("The database is unavailable; retry later".into())
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
    #[param(
        default = "documents",
        min_length = 1,
        max_length = 128,
        pattern = r"^[^\u0000]*$"
    )]
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
    problems.extend(check_range(
        vec!["query".into(), "limit".into()],
        limit.into(),
        1,
        100,
    ));
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
