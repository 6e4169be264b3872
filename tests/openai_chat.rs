//! `/v1/chat/completions` and `/v1/models` on the real local model, through plain HTTP and through
//! the official `openai` Python package (installed by tests/all into target/openai-venv).

mod common;

use common::GGUF;

use common::{TestServer, spawn};
use serde_json::{Value, json};

const MODEL: &str = "SmolLM2-135M-Instruct";

async fn server() -> TestServer {
    spawn(&["--chat-model", GGUF]).await
}

fn question() -> Value {
    json!([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
}

#[tokio::test]
async fn a_completion_has_openais_shape() {
    let server = server().await;
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": question(), "max_tokens": 48}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["model"], MODEL);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{body}"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn a_stream_sends_chunks_usage_and_done() {
    let server = server().await;
    let response = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(
            &json!({"model": MODEL, "messages": question(), "max_tokens": 5, "stream": true,
                      "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let finished = &chunks[chunks.len() - 2];
    assert_eq!(finished["choices"][0]["finish_reason"], "length");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn errors_and_models_use_openais_shapes() {
    let server = server().await;
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &json!({"model": "gpt-4o", "messages": question()}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": []}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["param"], "messages");
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": question(), "n": 2}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let models: Value = server
        .client
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [MODEL, "all-MiniLM-L6-v2"]);
}

#[tokio::test]
async fn the_official_openai_python_client_works_against_v1() {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/target/openai-venv/bin/python");
    assert!(
        std::path::Path::new(python).is_file(),
        "{python} is missing: tests/all installs the openai package there"
    );
    let server = server().await;
    let script = r#"
import sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
ids = [m.id for m in client.models.list()]
assert sys.argv[2] in ids, ids
messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
full = client.chat.completions.create(model=sys.argv[2], messages=messages, max_tokens=48)
assert "Paris" in full.choices[0].message.content, full
assert full.usage.completion_tokens > 0
pieces = []
for chunk in client.chat.completions.create(model=sys.argv[2], messages=messages, max_tokens=48, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
assert "Paris" in "".join(pieces), pieces
emb = client.embeddings.create(model="all-MiniLM-L6-v2", input=["hello", "world"])
assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384
print("ok")
"#;
    let base = server.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args(["-c", script, &base, MODEL])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_official_openai_npm_client_works_against_v1() {
    let server = server().await;
    let args = vec![server.base.clone(), MODEL.into(), "all-MiniLM-L6-v2".into()];
    common::node("openai.mjs", "openai", args).await;
}

#[tokio::test]
async fn unsupported_openai_fields_are_refused_by_name_and_their_off_values_pass() {
    let server = server().await;
    let refused = [
        ("response_format", json!({"type": "json_object"})),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "lookup"}}]),
        ),
        ("tool_choice", json!("auto")),
        ("logprobs", json!(true)),
        ("n", json!(2)),
    ];
    for (field, value) in refused {
        let mut request = json!({"model": MODEL, "messages": question(), "max_tokens": 4});
        request[field] = value;
        let (status, body) = server.post("/v1/chat/completions", &request).await;
        assert_eq!(status, 422, "{field}: {body}");
        assert_eq!(body["error"]["param"], field, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(field),
            "{body}"
        );
    }
    let off = json!({
        "model": MODEL, "messages": question(), "max_tokens": 4,
        "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
        "logprobs": false, "n": 1,
    });
    let (status, body) = server.post("/v1/chat/completions", &off).await;
    assert_eq!(status, 200, "{body}");
}
