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
    /// Busy or still starting: the client should retry after `Retry-After`.
    #[error("{0}")]
    Unavailable(String),
    #[error("the request took longer than {0} s")]
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
            Self::Unavailable(_) | Self::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The client-facing message; 5xx causes stay in the log.
    pub fn detail(&self) -> String {
        match self {
            Self::Internal(_) => "Internal Server Error".into(),
            Self::PayloadTooLarge { limit } => {
                format!("Request body is larger than the limit of {limit} bytes")
            }
            other => other.to_string(),
        }
    }

    fn retry_after(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Timeout(_))
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
        if self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
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
