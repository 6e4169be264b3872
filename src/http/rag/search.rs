//! `POST /api/rag/search` and `POST /api/rag/query`: the best chunks of a collection, and an
//! answer grounded in them, streamed after its sources.

use std::convert::Infallible;

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::super::chat::{self, ChatStreamEvent};
use super::super::error::{ApiError, HTTPValidationError, HttpError, ValidationError};
use super::super::extract::{ApiJson, Validate, body, check_range, check_text, integral};
use super::{
    api_error, check_collection, check_nul, check_scalar_map, default_collection, rag_of,
    scalar_map_schema,
};
use crate::llm::GenerationParams;
use crate::rag::{self, MIN_RELEVANCE, Mode, SearchParams};
use crate::state::AppState;

/// Most keys in a search filter.
const MAX_FILTER_KEYS: usize = 16;

fn default_top_k() -> usize {
    5
}

fn default_max_tokens() -> u32 {
    512
}

fn filter_schema() -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
    scalar_map_schema(MAX_FILTER_KEYS)
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
        problems.extend(check_range(body(&["top_k"]), self.top_k as u64, 1, 20));
        if let Some(filter) = &self.filter {
            problems.extend(check_scalar_map("filter", filter, MAX_FILTER_KEYS));
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
        problems.extend(check_range(body(&["top_k"]), self.top_k as u64, 1, 20));
        problems.extend(check_range(
            body(&["max_tokens"]),
            self.max_tokens.into(),
            1,
            2048,
        ));
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
    let rx = chat::start(&state, None, messages, params).await?.events;
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
