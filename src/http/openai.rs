//! The OpenAI-compatible surface (`/v1/...`): OpenAI's request, response and error shapes, so that
//! any OpenAI SDK can use aitier as its base URL.

use axum::Json;
use axum::extract::{FromRequest, Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::schema::OneOfBuilder;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::embed::{check_texts, text_schema, texts_schema};
use super::error::{ApiError, LocItem, ValidationError};
use super::extract::{Validate, parse_body};
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(embeddings))
}

/// OpenAI's error body.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": {"message": "dimensions: all-MiniLM-L6-v2 only produces 384 dimensions", "type": "invalid_request_error", "param": "dimensions", "code": null}}))]
pub struct OpenAiErrorBody {
    pub error: OpenAiErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorDetail {
    /// What went wrong.
    pub message: String,
    /// `invalid_request_error` for client errors, `server_error` otherwise.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// A machine-readable code such as `model_not_found`.
    pub code: Option<String>,
}

/// An [`ApiError`] answered in OpenAI's shape, with the same status and headers.
#[derive(Debug)]
pub struct OpenAiError {
    error: ApiError,
    code: Option<&'static str>,
}

impl From<ApiError> for OpenAiError {
    /// A 404 on the `/v1` surface is always an unknown model; 401, 403 and 429 carry OpenAI's codes.
    fn from(error: ApiError) -> Self {
        let code = match error {
            ApiError::NotFound(_) => Some("model_not_found"),
            ApiError::Unauthorized(_) => Some("invalid_api_key"),
            ApiError::Forbidden(_) => Some("insufficient_permissions"),
            ApiError::TooManyRequests { .. } => Some("rate_limit_exceeded"),
            _ => None,
        };
        Self { error, code }
    }
}

impl From<crate::inference::InferenceError> for OpenAiError {
    fn from(error: crate::inference::InferenceError) -> Self {
        ApiError::from(error).into()
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let (message, param) = match &self.error {
            ApiError::Validation(items) => (
                items
                    .iter()
                    .map(|v| format!("{}: {}", param_path(&v.loc), v.msg))
                    .collect::<Vec<_>>()
                    .join("; "),
                items.first().map(|v| param_path(&v.loc)),
            ),
            other => (other.detail(), None),
        };
        let kind = if self.error.status().is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        };
        self.error.respond_with(OpenAiErrorBody {
            error: OpenAiErrorDetail {
                message,
                kind: kind.into(),
                param,
                code: self.code.map(str::to_string),
            },
        })
    }
}

/// `["body", "input", 0]` → `input[0]`.
fn param_path(loc: &[LocItem]) -> String {
    let mut path = String::new();
    for item in loc.iter().skip(1) {
        match item {
            LocItem::Key(k) if path.is_empty() => path.push_str(k),
            LocItem::Key(k) => {
                path.push('.');
                path.push_str(k);
            }
            LocItem::Index(i) => path.push_str(&format!("[{i}]")),
        }
    }
    if path.is_empty() { "body".into() } else { path }
}

/// A JSON body whose rejections use OpenAI's error shape.
pub struct OpenAiJson<T>(pub T);

impl<S, T> FromRequest<S> for OpenAiJson<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + Validate,
{
    type Rejection = OpenAiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, OpenAiError> {
        Ok(Self(parse_body(req, state).await?))
    }
}

fn input_schema() -> OneOfBuilder {
    OneOfBuilder::new().item(text_schema()).item(texts_schema())
}

/// Text to embed: one string, or a list of 1 to 256 strings (each 1 to 10000 characters).
/// Token-id arrays are not accepted.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or an array of strings")]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    #[default]
    Float,
    /// Little-endian f32 bytes, base64-encoded: a quarter of the JSON size.
    Base64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"input": ["The quick brown fox jumps over the lazy dog."], "model": "all-MiniLM-L6-v2"}))]
pub struct CreateEmbeddingRequest {
    #[schema(schema_with = input_schema)]
    pub input: EmbeddingInput,
    /// The served embedding model's name (see `model` in `/api/embed` responses).
    #[schema(example = "all-MiniLM-L6-v2")]
    pub model: String,
    /// `float` (default) or `base64`.
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
    /// Output dimensions, from 1 to the model's own (384 for the default all-MiniLM-L6-v2): the
    /// vector is cut to its first `dimensions` values and L2-normalised again, as OpenAI's
    /// text-embedding-3 models do. MiniLM was not trained for this (no Matryoshka loss), so short
    /// vectors lose more meaning than OpenAI's do. More than the model's own is a 422.
    #[serde(default, deserialize_with = "super::extract::integral_opt")]
    #[schema(minimum = 1, maximum = 384)]
    pub dimensions: Option<u32>,
    /// An end-user id, accepted for compatibility and ignored.
    #[serde(default)]
    #[allow(dead_code)]
    pub user: Option<String>,
}

impl Validate for CreateEmbeddingRequest {
    fn validate(&self) -> Vec<ValidationError> {
        let at = vec![LocItem::from("body"), "input".into()];
        match &self.input {
            EmbeddingInput::One(text) => check_texts(&at, std::slice::from_ref(text))
                .into_iter()
                .map(|mut v| {
                    v.loc.truncate(2);
                    v
                })
                .collect(),
            EmbeddingInput::Many(texts) => check_texts(&at, texts),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ListObject {
    List,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingObjectKind {
    Embedding,
}

/// A vector as floats, or as base64 of little-endian f32 bytes.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingData {
    pub object: EmbeddingObjectKind,
    /// Position of the input this embedding belongs to.
    pub index: usize,
    pub embedding: EmbeddingVector,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [-0.0345, 0.031, 0.0067]}],
    "model": "all-MiniLM-L6-v2",
    "usage": {"prompt_tokens": 12, "total_tokens": 12}
}))]
pub struct CreateEmbeddingResponse {
    pub object: ListObject,
    pub data: Vec<EmbeddingData>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

/// Create embeddings (OpenAI-compatible).
///
/// Vectors are L2-normalised, as OpenAI's are. Errors use OpenAI's error shape.
#[utoipa::path(
    post,
    path = "/v1/embeddings",
    tag = "openai",
    request_body = CreateEmbeddingRequest,
    responses(
        (status = 200, description = "One embedding per input", body = CreateEmbeddingResponse),
        (status = 404, description = "No such model", body = OpenAiErrorBody,
            example = json!({"error": {"message": "The model 'gpt-4' does not exist; this server embeds with 'all-MiniLM-L6-v2'", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}})),
        (status = 413, description = "The body is larger than the configured limit", body = OpenAiErrorBody),
        (status = 422, description = "The body is not valid", body = OpenAiErrorBody),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = OpenAiErrorBody),
        (status = 503, description = "Overloaded or the model is loading: retry later", body = OpenAiErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn embeddings(
    State(state): State<AppState>,
    OpenAiJson(req): OpenAiJson<CreateEmbeddingRequest>,
) -> Result<Json<CreateEmbeddingResponse>, OpenAiError> {
    let service = state.embeddings.get()?;
    if state.aliases.resolve(&req.model) != service.name() {
        return Err(OpenAiError {
            error: ApiError::NotFound(format!(
                "The model '{}' does not exist; this server embeds with '{}'",
                req.model,
                service.name()
            )),
            code: Some("model_not_found"),
        });
    }
    if let Some(dimensions) = req
        .dimensions
        .filter(|&d| d == 0 || d as usize > service.dims())
    {
        return Err(ApiError::validation(
            vec!["body".into(), "dimensions".into()],
            format!(
                "dimensions should be between 1 and {}, the most {} produces; not {dimensions}",
                service.dims(),
                service.name(),
            ),
            "value_error",
        )
        .into());
    }
    let dimensions = req.dimensions.map(|d| d as usize);
    let texts = match req.input {
        EmbeddingInput::One(text) => vec![text],
        EmbeddingInput::Many(texts) => texts,
    };
    let embeddings = service.embed(texts, true).await?;
    let tokens = embeddings.iter().map(|e| e.tokens).sum();
    let base64 = req.encoding_format == Some(EncodingFormat::Base64);
    Ok(Json(CreateEmbeddingResponse {
        object: ListObject::List,
        data: embeddings
            .into_iter()
            .enumerate()
            .map(|(index, e)| {
                let vector = match dimensions {
                    Some(d) if d < e.vector.len() => shorten(e.vector, d),
                    _ => e.vector,
                };
                EmbeddingData {
                    object: EmbeddingObjectKind::Embedding,
                    index,
                    embedding: if base64 {
                        EmbeddingVector::Base64(encode_f32(&vector))
                    } else {
                        EmbeddingVector::Float(vector)
                    },
                }
            })
            .collect(),
        model: service.name().to_string(),
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    }))
}

/// The first `d` values, scaled back to unit length.
fn shorten(mut vector: Vec<f32>, d: usize) -> Vec<f32> {
    vector.truncate(d);
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
    vector
}

fn encode_f32(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
