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

use super::super::chat::{self, ChatStreamEvent, Source};
use super::super::error::{ApiError, HTTPValidationError, HttpError, ValidationError};
use super::super::extract::{ApiJson, Validate, body, check_range, check_text, integral};
use super::{
    api_error, check_collection, check_nul, check_scalar_map, default_collection, rag_of,
    scalar_map_schema,
};
use crate::llm::GenerationParams;
use crate::rag::{self, Mode, RELEVANCE_THRESHOLD, SearchParams};
use crate::state::AppState;

/// Most keys in a search filter.
const MAX_FILTER_KEYS: usize = 16;

pub(in crate::http) fn default_top_k() -> usize {
    5
}

fn default_max_tokens() -> u32 {
    512
}

pub(in crate::http) fn filter_schema() -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
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
    /// `vector` (embeddings), `text` (full text, BM25) or `hybrid` (both, their scores weighed).
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
#[schema(example = json!({"document_id": 42, "chunk_id": 108, "title": "Returns policy", "excerpt": "Customers may return any product within 30 days...", "score": 0.71}))]
pub struct SearchResult {
    pub document_id: i64,
    pub chunk_id: i64,
    pub title: String,
    /// The chunk's text, at most 500 characters.
    pub excerpt: String,
    /// Relevance in [0, 1], on one scale for every mode and question, so that it can be compared
    /// and thresholded: `vector` maps cosine similarity (0.6 and above is 1), `text` is BM25 as a
    /// share of the query's ideal score (every query term matched once), `hybrid` weighs the two
    /// (more towards text for queries with codes or numbers, or of one or two words). Below 0.35
    /// (`/api/rag/query`'s threshold) a chunk is unlikely to answer the query.
    #[schema(minimum = 0.0, maximum = 1.0)]
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
            min_score: None,
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
#[schema(example = json!({"question": "How long do I have to send a product back?", "collection": "handbook", "top_k": 5, "model": "gpt-4o-mini", "filter": {"lang": "en"}}))]
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
    /// The chat model that answers, routed as in `/api/chat/stream`: the local model's name (or
    /// none) runs locally, other names go to the upstream.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 256)]
    pub model: Option<String>,
    /// How the sources are retrieved (see `/api/rag/search`).
    #[serde(default)]
    #[schema(default = "hybrid")]
    pub mode: Mode,
    /// Metadata the sources' documents must hold (see `/api/rag/search`).
    #[serde(default)]
    #[schema(schema_with = filter_schema)]
    pub filter: Option<Map<String, Value>>,
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
        if let Some(model) = &self.model {
            problems.extend(check_text(body(&["model"]), model, 1, 256));
            problems.extend(check_nul(body(&["model"]), model));
        }
        if let Some(filter) = &self.filter {
            problems.extend(check_scalar_map("filter", filter, MAX_FILTER_KEYS));
        }
        problems
    }
}

/// Answer a question from a collection's documents.
///
/// `text/event-stream` of `data: {json}` events: first `sources` (the numbered sources the model is
/// given, number n being the n-th), then `delta` events of the answer, which cites them as `[n]`,
/// then `done` with the usage (or `error`). When the collection holds nothing relevant (no source
/// scores 0.35 or more) the answer is 404 before any stream starts. `model` is routed as in
/// `/api/chat/stream`, so a server with only an upstream answers too. The model sees, of each
/// source, the sentences that share most words with the question, within a budget of its tokens.
#[utoipa::path(
    post,
    path = "/api/rag/query",
    tag = "rag",
    request_body = QueryRequest,
    responses(
        (status = 200, description = "Server-Sent Events, each `data:` line one event", content_type = "text/event-stream", body = chat::ChatSseEvent),
        (status = 404, description = "Nothing relevant in the collection, or an unknown model", body = HttpError,
            example = json!({"detail": "No relevant documents found in the collection"})),
        (status = 413, description = "The body is larger than the configured limit", body = HttpError),
        (status = 422, description = "The body is not valid, or the question and its sources do not fit the chat model's context", body = HTTPValidationError),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = HttpError),
        (status = 502, description = "The chat upstream could not be reached or refused the request", body = HttpError),
        (status = 503, description = "No chat model, the database is unavailable, or a model is loading or busy", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
            example = json!({"detail": "This server has no chat model (--chat-model none): /api/rag/query cannot answer; /api/rag/search still works"})),
        (status = 504, description = "The chat upstream did not answer in time", body = HttpError),
    )
)]
pub async fn query(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<QueryRequest>,
) -> Result<Response, ApiError> {
    let (sources, started) = ground(&state, req).await?;
    let rx = started.events;
    let first = Event::default()
        .json_data(ChatStreamEvent::Sources { sources })
        .unwrap_or_else(|_| {
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

/// Everything an answer from documents does before its stream: find the sources (404 when none
/// is relevant), fit their best sentences to the model's budget, and start the generation. Shared
/// by `/api/rag/query` and the AI SDK's route; each writes the sources and events in its format.
pub async fn ground(
    state: &AppState,
    req: QueryRequest,
) -> Result<(Vec<Source>, chat::Started), ApiError> {
    let rag = rag_of(state)?;
    if state.chat.is_empty() && state.upstream.is_none() {
        return Err(ApiError::Unavailable(
            "This server has no chat model (--chat-model none): /api/rag/query cannot answer; /api/rag/search still works".into(),
        ));
    }
    // An unknown or loading model is refused before the search.
    let route = chat::route(state, req.model.as_deref())?;
    let hits = rag
        .search(&SearchParams {
            query: req.question.clone(),
            collection: req.collection,
            top_k: req.top_k,
            mode: req.mode,
            filter: req.filter.unwrap_or_default(),
            min_score: Some(RELEVANCE_THRESHOLD),
        })
        .await
        .map_err(api_error)?;
    if hits.is_empty() {
        return Err(ApiError::NotFound(
            "No relevant documents found in the collection".into(),
        ));
    }
    let passages = if route.upstream {
        rag::passages(
            &req.question,
            &hits,
            rag::UPSTREAM_CONTEXT_TOKENS,
            &|s: &str| s.chars().count().div_ceil(4),
        )
    } else {
        let service = state
            .chat_model(Some(&route.model))
            .ok_or_else(|| {
                ApiError::Internal(anyhow::anyhow!("a local route without a local model"))
            })?
            .get()?;
        let tokenizer = service.model().tokenizer().clone();
        let (question, hits) = (req.question.clone(), hits.clone());
        tokio::task::spawn_blocking(move || {
            let count = |s: &str| tokenizer.encode(s, false).map_or(s.len() / 4, |e| e.len());
            rag::passages(&question, &hits, rag::LOCAL_CONTEXT_TOKENS, &count)
        })
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
    };
    let sources = hits
        .iter()
        .zip(&passages)
        .map(|(h, p)| Source {
            id: h.document_id,
            title: h.title.clone(),
            excerpt: rag::excerpt(&if p.is_empty() {
                h.text.clone()
            } else {
                p.join(" ")
            }),
            score: h.score,
        })
        .collect();
    let params = GenerationParams {
        max_tokens: req.max_tokens as usize,
        ..Default::default()
    };
    let messages = rag::messages(&req.question, &hits, &passages);
    let started = chat::start_routed(state, route, messages, params).await?;
    Ok((sources, started))
}
