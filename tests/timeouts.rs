//! The response-time limit: a non-streaming completion that outlasts it is a 504 saying so (not a
//! 503 that SDKs would retry), its generation is cancelled, and streams are not cut by it.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;

#[tokio::test]
async fn a_slow_completion_is_a_504_and_streams_outlive_the_limit() {
    let server =
        common::spawn(&["--chat-model", common::GGUF, "--request-timeout-secs", "1"]).await;
    let long = json!({
        "model": "SmolLM2-135M-Instruct", "max_tokens": 2000, "temperature": 0,
        "messages": [{"role": "user", "content": common::LONG_ANSWER}],
    });
    let response = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    assert!(response.headers().get("retry-after").is_none());
    let body: serde_json::Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("1 s limit") && message.contains("stream"),
        "{body}"
    );
    // The abandoned generation stops.
    let chat = server.state.chat[0].get().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while chat.active() > 0 {
        assert!(Instant::now() < deadline, "the generation kept running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The same work streamed: headers at once, the stream runs past the limit to its end.
    let started = Instant::now();
    let stream = json!({
        "max_tokens": 400, "temperature": 0,
        "messages": [{"role": "user", "content": common::LONG_ANSWER}],
    });
    let response = server
        .client
        .post(server.url("/api/chat/stream"))
        .json(&stream)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let events = common::events(&text);
    assert_eq!(events.last().unwrap()["type"], "done", "{text}");
    assert!(
        started.elapsed() > Duration::from_secs(1),
        "the stream was too quick to tell"
    );
}
