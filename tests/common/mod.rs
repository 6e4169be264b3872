//! Test helpers: a real aitier server on a random port, with the real models from `models/`.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use aitier::config::{Cli, Command};
use clap::Parser;
use serde_json::Value;

pub const MINILM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/all-MiniLM-L6-v2");
/// The default local chat model (models/fetch).
pub const GGUF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
);
/// A request SmolLM2 answers greedily at length: it was still writing at 2,000 tokens (a prompt
/// like "Count from 1 to 1000" stops after 121 tokens, under a second once decode got fast).
pub const LONG_ANSWER: &str =
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.";

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    /// The server's state, to watch what happens behind the HTTP surface.
    pub state: aitier::state::AppState,
    /// Dropping it (with the server) or [`TestServer::shut_down`] stops the server as a signal does.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    running: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The SQLite file made for this server, removed with it.
    sqlite_file: Option<std::path::PathBuf>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(file) = &self.sqlite_file {
            for suffix in ["", "-wal", "-shm"] {
                let mut name = file.clone().into_os_string();
                name.push(suffix);
                let _ = std::fs::remove_file(name);
            }
        }
    }
}

/// Starts a server on port 0 with the real MiniLM and `extra` flags, and waits until it is ready.
pub async fn spawn(extra: &[&str]) -> TestServer {
    let server = start(extra).await;
    server.wait_ready().await;
    server
}

/// Starts a server like [`spawn`] without waiting for it to be ready.
pub async fn start(extra: &[&str]) -> TestServer {
    assert!(
        std::path::Path::new(MINILM)
            .join("model.safetensors")
            .is_file(),
        "{MINILM} is missing: run models/fetch"
    );
    let mut argv = vec!["aitier", "--port", "0", "--embedding-model", MINILM];
    // Chat loads only for the tests that ask for it.
    if !extra.contains(&"--chat-model") {
        argv.extend_from_slice(&["--chat-model", "none"]);
    }
    // Each server gets its own SQLite file unless the test names a database.
    let sqlite_file = (!extra.contains(&"--database-url"))
        .then(|| std::env::temp_dir().join(format!("aitier-test-{}.db", uuid::Uuid::new_v4())));
    let sqlite_url = sqlite_file
        .as_ref()
        .map(|f| format!("sqlite://{}", f.display()));
    if let Some(url) = &sqlite_url {
        argv.extend_from_slice(&["--database-url", url]);
    }
    argv.extend_from_slice(extra);
    let args = match Cli::try_parse_from(argv)
        .expect("valid flags")
        .into_command()
    {
        Command::Serve(args) => args,
        _ => unreachable!(),
    };
    let bound = aitier::server::bind(&args).await.expect("server binds");
    let addr = bound.local_addr().unwrap();
    let state = bound.state().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(bound.run(async {
        let _ = stopped.await;
    }));
    TestServer {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        state,
        stop: Some(stop),
        running: Some(running),
        sqlite_file,
    }
}

impl TestServer {
    /// Sends the shutdown signal and waits for the server to stop; returns what `run` returned.
    pub async fn shut_down(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.running.take() {
            Some(running) => running.await.expect("the server task"),
            None => Ok(()),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = self
                .client
                .get(self.url("/health/ready"))
                .send()
                .await
                .map(|r| r.status().as_u16());
            if matches!(status, Ok(200)) {
                return;
            }
            assert!(Instant::now() < deadline, "server never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GETs `path` and decodes its JSON answer.
    pub async fn get_json(&self, path: &str) -> Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// POSTs a JSON body; returns the status and the decoded JSON answer.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        (status, response.json().await.expect("a JSON answer"))
    }

    /// POSTs raw bytes with a content type; returns the status and the JSON answer.
    pub async fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        (status, response.json().await.expect("a JSON answer"))
    }

    /// Embeds texts through `/api/embed` and returns the vectors.
    pub async fn embed(&self, texts: &[&str]) -> Vec<Vec<f32>> {
        let (status, body) = self
            .post("/api/embed", &serde_json::json!({ "texts": texts }))
            .await;
        assert_eq!(status, 200, "{body}");
        vectors(&body["embeddings"])
    }
}

pub fn vectors(value: &Value) -> Vec<Vec<f32>> {
    serde_json::from_value(value.clone()).expect("a list of vectors")
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Asserts a FastAPI 422 body whose first error has this location and type.
pub fn assert_validation(status: u16, body: &Value, loc: Value, kind: &str) {
    assert_eq!(status, 422, "{body}");
    let first = &body["detail"][0];
    assert_eq!(first["loc"], loc, "{body}");
    assert_eq!(first["type"], kind, "{body}");
    assert!(
        first["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// The `data:` events of an SSE body.
pub fn events(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// The test PostgreSQL's URL (`AITIER_TEST_DATABASE_URL`). Without it the PostgreSQL half of a test
/// is skipped loudly, except under tests/all (`AITIER_TEST_REQUIRE_POSTGRES=1`), where it fails.
pub fn postgres_url() -> Option<String> {
    if let Ok(url) = std::env::var("AITIER_TEST_DATABASE_URL") {
        return Some(url);
    }
    assert!(
        std::env::var_os("AITIER_TEST_REQUIRE_POSTGRES").is_none(),
        "AITIER_TEST_DATABASE_URL is not set but AITIER_TEST_REQUIRE_POSTGRES is: run \
         `export AITIER_TEST_DATABASE_URL=$(tests/pg start)`"
    );
    eprintln!(
        "\n*** SKIPPED on PostgreSQL: AITIER_TEST_DATABASE_URL is not set. \
         Run `export AITIER_TEST_DATABASE_URL=$(tests/pg start)` (tests/all does). ***\n"
    );
    None
}

/// The index of the largest logit (the first of equals): a greedy choice.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Awaits `f`, failing the test after two minutes.
pub async fn within<T>(f: impl std::future::Future<Output = T>, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .unwrap_or_else(|_| panic!("no {what} within 2 minutes"))
}

/// Reads a stream until its text holds `needle` (past keep-alive comments); returns what it read.
pub async fn read_until(response: &mut reqwest::Response, needle: &str) -> String {
    let mut seen = String::new();
    while !seen.contains(needle) {
        let chunk = tokio::time::timeout(Duration::from_secs(120), response.chunk())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} within 2 minutes: {seen}"))
            .unwrap()
            .unwrap_or_else(|| panic!("the stream ended before {needle:?}: {seen}"));
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    seen
}

/// Runs `tests/clients/<script>` with Node and `args`, failing the test with its output unless it
/// succeeds. The packages come from `npm ci` in tests/clients (tests/all runs it).
pub async fn node(script: &str, package: &str, args: Vec<String>) {
    let clients = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients");
    assert!(
        std::path::Path::new(clients)
            .join("node_modules")
            .join(package)
            .is_dir(),
        "{clients}/node_modules/{package} is missing: tests/all runs `npm ci` there"
    );
    let script = format!("{clients}/{script}");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(script)
            .args(args)
            .output()
            .expect("node runs")
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
