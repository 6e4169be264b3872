//! Rate limits by cost over real HTTP: texts count, each key and each address has its own budget,
//! 429 carries `Retry-After`, a request costlier than the burst is a 422, probes are never
//! limited; and the admission caps on chat and metadata.

mod common;

use serde_json::{Value, json};

const ALICE: &str = "alice-0123456789abcdef";
const BOB: &str = "bob-0123456789abcdef00";

async fn embed(
    server: &common::TestServer,
    path: &str,
    key: Option<&str>,
    forwarded: Option<&str>,
    body: Value,
) -> (u16, Option<u64>, Value) {
    let mut request = server.client.post(server.url(path)).json(&body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(address) = forwarded {
        request = request.header("x-forwarded-for", address);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (status, retry, response.json().await.unwrap())
}

fn texts(n: usize) -> Value {
    json!({"texts": vec!["a short sentence"; n]})
}

#[tokio::test]
async fn each_key_spends_its_own_budget_of_texts_and_then_gets_429() {
    let keys = format!("{ALICE},{BOB}");
    let server = common::spawn(&[
        "--api-keys",
        &keys,
        "--rate-limit",
        "10",
        "--rate-limit-burst",
        "10",
    ])
    .await;
    let (status, _, body) = embed(&server, "/api/embed", Some(ALICE), None, texts(8)).await;
    assert_eq!(status, 200, "{body}");
    // 8 of 10 spent: 3 more texts do not fit, 2 would.
    let (status, retry, body) = embed(&server, "/api/embed", Some(ALICE), None, texts(3)).await;
    assert_eq!(status, 429, "{body}");
    assert!(retry.is_some_and(|s| s >= 1), "{retry:?}");
    assert!(body["detail"].as_str().unwrap().contains("3 work units"));
    let openai = json!({"input": ["a", "b", "c"], "model": "all-MiniLM-L6-v2"});
    let (status, _, body) = embed(&server, "/v1/embeddings", Some(ALICE), None, openai).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    // Bob's budget is his own.
    let (status, _, body) = embed(&server, "/api/embed", Some(BOB), None, texts(10)).await;
    assert_eq!(status, 200, "{body}");
    // More than the burst could never pass: a 422 saying so, not a 429 to retry forever.
    let (status, _, body) = embed(&server, "/api/embed", Some(BOB), None, texts(11)).await;
    assert_eq!(status, 422, "{body}");
    // Probes are never limited.
    for _ in 0..20 {
        let status = server
            .client
            .get(server.url("/health/ready"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
    }
}

#[tokio::test]
async fn without_keys_each_address_is_limited_behind_a_trusted_proxy() {
    let server = common::spawn(&["--rate-limit", "5", "--trust-forwarded-for"]).await;
    let one = Some("203.0.113.1");
    let (status, _, body) = embed(&server, "/api/embed", None, one, texts(5)).await;
    assert_eq!(status, 200, "{body}");
    let (status, retry, _) = embed(&server, "/api/embed", None, one, texts(1)).await;
    assert_eq!(status, 429);
    assert!(retry.is_some());
    let other = Some("203.0.113.2");
    let (status, _, body) = embed(&server, "/api/embed", None, other, texts(5)).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn chat_is_charged_for_its_prompt_and_max_tokens_before_any_work() {
    // 20 units a minute: one chat asking for 1024 tokens costs 11.
    let server = common::spawn(&["--rate-limit", "20"]).await;
    let chat = json!({"messages": [{"role": "user", "content": "hi"}]});
    // No chat model here: the first request passes the limiter and gets the handler's 404.
    let (status, _, body) = embed(&server, "/api/chat/stream", None, None, chat.clone()).await;
    assert_eq!(status, 404, "{body}");
    let (status, _, body) = embed(&server, "/api/chat/stream", None, None, chat).await;
    assert_eq!(status, 429, "{body}");
}

#[tokio::test]
async fn admission_caps_on_conversations_and_metadata_are_422s() {
    let server = common::spawn(&[]).await;
    let many = vec![json!({"role": "user", "content": "hi"}); 257];
    let (status, _, body) = embed(
        &server,
        "/api/chat/stream",
        None,
        None,
        json!({"messages": many}),
    )
    .await;
    common::assert_validation(status, &body, json!(["body", "messages"]), "too_long");
    let long = "x".repeat(60_000);
    let messages = vec![json!({"role": "user", "content": long}); 4];
    let (status, _, body) = embed(
        &server,
        "/v1/chat/completions",
        None,
        None,
        json!({"model": "m", "messages": messages}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("200000"),
        "{body}"
    );
    let document = json!({"title": "t", "content": "c", "metadata": {"note": "n".repeat(1001)}});
    let (status, _, body) = embed(&server, "/api/rag/documents", None, None, document).await;
    common::assert_validation(
        status,
        &body,
        json!(["body", "metadata", "note"]),
        "value_error",
    );
}
