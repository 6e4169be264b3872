//! `/api/chat/stream` on the real SmolLM2 model: streamed deltas, the done event, validation before
//! the stream, admission, and a disconnect stopping the generation.

mod common;

use common::{GGUF, events};

use std::time::{Duration, Instant};

use common::{TestServer, spawn};
use serde_json::json;

async fn chat_server(extra: &[&str]) -> TestServer {
    let mut args = vec!["--chat-model", GGUF];
    args.extend_from_slice(extra);
    spawn(&args).await
}

#[tokio::test]
async fn an_answer_streams_as_deltas_then_done() {
    let server = chat_server(&[]).await;
    let response = server
        .client
        .post(server.url("/api/chat/stream"))
        .json(&json!({
            // The README's first chat request, word for word.
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 64
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    let events = events(&response.text().await.unwrap());
    let (last, deltas) = events.split_last().unwrap();
    assert!(deltas.len() > 1 && deltas.iter().all(|e| e["type"] == "delta"));
    let text: String = deltas
        .iter()
        .map(|e| e["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, "The capital of France is Paris.");
    assert_eq!(last["type"], "done");
    assert_eq!(last["finish_reason"], "stop");
    assert!(last["usage"]["completion_tokens"].as_u64().unwrap() <= 64);
    assert!(last["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
}

#[tokio::test]
async fn max_tokens_is_respected_and_reported() {
    let server = chat_server(&[]).await;
    let response = server
        .client
        .post(server.url("/api/chat/stream"))
        .json(&json!({"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 7}))
        .send()
        .await
        .unwrap();
    let events = events(&response.text().await.unwrap());
    let done = events.last().unwrap();
    assert_eq!(done["finish_reason"], "length");
    assert_eq!(done["usage"]["completion_tokens"], 7);
}

#[tokio::test]
async fn the_server_side_token_limit_caps_every_request() {
    let server = chat_server(&["--max-tokens-limit", "3"]).await;
    let response = server
        .client
        .post(server.url("/api/chat/stream"))
        .json(&json!({"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 64}))
        .send()
        .await
        .unwrap();
    let events = events(&response.text().await.unwrap());
    let done = events.last().unwrap();
    assert_eq!(done["finish_reason"], "length");
    assert_eq!(done["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn bad_requests_are_refused_before_any_stream() {
    let server = chat_server(&[]).await;
    let cases = [
        (json!({"messages": []}), json!(["body", "messages"])),
        (
            json!({"messages": [{"role": "robot", "content": "hi"}]}),
            json!(["body", "messages", 0, "role"]),
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
            json!(["body", "max_tokens"]),
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}),
            json!(["body", "temperature"]),
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}),
            json!(["body", "stop"]),
        ),
    ];
    for (body, loc) in cases {
        let (status, answer) = server.post("/api/chat/stream", &body).await;
        assert_eq!(status, 422, "{body}: {answer}");
        assert_eq!(answer["detail"][0]["loc"], loc, "{answer}");
    }
    let (status, answer) = server
        .post(
            "/api/chat/stream",
            &json!({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    let long = "word ".repeat(9000);
    let (status, answer) = server
        .post(
            "/api/chat/stream",
            &json!({"messages": [{"role": "user", "content": long}]}),
        )
        .await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["detail"][0]["msg"]
            .as_str()
            .unwrap()
            .contains("context")
    );
}

#[tokio::test]
async fn over_the_limit_is_503_and_a_disconnect_stops_the_generation() {
    let server = chat_server(&[
        "--max-concurrent-generations",
        "1",
        "--generation-queue",
        "0",
    ])
    .await;
    let chat = server.state.chat[0].get().unwrap();
    let long = json!({
        "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
        "max_tokens": 4096
    });
    let mut first = server
        .client
        .post(server.url("/api/chat/stream"))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    // The first token has arrived: the generation is running. A slow (debug, loaded) machine may send
    // SSE keep-alive comments before it.
    common::read_until(&mut first, "delta").await;
    assert_eq!(chat.active(), 1);

    let refused = server
        .client
        .post(server.url("/api/chat/stream"))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");

    drop(first);
    let deadline = Instant::now() + Duration::from_secs(20);
    while chat.active() > 0 {
        assert!(
            Instant::now() < deadline,
            "the generation went on after the client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its place is free again.
    let again = server
        .client
        .post(server.url("/api/chat/stream"))
        .json(&json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert!(events(&again.text().await.unwrap()).last().unwrap()["type"] == "done");
}

#[tokio::test]
async fn integral_numbers_are_integers_as_json_schema_says() {
    let server = chat_server(&[]).await;
    let response = server
        .client
        .post(server.url("/api/chat/stream"))
        .json(&json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3.0, "seed": 7.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let done = events(&response.text().await.unwrap()).pop().unwrap();
    assert!(done["usage"]["completion_tokens"].as_u64().unwrap() <= 3);
    let (status, body) = server
        .post(
            "/api/chat/stream",
            &json!({"messages": [{"role": "user", "content": "Hi"}], "seed": 7.5}),
        )
        .await;
    common::assert_validation(status, &body, json!(["body", "seed"]), "int_type");
}

#[tokio::test]
async fn a_panic_in_the_engine_fails_its_streams_and_the_engine_restarts() {
    let server = chat_server(&[]).await;
    let chat = server.state.chat[0].get().unwrap();
    let messages =
        json!([{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]);
    let mut ours = server
        .client
        .post(server.url("/api/chat/stream"))
        .json(&json!({"messages": messages, "max_tokens": 2048}))
        .send()
        .await
        .unwrap();
    let mut openai = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&json!({"model": "SmolLM2-135M-Instruct", "messages": messages, "max_tokens": 2048, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(ours.status(), 200);
    assert_eq!(openai.status(), 200);
    // Both are generating: a token of each has streamed. (The OpenAI stream's opening chunk,
    // `{"role":"assistant","content":""}`, is sent before the engine has taken the request: a
    // request still queued when the engine fails waits for its restart, which `hold` delays.)
    common::read_until(&mut ours, "delta").await;
    common::read_until(&mut openai, r#""delta":{"content":""#).await;

    let hold = chat.inject_panic();
    // Both streams end with an error event, not a silent cut.
    let rest = common::read_until(&mut ours, r#""type":"error""#).await;
    let last = events(&rest).pop().unwrap();
    assert!(
        last["message"].as_str().unwrap().contains("try again"),
        "{last}"
    );
    let rest = common::read_until(&mut openai, r#""error""#).await;
    assert!(rest.contains("server_error"), "{rest}");
    assert!(
        common::within(ours.chunk(), "the end of the stream")
            .await
            .unwrap()
            .is_none(),
        "the stream ended"
    );

    // While the engine restarts, readiness and /metrics say so.
    let ready = common::within(
        server.client.get(server.url("/health/ready")).send(),
        "readiness",
    )
    .await
    .unwrap();
    assert_eq!(ready.status(), 503);
    let detail = ready.text().await.unwrap();
    assert!(detail.contains("restarts after a failure"), "{detail}");
    let metrics = common::within(server.client.get(server.url("/metrics")).send(), "metrics")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"aitier_chat_engine_restarting{model="SmolLM2-135M-Instruct"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"aitier_chat_engine_restarts_total{model="SmolLM2-135M-Instruct"} 1"#)
    );
    assert_eq!(chat.active(), 0, "the failed sequences left the gauge");
    drop(hold);

    // Then it serves again: ready, and an answer to the end.
    server.wait_ready().await;
    let again = server
        .client
        .post(server.url("/api/chat/stream"))
        .json(&json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(
        events(&again.text().await.unwrap()).last().unwrap()["type"],
        "done"
    );
}
