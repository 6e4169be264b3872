//! `GET /metrics` in Prometheus' text format (the `metrics` facade with its Prometheus exporter),
//! the middleware that counts requests by route and status, and `Server-Timing` on every response:
//! time queued for a model and time in it, as the embedding pools report them, and the total.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics))
}

/// Latency buckets, in seconds: from an embedding's milliseconds to a long generation.
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Sequences per forward pass.
const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// The process-wide recorder, installed on first use (several test servers share a process).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), BATCH))
            .expect("bucket lists are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder (a test's) may be installed already: this one still renders its own.
        let _ = ::metrics::set_global_recorder(recorder);
        handle
    })
}

/// Prometheus metrics.
///
/// Requests by route and status, latency histograms, embedding queue depth and wait, batch sizes,
/// chat tokens in and out, time to first token and between tokens, active generations,
/// prefix-cache reuse, database connections, rate-limit refusals.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain",
        body = String, example = "# TYPE aitier_http_requests_total counter\naitier_http_requests_total{method=\"POST\",route=\"/api/embed\",status=\"200\"} 3\n")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    sample(&state);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        handle().render(),
    )
        .into_response()
}

/// Reads the gauges that live elsewhere (the chat engine's own counters, the database pool) at
/// scrape time, so the hot paths pay nothing for them.
fn sample(state: &AppState) {
    let mut active = 0;
    for chat in state.chat.iter().filter_map(|slot| slot.get().ok()) {
        let model = chat.name().to_string();
        active += chat.active();
        ::metrics::gauge!("aitier_chat_queue_depth", "model" => model.clone())
            .set(chat.waiting() as f64);
        let stats = chat.stats();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        ::metrics::counter!("aitier_chat_prefilled_tokens_total", "model" => model.clone())
            .absolute(load(&stats.prefilled_tokens));
        ::metrics::counter!("aitier_chat_prefix_cache_tokens_total", "model" => model.clone())
            .absolute(load(&stats.reused_tokens));
        ::metrics::counter!("aitier_chat_decode_steps_total", "model" => model.clone())
            .absolute(load(&stats.steps));
        ::metrics::counter!("aitier_chat_decoded_sequences_total", "model" => model.clone())
            .absolute(load(&stats.stepped_sequences));
        ::metrics::counter!("aitier_chat_engine_restarts_total", "model" => model.clone())
            .absolute(load(&stats.restarts));
        ::metrics::gauge!("aitier_chat_engine_restarting", "model" => model)
            .set(if chat.restarting() { 1.0 } else { 0.0 });
    }
    if !state.chat.is_empty() {
        ::metrics::gauge!("aitier_chat_active_generations", "provider" => "local")
            .set(active as f64);
    }
    if let Some(upstream) = &state.upstream {
        ::metrics::gauge!("aitier_chat_active_generations", "provider" => "upstream")
            .set(upstream.active() as f64);
    }
    if let Some(store) = state.rag.as_ref().and_then(|rag| rag.database.store().ok()) {
        let (open, idle) = store.connections();
        ::metrics::gauge!("aitier_db_connections", "state" => "open").set(f64::from(open));
        ::metrics::gauge!("aitier_db_connections", "state" => "idle").set(idle as f64);
    }
}

/// Counts every request by matched route, method and status, times it, and writes
/// `Server-Timing`.
pub async fn observe(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().to_string();
    let started = Instant::now();
    let (mut response, (queued, inference)) =
        crate::telemetry::with_model_time(next.run(req)).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16().to_string();
    ::metrics::counter!("aitier_http_requests_total", "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    ::metrics::histogram!("aitier_http_request_duration_seconds", "route" => route)
        .record(elapsed.as_secs_f64());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut timing = Vec::with_capacity(3);
    if !queued.is_zero() || !inference.is_zero() {
        timing.push(format!("queue;dur={:.2}", ms(queued)));
        timing.push(format!("inference;dur={:.2}", ms(inference)));
    }
    timing.push(format!("total;dur={:.2}", ms(elapsed)));
    if let Ok(value) = HeaderValue::from_str(&timing.join(", ")) {
        response
            .headers_mut()
            .append(axum::http::HeaderName::from_static("server-timing"), value);
    }
    response
}
