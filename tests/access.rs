//! API keys over real HTTP: 401 and 403 in each surface's shape, both headers, scopes, open paths,
//! CORS preflights, a key file, and the refusal to serve a public address openly.

mod common;

use serde_json::{Value, json};

const READER: &str = "reader-0123456789abcdef";
const WRITER: &str = "writer-0123456789abcdef";
const ADMIN: &str = "admin-0123456789abcdef0";

fn keys() -> String {
    format!("{READER}:read,{WRITER},{ADMIN}:admin")
}

async fn keyed(extra: &[&str]) -> common::TestServer {
    let keys = keys();
    let mut argv = vec!["--api-keys", keys.as_str()];
    argv.extend_from_slice(extra);
    let server = common::start(&argv).await;
    server.wait_ready().await; // /health/ready is open
    server
}

async fn send(request: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

fn embed_body() -> Value {
    json!({"texts": ["hello"]})
}

#[tokio::test]
async fn without_a_key_the_api_answers_401_in_fastapi_and_openai_shapes() {
    let server = keyed(&[]).await;
    let (status, headers, body) = send(
        server
            .client
            .post(server.url("/api/embed"))
            .json(&embed_body()),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer")
    );
    assert_eq!(headers["www-authenticate"], "Bearer realm=\"aitier\"");

    let (status, headers, body) = send(
        server
            .client
            .post(server.url("/v1/embeddings"))
            .bearer_auth("not-a-key-at-all-0000")
            .json(&json!({"input": "hi", "model": "all-MiniLM-L6-v2"})),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(headers.contains_key("www-authenticate"));
    // The refusal never echoes the key it was given.
    assert!(!body.to_string().contains("not-a-key-at-all"));
}

#[tokio::test]
async fn a_key_works_as_bearer_token_and_as_x_api_key() {
    let server = keyed(&[]).await;
    for request in [
        server
            .client
            .post(server.url("/api/embed"))
            .bearer_auth(READER),
        server
            .client
            .post(server.url("/api/embed"))
            .header("x-api-key", WRITER),
    ] {
        let (status, _, body) = send(request.json(&embed_body())).await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test]
async fn a_read_key_cannot_ingest_or_delete_and_gets_403() {
    let server = keyed(&[]).await;
    let document = json!({"collection": "access", "title": "t", "content": "Keys guard writes."});
    let (status, _, body) = send(
        server
            .client
            .post(server.url("/api/rag/documents"))
            .bearer_auth(READER)
            .json(&document),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("'write'"),
        "{body}"
    );

    // A bare key reads and writes.
    let (status, _, created) = send(
        server
            .client
            .post(server.url("/api/rag/documents"))
            .bearer_auth(WRITER)
            .json(&document),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_i64().unwrap();
    let delete = |key: &str| {
        server
            .client
            .delete(server.url(&format!("/api/rag/documents/{id}")))
            .bearer_auth(key)
    };
    let (status, _, _) = send(delete(READER)).await;
    assert_eq!(status, 403);
    let (status, _, body) = send(
        server
            .client
            .post(server.url("/api/rag/search"))
            .bearer_auth(READER)
            .json(&json!({"query": "keys", "collection": "access"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = send(delete(ADMIN)).await;
    assert!(status == 200 || status == 204, "{status}");
}

#[tokio::test]
async fn probes_docs_and_preflights_need_no_key() {
    let server = keyed(&["--cors-origins", "https://app.example"]).await;
    for path in ["/health", "/health/ready", "/openapi.json", "/docs/"] {
        let status = server
            .client
            .get(server.url(path))
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_success(), "{path}: {status}");
    }
    let preflight = server
        .client
        .request(reqwest::Method::OPTIONS, server.url("/v1/chat/completions"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let allowed = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed.contains("authorization"), "{allowed}");
}

#[tokio::test]
async fn open_paths_are_configurable() {
    let server = keyed(&["--open-paths", "/health,/health/ready"]).await;
    let status = server
        .client
        .get(server.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401);
    let status = server
        .client
        .get(server.url("/openapi.json"))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn keys_can_come_from_a_file() {
    let path = std::env::temp_dir().join(format!("aitier-keys-{}", uuid::Uuid::new_v4()));
    std::fs::write(&path, format!("# one key per line\n{READER}:read\n")).unwrap();
    let spec = format!("@{}", path.display());
    let server = common::start(&["--api-keys", &spec]).await;
    server.wait_ready().await;
    let (status, _, body) = send(
        server
            .client
            .post(server.url("/api/embed"))
            .bearer_auth(READER)
            .json(&embed_body()),
    )
    .await;
    std::fs::remove_file(&path).unwrap();
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn the_openapi_document_declares_both_ways_to_send_a_key() {
    let spec = serde_json::to_value(aitier::http::openapi()).unwrap();
    let schemes = &spec["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["api_key"]["name"], "X-API-Key");
    assert_eq!(spec["security"].as_array().unwrap().len(), 2);
    assert_eq!(spec["paths"]["/health"]["get"]["security"], json!([{}]));
    let embed = &spec["paths"]["/api/embed"]["post"]["responses"];
    assert!(embed.get("401").is_some() && embed.get("403").is_some());
    let openai = &spec["paths"]["/v1/embeddings"]["post"]["responses"]["401"];
    assert!(openai.to_string().contains("OpenAiErrorBody"), "{openai}");
}

#[tokio::test]
async fn a_public_address_without_keys_is_refused_unless_anonymous_is_allowed() {
    let parse = |extra: &[&str]| {
        let mut argv = vec![
            "aitier",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--chat-model",
            "none",
            "--embedding-model",
            common::MINILM,
        ];
        argv.extend_from_slice(extra);
        match clap::Parser::try_parse_from(argv)
            .map(|cli: aitier::config::Cli| cli.into_command())
            .unwrap()
        {
            aitier::config::Command::Serve(args) => args,
            _ => unreachable!(),
        }
    };
    let refused = aitier::server::bind(&parse(&[])).await.err().unwrap();
    assert!(
        refused.to_string().contains("--allow-anonymous"),
        "{refused}"
    );
    let db = std::env::temp_dir().join(format!("aitier-anon-{}.db", uuid::Uuid::new_v4()));
    let url = format!("sqlite://{}", db.display());
    let bound = aitier::server::bind(&parse(&["--allow-anonymous", "--database-url", &url])).await;
    assert!(bound.is_ok(), "{:?}", bound.err());
    drop(bound);
    let _ = std::fs::remove_file(db);
}

#[tokio::test]
async fn the_official_openai_python_client_sends_its_key_as_bearer() {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/target/openai-venv/bin/python");
    assert!(
        std::path::Path::new(python).is_file(),
        "{python} is missing: tests/all installs the openai package there"
    );
    let server = keyed(&[]).await;
    let script = r#"
import sys, openai
good = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key=sys.argv[2], max_retries=0)
emb = good.embeddings.create(model="all-MiniLM-L6-v2", input="hello")
assert len(emb.data[0].embedding) == 384
bad = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="wrong-key-0123456789", max_retries=0)
try:
    bad.embeddings.create(model="all-MiniLM-L6-v2", input="hello")
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.code == "invalid_api_key", e
print("ok")
"#;
    let base = server.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args(["-c", script, &base, READER])
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
