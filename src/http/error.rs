//! Error responses in FastAPI's shapes (`{"detail": [...]}` for validation, `{"detail": "..."}` for
//! the rest), and the one exhaustive mapping from domain errors to statuses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::inference::{InferenceError, ModelError};

/// Seconds a client is told to wait before retrying after a 503.
pub const RETRY_AFTER_SECS: u64 = 1;

/// One path segment of a validation error location: a field name or a list index.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum LocItem {
    Key(String),
    Index(usize),
}

impl From<&str> for LocItem {
    fn from(s: &str) -> Self {
        Self::Key(s.to_string())
    }
}

impl From<usize> for LocItem {
    fn from(i: usize) -> Self {
        Self::Index(i)
    }
}

/// FastAPI's `ValidationError`: where the input is wrong, what is wrong, and an error type code.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({"loc": ["body", "texts", 0], "msg": "String should have at least 1 character", "type": "string_too_short"}))]
pub struct ValidationError {
    /// Path to the offending input, starting with `body`.
    pub loc: Vec<LocItem>,
    /// Human-readable message.
    pub msg: String,
    /// Machine-readable error type (pydantic's codes: `missing`, `string_type`, `too_long`, ...).
    #[serde(rename = "type")]
    pub kind: String,
}

impl ValidationError {
    pub fn new(loc: Vec<LocItem>, msg: impl Into<String>, kind: impl Into<String>) -> Self {
        Self {
            loc,
            msg: msg.into(),
            kind: kind.into(),
        }
    }
}

/// FastAPI's `HTTPValidationError`, the 422 body.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"detail": [{"loc": ["body", "texts"], "msg": "List should have at least 1 item after validation, not 0", "type": "too_short"}]}))]
#[allow(clippy::upper_case_acronyms)]
pub struct HTTPValidationError {
    pub detail: Vec<ValidationError>,
}

/// Any other error: FastAPI's `{"detail": "..."}`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"detail": "Not Found"}))]
pub struct HttpError {
    /// What went wrong.
    pub detail: String,
}

/// Every error an HTTP handler can return.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("validation failed")]
    Validation(Vec<ValidationError>),
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    NotFound(String),
    #[error("Method Not Allowed")]
    MethodNotAllowed,
    /// No valid API key: answered with `WWW-Authenticate`.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid key without the scope the route needs.
    #[error("{0}")]
    Forbidden(String),
    /// The caller spent its rate limit; it may retry after `retry_after` seconds.
    #[error("{detail}")]
    TooManyRequests { detail: String, retry_after: u64 },
    /// Busy or still starting: the client should retry after `Retry-After`.
    #[error("{0}")]
    Unavailable(String),
    /// The response did not start within the request time limit: 504, not 503, since clients
    /// retry 503s and a retry would redo the same long work.
    #[error(
        "The response took longer than the server's {0} s limit; ask for less work (a lower max_tokens), or stream long answers"
    )]
    Timeout(u64),
    /// The chat upstream failed or answered with an error; the detail says how.
    #[error("{0}")]
    BadGateway(String),
    /// The chat upstream did not answer in time.
    #[error("{0}")]
    GatewayTimeout(String),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn validation(loc: Vec<LocItem>, msg: impl Into<String>, kind: &str) -> Self {
        Self::Validation(vec![ValidationError::new(loc, msg, kind)])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The client-facing message; 5xx causes stay in the log.
    pub fn detail(&self) -> String {
        match self {
            Self::Internal(_) => "Internal Server Error".into(),
            // The cause can name the upstream's address, carry the upstream's own message (which
            // may quote part of its key) and an error chain: the client gets its first clause
            // when that names no address, the log gets the rest.
            Self::BadGateway(cause) => public_clause(cause)
                .unwrap_or("The chat upstream could not be reached or refused the request")
                .into(),
            Self::GatewayTimeout(cause) => public_clause(cause)
                .unwrap_or("The chat upstream did not answer in time")
                .into(),
            Self::PayloadTooLarge { limit } => {
                format!("Request body is larger than the limit of {limit} bytes")
            }
            other => other.to_string(),
        }
    }

    /// Seconds to put in `Retry-After`, for the errors a retry can cure.
    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Unavailable(_) => Some(RETRY_AFTER_SECS),
            Self::TooManyRequests { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Builds a response with any JSON body, the status, `Retry-After` where due, and logs a 5xx
    /// cause once, with its whole source chain.
    pub fn respond_with(&self, body: impl Serialize) -> Response {
        match self {
            Self::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "internal error")
            }
            Self::BadGateway(cause) | Self::GatewayTimeout(cause) => {
                tracing::warn!(error = %cause, "chat upstream failed")
            }
            _ => {}
        }
        let mut response = (self.status(), axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if matches!(self, Self::Unauthorized(_)) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"aitier\""),
            );
        }
        response
    }
}

/// The first clause of a message (what follows `: ` is a cause or an error chain), unless it names
/// an address.
pub fn public_clause(message: &str) -> Option<&str> {
    let first = message.split(": ").next().unwrap_or(message);
    (!first.contains("://")).then_some(first)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Validation(items) => self.respond_with(HTTPValidationError {
                detail: items.clone(),
            }),
            _ => self.respond_with(HttpError {
                detail: self.detail(),
            }),
        }
    }
}

impl From<InferenceError> for ApiError {
    fn from(e: InferenceError) -> Self {
        match e {
            InferenceError::Overloaded { model } => Self::Unavailable(format!(
                "The {model} queue is full; retry after {RETRY_AFTER_SECS} s"
            )),
            InferenceError::NotReady { model } => Self::Unavailable(format!(
                "Model {model} is loading; retry after {RETRY_AFTER_SECS} s"
            )),
            InferenceError::Model(ModelError::Tokenize(msg)) => Self::validation(
                vec!["body".into()],
                format!("The text could not be tokenized: {msg}"),
                "value_error",
            ),
            InferenceError::Model(
                e @ (ModelError::Load(_) | ModelError::Forward(_) | ModelError::Panic(_)),
            ) => Self::Internal(e.into()),
            e @ InferenceError::WorkerStopped { .. } => Self::Internal(e.into()),
        }
    }
}
