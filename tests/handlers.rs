//! Fast handler tests on a fake model (`app(state).oneshot(..)`): readiness, failures, panics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aitier::classify::RegistryConfig;
use aitier::config::{Cli, Command};
use aitier::inference::{BatchConfig, EmbeddingService, ModelError, SequenceModel, Tokenized};
use aitier::state::AppState;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use clap::Parser;
use tower::ServiceExt;

/// Embeds a text as `[len, 0, 0]`; fails or panics on request.
struct Fake {
    fail: AtomicBool,
}

impl SequenceModel for Fake {
    fn tokenize(&self, text: &str) -> Result<Tokenized, ModelError> {
        let ids = vec![1; text.len()];
        Ok(Tokenized {
            type_ids: vec![0; ids.len()],
            ids,
            truncated: false,
        })
    }
    fn forward(&self, batch: &[&Tokenized]) -> Result<Vec<Vec<f32>>, ModelError> {
        if batch.iter().any(|t| t.ids.len() == 5) {
            panic!("five is right out");
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(ModelError::Forward("secret internal cause".into()));
        }
        Ok(batch
            .iter()
            .map(|t| vec![t.ids.len() as f32, 0.0, 0.0])
            .collect())
    }
    fn dims(&self) -> usize {
        3
    }
}

fn app(state: &AppState) -> axum::Router {
    let args = match Cli::try_parse_from(["aitier"]).unwrap().into_command() {
        Command::Serve(args) => args,
        _ => unreachable!(),
    };
    aitier::http::app(state.clone(), &args)
}

fn fake_state() -> AppState {
    let registry = RegistryConfig {
        dir: std::env::temp_dir().join("aitier-no-classifiers"),
        capacity: 1,
        batch: batch_config(),
        hub: Default::default(),
        hub_ids: false,
    };
    AppState::new("fake", registry, None)
}

fn batch_config() -> BatchConfig {
    BatchConfig {
        name: "fake".into(),
        max_batch_size: 8,
        max_batch_tokens: 1024,
        max_wait: Duration::from_millis(1),
        queue_capacity: 8,
        workers: 1,
    }
}

fn fake_service(fake: Arc<Fake>) -> EmbeddingService {
    EmbeddingService::with_model(fake, 16, batch_config()).unwrap()
}

async fn call(
    state: &AppState,
    method: &str,
    path: &str,
    body: &str,
) -> (StatusCode, String, serde_json::Value) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app(state).oneshot(request).await.unwrap();
    let status = response.status();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, retry, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn readiness_and_embedding_are_503_until_the_model_is_warm() {
    let state = fake_state();
    let (status, retry, body) = call(&state, "GET", "/health/ready", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry, "1");
    assert_eq!(body["detail"], "Not ready: loading fake");
    let (status, retry, _) = call(&state, "POST", "/api/embed", r#"{"texts":["hi"]}"#).await;
    assert_eq!(
        (status, retry.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "1")
    );
    let (status, ..) = call(&state, "GET", "/health", "").await;
    assert_eq!(status, StatusCode::OK);

    state.embeddings.fill(fake_service(Arc::new(Fake {
        fail: AtomicBool::new(false),
    })));
    let (status, _, body) = call(&state, "GET", "/health/ready", "").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ready"))
    );
    let (status, _, body) = call(&state, "POST", "/api/embed", r#"{"texts":["hi","hey"]}"#).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["dims"], 3);
    assert_eq!(body["usage"]["prompt_tokens"], 5);
}

#[tokio::test]
async fn a_model_failure_is_an_opaque_500() {
    let state = fake_state();
    let fake = Arc::new(Fake {
        fail: AtomicBool::new(true),
    });
    state.embeddings.fill(fake_service(fake.clone()));
    let (status, _, body) = call(&state, "POST", "/api/embed", r#"{"texts":["hi"]}"#).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body, serde_json::json!({"detail": "Internal Server Error"}));
    fake.fail.store(false, Ordering::SeqCst);
    let (status, ..) = call(&state, "POST", "/api/embed", r#"{"texts":["hi"]}"#).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_panicking_model_is_a_500_and_the_server_lives_on() {
    let state = fake_state();
    state.embeddings.fill(fake_service(Arc::new(Fake {
        fail: AtomicBool::new(false),
    })));
    let (status, _, body) = call(&state, "POST", "/api/embed", r#"{"texts":["fives"]}"#).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["detail"], "Internal Server Error");
    let (status, ..) = call(&state, "POST", "/api/embed", r#"{"texts":["four"]}"#).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn once_shutdown_begins_readiness_and_new_requests_are_503_but_liveness_is_not() {
    let state = fake_state();
    state.embeddings.fill(fake_service(Arc::new(Fake {
        fail: AtomicBool::new(false),
    })));
    let (status, ..) = call(&state, "GET", "/health/ready", "").await;
    assert_eq!(status, StatusCode::OK);
    state.shutdown.begin();
    let (status, retry, body) = call(&state, "GET", "/health/ready", "").await;
    assert_eq!(
        (status, retry.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "1")
    );
    assert!(body["detail"].as_str().unwrap().contains("shutting down"));
    let (status, _, body) = call(&state, "POST", "/api/embed", r#"{"texts":["hi"]}"#).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["detail"].as_str().unwrap().contains("shutting down"));
    let (status, _, body) = call(
        &state,
        "POST",
        "/v1/embeddings",
        r#"{"input":"hi","model":"fake"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down")
    );
    let (status, ..) = call(&state, "GET", "/health", "").await;
    assert_eq!(status, StatusCode::OK);
}
