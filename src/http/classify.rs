//! Classification routes: `/api/classify/sentiment` (the seed's contract), any classifier by name,
//! batch forms of both, and the list of classifiers.

use std::collections::BTreeMap;
use std::time::Instant;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::embed::{MAX_CHARS, check_texts, text_schema, texts_schema};
use super::error::{ApiError, HTTPValidationError, HttpError, LocItem, ValidationError};
use super::extract::{ApiJson, Validate, check_text};
use crate::classify::{ClassifyError, Prediction};
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(sentiment))
        .routes(routes!(sentiment_batch))
        .routes(routes!(classify))
        .routes(routes!(classify_batch))
        .routes(routes!(list))
}

const MAX_MODEL_ID: usize = 200;

fn check_model_id(model_id: &Option<String>) -> Option<ValidationError> {
    let id = model_id.as_ref()?;
    check_text(vec!["body".into(), "model_id".into()], id, 1, MAX_MODEL_ID)
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"text": "I love this, it is wonderful"}))]
pub struct SentimentRequest {
    /// The text to classify (1 to 10000 characters). Long texts are read sentence by sentence (a
    /// Hugging Face checkpoint reads a text whole when it fits, else in windows of whole sentences).
    #[schema(schema_with = text_schema)]
    pub text: String,
    /// Another classifier for this request: a name from `GET /api/classifiers` or a Hugging Face
    /// repo id. Loaded on first use and kept in a small LRU cache.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200, example = "sentiment")]
    pub model_id: Option<String>,
}

impl Validate for SentimentRequest {
    fn validate(&self) -> Vec<ValidationError> {
        check_text(vec!["body".into(), "text".into()], &self.text, 1, MAX_CHARS)
            .into_iter()
            .chain(check_model_id(&self.model_id))
            .collect()
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"texts": ["I love this, it is wonderful", "This is terrible and I hate it"]}))]
pub struct SentimentBatchRequest {
    /// Texts to classify: 1 to 256, each 1 to 10000 characters.
    #[schema(schema_with = texts_schema)]
    pub texts: Vec<String>,
    /// As in `SentimentRequest`.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200, example = "sentiment")]
    pub model_id: Option<String>,
}

impl Validate for SentimentBatchRequest {
    fn validate(&self) -> Vec<ValidationError> {
        let mut problems = check_texts(&["body".into(), "texts".into()], &self.texts);
        problems.extend(check_model_id(&self.model_id));
        problems
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"text": "The delivery was late and the box was damaged."}))]
pub struct ClassifyRequest {
    /// The text to classify (1 to 10000 characters).
    #[schema(schema_with = text_schema)]
    pub text: String,
}

impl Validate for ClassifyRequest {
    fn validate(&self) -> Vec<ValidationError> {
        check_text(vec!["body".into(), "text".into()], &self.text, 1, MAX_CHARS)
            .into_iter()
            .collect()
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"texts": ["The delivery was late.", "Great support team!"]}))]
pub struct ClassifyBatchRequest {
    /// Texts to classify: 1 to 256, each 1 to 10000 characters.
    #[schema(schema_with = texts_schema)]
    pub texts: Vec<String>,
}

impl Validate for ClassifyBatchRequest {
    fn validate(&self) -> Vec<ValidationError> {
        check_texts(&["body".into(), "texts".into()], &self.texts)
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "text": "I love this, it is wonderful",
    "label": "positive",
    "score": 0.93,
    "scores": {"negative": 0.02, "neutral": 0.05, "positive": 0.93},
    "model_id": "sentiment",
    "processing_time_ms": 4.2
}))]
pub struct ClassifyResponse {
    /// The text, as sent.
    pub text: String,
    /// The most probable label, lower-case (`positive`, `negative` or `neutral` for sentiment).
    pub label: String,
    /// Probability of `label`, between 0 and 1.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub score: f32,
    /// Every label with its probability.
    pub scores: BTreeMap<String, f32>,
    /// The classifier that answered.
    pub model_id: String,
    /// Time spent classifying, in milliseconds.
    pub processing_time_ms: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchClassifyResponse {
    /// One result per text, in order.
    pub results: Vec<ClassifyResponse>,
    /// The classifier that answered.
    pub model_id: String,
    /// Time spent classifying the whole batch, in milliseconds.
    pub processing_time_ms: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClassifierSummary {
    /// Name to use in `/api/classify/{classifier}` or as `model_id`.
    pub name: String,
    /// `embedding-head` (trained by aitier) or `transformers` (a Hugging Face checkpoint).
    pub kind: String,
    /// Labels, lower-case.
    pub labels: Vec<String>,
    /// For embedding heads: the embedding model they read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding_model: Option<String>,
    /// For embedding heads: held-out metrics measured when trained (`heldout`), and by dev set
    /// (`dev.<set>`) the metrics on sets it was neither trained nor tuned on, recorded by
    /// `aitier classifier eval --record`: accuracy, macro-F1, positive-vs-negative accuracy
    /// (`polar_accuracy`, neutral counting wrong), calibration error and the confusion matrix.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metrics: Option<serde_json::Value>,
    /// Whether it is loaded in memory now.
    pub loaded: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClassifiersResponse {
    pub classifiers: Vec<ClassifierSummary>,
    /// The classifier behind `/api/classify/sentiment`.
    pub sentiment: Option<String>,
}

/// Where the classifier id came from, so that a bad one is reported at the right place.
enum Source {
    Body,
    Path,
}

fn to_api_error(e: ClassifyError, source: Source) -> ApiError {
    match e {
        ClassifyError::NotFound(detail) => ApiError::NotFound(detail),
        ClassifyError::Invalid(msg) => {
            let loc: Vec<LocItem> = match source {
                Source::Body => vec!["body".into(), "model_id".into()],
                Source::Path => vec!["path".into(), "classifier".into()],
            };
            ApiError::validation(
                loc,
                format!("Not a usable classifier: {msg}"),
                "value_error",
            )
        }
        ClassifyError::Inference(e) => e.into(),
        e @ (ClassifyError::Io(_) | ClassifyError::Candle(_)) => ApiError::Internal(e.into()),
    }
}

async fn run(
    state: &AppState,
    id: &str,
    source: Source,
    texts: Vec<String>,
) -> Result<(Vec<ClassifyResponse>, f64), ApiError> {
    let started = Instant::now();
    let classifier = state
        .classifiers
        .get(id)
        .await
        .map_err(|e| to_api_error(e, source))?;
    let predictions = classifier
        .classify(texts.clone())
        .await
        .map_err(|e| to_api_error(e, Source::Path))?;
    let elapsed = started.elapsed().as_secs_f64() * 1e3;
    let results = texts
        .into_iter()
        .zip(predictions)
        .map(|(text, p): (String, Prediction)| ClassifyResponse {
            text,
            label: p.label,
            score: p.score,
            scores: p.scores.into_iter().collect(),
            model_id: id.to_string(),
            processing_time_ms: elapsed,
        })
        .collect();
    Ok((results, elapsed))
}

/// The `{classifier}` segment, or a FastAPI-shaped 422 when it is not valid UTF-8.
fn path_param(param: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    param.map(|Path(p)| p).map_err(|e| {
        ApiError::validation(
            vec!["path".into(), "classifier".into()],
            format!("Invalid path parameter: {}", e.body_text()),
            "value_error",
        )
    })
}

fn sentiment_id(state: &AppState, model_id: Option<String>) -> Result<String, ApiError> {
    model_id
        .or_else(|| state.sentiment.as_ref().map(|s| s.id.clone()))
        .ok_or_else(|| ApiError::NotFound("No sentiment classifier is configured".into()))
}

/// Classify the sentiment of a text.
///
/// `negative`, `neutral` or `positive` with the default classifier (trained by aitier on 38k
/// labelled tweets, read sentence by sentence so that reviews and paragraphs work too).
#[utoipa::path(
    post,
    path = "/api/classify/sentiment",
    tag = "classification",
    request_body = SentimentRequest,
    responses(
        (status = 200, description = "The text's sentiment", body = ClassifyResponse),
        (status = 404, description = "Unknown `model_id`", body = HttpError,
            example = json!({"detail": "Unknown classifier 'nope': there is no models/classifiers/nope"})),
        (status = 413, description = "The body is larger than the configured limit", body = HttpError),
        (status = 422, description = "The body is not valid, or `model_id` is not a classifier", body = HTTPValidationError),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = HttpError),
        (status = 503, description = "Overloaded or still loading: retry later", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn sentiment(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<SentimentRequest>,
) -> Result<Json<ClassifyResponse>, ApiError> {
    let source = if req.model_id.is_some() {
        Source::Body
    } else {
        Source::Path
    };
    let id = sentiment_id(&state, req.model_id)?;
    let (mut results, _) = run(&state, &id, source, vec![req.text]).await?;
    Ok(Json(results.remove(0)))
}

/// Classify the sentiment of several texts.
#[utoipa::path(
    post,
    path = "/api/classify/sentiment/batch",
    tag = "classification",
    request_body = SentimentBatchRequest,
    responses(
        (status = 200, description = "One result per text", body = BatchClassifyResponse),
        (status = 404, description = "Unknown `model_id`", body = HttpError),
        (status = 413, description = "The body is larger than the configured limit", body = HttpError),
        (status = 422, description = "The body is not valid, or `model_id` is not a classifier", body = HTTPValidationError),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = HttpError),
        (status = 503, description = "Overloaded or still loading: retry later", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn sentiment_batch(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<SentimentBatchRequest>,
) -> Result<Json<BatchClassifyResponse>, ApiError> {
    let source = if req.model_id.is_some() {
        Source::Body
    } else {
        Source::Path
    };
    let id = sentiment_id(&state, req.model_id)?;
    let (results, elapsed) = run(&state, &id, source, req.texts).await?;
    Ok(Json(BatchClassifyResponse {
        results,
        model_id: id,
        processing_time_ms: elapsed,
    }))
}

/// Classify a text with a named classifier.
#[utoipa::path(
    post,
    path = "/api/classify/{classifier}",
    tag = "classification",
    params(("classifier" = String, Path, description = "A name from `GET /api/classifiers`", example = "sentiment")),
    request_body = ClassifyRequest,
    responses(
        (status = 200, description = "The text's label", body = ClassifyResponse),
        (status = 404, description = "No such classifier", body = HttpError,
            example = json!({"detail": "Unknown classifier 'nope': there is no models/classifiers/nope"})),
        (status = 413, description = "The body is larger than the configured limit", body = HttpError),
        (status = 422, description = "The body is not valid, or the folder is not a usable classifier", body = HTTPValidationError),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = HttpError),
        (status = 503, description = "Overloaded or still loading: retry later", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn classify(
    State(state): State<AppState>,
    classifier: Result<Path<String>, PathRejection>,
    ApiJson(req): ApiJson<ClassifyRequest>,
) -> Result<Json<ClassifyResponse>, ApiError> {
    let classifier = path_param(classifier)?;
    let (mut results, _) = run(&state, &classifier, Source::Path, vec![req.text]).await?;
    Ok(Json(results.remove(0)))
}

/// Classify several texts with a named classifier.
#[utoipa::path(
    post,
    path = "/api/classify/{classifier}/batch",
    tag = "classification",
    params(("classifier" = String, Path, description = "A name from `GET /api/classifiers`", example = "sentiment")),
    request_body = ClassifyBatchRequest,
    responses(
        (status = 200, description = "One result per text", body = BatchClassifyResponse),
        (status = 404, description = "No such classifier", body = HttpError),
        (status = 413, description = "The body is larger than the configured limit", body = HttpError),
        (status = 422, description = "The body is not valid, or the folder is not a usable classifier", body = HTTPValidationError),
        (status = 500, description = "Unexpected server error (the cause is logged)", body = HttpError),
        (status = 503, description = "Overloaded or still loading: retry later", body = HttpError,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn classify_batch(
    State(state): State<AppState>,
    classifier: Result<Path<String>, PathRejection>,
    ApiJson(req): ApiJson<ClassifyBatchRequest>,
) -> Result<Json<BatchClassifyResponse>, ApiError> {
    let classifier = path_param(classifier)?;
    let (results, elapsed) = run(&state, &classifier, Source::Path, req.texts).await?;
    Ok(Json(BatchClassifyResponse {
        results,
        model_id: classifier,
        processing_time_ms: elapsed,
    }))
}

/// List the classifiers: those under the classifiers folder and those loaded from the Hub.
#[utoipa::path(
    get,
    path = "/api/classifiers",
    tag = "classification",
    responses((status = 200, description = "The classifiers", body = ClassifiersResponse)),
)]
pub async fn list(State(state): State<AppState>) -> Json<ClassifiersResponse> {
    let registry = state.classifiers.clone();
    let infos = tokio::task::spawn_blocking(move || registry.list())
        .await
        .unwrap_or_default();
    Json(ClassifiersResponse {
        classifiers: infos
            .into_iter()
            .map(|i| ClassifierSummary {
                name: i.name,
                kind: i.kind,
                labels: i.labels,
                embedding_model: i.embedding_model,
                metrics: i.metrics,
                loaded: i.loaded,
            })
            .collect(),
        sentiment: state.sentiment.as_ref().map(|s| s.id.clone()),
    })
}
