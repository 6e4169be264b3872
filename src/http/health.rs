//! Liveness and readiness probes.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, HttpError};
use crate::state::AppState;

/// How long readiness waits for the database to answer.
const DATABASE_PING: std::time::Duration = std::time::Duration::from_secs(2);

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"status": "ok"}))]
pub struct HealthResponse {
    /// `ok` while the process serves HTTP; `ready` once every model is loaded and warm.
    pub status: String,
}

/// Liveness: the process is up and serving HTTP (Render's health check).
#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, description = "The server is up", body = HealthResponse)))]
pub async fn health() -> Json<HealthResponse> {
    Json(HealthResponse {
        status: "ok".into(),
    })
}

/// Readiness: every configured model is loaded and warmed up.
#[utoipa::path(get, path = "/health/ready", tag = "health",
    responses(
        (status = 200, description = "Every model is loaded and warm", body = HealthResponse,
            example = json!({"status": "ready"})),
        (status = 503, description = "A model is still loading, or the database is unavailable", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before asking again")),
            example = json!({"detail": "Not ready: loading all-MiniLM-L6-v2"})),
    ))]
pub async fn ready(State(state): State<AppState>) -> Result<Json<HealthResponse>, ApiError> {
    if state.shutdown.is_begun() {
        return Err(ApiError::Unavailable(
            "Not ready: the server is shutting down".into(),
        ));
    }
    let pending = state.not_ready();
    let database = match &state.rag {
        Some(rag) => rag.database.problem(DATABASE_PING).await,
        None => None,
    };
    if let Some(problem) = database {
        let loading = if pending.is_empty() {
            String::new()
        } else {
            format!("; loading {}", pending.join(", "))
        };
        // The driver's message can name hosts and users, and this route is open: the cause is
        // in the log (the connection loop warns on every retry).
        tracing::debug!(error = %problem, "not ready: database");
        return Err(ApiError::Unavailable(format!(
            "Not ready: the database is unavailable{loading}"
        )));
    }
    if pending.is_empty() {
        Ok(Json(HealthResponse {
            status: "ready".into(),
        }))
    } else {
        Err(ApiError::Unavailable(format!(
            "Not ready: loading {}",
            pending.join(", ")
        )))
    }
}
