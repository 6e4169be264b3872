//! Rate limits counted in the work a request asks for, not in requests: one GCRA bucket
//! (`governor`) per caller — its API key, or its address when the server asks for none. The cost
//! is read from the JSON body before any handler runs, so a refused request costs a parse, no
//! model time.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::Value;

use super::auth::{Caller, refuse};
use super::error::ApiError;
use crate::config::ServeArgs;

/// Prompt characters per token, for a cost estimate before anything is tokenized (English text
/// runs at 4 or a little more with the usual BPE vocabularies).
const CHARS_PER_TOKEN: usize = 4;
/// Chat tokens per work unit.
const TOKENS_PER_UNIT: usize = 100;
/// Characters per ingested chunk, for the estimate (200 MiniLM tokens).
const CHARS_PER_CHUNK: usize = 800;
/// Idle callers' buckets are dropped every this many checks, so that a scan from many addresses
/// cannot grow the map without bound.
const SWEEP_EVERY: u64 = 4096;

pub struct Limits {
    limiter: Option<DefaultKeyedRateLimiter<Caller>>,
    burst: u32,
    body_limit: usize,
    max_tokens_limit: Option<usize>,
    checks: AtomicU64,
}

impl Limits {
    pub fn from_args(args: &ServeArgs) -> Self {
        let per_minute = args.rate_limit.and_then(NonZeroU32::new);
        let burst = args
            .rate_limit_burst
            .and_then(NonZeroU32::new)
            .or(per_minute);
        let limiter = per_minute
            .zip(burst)
            .map(|(rate, burst)| RateLimiter::keyed(Quota::per_minute(rate).allow_burst(burst)));
        Self {
            limiter,
            burst: burst.map_or(0, NonZeroU32::get),
            body_limit: args.body_limit,
            max_tokens_limit: args.max_tokens_limit,
            checks: AtomicU64::new(0),
        }
    }
}

/// The work units a request asks for (at least 1).
pub fn cost(path: &str, body: &Value, max_tokens_limit: Option<usize>) -> u32 {
    let count = |field: &str| match &body[field] {
        Value::Array(items) => items.len(),
        _ => 1,
    };
    let chars = |v: &Value| v.as_str().map_or(0, |s| s.chars().count());
    let units = match path.trim_end_matches('/') {
        "/api/embed" => count("texts"),
        "/v1/embeddings" => count("input"),
        p if p.starts_with("/api/classify/") && p.ends_with("/batch") => count("texts"),
        "/api/chat/stream"
        | "/v1/chat/completions"
        | "/api/rag/query"
        | "/api/ai-sdk/chat"
        | "/api/ai-sdk/rag" => {
            let text = |parts: &Vec<Value>| parts.iter().map(|p| chars(&p["text"])).sum::<usize>();
            let prompt: usize = match &body["messages"] {
                // OpenAI's `content` (a string or parts), or the AI SDK's `parts`.
                Value::Array(messages) => messages
                    .iter()
                    .map(|m| match (&m["content"], &m["parts"]) {
                        (Value::Array(parts), _) | (_, Value::Array(parts)) => text(parts),
                        (content, _) => chars(content),
                    })
                    .sum(),
                _ => chars(&body["question"]),
            };
            let asked = ["max_completion_tokens", "max_tokens"]
                .iter()
                .find_map(|f| body[*f].as_f64())
                .map_or(1024, |t| t.max(0.0) as usize);
            let generated = max_tokens_limit.map_or(asked, |limit| asked.min(limit));
            (prompt / CHARS_PER_TOKEN + generated).div_ceil(TOKENS_PER_UNIT)
        }
        "/api/rag/documents" => chars(&body["content"]).div_ceil(CHARS_PER_CHUNK),
        _ => 1,
    };
    u32::try_from(units.max(1)).unwrap_or(u32::MAX)
}

/// Charges the caller for the request's work; 429 with `Retry-After` when its budget is spent.
pub async fn check(State(limits): State<Arc<Limits>>, req: Request, next: Next) -> Response {
    let (Some(limiter), Some(caller)) =
        (&limits.limiter, req.extensions().get::<Caller>().copied())
    else {
        return next.run(req).await;
    };
    let path = req.uri().path().to_string();
    let (parts, body) = req.into_parts();
    // Only bodies are costed; an unreadable or oversized one is left for the handler to refuse.
    let (units, body) = match axum::body::to_bytes(body, limits.body_limit).await {
        Ok(bytes) => {
            let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            (
                cost(&path, &value, limits.max_tokens_limit),
                Body::from(bytes),
            )
        }
        Err(_) => {
            let limit = limits.body_limit;
            return refuse(&path, ApiError::PayloadTooLarge { limit });
        }
    };
    if limits.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
        limiter.retain_recent();
    }
    let n = NonZeroU32::new(units).unwrap_or(NonZeroU32::MIN);
    match limiter.check_key_n(&caller, n) {
        Ok(Ok(())) => next.run(Request::from_parts(parts, body)).await,
        Ok(Err(not_until)) => {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            metrics::counter!("aitier_rate_limited_total").increment(1);
            refuse(
                &path,
                ApiError::TooManyRequests {
                    detail: format!(
                        "Rate limit reached: this request costs {units} work units; retry after {retry_after} s"
                    ),
                    retry_after: retry_after.max(1),
                },
            )
        }
        Err(_) => refuse(
            &path,
            ApiError::validation(
                vec!["body".into()],
                format!(
                    "This request costs {units} work units, more than the {} a caller may spend at once: send less per request",
                    limits.burst
                ),
                "too_costly",
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cost_counts_texts_tokens_and_chunks() {
        assert_eq!(
            cost("/api/embed", &json!({"texts": ["a", "b", "c"]}), None),
            3
        );
        assert_eq!(cost("/v1/embeddings", &json!({"input": "a"}), None), 1);
        let batch = json!({"texts": vec!["a"; 7]});
        assert_eq!(cost("/api/classify/sentiment/batch", &batch, None), 7);
        let chat =
            json!({"messages": [{"role": "user", "content": "x".repeat(4000)}], "max_tokens": 200});
        assert_eq!(cost("/api/chat/stream", &chat, None), 12);
        assert_eq!(cost("/api/chat/stream", &chat, Some(100)), 11);
        let sdk = json!({"messages": [{"role": "user", "parts": [{"type": "text", "text": "x".repeat(4000)}]}], "max_tokens": 200});
        assert_eq!(cost("/api/ai-sdk/chat", &sdk, None), 12);
        let unset = json!({"messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(cost("/v1/chat/completions", &unset, None), 11);
        let doc = json!({"title": "t", "content": "y".repeat(8001)});
        assert_eq!(cost("/api/rag/documents", &doc, None), 11);
        assert_eq!(cost("/api/rag/search", &json!({"query": "q"}), None), 1);
        assert_eq!(cost("/v1/models", &Value::Null, None), 1);
    }
}
