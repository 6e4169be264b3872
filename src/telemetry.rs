//! Tracing set-up: level from `RUST_LOG` (default `info`), text or JSON lines; and the per-request
//! record of model time that `Server-Timing` reports.

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // A second init (tests start several servers) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

tokio::task_local! {
    /// Time queued for a model and time in it, spent on behalf of the request being served.
    static MODEL_TIME: Cell<(Duration, Duration)>;
}

/// Adds model time to the current request's record (a no-op outside [`with_model_time`]).
pub fn record_model_time(queued: Duration, inference: Duration) {
    let _ = MODEL_TIME.try_with(|t| {
        let (q, i) = t.get();
        t.set((q + queued, i + inference));
    });
}

/// Runs `work`, returning its output and the model time recorded while it ran.
pub async fn with_model_time<T>(work: impl Future<Output = T>) -> (T, (Duration, Duration)) {
    MODEL_TIME
        .scope(Cell::new(Default::default()), async move {
            let out = work.await;
            (out, MODEL_TIME.with(Cell::get))
        })
        .await
}
