//! The HTTP surface: routes (one file per resource family), the OpenAPI document they generate, the
//! page at `/`, and the middleware stack (request ids, tracing, CORS, limits, timeouts, panics).

mod ai_sdk;
pub mod auth;
mod chat;
mod classify;
mod docs;
mod embed;
mod error;
mod extract;
mod health;
mod limit;
mod openai;
mod openai_chat;
mod page;
mod rag;
mod scrape;
mod tokenize;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

pub use embed::{EmbedRequest, EmbedResponse};
pub use error::{ApiError, HTTPValidationError, HttpError, ValidationError};
pub use extract::{ApiJson, BodyLimit, Validate};
pub use openai::{OpenAiError, OpenAiJson};

use crate::config::ServeArgs;
use crate::state::AppState;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(OpenApi)]
#[openapi(
    info(
        title = "aitier",
        description = "An AI middle tier: embeddings, classification, streamed chat and retrieval-augmented \
            answers over HTTP. Errors use FastAPI's shapes (`/v1` routes use OpenAI's).",
        license(name = "MIT", identifier = "MIT"),
    ),
    tags(
        (name = "embeddings", description = "Sentence embeddings"),
        (name = "classification", description = "Sentiment and text classification"),
        (name = "chat", description = "Chat answers streamed as Server-Sent Events"),
        (name = "openai", description = "OpenAI-compatible API"),
        (name = "rag", description = "Documents, retrieval, and answers grounded in them"),
        (name = "health", description = "Liveness and readiness probes"),
    ),
    components(schemas(HTTPValidationError, ValidationError, HttpError, chat::ChatStreamEvent, openai_chat::ChatCompletionChunk, ai_sdk::parts::UiStreamPart))
)]
struct ApiDoc;

/// Every documented route. A route cannot be added without its OpenAPI entry.
fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(health::routes())
        .merge(embed::routes())
        .merge(classify::routes())
        .merge(chat::routes())
        .merge(openai::routes())
        .merge(openai_chat::routes())
        .merge(rag::routes())
        .merge(scrape::routes())
        .merge(tokenize::routes())
        .merge(ai_sdk::routes())
}

/// The OpenAPI document, as committed in `openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    finish(api().into_openapi())
}

/// Touches utoipa cannot make: each event union becomes a oneOf of named event schemas with a
/// `type` discriminator, which openapi-typescript turns into a discriminated union.
fn finish(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    chat::discriminate(&mut doc, "ChatStreamEvent", "type");
    chat::discriminate(&mut doc, "UiStreamPart", "type");
    docs::secure(&mut doc);
    doc
}

/// The application with its middleware, ready to serve. Call [`ServeArgs::validate`] first: an
/// unreadable key file panics here.
pub fn app(state: AppState, args: &ServeArgs) -> Router {
    let access = Arc::new(
        auth::Access::from_args(args).unwrap_or_else(|e| panic!("invalid --api-keys: {e}")),
    );
    scrape::handle(); // installs the metrics recorder before anything is counted
    let (router, spec) = api().split_for_parts();
    let spec = finish(spec);
    router
        .merge(SwaggerUi::new("/docs").url("/openapi.json", spec))
        .merge(page::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(request_span)
                        .on_response(DefaultOnResponse::new().level(tracing::Level::INFO))
                        // A 503 while loading or when a queue is full is expected, not an ERROR
                        // line per readiness probe; a real 500 is logged once, with its cause,
                        // where it happens (`ApiError::respond_with`).
                        .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                .layer(middleware::from_fn(scrape::observe))
                .layer(CatchPanicLayer::custom(panic_response))
                .layer(middleware::from_fn_with_state(
                    state.shutdown.clone(),
                    refuse_when_stopping,
                ))
                .layer(cors(args))
                // Inside CORS, so that preflights are answered before any key is asked for.
                .layer(middleware::from_fn_with_state(access, auth::check))
                // Inside the key check: the caller it names is what is charged.
                .layer(middleware::from_fn_with_state(
                    Arc::new(limit::Limits::from_args(args)),
                    limit::check,
                ))
                .layer(middleware::from_fn_with_state(
                    args.request_timeout(),
                    time_limit,
                ))
                .layer(DefaultBodyLimit::max(args.body_limit))
                .layer(Extension(BodyLimit(args.body_limit))),
        )
        .with_state(state)
}

fn request_span(req: &Request) -> tracing::Span {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(req.uri().path(), MatchedPath::as_str);
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info_span!("request", method = %req.method(), path, request_id = id)
}

fn cors(args: &ServeArgs) -> CorsLayer {
    let origins = if args.cors_origins.iter().any(|o| o.trim() == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            args.cors_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o.trim()).ok()),
        )
    };
    CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("x-api-key"),
        ])
        .expose_headers([REQUEST_ID, header::RETRY_AFTER])
        .allow_credentials(args.cors_credentials)
}

/// Once shutdown has begun, new requests on connections still open get 503 (probes keep their
/// own answers: alive, not ready).
async fn refuse_when_stopping(
    State(shutdown): State<Arc<crate::state::Shutdown>>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    if shutdown.is_begun() && !path.starts_with("/health") {
        let path = path.to_string();
        return auth::refuse(
            &path,
            ApiError::Unavailable("The server is shutting down; retry elsewhere".into()),
        );
    }
    next.run(req).await
}

/// Bounds the time to a response's headers; a stream's body is not cut.
async fn time_limit(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => auth::refuse(&path, ApiError::Timeout(limit.as_secs())),
    }
}

fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    ApiError::Internal(anyhow::anyhow!("handler panicked: {message}")).into_response()
}

async fn not_found() -> ApiError {
    ApiError::NotFound("Not Found".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
