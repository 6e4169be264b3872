//! The Vercel AI SDK's own stream at its own routes: `useChat` (npm `ai` + `@ai-sdk/react`) with a
//! `DefaultChatTransport` pointed at `/api/ai-sdk/chat` or `/api/ai-sdk/rag` runs against aitier
//! with no route handler of its own. The SDK sends its UI messages (`parts`, not `content`) and
//! reads the UI message stream protocol v1 (see [`parts`]). The same generation as
//! `/api/chat/stream` and `/api/rag/query`; only the wire format differs.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::HeaderName;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::chat::{self, Role, Source, check_generation};
use super::error::{ApiError, HTTPValidationError, HttpError, LocItem, ValidationError};
use super::extract::{ApiJson, Validate, body, integral, integral_opt};
use super::rag::search::{self, QueryRequest};
use crate::llm::{ChatMessage, ChatStream, GenerationParams};
use crate::rag::Mode;
use crate::state::AppState;

pub mod parts;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(ui_chat))
        .routes(routes!(ui_rag))
}

/// A message as the AI SDK's `useChat` sends it (its `id` and `metadata` are accepted, not used).
#[derive(Debug, Deserialize, ToSchema)]
pub struct UiMessage {
    pub role: Role,
    /// The message's parts; the text of its `text` parts is the message. Other parts (sources,
    /// data, files, steps) are skipped.
    #[schema(max_items = 1024)]
    pub parts: Vec<UiPart>,
}

/// One part of a UI message; only `text` parts are read.
#[derive(Debug, Deserialize, ToSchema)]
pub struct UiPart {
    /// `text`, or any other part type (skipped).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

impl UiMessage {
    fn text(&self) -> String {
        self.parts
            .iter()
            .filter(|p| p.kind == "text")
            .filter_map(|p| p.text.as_deref())
            .collect::<Vec<_>>()
            .join("")
    }
}

fn default_chat_tokens() -> u32 {
    1024
}

fn default_rag_tokens() -> u32 {
    512
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"id": "chat-1", "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "What is the capital of France?"}]}], "trigger": "submit-message"}))]
pub struct UiChatRequest {
    /// The conversation, oldest first (1 to 256 messages, 200000 characters of text in all), as
    /// `useChat` sends it; its other fields (`id`, `trigger`, `messageId`) are accepted and not
    /// used. The fields below come from the transport's `body` option.
    #[schema(min_items = 1, max_items = 256)]
    pub messages: Vec<UiMessage>,
    /// The chat model, routed as in `/api/chat/stream`.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 256)]
    pub model: Option<String>,
    /// Most tokens to generate.
    #[serde(default = "default_chat_tokens", deserialize_with = "integral")]
    #[schema(minimum = 1, maximum = 4096, default = 1024)]
    pub max_tokens: u32,
    /// Sampling temperature; 0 or omitted is greedy decoding.
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    /// The same seed gives the same text.
    #[serde(default, deserialize_with = "integral_opt")]
    #[schema(minimum = 0)]
    pub seed: Option<i64>,
}

/// Characters of text in all the messages' parts.
fn text_chars(messages: &[UiMessage]) -> usize {
    messages.iter().map(|m| m.text().chars().count()).sum()
}

impl Validate for UiChatRequest {
    fn validate(&self) -> Vec<ValidationError> {
        let mut problems = check_generation(
            self.messages.len(),
            text_chars(&self.messages),
            &[("max_tokens", Some(self.max_tokens))],
            self.temperature,
            self.top_p,
            &[],
        );
        if self.messages.iter().all(|m| m.text().is_empty()) && !self.messages.is_empty() {
            problems.push(ValidationError::new(
                body(&["messages"]),
                "No message has a text part",
                "value_error",
            ));
        }
        problems
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"messages": [{"role": "user", "parts": [{"type": "text", "text": "How long do I have to return a product?"}]}], "collection": "documents"}))]
pub struct UiRagRequest {
    /// The conversation as `useChat` sends it; the text of the last user message is the question
    /// (1 to 2000 characters).
    #[schema(min_items = 1, max_items = 256)]
    pub messages: Vec<UiMessage>,
    /// As in `/api/rag/query`.
    #[serde(default = "super::rag::default_collection")]
    #[schema(min_length = 1, max_length = 128, default = "documents")]
    pub collection: String,
    /// Chunks given to the model as sources.
    #[serde(
        default = "super::rag::search::default_top_k",
        deserialize_with = "integral"
    )]
    #[schema(minimum = 1, maximum = 20, default = 5)]
    pub top_k: usize,
    /// Most tokens of the answer.
    #[serde(default = "default_rag_tokens", deserialize_with = "integral")]
    #[schema(minimum = 1, maximum = 2048, default = 512)]
    pub max_tokens: u32,
    /// The chat model that answers, routed as in `/api/chat/stream`.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 256)]
    pub model: Option<String>,
    /// How the sources are retrieved (see `/api/rag/search`).
    #[serde(default)]
    #[schema(default = "hybrid")]
    pub mode: Mode,
    /// Metadata the sources' documents must hold (see `/api/rag/search`).
    #[serde(default)]
    #[schema(schema_with = super::rag::search::filter_schema)]
    pub filter: Option<Map<String, Value>>,
}

impl UiRagRequest {
    /// The `/api/rag/query` request this one stands for.
    fn query(&self) -> QueryRequest {
        let question = self
            .messages
            .iter()
            .rev()
            .find(|m| matches!(m.role, Role::User))
            .map(UiMessage::text)
            .unwrap_or_default();
        QueryRequest {
            question,
            collection: self.collection.clone(),
            top_k: self.top_k,
            max_tokens: self.max_tokens,
            model: self.model.clone(),
            mode: self.mode,
            filter: self.filter.clone(),
        }
    }
}

impl Validate for UiRagRequest {
    fn validate(&self) -> Vec<ValidationError> {
        let mut problems = check_generation(
            self.messages.len(),
            text_chars(&self.messages),
            &[],
            None,
            None,
            &[],
        );
        // The question's checks, said of the messages it comes from.
        for mut problem in self.query().validate() {
            if problem.loc.get(1) == Some(&LocItem::from("question")) {
                problem.loc = body(&["messages"]);
                problem.msg = format!("The last user message: {}", problem.msg);
            }
            problems.push(problem);
        }
        problems
    }
}

/// Chat for the AI SDK's `useChat`.
///
/// Takes the SDK's request (UI messages with parts) and answers in its UI message stream protocol
/// v1: `start`, `text-start`, `text-delta`…, `text-end`, `finish` (or `error`), then
/// `data: [DONE]`, with the header `x-vercel-ai-ui-message-stream: v1`. `finish` carries the usage
/// and the model as `messageMetadata`. A client that stops (`stop()`) ends the generation.
#[utoipa::path(
    post,
    path = "/api/ai-sdk/chat",
    tag = "chat",
    request_body = UiChatRequest,
    responses(
        (status = 200, description = "Server-Sent Events, each `data:` line one UI message stream part, the last `[DONE]`", content_type = "text/event-stream", body = parts::UiStreamSse,
            headers(("x-vercel-ai-ui-message-stream" = String, description = "`v1`"))),
        (status = 404, description = "Unknown model", body = HttpError),
        (status = 413, description = "The body is larger than the configured limit", body = HttpError),
        (status = 422, description = "The body is not valid, no message has text, or the conversation does not fit the context", body = HTTPValidationError),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = HttpError),
        (status = 502, description = "The chat upstream could not be reached or refused the request", body = HttpError),
        (status = 503, description = "Too many generations, or the model is loading: retry later", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 504, description = "The chat upstream did not answer in time", body = HttpError),
    )
)]
pub async fn ui_chat(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<UiChatRequest>,
) -> Result<Response, ApiError> {
    let messages: Vec<ChatMessage> = req
        .messages
        .iter()
        .map(|m| ChatMessage::new(m.role.as_str(), &m.text()))
        .collect();
    let params = GenerationParams {
        max_tokens: req.max_tokens as usize,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed.map(|s| s as u64),
        ..Default::default()
    };
    let started = chat::start(&state, req.model.as_deref(), messages, params).await?;
    Ok(respond(Vec::new(), started.model, started.events))
}

/// Answers from documents for the AI SDK's `useChat`.
///
/// The last user message is the question, answered as `/api/rag/query` answers it (404 before any
/// stream when nothing relevant is found). The stream sends the sources first: one
/// `source-document` part per source (`sourceId` is its number n, cited as `[n]`), and a
/// `data-sources` part with their ids, titles, excerpts and scores; then the answer's text parts
/// and `finish`, as in `/api/ai-sdk/chat`.
#[utoipa::path(
    post,
    path = "/api/ai-sdk/rag",
    tag = "rag",
    request_body = UiRagRequest,
    responses(
        (status = 200, description = "Server-Sent Events, each `data:` line one UI message stream part, the last `[DONE]`", content_type = "text/event-stream", body = parts::UiStreamSse,
            headers(("x-vercel-ai-ui-message-stream" = String, description = "`v1`"))),
        (status = 404, description = "Nothing relevant in the collection, or an unknown model", body = HttpError),
        (status = 413, description = "The body is larger than the configured limit", body = HttpError),
        (status = 422, description = "The body is not valid, no user message has text, or the question and its sources do not fit the chat model's context", body = HTTPValidationError),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = HttpError),
        (status = 502, description = "The chat upstream could not be reached or refused the request", body = HttpError),
        (status = 503, description = "No chat model, the database is unavailable, or a model is loading or busy", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 504, description = "The chat upstream did not answer in time", body = HttpError),
    )
)]
pub async fn ui_rag(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<UiRagRequest>,
) -> Result<Response, ApiError> {
    let (sources, started) = search::ground(&state, req.query()).await?;
    Ok(respond(sources, started.model, started.events))
}

fn respond(sources: Vec<Source>, model: String, events: ChatStream) -> Response {
    let stream = futures::StreamExt::map(parts::encode(sources, model, events), |event| {
        Ok::<Event, Infallible>(event)
    });
    (
        chat::stream_headers(),
        [(
            HeaderName::from_static("x-vercel-ai-ui-message-stream"),
            "v1",
        )],
        Sse::new(stream).keep_alive(KeepAlive::default()),
    )
        .into_response()
}
