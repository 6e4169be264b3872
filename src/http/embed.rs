//! `POST /api/embed`: sentence embeddings in aitier's own (the seed's) shape.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, HTTPValidationError, HttpError, LocItem, ValidationError};
use super::extract::{ApiJson, Validate, check_list, check_text};
use crate::inference::Embedding;
use crate::state::AppState;

/// Most texts in one request.
pub const MAX_TEXTS: usize = 256;
/// Longest text, in characters.
pub const MAX_CHARS: usize = 10_000;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(embed))
}

/// The schema of a list of 1..=256 texts of 1..=10000 characters.
pub fn texts_schema() -> ArrayBuilder {
    ArrayBuilder::new()
        .items(text_schema())
        .min_items(Some(1))
        .max_items(Some(MAX_TEXTS))
}

pub fn text_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_CHARS))
}

/// Checks a list of texts against the limits, reporting each offending item at `loc`.
pub fn check_texts(loc: &[LocItem], texts: &[String]) -> Vec<ValidationError> {
    if let Some(problem) = check_list(loc, texts.len(), 1, MAX_TEXTS) {
        return vec![problem];
    }
    texts
        .iter()
        .enumerate()
        .filter_map(|(i, text)| {
            let mut at = loc.to_vec();
            at.push(i.into());
            check_text(at, text, 1, MAX_CHARS)
        })
        .collect()
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"texts": ["The quick brown fox jumps over the lazy dog."], "normalize": true}))]
pub struct EmbedRequest {
    /// Texts to embed: 1 to 256 of them, each 1 to 10000 characters. Texts longer than the model's
    /// maximum length are truncated (see `truncated`).
    #[schema(schema_with = texts_schema)]
    pub texts: Vec<String>,
    /// L2-normalise each vector, so that a dot product is the cosine similarity.
    #[serde(default = "default_true")]
    #[schema(default = true)]
    pub normalize: bool,
}

fn default_true() -> bool {
    true
}

impl Validate for EmbedRequest {
    fn validate(&self) -> Vec<ValidationError> {
        check_texts(&["body".into(), "texts".into()], &self.texts)
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "embeddings": [[-0.0345, 0.031, 0.0067]],
    "model": "all-MiniLM-L6-v2",
    "dims": 384,
    "usage": {"prompt_tokens": 12}
}))]
pub struct EmbedResponse {
    /// One vector per input text, in order.
    pub embeddings: Vec<Vec<f32>>,
    /// The model that produced them.
    pub model: String,
    /// Length of each vector.
    pub dims: usize,
    pub usage: Usage,
    /// Present when at least one text was longer than the model's maximum length: which texts were
    /// truncated before embedding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated: Option<Vec<bool>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Usage {
    /// Tokens the model read, special tokens included, after truncation.
    pub prompt_tokens: usize,
}

/// Embed texts.
///
/// Requests that arrive together are batched into one forward pass. Returns 503 with `Retry-After`
/// when the queue is full or the model is still loading.
#[utoipa::path(
    post,
    path = "/api/embed",
    tag = "embeddings",
    request_body = EmbedRequest,
    responses(
        (status = 200, description = "One embedding per text", body = EmbedResponse),
        (status = 413, description = "The body is larger than the configured limit", body = HttpError,
            example = json!({"detail": "Request body is larger than the limit of 2097152 bytes"})),
        (status = 422, description = "The body is not valid", body = HTTPValidationError),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = HttpError,
            example = json!({"detail": "Internal Server Error"})),
        (status = 503, description = "Overloaded or the model is loading: retry later", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
            example = json!({"detail": "The all-MiniLM-L6-v2 queue is full; retry after 1 s"})),
    )
)]
pub async fn embed(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<EmbedRequest>,
) -> Result<Json<EmbedResponse>, ApiError> {
    let service = state.embeddings.get()?;
    let embeddings = service.embed(req.texts, req.normalize).await?;
    Ok(Json(EmbedResponse {
        model: service.name().to_string(),
        dims: service.dims(),
        usage: Usage {
            prompt_tokens: embeddings.iter().map(|e| e.tokens).sum(),
        },
        truncated: embeddings
            .iter()
            .any(|e| e.truncated)
            .then(|| embeddings.iter().map(|e| e.truncated).collect()),
        embeddings: embeddings
            .into_iter()
            .map(|e: Embedding| e.vector)
            .collect(),
    }))
}
