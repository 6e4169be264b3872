//! The relay between a generation and its HTTP stream: timings for `/metrics`, and the end of
//! every open stream when the server shuts down.

use super::SHUTTING_DOWN;
use crate::llm::{ChatEvent, ChatStream};

/// Relays a generation's events while timing them for `/metrics`: time to first token, time
/// between tokens, tokens in and out. A client that goes away closes the relay at once, which
/// drops the generation's receiver just as the client's own drop would; so does shutdown, after
/// an `error` event telling the client why (the local generation stops, an upstream request is
/// dropped).
pub(super) fn meter(
    mut events: ChatStream,
    provider: &'static str,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> ChatStream {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let started = std::time::Instant::now();
    tokio::spawn(async move {
        let mut last: Option<std::time::Instant> = None;
        loop {
            let event = tokio::select! {
                () = tx.closed() => return,
                true = async { shutdown.wait_for(|&begun| begun).await.is_ok() } => {
                    let _ = tx.send(ChatEvent::Error(SHUTTING_DOWN.into())).await;
                    return;
                }
                event = events.recv() => match event {
                    Some(event) => event,
                    None => return,
                },
            };
            match &event {
                ChatEvent::Delta(_) => {
                    let now = std::time::Instant::now();
                    match last {
                        None => metrics::histogram!("aitier_chat_ttft_seconds", "provider" => provider)
                            .record((now - started).as_secs_f64()),
                        Some(before) => metrics::histogram!("aitier_chat_inter_token_seconds", "provider" => provider)
                            .record((now - before).as_secs_f64()),
                    }
                    last = Some(now);
                }
                ChatEvent::Done(g) => {
                    metrics::counter!("aitier_chat_prompt_tokens_total", "provider" => provider)
                        .increment(g.prompt_tokens as u64);
                    metrics::counter!("aitier_chat_completion_tokens_total", "provider" => provider)
                        .increment(g.completion_tokens as u64);
                }
                ChatEvent::Error(_) => {
                    metrics::counter!("aitier_chat_failed_total", "provider" => provider)
                        .increment(1)
                }
                ChatEvent::Queued => {}
            }
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    rx
}
