//! Bad input gets FastAPI's error shapes, never a 500 or a hang.

mod common;

use common::{assert_validation, spawn};
use serde_json::json;

#[tokio::test]
async fn every_bad_body_is_a_422_in_fastapis_shape() {
    let server = spawn(&["--body-limit", "200000"]).await;
    let cases = [
        (json!({"texts": []}), json!(["body", "texts"]), "too_short"),
        (
            json!({"texts": ["ok", ""]}),
            json!(["body", "texts", 1]),
            "string_too_short",
        ),
        (
            json!({"texts": vec!["a"; 257]}),
            json!(["body", "texts"]),
            "too_long",
        ),
        (
            json!({"texts": ["x".repeat(10_001)]}),
            json!(["body", "texts", 0]),
            "string_too_long",
        ),
        (
            json!({"texts": ["ok", 3]}),
            json!(["body", "texts", 1]),
            "string_type",
        ),
        (
            json!({"texts": "not a list"}),
            json!(["body", "texts"]),
            "list_type",
        ),
        (
            json!({"text": ["typo"]}),
            json!(["body", "texts"]),
            "missing",
        ),
        (
            json!({"texts": ["ok"], "normalize": "yes"}),
            json!(["body", "normalize"]),
            "bool_type",
        ),
        (json!(["texts"]), json!(["body"]), "model_attributes_type"),
    ];
    for (body, loc, kind) in cases {
        let (status, answer) = server.post("/api/embed", &body).await;
        assert_validation(status, &answer, loc, kind);
    }
}

#[tokio::test]
async fn malformed_json_and_a_wrong_content_type_are_422() {
    let server = spawn(&[]).await;
    let (status, body) = server
        .post_raw("/api/embed", "application/json", b"{\"texts\": [".to_vec())
        .await;
    assert_validation(status, &body, json!(["body"]), "json_invalid");
    let (status, body) = server
        .post_raw("/api/embed", "text/plain", br#"{"texts": ["hi"]}"#.to_vec())
        .await;
    assert_validation(status, &body, json!(["body"]), "model_attributes_type");
    let (status, body) = server
        .post_raw("/api/embed", "application/json", vec![0xff, 0xfe, 0x00])
        .await;
    assert_validation(status, &body, json!(["body"]), "json_invalid");
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let server = spawn(&["--body-limit", "1000"]).await;
    let (status, body) = server
        .post("/api/embed", &json!({"texts": ["y".repeat(2000)]}))
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(
        body["detail"],
        "Request body is larger than the limit of 1000 bytes"
    );
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_in_the_same_shape() {
    let server = spawn(&[]).await;
    let r = server.client.get(server.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        json!({"detail": "Not Found"})
    );
    let r = server
        .client
        .delete(server.url("/api/embed"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        json!({"detail": "Method Not Allowed"})
    );
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_cors_is_closed_by_default() {
    let server = spawn(&[]).await;
    let r = server
        .client
        .get(server.url("/health"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("x-request-id"));
    assert!(!r.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn configured_origins_may_call_from_a_browser() {
    let server = spawn(&[
        "--cors-origins",
        "https://app.example,https://admin.example",
    ])
    .await;
    let preflight = server
        .client
        .request(reqwest::Method::OPTIONS, server.url("/api/embed"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,authorization",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let allowed = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("content-type"));
    let other = server
        .client
        .get(server.url("/health"))
        .header("origin", "https://other.example")
        .send()
        .await
        .unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));
}
