//! The database going away and coming back: RAG routes answer 503 with a clear detail, readiness
//! says so, and the server recovers by itself. Stops and starts the test PostgreSQL (`tests/pg`),
//! so it lives in its own test binary: cargo runs binaries one after the other, never beside
//! `tests/rag.rs`.

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

const PG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pg");

fn pg(command: &str) {
    let status = std::process::Command::new(PG)
        .arg(command)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("tests/pg runs");
    assert!(status.success(), "tests/pg {command} failed");
}

/// The tests here stop and start the one test PostgreSQL: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts the test PostgreSQL again even when an assertion fails, for the tests that follow.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        pg("start");
    }
}

#[tokio::test]
async fn a_database_outage_is_503_and_the_server_recovers_by_itself() {
    let Some(url) = common::postgres_url() else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let server = common::spawn(&["--database-url", &url]).await;
    let collection = format!("outage-{}", uuid::Uuid::new_v4().simple());
    let doc = json!({"collection": collection, "title": "Opening hours", "content": "The shop opens at nine."});
    let (status, body) = server.post("/api/rag/documents", &doc).await;
    assert_eq!(status, 201, "{body}");
    let query = json!({"query": "when does the shop open", "collection": collection});

    let restart = Restart;
    pg("stop");
    for path in ["/api/rag/search", "/api/rag/documents"] {
        let body = if path == "/api/rag/search" {
            query.clone()
        } else {
            json!({"collection": collection, "title": "t", "content": "New text while down."})
        };
        let started = Instant::now();
        let (status, answer) = server.post(path, &body).await;
        assert_eq!(status, 503, "{path}: {answer}");
        let detail = answer["detail"].as_str().unwrap();
        assert!(detail.contains("database is unavailable"), "{detail}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    let collections = server
        .client
        .get(server.url("/api/rag/collections"))
        .send()
        .await
        .unwrap();
    assert_eq!(collections.status(), 503);
    assert!(collections.headers().contains_key("retry-after"));
    let ready = server
        .client
        .get(server.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert!(
        ready["detail"].as_str().unwrap().contains("database"),
        "{ready}"
    );
    // Embeddings do not need the database.
    server.embed(&["still here"]).await;

    drop(restart);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, answer) = server.post("/api/rag/search", &query).await;
        if status == 200 {
            assert_eq!(answer[0]["title"], "Opening hours", "{answer}");
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {status} {answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.wait_ready().await;
    // Nothing was half-written while the database was down.
    let (status, body) = server
        .post(
            "/api/rag/documents",
            &json!({"collection": collection, "title": "t", "content": "New text while down."}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn a_server_started_while_the_database_is_down_serves_rag_once_it_is_up() {
    let Some(url) = common::postgres_url() else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let restart = Restart;
    pg("stop");
    let server = common::start(&["--database-url", &url]).await;
    // The models load; the database does not answer: not ready, and says why.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = server
            .client
            .get(server.url("/health/ready"))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 503);
        let detail = ready.json::<Value>().await.unwrap()["detail"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(detail.contains("database"), "{detail}");
        if !detail.contains("loading") {
            break;
        }
        assert!(Instant::now() < deadline, "{detail}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = server
        .post("/api/rag/search", &json!({"query": "anything"}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["detail"].as_str().unwrap() == "The database is unavailable; retry later",
        "{body}"
    );
    server
        .embed(&["embeddings do not wait for the database"])
        .await;
    drop(restart);
    // It keeps trying, connects, migrates, and becomes ready by itself.
    server.wait_ready().await;
    let (status, body) = server
        .post(
            "/api/rag/search",
            &json!({"query": "anything", "collection": "none-such"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}
