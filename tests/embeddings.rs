//! The real all-MiniLM-L6-v2 through real HTTP: reference values, batching, concurrency, truncation,
//! overload.

mod common;

use common::{cosine, spawn, vectors};
use serde_json::json;

#[tokio::test]
async fn hello_world_matches_the_reference_embedding() {
    let server = spawn(&[]).await;
    let v = &server.embed(&["Hello world"]).await[0];
    assert_eq!(v.len(), 384);
    let reference = [-0.03448, 0.03102, 0.00674, 0.02611, -0.03936];
    for (got, want) in v.iter().zip(reference) {
        assert!((got - want).abs() < 1e-4, "{:?} vs {reference:?}", &v[..5]);
    }
}

#[tokio::test]
async fn similar_sentences_score_as_the_reference_does() {
    let server = spawn(&[]).await;
    let v = server
        .embed(&[
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The girl is carrying a baby.",
        ])
        .await;
    let near = cosine(&v[0], &v[1]);
    let far = cosine(&v[0], &v[2]);
    assert!((near - 0.7553).abs() < 1e-4, "{near}");
    assert!((far - -0.1050).abs() < 1e-4, "{far}");
}

#[tokio::test]
async fn a_batched_request_returns_the_same_vectors_as_single_requests() {
    let server = spawn(&[]).await;
    let texts = [
        "Short.",
        "A somewhat longer sentence about the weather in the mountains in spring.",
        "Rust servers stream tokens without a garbage collector, which keeps latency low and predictable.",
        "Hi",
        "Embeddings map sentences to points in a vector space.",
    ];
    let batched = server.embed(&texts).await;
    for (text, together) in texts.iter().zip(&batched) {
        let worst = largest_difference(&server.embed(&[text]).await[0], together);
        assert!(worst < 1e-4, "{text}: differs by {worst}");
    }
}

fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// 32 texts of about 22 tokens pack into more rows than the panel kernel takes in one call, so the
/// batch runs in chunks; alone, each text runs in one.
#[tokio::test]
async fn a_batch_too_large_for_the_panels_returns_the_same_vectors_as_single_requests() {
    let server = spawn(&[]).await;
    let texts: Vec<String> = (0..32)
        .map(|i| {
            format!(
                "Boat number {i} came back to the quiet harbour at dusk, low in the water with \
                 its catch of herring."
            )
        })
        .collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let batched = server.embed(&texts).await;
    for i in [0, 13, 31] {
        let worst = largest_difference(&server.embed(&[texts[i]]).await[0], &batched[i]);
        assert!(worst < 1e-4, "{}: differs by {worst}", texts[i]);
    }
    assert!(
        cosine(&batched[0], &batched[31]) < 0.9999,
        "the numbers must tell the texts apart"
    );
}

#[tokio::test]
async fn many_concurrent_requests_all_succeed_with_their_own_answers() {
    let server = std::sync::Arc::new(spawn(&[]).await);
    let reference = server.embed(&["request number 7"]).await.remove(0);
    let answers = futures::future::join_all((0..48).map(|i| {
        let server = server.clone();
        async move {
            let text = format!("request number {i}");
            (i, server.embed(&[&text]).await.remove(0))
        }
    }))
    .await;
    for (i, v) in &answers {
        assert_eq!(v.len(), 384);
        let same = cosine(v, &reference) > 0.9999;
        assert_eq!(same, *i == 7, "request {i} got someone else's vector");
    }
}

#[tokio::test]
async fn a_long_text_is_truncated_and_reported_not_rejected() {
    let server = spawn(&[]).await;
    let long = "word ".repeat(1000);
    let (status, body) = server
        .post("/api/embed", &json!({"texts": ["short one", long]}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["truncated"], json!([false, true]));
    let (_, alone) = server.post("/api/embed", &json!({"texts": [long]})).await;
    assert_eq!(alone["usage"]["prompt_tokens"], 256);
    let (_, short) = server
        .post("/api/embed", &json!({"texts": ["short one"]}))
        .await;
    assert!(short.get("truncated").is_none(), "{short}");
}

#[tokio::test]
async fn normalisation_can_be_turned_off() {
    let server = spawn(&[]).await;
    let norm = |v: &Vec<f32>| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let (_, on) = server
        .post("/api/embed", &json!({"texts": ["Hello world"]}))
        .await;
    let (_, off) = server
        .post(
            "/api/embed",
            &json!({"texts": ["Hello world"], "normalize": false}),
        )
        .await;
    let on = &vectors(&on["embeddings"])[0];
    let off = &vectors(&off["embeddings"])[0];
    assert!((norm(on) - 1.0).abs() < 1e-5);
    assert!((norm(off) - 1.0).abs() > 0.01, "norm {}", norm(off));
    assert!(cosine(on, off) > 0.9999);
}

#[tokio::test]
async fn overload_is_refused_at_once_with_503_and_retry_after() {
    let server = std::sync::Arc::new(
        spawn(&[
            "--queue-capacity",
            "1",
            "--max-batch-size",
            "4",
            "--max-batch-wait-ms",
            "0",
        ])
        .await,
    );
    let heavy: Vec<String> = (0..32)
        .map(|i| format!("sentence {i} ").repeat(40))
        .collect();
    let responses = futures::future::join_all((0..12).map(|_| {
        let server = server.clone();
        let body = json!({ "texts": heavy });
        async move {
            let r = server
                .client
                .post(server.url("/api/embed"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let retry_after = r.headers().get("retry-after").cloned();
            (
                r.status().as_u16(),
                retry_after,
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    }))
    .await;
    let refused: Vec<_> = responses.iter().filter(|(s, ..)| *s == 503).collect();
    assert!(!refused.is_empty(), "nothing was refused");
    assert!(
        responses.iter().any(|(s, ..)| *s == 200),
        "nothing was served"
    );
    for (status, retry_after, body) in &responses {
        assert!(*status == 200 || *status == 503, "{status}: {body}");
        if *status == 503 {
            assert_eq!(retry_after.as_ref().unwrap(), "1");
            assert!(body["detail"].as_str().unwrap().contains("queue is full"));
        }
    }
}
