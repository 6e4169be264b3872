//! The upstream chat provider, for real: a second aitier (its `/v1`, with the real SmolLM2) is the
//! upstream of the first, through async-openai; and upstreams that fail — nobody listening, a 500,
//! a stream cut midway, a malformed chunk, silence — each end in a 502/504 or an `error` event.

mod common;

use common::{GGUF, events};

use std::time::{Duration, Instant};

use common::{TestServer, spawn};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const MODEL: &str = "SmolLM2-135M-Instruct";

fn text(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "delta")
        .map(|e| e["content"].as_str().unwrap())
        .collect()
}

/// A server without a local model whose chat goes to `base`.
async fn relay(base: &str, extra: &[&str]) -> TestServer {
    let mut args = vec!["--openai-base-url", base, "--openai-api-key", "sk-test"];
    args.extend_from_slice(extra);
    spawn(&args).await
}

fn paris() -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        "max_tokens": 48
    })
}

async fn chat(server: &TestServer, body: &Value) -> (u16, String) {
    let response = server
        .client
        .post(server.url("/api/chat/stream"))
        .json(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_aitier_is_a_real_upstream() {
    let upstream = spawn(&["--chat-model", GGUF]).await;
    let server = relay(&upstream.url("/v1"), &[]).await;

    // The same greedy answer directly and through the relay.
    let (status, direct) = chat(&upstream, &paris()).await;
    assert_eq!(status, 200);
    let (status, relayed) = chat(&server, &paris()).await;
    assert_eq!(status, 200, "{relayed}");
    let (direct, relayed) = (events(&direct), events(&relayed));
    assert!(text(&relayed).contains("Paris"), "{relayed:?}");
    assert_eq!(text(&relayed), text(&direct));
    let done = relayed.last().unwrap();
    assert_eq!(done["type"], "done");
    assert_eq!(done["finish_reason"], "stop");
    // Usage comes from the upstream's include_usage chunk.
    assert_eq!(done["usage"], direct.last().unwrap()["usage"]);

    // max_tokens and stop strings reach the upstream.
    let mut short = paris();
    short["max_tokens"] = json!(5);
    let (_, body) = chat(&server, &short).await;
    let done = events(&body).pop().unwrap();
    assert_eq!(done["finish_reason"], "length");
    assert_eq!(done["usage"]["completion_tokens"], 5);

    // The OpenAI surface routes the same way, and /v1/models lists the upstream's chat model.
    let (status, completion) = server.post("/v1/chat/completions", &paris()).await;
    assert_eq!(status, 200, "{completion}");
    assert_eq!(completion["model"], MODEL);
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        text(&direct).as_str()
    );
    let models: Value = server
        .client
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let chat_model = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == MODEL)
        .unwrap_or_else(|| panic!("{models}"));
    assert_eq!(chat_model["owned_by"], "upstream");

    // Validation still happens here, and the upstream's own refusals come back as 502.
    let (status, _) = server
        .post("/api/chat/stream", &json!({"model": MODEL, "messages": []}))
        .await;
    assert_eq!(status, 422);
    let (status, body) = server
        .post(
            "/api/chat/stream",
            &json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("404"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_drops_the_upstream_request() {
    let upstream = spawn(&["--chat-model", GGUF]).await;
    let server = relay(&upstream.url("/v1"), &[]).await;
    let upstream_chat = upstream.state.chat[0].get().unwrap();
    let relay_gauge = server.state.upstream.clone().unwrap();

    let mut long = paris();
    long["messages"][0]["content"] = json!("Write a very long story about a dragon.");
    long["max_tokens"] = json!(4000);
    let mut response = server
        .client
        .post(server.url("/api/chat/stream"))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("delta"));
    assert_eq!(relay_gauge.active(), 1);
    assert_eq!(upstream_chat.active(), 1);
    drop(response);

    // The relay notices the closed stream, drops its request, and the upstream stops generating.
    let deadline = Instant::now() + Duration::from_secs(20);
    while relay_gauge.active() + upstream_chat.active() > 0 {
        assert!(
            Instant::now() < deadline,
            "relay {} / upstream {} still running",
            relay_gauge.active(),
            upstream_chat.active()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn nobody_listening_is_a_502_before_the_stream() {
    // A port that was free a moment ago: connections are refused.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = relay(&format!("http://127.0.0.1:{port}/v1"), &[]).await;
    let (status, body) = server.post("/api/chat/stream", &paris()).await;
    assert_eq!(status, 502, "{body}");
    // The upstream's address and the error chain stay in the log.
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("could not be reached"), "{detail}");
    assert!(
        !detail.contains(&port.to_string()) && !detail.contains("127.0.0.1"),
        "{detail}"
    );
    let (status, body) = server.post("/v1/chat/completions", &paris()).await;
    assert_eq!(status, 502);
    assert_eq!(body["error"]["type"], "server_error", "{body}");
}

/// A fake upstream: answers every connection with `head` and the `body` pieces (each after
/// `pause`), then closes the connection. Returns its `/v1` URL.
async fn fake(head: &'static str, body: Vec<&'static str>, pause: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let body = body.clone();
            tokio::spawn(async move {
                let mut request = vec![0u8; 64 * 1024];
                let _ = socket.read(&mut request).await;
                let _ = socket.write_all(head.as_bytes()).await;
                for piece in body {
                    tokio::time::sleep(pause).await;
                    if socket.write_all(piece.as_bytes()).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(pause).await;
            });
        }
    });
    base
}

const SSE_HEAD: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
const HELLO: &str = r#"data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}

"#;

#[tokio::test]
async fn an_upstream_500_is_a_502_with_its_status_and_not_its_message() {
    let base = fake(
        "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n",
        vec![r#"{"error":{"message":"the GPU caught fire","type":"server_error","param":null,"code":null}}"#],
        Duration::ZERO,
    )
    .await;
    let server = relay(&base, &[]).await;
    let (status, body) = server.post("/api/chat/stream", &paris()).await;
    assert_eq!(status, 502, "{body}");
    let detail = body["detail"].as_str().unwrap();
    // The upstream's own message (OpenAI's can quote part of the key) stays in the log.
    assert!(
        detail.contains("500") && !detail.contains("the GPU caught fire"),
        "{detail}"
    );
}

#[tokio::test]
async fn a_stream_cut_midway_ends_with_an_error_event() {
    // Headers and one chunk, then the connection closes: no finish_reason, no [DONE].
    let base = fake(SSE_HEAD, vec![HELLO], Duration::from_millis(10)).await;
    let server = relay(&base, &[]).await;
    let (status, body) = chat(&server, &paris()).await;
    assert_eq!(status, 200);
    let events = events(&body);
    assert_eq!(text(&events), "Hello");
    let last = events.last().unwrap();
    assert_eq!(last["type"], "error", "{events:?}");
    assert!(
        last["message"].as_str().unwrap().contains("ended before"),
        "{last}"
    );
}

#[tokio::test]
async fn a_malformed_chunk_ends_with_an_error_event() {
    let base = fake(
        SSE_HEAD,
        vec![HELLO, "data: {this is not json}\n\n"],
        Duration::from_millis(10),
    )
    .await;
    let server = relay(&base, &[]).await;
    let (_, body) = chat(&server, &paris()).await;
    let events = events(&body);
    assert_eq!(text(&events), "Hello");
    assert_eq!(events.last().unwrap()["type"], "error", "{events:?}");
}

#[tokio::test]
async fn a_silent_upstream_is_a_504_and_a_stalled_stream_an_error_event() {
    // No response at all within the timeout: 504 before the stream.
    let base = fake("", vec![SSE_HEAD], Duration::from_secs(5)).await;
    let server = relay(&base, &["--upstream-timeout-secs", "1"]).await;
    let started = Instant::now();
    let (status, body) = server.post("/api/chat/stream", &paris()).await;
    assert_eq!(status, 504, "{body}");
    assert!(started.elapsed() < Duration::from_secs(4));

    // A stream that starts, then stalls: an error event, not a hang.
    let base = fake(SSE_HEAD, vec![HELLO, HELLO], Duration::from_secs(3)).await;
    let server = relay(&base, &["--upstream-timeout-secs", "1"]).await;
    let (status, body) = chat(&server, &paris()).await;
    assert_eq!(status, 200);
    let events = events(&body);
    let last = events.last().unwrap();
    assert_eq!(last["type"], "error", "{events:?}");
    assert!(
        last["message"].as_str().unwrap().contains("sent nothing"),
        "{last}"
    );
}

#[tokio::test]
async fn models_route_by_name_and_prefix() {
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = relay(
        &format!("http://127.0.0.1:{port}/v1"),
        &["--upstream-models", "gpt-4o-mini,claude-*"],
    )
    .await;
    let ask = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    // Routed upstream (which refuses the connection): 502. Not routed: 404 before any call.
    for model in ["gpt-4o-mini", "claude-3-haiku"] {
        let (status, _) = server.post("/api/chat/stream", &ask(model)).await;
        assert_eq!(status, 502, "{model}");
    }
    let (status, body) = server.post("/api/chat/stream", &ask("gpt-4o")).await;
    assert_eq!(status, 404, "{body}");
    // Without a local model, a request without `model` goes to the first configured name.
    let (status, _) = server
        .post(
            "/api/chat/stream",
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 502);
}
