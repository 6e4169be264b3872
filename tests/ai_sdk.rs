//! The Vercel AI SDK's routes over real HTTP with the real chat model: the official `ai` package
//! reads them (tests/clients/ai-sdk.mjs), and the wire format is checked byte by byte here.

mod common;

use serde_json::{Value, json};

const MODEL: &str = "SmolLM2-135M-Instruct";

async fn server() -> common::TestServer {
    common::spawn(&["--chat-model", common::GGUF]).await
}

#[tokio::test]
async fn the_ai_sdk_reads_chat_stop_errors_and_sources_from_aitier() {
    let server = server().await;
    common::node("ai-sdk.mjs", "ai", vec![server.base.clone(), MODEL.into()]).await;
}

#[tokio::test]
async fn the_stream_is_the_ui_message_protocol_v1() {
    let server = server().await;
    let response = server
        .client
        .post(server.url("/api/ai-sdk/chat"))
        .json(&json!({
            "id": "chat-1",
            "trigger": "submit-message",
            "max_tokens": 5,
            "messages": [{"id": "m1", "role": "user", "parts": [
                {"type": "step-start"},
                {"type": "text", "text": "Say hi."}
            ]}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-vercel-ai-ui-message-stream"], "v1");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let body = response.text().await.unwrap();
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    let parts: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let types: Vec<&str> = parts.iter().map(|p| p["type"].as_str().unwrap()).collect();
    assert_eq!(types[..2], ["start", "text-start"], "{body}");
    assert_eq!(types[types.len() - 2..], ["text-end", "finish"], "{body}");
    assert!(
        types[2..types.len() - 2].iter().all(|t| *t == "text-delta"),
        "{body}"
    );
    let finish = parts.last().unwrap();
    assert_eq!(finish["finishReason"], "length");
    assert_eq!(finish["messageMetadata"]["usage"]["completion_tokens"], 5);
    assert_eq!(finish["messageMetadata"]["model"], MODEL);
    let ids: Vec<&Value> = parts.iter().filter_map(|p| p.get("id")).collect();
    assert!(
        ids.windows(2).all(|w| w[0] == w[1]),
        "one text part: {body}"
    );
}

#[tokio::test]
async fn requests_the_sdk_can_send_wrong_are_refused_with_422() {
    let server = server().await;
    let text = |t: &str| json!([{"role": "user", "parts": [{"type": "text", "text": t}]}]);
    for (path, request, loc) in [
        (
            "/api/ai-sdk/chat",
            json!({"messages": []}),
            json!(["body", "messages"]),
        ),
        (
            "/api/ai-sdk/chat",
            json!({"messages": [{"role": "user", "parts": [{"type": "file", "url": "x"}]}]}),
            json!(["body", "messages"]),
        ),
        (
            "/api/ai-sdk/chat",
            json!({"messages": text("hi"), "max_tokens": 0}),
            json!(["body", "max_tokens"]),
        ),
        (
            "/api/ai-sdk/rag",
            json!({"messages": [{"role": "assistant", "parts": [{"type": "text", "text": "hello"}]}]}),
            json!(["body", "messages"]),
        ),
        (
            "/api/ai-sdk/rag",
            json!({"messages": text(&"q".repeat(2001))}),
            json!(["body", "messages"]),
        ),
        (
            "/api/ai-sdk/rag",
            json!({"messages": text("q"), "top_k": 0}),
            json!(["body", "top_k"]),
        ),
    ] {
        let (status, body) = server.post(path, &request).await;
        assert_eq!(status, 422, "{request}: {body}");
        assert_eq!(body["detail"][0]["loc"], loc, "{request}: {body}");
    }
}
