//! The OpenAI-compatible chat surface: `POST /v1/chat/completions` (streaming and not) and
//! `GET /v1/models`, on the local chat model, so that any OpenAI SDK can use aitier as its base URL.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::chat::{Role, Stop, check_generation, start, stream_headers};
use super::error::{ApiError, ValidationError};
use super::extract::{Validate, integral_opt};
use super::openai::{OpenAiError, OpenAiErrorBody, OpenAiJson};
use crate::llm::{ChatEvent, ChatMessage, FinishReason, GenerationParams};
use crate::state::AppState;

mod types;
mod unsupported;

pub use types::*;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(completions))
        .routes(routes!(models))
}

/// A message's content: text, or a list of parts of which only `text` parts are understood.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged, expecting = "a string or an array of content parts")]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// Only text parts are supported.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PartKind {
    Text,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    #[allow(dead_code)] // checked by deserialization: only `text` parts get through
    pub kind: PartKind,
    pub text: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionMessage {
    pub role: Role,
    pub content: Content,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with the token usage before `[DONE]`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32}))]
pub struct ChatCompletionRequest {
    /// The chat model (see `GET /v1/models`).
    pub model: String,
    /// The conversation so far: 1 to 256 messages of at most 200000 characters in all.
    #[schema(min_items = 1, max_items = 256)]
    pub messages: Vec<CompletionMessage>,
    /// Most tokens to generate (default 1024).
    #[serde(default, deserialize_with = "integral_opt")]
    #[schema(minimum = 1, maximum = 4096)]
    pub max_tokens: Option<u32>,
    /// Newer name of `max_tokens`; wins when both are given.
    #[serde(default, deserialize_with = "integral_opt")]
    #[schema(minimum = 1, maximum = 4096)]
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature; 0 or omitted is greedy decoding.
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f64>,
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    #[serde(default, deserialize_with = "integral_opt")]
    #[schema(minimum = 0)]
    pub seed: Option<i64>,
    /// Up to 4 stop sequences (each 1 to 64 characters).
    #[serde(default)]
    #[schema(schema_with = super::chat::stop_schema)]
    pub stop: Option<Stop>,
    /// Stream `chat.completion.chunk` events, ending with `data: [DONE]`.
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Only 1 is supported.
    #[serde(default, deserialize_with = "integral_opt")]
    #[schema(minimum = 1, maximum = 1)]
    pub n: Option<u32>,
    /// Only `{"type": "text"}`: output cannot be constrained to JSON here. Any other format is a
    /// 422 naming this field, rather than an answer that silently ignores it.
    #[serde(default)]
    #[schema(schema_with = unsupported::text_format)]
    pub response_format: Option<Value>,
    /// Tool calling is not supported: only an empty list.
    #[serde(default)]
    #[schema(schema_with = unsupported::no_list)]
    pub tools: Option<Value>,
    /// Only `none` (there are no tools to call).
    #[serde(default)]
    #[schema(schema_with = unsupported::only_none)]
    pub tool_choice: Option<Value>,
    /// The deprecated form of `tools`: only an empty list.
    #[serde(default)]
    #[schema(schema_with = unsupported::no_list)]
    pub functions: Option<Value>,
    /// The deprecated form of `tool_choice`: only `none`.
    #[serde(default)]
    #[schema(schema_with = unsupported::only_none)]
    pub function_call: Option<Value>,
    /// Log probabilities are not returned: only `false`.
    #[serde(default)]
    #[schema(schema_with = unsupported::only_false)]
    pub logprobs: Option<Value>,
    /// Only 0 (no log probabilities are returned).
    #[serde(default)]
    #[schema(schema_with = unsupported::only_zero)]
    pub top_logprobs: Option<Value>,
}

impl ChatCompletionRequest {
    fn max_tokens(&self) -> u32 {
        self.max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(1024)
    }

    fn text(content: &Content) -> String {
        match content {
            Content::Text(t) => t.clone(),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| p.text.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

impl Validate for ChatCompletionRequest {
    fn validate(&self) -> Vec<ValidationError> {
        let prompt_chars = self
            .messages
            .iter()
            .map(|m| match &m.content {
                Content::Text(t) => t.chars().count(),
                Content::Parts(parts) => parts.iter().map(|p| p.text.chars().count()).sum(),
            })
            .sum();
        let mut problems = check_generation(
            self.messages.len(),
            prompt_chars,
            &[
                ("max_tokens", self.max_tokens),
                ("max_completion_tokens", self.max_completion_tokens),
            ],
            self.temperature,
            self.top_p,
            &Stop::list(&self.stop),
        );
        if self.n.is_some_and(|n| n != 1) {
            problems.push(ValidationError::new(
                vec!["body".into(), "n".into()],
                "only n = 1 is supported",
                "value_error",
            ));
        }
        problems.extend(unsupported::check(&[
            ("response_format", &self.response_format),
            ("tools", &self.tools),
            ("tool_choice", &self.tool_choice),
            ("functions", &self.functions),
            ("function_call", &self.function_call),
            ("logprobs", &self.logprobs),
            ("top_logprobs", &self.top_logprobs),
        ]));
        problems
    }
}

fn finish(reason: FinishReason) -> String {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    }
    .into()
}

/// Create a chat completion (OpenAI-compatible).
///
/// With `stream: true` the answer arrives as `chat.completion.chunk` Server-Sent Events ending with
/// `data: [DONE]`. Errors use OpenAI's shape.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion, or its stream of chunks",
            content((ChatCompletion = "application/json"), (ChatCompletionSseEvent = "text/event-stream"))),
        (status = 404, description = "No such model", body = OpenAiErrorBody),
        (status = 413, description = "The body is larger than the configured limit", body = OpenAiErrorBody),
        (status = 422, description = "The body is not valid, or the conversation does not fit the context", body = OpenAiErrorBody),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = OpenAiErrorBody),
        (status = 502, description = "The chat upstream could not be reached or refused the request", body = OpenAiErrorBody),
        (status = 503, description = "Too many generations, or the model is loading: retry later", body = OpenAiErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 504, description = "The chat upstream did not answer in time", body = OpenAiErrorBody),
    )
)]
pub async fn completions(
    State(state): State<AppState>,
    OpenAiJson(req): OpenAiJson<ChatCompletionRequest>,
) -> Result<Response, OpenAiError> {
    let messages: Vec<ChatMessage> = req
        .messages
        .iter()
        .map(|m| ChatMessage::new(m.role.as_str(), &ChatCompletionRequest::text(&m.content)))
        .collect();
    let params = GenerationParams {
        max_tokens: req.max_tokens() as usize,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed.map(|s| s as u64),
        stop: Stop::list(&req.stop),
        ..Default::default()
    };
    let began = std::time::Instant::now();
    let started = start(&state, Some(&req.model), messages, params).await?;
    let (model, mut rx) = (started.model, started.events);
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if req.stream != Some(true) {
        let mut text = String::new();
        while let Some(event) = rx.recv().await {
            match event {
                ChatEvent::Queued => {}
                ChatEvent::Delta(piece) => text.push_str(&piece),
                ChatEvent::Done(generation) => {
                    // `Server-Timing`: the wait for a generation slot, then the generation.
                    crate::telemetry::record_model_time(
                        generation.queued,
                        began.elapsed().saturating_sub(generation.queued),
                    );
                    return Ok(Json(ChatCompletion {
                        id,
                        object: "chat.completion".into(),
                        created,
                        model,
                        choices: vec![CompletionChoice {
                            index: 0,
                            message: AssistantMessage {
                                role: "assistant".into(),
                                content: generation.text.clone(),
                            },
                            finish_reason: finish(generation.finish_reason),
                        }],
                        usage: CompletionUsage::from(&generation),
                    })
                    .into_response());
                }
                ChatEvent::Error(message) if started.upstream => {
                    return Err(ApiError::BadGateway(message).into());
                }
                ChatEvent::Error(message) => {
                    return Err(ApiError::Internal(anyhow::anyhow!(message)).into());
                }
            }
        }
        return Err(
            ApiError::Internal(anyhow::anyhow!("the generation ended without a result")).into(),
        );
    }
    let include_usage = req
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let chunk =
        move |delta: ChunkDelta, finish_reason: Option<String>, usage: Option<CompletionUsage>| {
            let choices = match usage {
                Some(_) => Vec::new(),
                None => vec![ChunkChoice {
                    index: 0,
                    delta,
                    finish_reason,
                }],
            };
            Event::default()
                .json_data(ChatCompletionChunk {
                    id: id.clone(),
                    object: "chat.completion.chunk".into(),
                    created,
                    model: model.clone(),
                    choices,
                    usage,
                })
                .unwrap_or_else(|_| Event::default().data("{}"))
        };
    let opening = chunk(
        ChunkDelta {
            role: Some("assistant".into()),
            content: Some(String::new()),
        },
        None,
        None,
    );
    // The generation closes the channel after its last event, which ends the stream.
    let to_events = move |event: ChatEvent| -> Vec<Event> {
        match event {
            ChatEvent::Queued => vec![Event::default().comment("queued")],
            ChatEvent::Delta(piece) => vec![chunk(
                ChunkDelta {
                    role: None,
                    content: Some(piece),
                },
                None,
                None,
            )],
            ChatEvent::Done(generation) => {
                let mut out = vec![chunk(
                    ChunkDelta::default(),
                    Some(finish(generation.finish_reason)),
                    None,
                )];
                if include_usage {
                    out.push(chunk(
                        ChunkDelta::default(),
                        None,
                        Some(CompletionUsage::from(&generation)),
                    ));
                }
                out.push(Event::default().data("[DONE]"));
                out
            }
            ChatEvent::Error(message) => {
                let message = super::chat::public_message(&message);
                let body = serde_json::json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
                vec![Event::default().data(body.to_string())]
            }
        }
    };
    let events = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (event, rx))
    })
    .flat_map(move |event| futures::stream::iter(to_events(event)));
    let stream = futures::stream::iter([opening])
        .chain(events)
        .map(Ok::<_, Infallible>);
    Ok((
        stream_headers(),
        Sse::new(stream).keep_alive(KeepAlive::default()),
    )
        .into_response())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    /// Always `model`.
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    /// For an alias (`--model-aliases`): the model that answers to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias_of: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<ModelCard>,
}

/// List the served models (OpenAI-compatible): the local chat model, the upstream's chat models,
/// the embedding model, then the aliases (`alias_of` names the model each stands for).
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, description = "The served models", body = ModelList)))]
pub async fn models(State(state): State<AppState>) -> Json<ModelList> {
    let card = |id: &str, owned_by: &str| ModelCard {
        id: id.to_string(),
        object: "model".into(),
        created: 0,
        owned_by: owned_by.into(),
        alias_of: None,
    };
    let mut data: Vec<ModelCard> = state
        .chat
        .iter()
        .map(|slot| card(slot.name(), "aitier"))
        .collect();
    if let Some(upstream) = &state.upstream {
        data.extend(
            upstream
                .models()
                .await
                .iter()
                .map(|id| card(id, "upstream")),
        );
    }
    data.push(card(state.embeddings.name(), "aitier"));
    data.extend(state.aliases.iter().map(|(alias, model)| ModelCard {
        alias_of: Some(model.to_string()),
        ..card(alias, "aitier")
    }));
    Json(ModelList {
        object: "list".into(),
        data,
    })
}
