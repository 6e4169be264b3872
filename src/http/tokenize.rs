//! `POST /api/tokenize`: how many tokens a text or a conversation is for the chat or the
//! embedding model, so that a page can show how much of the context a conversation uses.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::chat::{MAX_MESSAGES, MAX_PROMPT_CHARS, Message};
use super::error::{ApiError, HTTPValidationError, HttpError, ValidationError};
use super::extract::{ApiJson, Validate, body, check_list, check_text};
use crate::inference::InferenceError;
use crate::llm::{ChatMessage, LlmError};
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(tokenize))
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}]}))]
pub struct TokenizeRequest {
    /// Whose tokenizer counts: the local chat model, the embedding model, or an alias of either.
    /// Omitted: the chat model, or the embedding model when chat is off.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200, example = "SmolLM2-135M-Instruct")]
    pub model: Option<String>,
    /// A text, counted as it is (1 to 200000 characters). Give `text` or `messages`, not both.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200000)]
    pub text: Option<String>,
    /// A conversation (1 to 256 messages, 200000 characters in all), counted as the chat model's
    /// prompt: its chat template applied and the assistant's turn opened, as a chat request
    /// would send it. Chat models only.
    #[serde(default)]
    #[schema(min_items = 1, max_items = 256)]
    pub messages: Option<Vec<Message>>,
    /// Return the token ids too.
    #[serde(default)]
    pub return_ids: bool,
}

impl Validate for TokenizeRequest {
    fn validate(&self) -> Vec<ValidationError> {
        let mut problems = Vec::new();
        if let Some(model) = &self.model {
            problems.extend(check_text(body(&["model"]), model, 1, 200));
        }
        match (&self.text, &self.messages) {
            (Some(_), Some(_)) | (None, None) => problems.push(ValidationError::new(
                body::<&str>(&[]),
                "Give either text or messages",
                "value_error",
            )),
            (Some(text), None) => {
                problems.extend(check_text(body(&["text"]), text, 1, MAX_PROMPT_CHARS))
            }
            (None, Some(messages)) => {
                problems.extend(check_list(
                    &body(&["messages"]),
                    messages.len(),
                    1,
                    MAX_MESSAGES,
                ));
                let chars: usize = messages.iter().map(|m| m.content.chars().count()).sum();
                if chars > MAX_PROMPT_CHARS {
                    problems.push(ValidationError::new(
                        body(&["messages"]),
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
/// embedding model, a text counts as `/api/embed` reads it.
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
        (status = 422, description = "The body is not valid, or `messages` for the embedding model", body = HTTPValidationError),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = HttpError),
        (status = 503, description = "The model is loading: retry later", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn tokenize(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let chat = state.chat.as_ref();
    let embedding = state.embeddings.name();
    let asked = req.model.as_deref().map(|m| state.aliases.resolve(m));
    let to_chat = match (asked, chat) {
        (None, chat) => chat.is_some(),
        (Some(m), Some(slot)) if m == slot.name() => true,
        (Some(m), _) if m == embedding => false,
        (Some(m), _) => {
            let served: Vec<String> = chat
                .map(|slot| slot.name())
                .into_iter()
                .chain([embedding])
                .map(|n| format!("'{n}'"))
                .collect();
            return Err(ApiError::NotFound(format!(
                "Tokens are counted for {}, not '{m}'",
                served.join(" and ")
            )));
        }
    };
    let counted = match chat.filter(|_| to_chat) {
        Some(slot) => {
            let service = slot.get()?;
            let model = service.model().clone();
            let limit = model.context_length();
            let ids = blocking(move || match (req.text, req.messages) {
                (Some(text), _) => model.tokens(&text),
                (None, messages) => {
                    let messages: Vec<ChatMessage> = messages
                        .unwrap_or_default()
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
            let Some(text) = req.text else {
                return Err(ApiError::validation(
                    body(&["messages"]),
                    format!("'{embedding}' is not a chat model: give text"),
                    "value_error",
                ));
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
