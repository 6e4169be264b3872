//! `POST /api/tokenize`: how many tokens a text or a conversation is for the chat or the
//! embedding model, so that a page can show how much of the context a conversation uses.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use utoipa::openapi::Ref;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};

use super::chat::{MAX_CONTENT, MAX_MESSAGES, MAX_PROMPT_CHARS, Message};
use super::error::{ApiError, HTTPValidationError, HttpError, LocItem, ValidationError};
use super::extract::{ApiJson, Validate, body, check_list, check_text};
use crate::inference::InferenceError;
use crate::llm::{ChatMessage, LlmError};
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(tokenize))
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"input": [{"role": "user", "content": "What is the capital of France?"}]}))]
pub struct TokenizeRequest {
    /// Whose tokenizer counts: the local chat model, the embedding model, or an alias of either.
    /// Omitted: the chat model, or the embedding model when chat is off.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200, example = "SmolLM2-135M-Instruct")]
    pub model: Option<String>,
    /// What to count: a text (1 to 200000 characters), counted as it is; or a conversation (1 to
    /// 256 messages of at most 100000 characters, 200000 in all), counted for the chat model as
    /// the prompt a chat request would send (its chat template applied, the assistant's turn
    /// opened), for the embedding model as its messages' texts, one per line.
    #[schema(schema_with = input_schema)]
    pub input: TokenizeInput,
    /// Return the token ids too.
    #[serde(default)]
    pub return_ids: bool,
}

/// A text or a conversation.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or an array of messages")]
pub enum TokenizeInput {
    Text(String),
    Messages(Vec<Message>),
}

fn input_schema() -> OneOfBuilder {
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(MAX_PROMPT_CHARS)),
        )
        .item(
            ArrayBuilder::new()
                .items(Ref::from_schema_name("Message"))
                .min_items(Some(1))
                .max_items(Some(MAX_MESSAGES)),
        )
}

impl Validate for TokenizeRequest {
    fn validate(&self) -> Vec<ValidationError> {
        let mut problems = Vec::new();
        if let Some(model) = &self.model {
            problems.extend(check_text(body(&["model"]), model, 1, 200));
        }
        match &self.input {
            TokenizeInput::Text(text) => {
                problems.extend(check_text(body(&["input"]), text, 1, MAX_PROMPT_CHARS))
            }
            TokenizeInput::Messages(messages) => {
                problems.extend(check_list(
                    &body(&["input"]),
                    messages.len(),
                    1,
                    MAX_MESSAGES,
                ));
                for (i, m) in messages.iter().enumerate() {
                    problems.extend(check_text(
                        body::<LocItem>(&["input".into(), i.into(), "content".into()]),
                        &m.content,
                        0,
                        MAX_CONTENT,
                    ));
                }
                let chars: usize = messages.iter().map(|m| m.content.chars().count()).sum();
                if chars > MAX_PROMPT_CHARS {
                    problems.push(ValidationError::new(
                        body(&["input"]),
                        format!("The conversation has {chars} characters; at most {MAX_PROMPT_CHARS} are accepted"),
                        "too_long",
                    ));
                }
            }
        }
        problems
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"model": "SmolLM2-135M-Instruct", "count": 38, "limit": 8192, "truncated": false}))]
pub struct TokenizeResponse {
    /// The model that counted.
    pub model: String,
    /// Tokens the model reads (for the embedding model, special tokens included, at most `limit`).
    pub count: usize,
    /// The most tokens the model reads: the chat model's context (prompt and answer together),
    /// the embedding model's longest input.
    pub limit: usize,
    /// The embedding model cuts a longer text at `limit` tokens (`/api/embed` flags it too). A
    /// conversation longer than the chat model's context is refused by chat requests instead.
    pub truncated: bool,
    /// The token ids, when `return_ids` was set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<u32>>,
}

/// Count the tokens of a text or a conversation.
///
/// For the chat model, a conversation counts as the prompt a chat request would send; for the
/// embedding model, a text counts as `/api/embed` reads it (cut at its longest input).
#[utoipa::path(
    post,
    path = "/api/tokenize",
    tag = "chat",
    request_body = TokenizeRequest,
    responses(
        (status = 200, description = "The count", body = TokenizeResponse),
        (status = 404, description = "No such model here", body = HttpError,
            example = json!({"detail": "Tokens are counted for 'SmolLM2-135M-Instruct' and 'all-MiniLM-L6-v2', not 'gpt-4'"})),
        (status = 413, description = "The body is larger than the configured limit", body = HttpError),
        (status = 422, description = "The body is not valid", body = HTTPValidationError),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = HttpError),
        (status = 503, description = "The model is loading: retry later", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn tokenize(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let embedding = state.embeddings.name();
    let asked = req.model.as_deref().map(|m| state.aliases.resolve(m));
    // No name: the default chat model (the embedding model when chat is off).
    let chat = state.chat_model(asked);
    if chat.is_none()
        && let Some(m) = asked
        && m != embedding
    {
        let served: Vec<String> = state
            .chat
            .iter()
            .map(|slot| slot.name())
            .chain([embedding])
            .map(|n| format!("'{n}'"))
            .collect();
        return Err(ApiError::NotFound(format!(
            "Tokens are counted for {}, not '{m}'",
            served.join(" and ")
        )));
    }
    let counted = match chat {
        Some(slot) => {
            let service = slot.get()?;
            let model = service.model().clone();
            let limit = model.context_length();
            let ids = blocking(move || match req.input {
                TokenizeInput::Text(text) => model.tokens(&text),
                TokenizeInput::Messages(messages) => {
                    let messages: Vec<ChatMessage> = messages
                        .iter()
                        .map(|m| ChatMessage::new(m.role.as_str(), &m.content))
                        .collect();
                    model.prompt_tokens(&messages)
                }
            })
            .await?
            .map_err(|e| match e {
                LlmError::Template(msg) | LlmError::Tokenizer(msg) => {
                    ApiError::validation(body::<&str>(&[]), msg, "value_error")
                }
                e => ApiError::Internal(e.into()),
            })?;
            Counted {
                model: slot.name().to_string(),
                limit,
                truncated: false,
                ids,
            }
        }
        None => {
            let text = match req.input {
                TokenizeInput::Text(text) => text,
                TokenizeInput::Messages(messages) => messages
                    .iter()
                    .map(|m| m.content.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            };
            let service = state.embeddings.get()?;
            let limit = service.max_tokens();
            let tokenized = blocking(move || service.tokenize(&text))
                .await?
                .map_err(|e| ApiError::from(InferenceError::Model(e)))?;
            Counted {
                model: embedding.to_string(),
                limit,
                truncated: tokenized.truncated,
                ids: tokenized.ids,
            }
        }
    };
    Ok(Json(TokenizeResponse {
        model: counted.model,
        count: counted.ids.len(),
        limit: counted.limit,
        truncated: counted.truncated,
        ids: req.return_ids.then_some(counted.ids),
    }))
}

struct Counted {
    model: String,
    limit: usize,
    truncated: bool,
    ids: Vec<u32>,
}

/// Tokenizing 200,000 characters takes milliseconds: off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("tokenizer task failed: {e}")))
}
