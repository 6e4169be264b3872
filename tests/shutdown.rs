//! Shutdown (SIGTERM or ctrl-c): open streams end with an `error` event saying the server is
//! shutting down, the generation behind them stops, the server exits within its drain timeout;
//! readiness and new requests answer 503 from the moment it begins.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

#[tokio::test]
async fn a_stream_in_flight_ends_with_an_error_event_and_the_server_exits_in_time() {
    let mut server = common::spawn(&[
        "--chat-model",
        common::GGUF,
        "--shutdown-timeout-secs",
        "10",
    ])
    .await;
    let request = json!({"max_tokens": 2000, "temperature": 0,
        "messages": [{"role": "user", "content": common::LONG_ANSWER}]});
    let response = server
        .client
        .post(server.url("/api/chat/stream"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut text = String::new();
    // Wait for the first tokens, so that the generation is surely running.
    while !text.contains("\"delta\"") {
        let chunk = body.next().await.expect("stream open").unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let chat = server.state.chat[0].get().unwrap();
    assert_eq!(chat.active(), 1);

    let started = Instant::now();
    let stopping = {
        let state = server.state.clone();
        tokio::spawn(async move {
            // Readiness turns 503 as soon as shutdown begins.
            let mut watch = state.shutdown.watch();
            watch.wait_for(|&begun| begun).await.unwrap();
        })
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), server.shut_down())
        .await
        .expect("the server exits within its drain timeout");
    assert!(outcome.is_ok(), "{outcome:?}");
    stopping.await.unwrap();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let events = common::events(&text);
    let last = events.last().unwrap();
    assert_eq!(last["type"], "error", "{text}");
    assert!(
        last["message"].as_str().unwrap().contains("shutting down"),
        "{last}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while chat.active() > 0 {
        assert!(Instant::now() < deadline, "the generation kept running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
