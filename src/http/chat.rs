//! `POST /api/chat/stream`: the seed's streamed chat, as Server-Sent Events of `delta` events and a
//! final `done` (or `error`) event. Validation, an unknown model and overload are answered before the
//! stream starts.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::{HeaderName, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::schema::{ArrayBuilder, Discriminator, ObjectBuilder, OneOfBuilder, Type};
use utoipa::openapi::{Ref, RefOr, Schema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, HTTPValidationError, HttpError, LocItem, ValidationError};
use super::extract::{
    ApiJson, Validate, body, check_list, check_range, check_text, integral, integral_opt,
};
use crate::llm::{
    ChatError, ChatEvent, ChatMessage, ChatStream, FinishReason, GenerationParams, Local, Route,
    RouteError,
};
use crate::state::AppState;

mod meter;

use meter::meter;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(chat_stream))
}

/// Most characters in one message.
pub const MAX_CONTENT: usize = 100_000;
/// What a stream cut by shutdown says; a client should retry elsewhere.
pub const SHUTTING_DOWN: &str = "The server is shutting down; retry the request";
/// Most messages in one conversation.
pub const MAX_MESSAGES: usize = 256;
/// Most characters in all of a conversation's messages: refused before anything is templated or
/// tokenized, whatever the queue holds.
pub const MAX_PROMPT_CHARS: usize = 200_000;
const MAX_STOPS: usize = 4;

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct Message {
    pub role: Role,
    /// The message text (at most 100000 characters).
    #[schema(max_length = 100000)]
    pub content: String,
}

/// One stop sequence or several (at most 4).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged, expecting = "a string or an array of strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

fn stop_text() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(64))
}

/// A string, a list of strings, or null (as OpenAI's API accepts).
pub fn stop_schema() -> OneOfBuilder {
    OneOfBuilder::new()
        .item(stop_text())
        .item(
            ArrayBuilder::new()
                .items(stop_text())
                .max_items(Some(MAX_STOPS)),
        )
        .item(ObjectBuilder::new().schema_type(Type::Null))
}

fn default_max_tokens() -> u32 {
    1024
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 64}))]
pub struct ChatRequest {
    /// The conversation so far, oldest first: 1 to 256 messages of at most 200000 characters
    /// in all.
    #[schema(min_items = 1, max_items = 256)]
    pub messages: Vec<Message>,
    /// The chat model; the local model when omitted.
    #[serde(default)]
    pub model: Option<String>,
    /// Most tokens to generate.
    #[serde(default = "default_max_tokens", deserialize_with = "integral")]
    #[schema(minimum = 1, maximum = 4096, default = 1024)]
    pub max_tokens: u32,
    /// Sampling temperature; 0 or omitted is greedy decoding.
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p.
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    /// Makes sampling repeatable: the same request and seed give the same text.
    #[serde(default, deserialize_with = "integral_opt")]
    #[schema(minimum = 0)]
    pub seed: Option<i64>,
    /// Generation ends before any of these strings (at most 4, each 1 to 64 characters); they are
    /// not part of the answer.
    #[serde(default)]
    #[schema(schema_with = stop_schema)]
    pub stop: Option<Stop>,
}

/// The checks both chat surfaces make: at least one message, and the sampling settings' ranges.
/// `max_tokens` are the (field, value) pairs a surface accepts.
pub fn check_generation(
    messages: usize,
    prompt_chars: usize,
    max_tokens: &[(&str, Option<u32>)],
    temperature: Option<f64>,
    top_p: Option<f64>,
    stops: &[String],
) -> Vec<ValidationError> {
    let mut problems: Vec<ValidationError> =
        check_list(&body(&["messages"]), messages, 1, MAX_MESSAGES)
            .into_iter()
            .chain(max_tokens.iter().filter_map(|(name, value)| {
                check_range(body(&[*name]), u64::from((*value)?), 1, 4096)
            }))
            .collect();
    let mut range = |name: &str, ok: bool, msg: String| {
        if !ok {
            problems.push(ValidationError::new(body(&[name]), msg, "value_error"));
        }
    };
    range(
        "temperature",
        temperature.is_none_or(|t| (0.0..=2.0).contains(&t)),
        "temperature should be between 0 and 2".into(),
    );
    range(
        "top_p",
        top_p.is_none_or(|p| p > 0.0 && p <= 1.0),
        "top_p should be above 0 and at most 1".into(),
    );
    if prompt_chars > MAX_PROMPT_CHARS {
        problems.push(ValidationError::new(
            body(&["messages"]),
            format!(
                "The conversation has {prompt_chars} characters; at most {MAX_PROMPT_CHARS} are accepted"
            ),
            "too_long",
        ));
    }
    problems.extend(check_list(&body(&["stop"]), stops.len(), 0, MAX_STOPS));
    for (i, s) in stops.iter().enumerate() {
        problems.extend(check_text(
            body::<LocItem>(&["stop".into(), i.into()]),
            s,
            1,
            64,
        ));
    }
    problems
}

impl Stop {
    /// The stop strings as a list.
    pub fn list(stop: &Option<Stop>) -> Vec<String> {
        match stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }
}

impl Validate for ChatRequest {
    fn validate(&self) -> Vec<ValidationError> {
        let mut problems = check_generation(
            self.messages.len(),
            self.messages
                .iter()
                .map(|m| m.content.chars().count())
                .sum(),
            &[("max_tokens", Some(self.max_tokens))],
            self.temperature,
            self.top_p,
            &Stop::list(&self.stop),
        );
        for (i, m) in self.messages.iter().enumerate() {
            problems.extend(check_text(
                body::<LocItem>(&["messages".into(), i.into(), "content".into()]),
                &m.content,
                0,
                MAX_CONTENT,
            ));
        }
        problems
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// The events of a chat stream, each sent as `data: {json}`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ChatStreamEvent {
    /// The sources an answer from `/api/rag/query` is grounded in, before any delta; the answer
    /// cites the n-th as `[n]`.
    Sources { sources: Vec<Source> },
    /// The next piece of the answer.
    Delta { content: String },
    /// The answer is complete: `stop` (end of turn or a stop string) or `length` (max_tokens).
    Done {
        finish_reason: String,
        usage: ChatUsage,
    },
    /// Generation failed after the stream started.
    Error { message: String },
}

/// One Server-Sent Event of a chat stream: its `data` is a JSON-encoded [`ChatStreamEvent`].
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // a schema only: the events are written by axum's `Event`
pub struct ChatSseEvent {
    #[schema(schema_with = chat_event_data)]
    data: String,
    /// The SSE event type, `message` (the default) when absent.
    event: Option<String>,
}

fn chat_event_data() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .content_media_type("application/json")
        .content_schema(Some(Ref::from_schema_name("ChatStreamEvent")))
        .into()
}

/// Rewrites the internally tagged union `union` (utoipa writes its variants inline): each variant
/// becomes a component named after its tag (`delta` in `ChatStreamEvent` → `ChatDeltaEvent`), the
/// union a oneOf of references with a discriminator on `tag` mapping each value to its schema.
pub fn discriminate(doc: &mut utoipa::openapi::OpenApi, union: &str, tag: &str) {
    let Some(components) = doc.components.as_mut() else {
        return;
    };
    let Some(RefOr::T(Schema::OneOf(one_of))) = components.schemas.get(union).cloned() else {
        return;
    };
    let (stem, suffix) = match (
        union.strip_suffix("StreamEvent"),
        union.strip_suffix("Part"),
    ) {
        (Some(stem), _) => (stem, "Event"),
        (None, Some(stem)) => (stem, "Part"),
        (None, None) => (union, ""),
    };
    let (mut refs, mut mapping) = (Vec::new(), Vec::new());
    for item in one_of.items {
        let RefOr::T(Schema::Object(variant)) = &item else {
            refs.push(item);
            continue;
        };
        let value = variant
            .properties
            .get(tag)
            .and_then(|p| match p {
                RefOr::T(Schema::Object(o)) => o.enum_values.as_ref()?.first()?.as_str(),
                _ => None,
            })
            .map(str::to_string);
        let Some(value) = value else {
            refs.push(item);
            continue;
        };
        // `text-delta` → `TextDelta`.
        let title: String = value
            .split('-')
            .map(|word| {
                let mut word = word.to_string();
                let first = 1.min(word.len());
                word[..first].make_ascii_uppercase();
                word
            })
            .collect();
        let name = format!("{stem}{title}{suffix}");
        let reference = format!("#/components/schemas/{name}");
        components.schemas.insert(name.clone(), item);
        refs.push(Ref::new(reference.clone()).into());
        mapping.push((value, reference));
    }
    let mut rebuilt = OneOfBuilder::new()
        .description(one_of.description)
        .discriminator(Some(Discriminator::with_mapping(tag, mapping)));
    for item in refs {
        rebuilt = rebuilt.item(item);
    }
    components
        .schemas
        .insert(union.to_string(), Schema::OneOf(rebuilt.build()).into());
}

/// What a client may read of a mid-stream failure: the first clause of the message (the rest is
/// an error chain), and nothing that names an address. The whole message goes to the log, under
/// the request's id.
pub(crate) fn public_message(message: &str) -> String {
    tracing::warn!(error = %message, "generation failed midway");
    super::error::public_clause(message)
        .unwrap_or("The chat upstream failed")
        .to_string()
}

pub(super) fn event(e: ChatEvent) -> Event {
    let payload = match e {
        ChatEvent::Queued => return Event::default().comment("queued"),
        ChatEvent::Delta(content) => ChatStreamEvent::Delta { content },
        ChatEvent::Done(g) => ChatStreamEvent::Done {
            finish_reason: match g.finish_reason {
                FinishReason::Stop => "stop",
                FinishReason::Length => "length",
                FinishReason::Cancelled => "cancelled",
            }
            .into(),
            usage: ChatUsage {
                prompt_tokens: g.prompt_tokens,
                completion_tokens: g.completion_tokens,
            },
        },
        ChatEvent::Error(message) => ChatStreamEvent::Error {
            message: public_message(&message),
        },
    };
    Event::default().json_data(payload).unwrap_or_else(|_| {
        Event::default().data(r#"{"type":"error","message":"unserialisable event"}"#)
    })
}

/// The provider for `model` ([`crate::llm::route`]), as an HTTP error when there is none.
pub fn route(state: &AppState, model: Option<&str>) -> Result<Route, ApiError> {
    let locals = state
        .chat
        .iter()
        .map(|slot| match slot.get() {
            Ok(service) => Local::Ready(slot.name(), service),
            Err(_) => Local::Loading(slot.name()),
        })
        .collect();
    let model = model.map(|m| state.aliases.resolve(m));
    crate::llm::route(model, locals, state.upstream.as_ref()).map_err(|e| match e {
        e @ RouteError::ModelRequired => {
            ApiError::validation(body(&["model"]), e.to_string(), "missing")
        }
        e @ (RouteError::NoProvider | RouteError::Unknown { .. }) => {
            ApiError::NotFound(e.to_string())
        }
        e @ RouteError::Loading(_) => ApiError::Unavailable(e.to_string()),
    })
}

/// Routes a chat request to its provider, which checks it and takes a place in line; every
/// failure happens here, before a stream starts. Shared by `/api/chat/stream`,
/// `/v1/chat/completions` and `/api/rag/query`.
pub async fn start(
    state: &AppState,
    model: Option<&str>,
    messages: Vec<ChatMessage>,
    params: GenerationParams,
) -> Result<Started, ApiError> {
    let route = route(state, model)?;
    start_routed(state, route, messages, params).await
}

/// Starts a request on the provider already chosen.
pub async fn start_routed(
    state: &AppState,
    route: Route,
    messages: Vec<ChatMessage>,
    mut params: GenerationParams,
) -> Result<Started, ApiError> {
    if let Some(limit) = state.max_tokens_limit {
        params.max_tokens = params.max_tokens.min(limit);
    }
    let Route {
        provider,
        model: name,
        upstream,
    } = route;
    let events = provider
        .start(name.clone(), messages, params)
        .await
        .map_err(|e| match e {
            ChatError::Invalid(e) => {
                ApiError::validation(body(&["messages"]), e.to_string(), "value_error")
            }
            e @ ChatError::Busy(_) => ApiError::Unavailable(e.to_string()),
            ChatError::Upstream(detail) => ApiError::BadGateway(detail),
            ChatError::UpstreamTimeout(detail) => ApiError::GatewayTimeout(detail),
            ChatError::Internal(e) => ApiError::Internal(e),
        })?;
    Ok(Started {
        model: name,
        events: meter(
            events,
            if upstream { "upstream" } else { "local" },
            state.shutdown.watch(),
        ),
        upstream,
    })
}

/// A chat request that passed every check: its stream has started.
pub struct Started {
    /// The model answering.
    pub model: String,
    pub events: ChatStream,
    /// Whether the upstream answers (so an `error` event is the upstream's failure).
    pub upstream: bool,
}

/// A source of an answer, as listed by the first event of `/api/rag/query`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"id": 42, "title": "Returns policy", "excerpt": "Customers may return any product within 30 days...", "score": 0.71}))]
pub struct Source {
    /// The document's id.
    pub id: i64,
    pub title: String,
    /// The passages of the document given to the model, at most 500 characters.
    pub excerpt: String,
    /// Relevance in [0, 1], on the same scale in every mode and for every question (see
    /// `SearchResult.score`).
    pub score: f32,
}

/// Response headers of every chat stream: no caching, no proxy buffering.
pub fn stream_headers() -> [(HeaderName, &'static str); 2] {
    [
        (header::CACHE_CONTROL, "no-cache"),
        (HeaderName::from_static("x-accel-buffering"), "no"),
    ]
}

/// Stream a chat answer token by token.
///
/// `text/event-stream` of `data: {json}` events: `delta` events, then one `done` (or `error`).
/// A request that must wait for a generation slot gets its headers and a `: queued` comment at
/// once; a client that disconnects stops the generation within one token.
#[utoipa::path(
    post,
    path = "/api/chat/stream",
    tag = "chat",
    request_body = ChatRequest,
    responses(
        (status = 200, description = "Server-Sent Events, each `data:` line one event", content_type = "text/event-stream", body = ChatSseEvent),
        (status = 404, description = "Unknown model", body = HttpError,
            example = json!({"detail": "Unknown model 'gpt-4'; this server chats with 'SmolLM2-135M-Instruct'"})),
        (status = 413, description = "The body is larger than the configured limit", body = HttpError),
        (status = 422, description = "The body is not valid, or the conversation does not fit the context", body = HTTPValidationError),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = HttpError),
        (status = 502, description = "The chat upstream could not be reached or refused the request", body = HttpError,
            example = json!({"detail": "The chat upstream could not be reached or refused the request"})),
        (status = 503, description = "Too many generations, or the model is loading: retry later", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 504, description = "The chat upstream did not answer in time", body = HttpError),
    )
)]
pub async fn chat_stream(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let messages: Vec<ChatMessage> = req
        .messages
        .iter()
        .map(|m| ChatMessage::new(m.role.as_str(), &m.content))
        .collect();
    let params = GenerationParams {
        max_tokens: req.max_tokens as usize,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed.map(|s| s as u64),
        stop: Stop::list(&req.stop),
        ..Default::default()
    };
    let rx = start(&state, req.model.as_deref(), messages, params)
        .await?
        .events;
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let next = rx.recv().await?;
        Some((Ok::<_, Infallible>(event(next)), rx))
    });
    Ok((
        stream_headers(),
        Sse::new(stream).keep_alive(KeepAlive::default()),
    )
        .into_response())
}
