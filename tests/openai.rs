//! `/v1/embeddings` speaks OpenAI's request, response and error shapes.

mod common;

use base64::Engine;
use common::{cosine, spawn, vectors};
use serde_json::json;

#[tokio::test]
async fn a_string_or_a_list_gives_openai_shaped_embeddings() {
    let server = spawn(&[]).await;
    let (status, one) = server
        .post(
            "/v1/embeddings",
            &json!({"input": "Hello world", "model": "all-MiniLM-L6-v2"}),
        )
        .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["object"], "list");
    assert_eq!(one["data"][0]["object"], "embedding");
    assert_eq!(one["data"][0]["index"], 0);
    assert_eq!(one["model"], "all-MiniLM-L6-v2");
    assert!(one["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(one["usage"]["prompt_tokens"], one["usage"]["total_tokens"]);
    let ours = &server.embed(&["Hello world"]).await[0];
    let theirs: Vec<f32> = serde_json::from_value(one["data"][0]["embedding"].clone()).unwrap();
    assert!(cosine(ours, &theirs) > 0.99999);

    let (status, many) = server
        .post(
            "/v1/embeddings",
            &json!({"input": ["a", "b", "c"], "model": "all-MiniLM-L6-v2", "dimensions": 384}),
        )
        .await;
    assert_eq!(status, 200, "{many}");
    let indices: Vec<u64> = many["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2]);
}

#[tokio::test]
async fn base64_encoding_carries_the_same_floats() {
    let server = spawn(&[]).await;
    let body = |format: &str| json!({"input": ["Hello world"], "model": "all-MiniLM-L6-v2", "encoding_format": format});
    let (_, floats) = server.post("/v1/embeddings", &body("float")).await;
    let (status, encoded) = server.post("/v1/embeddings", &body("base64")).await;
    assert_eq!(status, 200, "{encoded}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let floats: Vec<f32> = serde_json::from_value(floats["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(decoded, floats);
    let _ = vectors(&json!([floats]));
}

#[tokio::test]
async fn errors_use_openais_shape() {
    let server = spawn(&[]).await;
    let (status, body) = server
        .post(
            "/v1/embeddings",
            &json!({"input": "x", "model": "all-MiniLM-L6-v2", "dimensions": 385}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["param"], "dimensions");
    assert!(body["error"]["message"].as_str().unwrap().contains("384"));

    let (status, body) = server
        .post(
            "/v1/embeddings",
            &json!({"input": "x", "model": "text-embedding-3-small"}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");

    let (status, body) = server
        .post(
            "/v1/embeddings",
            &json!({"input": ["ok", ""], "model": "all-MiniLM-L6-v2"}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["param"], "input[1]");

    let (status, body) = server
        .post(
            "/v1/embeddings",
            &json!({"input": [1, 2, 3], "model": "all-MiniLM-L6-v2"}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let (status, body) = server
        .post_raw("/v1/embeddings", "application/json", b"{".to_vec())
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("JSON"));
}

#[tokio::test]
async fn fewer_dimensions_are_the_first_ones_normalised_again() {
    let server = spawn(&[]).await;
    let full = server.embed(&["Hello world"]).await.remove(0);
    for d in [1usize, 64, 384] {
        let (status, body) = server
            .post(
                "/v1/embeddings",
                &json!({"input": "Hello world", "model": "all-MiniLM-L6-v2", "dimensions": d}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let short = vectors(&json!([body["data"][0]["embedding"]])).remove(0);
        assert_eq!(short.len(), d);
        let norm = short.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        assert!(common::cosine(&short, &full[..d]) > 0.9999);
    }
}
