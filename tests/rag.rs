//! RAG over real HTTP with the real MiniLM, the same cases on both backends: the embedded SQLite
//! store and PostgreSQL + pgvector (the server `tests/pg start` runs; its URL in
//! `AITIER_TEST_DATABASE_URL`, which `tests/all` sets). Fixture corpus: `tests/fixtures/rag/`.

mod common;

use common::{GGUF, events};

use std::collections::HashMap;

use common::{TestServer, assert_validation, spawn};
use serde_json::{Value, json};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rag");

#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A server on the backend, or `None` (with a loud message) when the test PostgreSQL is not set up.
async fn server(backend: Backend, extra: &[&str]) -> Option<TestServer> {
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    if let Backend::Postgres = backend {
        let url = common::postgres_url()?;
        args.extend(["--database-url".into(), url]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Some(spawn(&args).await)
}

/// A collection name no other test (or earlier run on the shared PostgreSQL) uses.
fn collection(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::new_v4().simple())
}

/// The fixture corpus: (file stem, title, content).
fn corpus() -> Vec<(String, String, String)> {
    let mut docs: Vec<_> = std::fs::read_dir(CORPUS)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| {
            let content = std::fs::read_to_string(&p).unwrap();
            let title = content.lines().next().unwrap().trim_start_matches("# ");
            (
                p.file_stem().unwrap().to_string_lossy().into_owned(),
                title.to_string(),
                content.clone(),
            )
        })
        .collect();
    docs.sort();
    docs
}

/// Ingests the corpus; returns file stem -> document id.
async fn ingest_corpus(server: &TestServer, collection: &str) -> HashMap<String, i64> {
    let mut ids = HashMap::new();
    for (stem, title, content) in corpus() {
        let kind = if stem.contains('-') && stem.chars().any(|c| c.is_ascii_digit()) {
            "manual"
        } else {
            "policy"
        };
        let (status, body) = server
            .post(
                "/api/rag/documents",
                &json!({"collection": collection, "title": title, "content": content,
                        "source": format!("fixtures/{stem}.md"), "metadata": {"kind": kind, "stem": stem}}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        ids.insert(stem, body["id"].as_i64().unwrap());
    }
    ids
}

async fn search(server: &TestServer, body: Value) -> Vec<Value> {
    let (status, answer) = server.post("/api/rag/search", &body).await;
    assert_eq!(status, 200, "{answer}");
    answer.as_array().unwrap().clone()
}

async fn collection_counts(server: &TestServer, name: &str) -> Option<(i64, i64)> {
    let body: Value = server
        .client
        .get(server.url("/api/rag/collections"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["collections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .map(|c| {
            (
                c["documents"].as_i64().unwrap(),
                c["chunks"].as_i64().unwrap(),
            )
        })
}

/// Questions worded unlike their answers, and the document that answers each.
const QUESTIONS: &[(&str, &str)] = &[
    (
        "How many days do I have to bring a purchase back and get my money?",
        "returns-policy",
    ),
    (
        "When will my package get to me if I live abroad?",
        "shipping-times",
    ),
    (
        "My kettle is full of white chalky deposits, how do I get rid of them?",
        "kettle-tq208",
    ),
    (
        "I can't remember how to log in, what should I do?",
        "password-reset",
    ),
    (
        "Can I phone someone on a Saturday afternoon?",
        "office-hours",
    ),
    (
        "What are the points I collect with my purchases worth?",
        "loyalty-program",
    ),
    (
        "Where is my information kept and can you delete it?",
        "data-privacy",
    ),
    (
        "The robot cleaner won't recharge on its dock",
        "vacuum-vr12",
    ),
    (
        "Another shop sells it for less, will you give me the difference?",
        "price-match",
    ),
    (
        "Do you take my old fridge away when bringing the new one?",
        "sustainability",
    ),
];

pub async fn search_finds_the_right_document(backend: Backend) {
    let Some(server) = server(backend, &[]).await else {
        return;
    };
    let name = collection("corpus");
    let ids = ingest_corpus(&server, &name).await;
    let mut first = 0;
    for (question, stem) in QUESTIONS {
        let results = search(
            &server,
            json!({"query": question, "collection": name, "top_k": 3}),
        )
        .await;
        let found: Vec<i64> = results
            .iter()
            .map(|r| r["document_id"].as_i64().unwrap())
            .collect();
        assert!(
            found.contains(&ids[*stem]),
            "{question}: expected {stem} in the top 3, got {results:#?}"
        );
        first += usize::from(found[0] == ids[*stem]);
        for r in &results {
            assert!(r["excerpt"].as_str().unwrap().chars().count() <= 500);
            assert!(r["chunk_id"].as_i64().is_some() && r["title"].as_str().is_some());
        }
    }
    assert!(
        first * 10 >= QUESTIONS.len() * 8,
        "only {first} of {} questions found their document first",
        QUESTIONS.len()
    );
}

pub async fn the_same_content_is_stored_once(backend: Backend) {
    let Some(server) = server(backend, &[]).await else {
        return;
    };
    let name = collection("idempotent");
    let doc = json!({"collection": name, "title": "Gift cards", "content": "Gift cards are valid for three years."});
    let (status, first) = server.post("/api/rag/documents", &doc).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["chunks"], 1);
    assert_eq!(first["content_hash"].as_str().unwrap().len(), 64);
    // Same content, another title: still the same document.
    let again = json!({"collection": name, "title": "Renamed", "content": "Gift cards are valid for three years."});
    let (status, second) = server.post("/api/rag/documents", &again).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["title"], "Gift cards");
    assert_eq!(collection_counts(&server, &name).await, Some((1, 1)));
    // The same content in another collection is another document.
    let other = collection("idempotent-other");
    let (status, third) = server
        .post(
            "/api/rag/documents",
            &json!({"collection": other, "title": "Gift cards", "content": "Gift cards are valid for three years."}),
        )
        .await;
    assert_eq!(status, 201, "{third}");
    assert_ne!(third["id"], first["id"]);
}

pub async fn a_deleted_document_is_gone_with_its_chunks(backend: Backend) {
    let Some(server) = server(backend, &[]).await else {
        return;
    };
    let name = collection("delete");
    let ids = ingest_corpus(&server, &name).await;
    let (docs, chunks) = collection_counts(&server, &name).await.unwrap();
    assert_eq!(docs, 20);
    let target = ids["blender-xk4471"];
    let query = json!({"query": "XK-4471 blender jar", "collection": name, "top_k": 20});
    let before = search(&server, query.clone()).await;
    assert_eq!(before[0]["document_id"], target);
    let deleted = server
        .client
        .delete(server.url(&format!("/api/rag/documents/{target}")))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let after = search(&server, query).await;
    assert!(
        after.iter().all(|r| r["document_id"] != target),
        "{after:#?}"
    );
    let (docs_after, chunks_after) = collection_counts(&server, &name).await.unwrap();
    assert_eq!(docs_after, 19);
    assert!(chunks_after < chunks, "{chunks_after} vs {chunks}");
    let again = server
        .client
        .delete(server.url(&format!("/api/rag/documents/{target}")))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["detail"], format!("Document {target} not found"));
    // Deleted content can be ingested again, as a new document.
    let (_, title, content) = corpus()
        .into_iter()
        .find(|(stem, _, _)| stem == "blender-xk4471")
        .unwrap();
    let (status, body) = server
        .post(
            "/api/rag/documents",
            &json!({"collection": name, "title": title, "content": content}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

pub async fn a_metadata_filter_keeps_only_matching_documents(backend: Backend) {
    let Some(server) = server(backend, &[]).await else {
        return;
    };
    let name = collection("filter");
    let ids = ingest_corpus(&server, &name).await;
    let manuals = [
        "blender-xk4471",
        "coffee-machine-cm90",
        "kettle-tq208",
        "vacuum-vr12",
    ];
    for mode in ["vector", "text", "hybrid"] {
        let results = search(
            &server,
            json!({"query": "how do I clean it", "collection": name, "top_k": 20, "mode": mode,
                   "filter": {"kind": "manual"}}),
        )
        .await;
        assert!(!results.is_empty(), "{mode}");
        for r in &results {
            let id = r["document_id"].as_i64().unwrap();
            assert!(
                manuals.iter().any(|m| ids[*m] == id),
                "{mode}: {r} is not a manual"
            );
        }
    }
    let one = search(
        &server,
        json!({"query": "cleaning", "collection": name, "filter": {"kind": "manual", "stem": "coffee-machine-cm90"}}),
    )
    .await;
    assert_eq!(one.len(), 1, "{one:#?}");
    assert_eq!(one[0]["document_id"], ids["coffee-machine-cm90"]);
    let none = search(
        &server,
        json!({"query": "cleaning", "collection": name, "filter": {"kind": "recipe"}}),
    )
    .await;
    assert!(none.is_empty(), "{none:#?}");
}

/// The rank (0-based) of a document in a search, or past the end.
async fn rank_of(server: &TestServer, body: Value, id: i64) -> usize {
    let results = search(server, body).await;
    results
        .iter()
        .position(|r| r["document_id"] == id)
        .unwrap_or(usize::MAX)
}

pub async fn hybrid_ranks_a_product_code_at_least_as_well_as_vector_only(backend: Backend) {
    let Some(server) = server(backend, &[]).await else {
        return;
    };
    let name = collection("hybrid");
    let ids = ingest_corpus(&server, &name).await;
    for (code, stem) in [
        ("TQ-208", "kettle-tq208"),
        ("CM-90", "coffee-machine-cm90"),
        ("VR-12", "vacuum-vr12"),
        ("XK-4471", "blender-xk4471"),
    ] {
        let query = format!("what does the manual say about {code}?");
        let body =
            |mode: &str| json!({"query": query, "collection": name, "top_k": 10, "mode": mode});
        let hybrid = rank_of(&server, body("hybrid"), ids[stem]).await;
        let vector = rank_of(&server, body("vector"), ids[stem]).await;
        let text = rank_of(&server, body("text"), ids[stem]).await;
        assert_eq!(text, 0, "{code}: full text finds the code first");
        assert!(
            hybrid <= vector,
            "{code}: hybrid rank {hybrid} worse than vector rank {vector}"
        );
        assert!(hybrid <= 1, "{code}: hybrid rank {hybrid}");
    }
}

pub async fn collections_and_pages_of_documents_are_listed(backend: Backend) {
    let Some(server) = server(backend, &[]).await else {
        return;
    };
    let name = collection("pages");
    let ids = ingest_corpus(&server, &name).await;
    let mut seen = Vec::new();
    for offset in [0, 8, 16] {
        let page: Value = server
            .client
            .get(server.url(&format!(
                "/api/rag/documents?collection={name}&limit=8&offset={offset}"
            )))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(page["total"], 20, "{page}");
        let docs = page["documents"].as_array().unwrap();
        assert_eq!(docs.len(), if offset == 16 { 4 } else { 8 });
        seen.extend(docs.iter().map(|d| d["id"].as_i64().unwrap()));
    }
    let mut expected: Vec<i64> = ids.values().copied().collect();
    expected.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(seen, expected, "newest first, each document once");
    let bad = server
        .client
        .get(server.url("/api/rag/documents?limit=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    let bad = server
        .client
        .get(server.url("/api/rag/documents?limit=abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
}

pub async fn an_answer_streams_its_sources_first(backend: Backend) {
    let Some(server) = server(backend, &["--chat-model", GGUF]).await else {
        return;
    };
    let name = collection("answer");
    let ids = ingest_corpus(&server, &name).await;
    let response = server
        .client
        .post(server.url("/api/rag/query"))
        .json(
            &json!({"question": "How long is the warranty on appliances?", "collection": name,
                      "top_k": 3, "max_tokens": 12}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = events(&response.text().await.unwrap());
    let sources = &events[0];
    assert_eq!(sources["type"], "sources", "{events:#?}");
    let listed = sources["sources"].as_array().unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0]["id"], ids["warranty"], "{sources}");
    assert!(listed.iter().all(|s| s["title"].is_string()
        && s["excerpt"].as_str().unwrap().chars().count() <= 500
        && s["score"].is_number()));
    let (done, deltas) = events[1..].split_last().unwrap();
    assert!(!deltas.is_empty() && deltas.iter().all(|e| e["type"] == "delta"));
    assert_eq!(done["type"], "done", "{done}");
    assert!(done["usage"]["completion_tokens"].as_u64().unwrap() <= 12);
    // The sources are in the prompt: it is far longer than the question alone.
    assert!(
        done["usage"]["prompt_tokens"].as_u64().unwrap() > 100,
        "{done}"
    );
}

pub async fn an_empty_collection_answers_404_before_any_stream(backend: Backend) {
    let Some(server) = server(backend, &["--chat-model", GGUF]).await else {
        return;
    };
    let (status, body) = server
        .post(
            "/api/rag/query",
            &json!({"question": "What is the warranty?", "collection": collection("empty")}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        body,
        json!({"detail": "No relevant documents found in the collection"})
    );
    // A question the collection knows nothing about finds no sources either.
    let name = collection("unrelated");
    ingest_corpus(&server, &name).await;
    let (status, body) = server
        .post(
            "/api/rag/query",
            &json!({"question": "Which chemical element has the atomic number 79?", "collection": name}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    for question in [
        "Who painted the Mona Lisa?",
        "How do I bake sourdough bread?",
    ] {
        let (status, body) = server
            .post(
                "/api/rag/query",
                &json!({"question": question, "collection": name}),
            )
            .await;
        assert_eq!(status, 404, "{question}: {body}");
    }
    // An unknown model is refused before any search.
    let (status, body) = server
        .post(
            "/api/rag/query",
            &json!({"question": "What is the warranty?", "collection": name, "model": "nope"}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("Unknown model 'nope'"),
        "{body}"
    );
    // Search works without a chat model; the answer route says why it cannot answer.
    let Some(no_chat) = self::server(backend, &[]).await else {
        return;
    };
    let (status, body) = no_chat
        .post(
            "/api/rag/query",
            &json!({"question": "What is the warranty?"}),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("no chat model"));
}

pub async fn bad_requests_are_refused_with_422(backend: Backend) {
    let Some(server) = server(backend, &[]).await else {
        return;
    };
    let cases = [
        (
            "/api/rag/documents",
            json!({"title": "t"}),
            json!(["body", "content"]),
            "missing",
        ),
        (
            "/api/rag/documents",
            json!({"title": "", "content": "x"}),
            json!(["body", "title"]),
            "string_too_short",
        ),
        (
            "/api/rag/documents",
            json!({"title": "t", "content": "a\u{0}b"}),
            json!(["body", "content"]),
            "string_pattern_mismatch",
        ),
        (
            "/api/rag/documents",
            json!({"title": "t", "content": "x", "metadata": [1]}),
            json!(["body", "metadata"]),
            "model_attributes_type",
        ),
        (
            "/api/rag/documents",
            json!({"title": "t", "content": "   "}),
            json!(["body", "content"]),
            "value_error",
        ),
        // U+0085 is white space to the chunker, U+FEFF to the schema's pattern: 422 either way.
        (
            "/api/rag/documents",
            json!({"title": "t", "content": "\u{85}\u{a0}"}),
            json!(["body", "content"]),
            "value_error",
        ),
        (
            "/api/rag/documents",
            json!({"title": "t", "content": "\u{feff} "}),
            json!(["body", "content"]),
            "value_error",
        ),
        (
            "/api/rag/documents",
            json!({"title": "t", "content": "x", "metadata": {"a": {"b": 1}}}),
            json!(["body", "metadata", "a"]),
            "value_error",
        ),
        (
            "/api/rag/documents",
            json!({"title": "t", "content": "x", "metadata": {"a": "\u{0}"}}),
            json!(["body", "metadata", "a"]),
            "value_error",
        ),
        (
            "/api/rag/search",
            json!({"query": ""}),
            json!(["body", "query"]),
            "string_too_short",
        ),
        (
            "/api/rag/search",
            json!({"query": "q", "top_k": 0}),
            json!(["body", "top_k"]),
            "value_error",
        ),
        (
            "/api/rag/search",
            json!({"query": "q", "top_k": 21}),
            json!(["body", "top_k"]),
            "value_error",
        ),
        (
            "/api/rag/search",
            json!({"query": "q", "mode": "fuzzy"}),
            json!(["body", "mode"]),
            "value_error",
        ),
        (
            "/api/rag/search",
            json!({"query": "q", "filter": {"a": {"b": 1}}}),
            json!(["body", "filter", "a"]),
            "value_error",
        ),
        (
            "/api/rag/search",
            json!({"query": "q", "filter": {"bad key": 1}}),
            json!(["body", "filter", "bad key"]),
            "value_error",
        ),
        (
            "/api/rag/query",
            json!({"question": "x".repeat(2001)}),
            json!(["body", "question"]),
            "string_too_long",
        ),
        (
            "/api/rag/query",
            json!({"question": "q", "max_tokens": 0}),
            json!(["body", "max_tokens"]),
            "value_error",
        ),
    ];
    for (path, body, loc, kind) in cases {
        let (status, answer) = server.post(path, &body).await;
        assert_validation(status, &answer, loc, kind);
    }
    let response = server
        .client
        .delete(server.url("/api/rag/documents/abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
}

pub async fn a_collection_of_another_vector_length_is_refused(backend: Backend) {
    let Some(server) = server(backend, &[]).await else {
        return;
    };
    let name = collection("dims");
    let rag = server.state.rag.clone().unwrap();
    let store = rag.database.store().unwrap();
    // A collection written by a 3-dimensional model.
    let inserted = store
        .insert_document(
            aitier::store::NewDocument {
                collection: name.clone(),
                title: "tiny".into(),
                source: None,
                metadata: Default::default(),
                content_hash: "h".into(),
                chunks: vec![aitier::store::NewChunk {
                    text: "tiny vectors".into(),
                    start: 0,
                    end: 12,
                    embedding: vec![0.1, 0.2, 0.3],
                }],
            },
            3,
        )
        .await;
    assert!(inserted.is_ok(), "{inserted:?}");
    let (status, body) = server
        .post(
            "/api/rag/documents",
            &json!({"collection": name, "title": "t", "content": "Some text."}),
        )
        .await;
    assert_validation(status, &body, json!(["body", "collection"]), "value_error");
    let detail = body["detail"][0]["msg"].as_str().unwrap();
    assert!(
        detail.contains("3-dimensional") && detail.contains("384"),
        "{detail}"
    );
    let (status, body) = server
        .post(
            "/api/rag/search",
            &json!({"query": "text", "collection": name}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
}

pub async fn an_ingest_that_fails_midway_leaves_nothing(backend: Backend) {
    let Some(server) = server(backend, &[]).await else {
        return;
    };
    let name = collection("atomic");
    let (status, body) = server
        .post(
            "/api/rag/documents",
            &json!({"collection": name, "title": "first", "content": "A document that stays."}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let before = collection_counts(&server, &name).await.unwrap();
    let store = server.state.rag.clone().unwrap().database.store().unwrap();
    let good = |i: usize| aitier::store::NewChunk {
        text: format!("chunk {i}"),
        start: i * 10,
        end: i * 10 + 7,
        embedding: vec![0.05; 384],
    };
    // The document row and two chunks are written before the third chunk's vector is refused
    // (wrong length): the whole transaction must roll back.
    let mut bad = good(2);
    bad.embedding = vec![0.05; 383];
    let result = store
        .insert_document(
            aitier::store::NewDocument {
                collection: name.clone(),
                title: "half".into(),
                source: None,
                metadata: Default::default(),
                content_hash: "midway".into(),
                chunks: vec![good(0), good(1), bad],
            },
            384,
        )
        .await;
    assert!(result.is_err(), "{result:?}");
    assert!(
        store
            .find_document(&name, "midway")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(collection_counts(&server, &name).await.unwrap(), before);
    let results = search(
        &server,
        json!({"query": "chunk", "collection": name, "mode": "text", "top_k": 20}),
    )
    .await;
    assert!(
        results.iter().all(|r| r["title"] == "first"),
        "{results:#?}"
    );
}

pub async fn a_long_document_is_split_into_searchable_chunks(backend: Backend) {
    let Some(server) = server(backend, &[]).await else {
        return;
    };
    let name = collection("long");
    // The whole corpus as one document: about 1,500 tokens, far beyond one chunk.
    let content: String = corpus()
        .into_iter()
        .map(|(_, _, text)| text)
        .collect::<Vec<_>>()
        .join("\n");
    let (status, doc) = server
        .post(
            "/api/rag/documents",
            &json!({"collection": name, "title": "Handbook", "content": content}),
        )
        .await;
    assert_eq!(status, 201, "{doc}");
    let chunks = doc["chunks"].as_i64().unwrap();
    assert!(chunks >= 6, "{doc}");
    assert_eq!(collection_counts(&server, &name).await, Some((1, chunks)));
    let results = search(
        &server,
        json!({"query": "descaling the kettle with vinegar", "collection": name, "top_k": 20}),
    )
    .await;
    assert_eq!(results.len() as i64, chunks.min(20));
    let mut ids: Vec<i64> = results
        .iter()
        .map(|r| r["chunk_id"].as_i64().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), results.len(), "each chunk once");
    assert!(
        results[0]["excerpt"].as_str().unwrap().contains("vinegar"),
        "{:#?}",
        results[0]
    );
    assert!(
        results.iter().all(|r| r["document_id"] == doc["id"]
            && r["excerpt"].as_str().unwrap().chars().count() <= 500)
    );
}

/// A fake OpenAI-compatible upstream that streams "Hello" to every request and keeps each request
/// it received. Returns its `/v1` URL.
async fn fake_upstream() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let requests = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let requests = requests.clone();
            tokio::spawn(async move {
                // Read the head, then as much body as content-length says.
                let mut data = Vec::new();
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    data.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&data).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if data.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                requests
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&data).into_owned());
                let chunk = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":"stop"}]}"#;
                let body = format!("data: {chunk}\n\ndata: [DONE]\n\n");
                let _ = socket
                    .write_all(
                        format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{body}")
                            .as_bytes(),
                    )
                    .await;
            });
        }
    });
    (base, seen)
}

pub async fn a_named_model_answers_through_the_upstream_alone(backend: Backend) {
    let (base, seen) = fake_upstream().await;
    let Some(server) = server(
        backend,
        &[
            "--chat-model",
            "none",
            "--openai-base-url",
            &base,
            "--openai-api-key",
            "sk-test",
        ],
    )
    .await
    else {
        return;
    };
    let name = collection("upstream");
    let ids = ingest_corpus(&server, &name).await;
    let response = server
        .client
        .post(server.url("/api/rag/query"))
        .json(&json!({"question": "How long is the warranty on appliances?", "collection": name,
                      "model": "gpt-test", "top_k": 3, "mode": "hybrid", "filter": {"kind": "policy"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = events(&response.text().await.unwrap());
    assert_eq!(events[0]["type"], "sources", "{events:#?}");
    assert_eq!(
        events[0]["sources"][0]["id"], ids["warranty"],
        "{events:#?}"
    );
    assert!(events[0]["sources"].as_array().unwrap().iter().all(|s| {
        let score = s["score"].as_f64().unwrap();
        (0.35..=1.0).contains(&score)
    }));
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "delta" && e["content"] == "Hello"),
        "{events:#?}"
    );
    // The upstream got the named model and a prompt of numbered sources, the best one first.
    let requests = seen.lock().unwrap().clone();
    let request = requests
        .iter()
        .find(|r| r.contains("gpt-test"))
        .expect("a request for gpt-test");
    assert!(request.contains("only the numbered sources"), "{request}");
    assert!(request.contains("[1] Warranty"), "{request}");
    // The filter applies: no manual (kind "manual") among the sources.
    let manuals = [
        "blender-xk4471",
        "coffee-machine-cm90",
        "kettle-tq208",
        "vacuum-vr12",
    ];
    assert!(
        events[0]["sources"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| manuals.iter().all(|m| s["id"] != ids[*m])),
        "{events:#?}"
    );
    // Without a name, and no default upstream model, the request must name one.
    let (status, body) = server
        .post(
            "/api/rag/query",
            &json!({"question": "How long is the warranty?", "collection": name}),
        )
        .await;
    assert_validation(status, &body, json!(["body", "model"]), "missing");
}

/// Each case as a test on each backend.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Backend::Postgres).await
                }
            )*
        }
    };
}

on_both_backends!(
    search_finds_the_right_document,
    the_same_content_is_stored_once,
    a_deleted_document_is_gone_with_its_chunks,
    a_metadata_filter_keeps_only_matching_documents,
    hybrid_ranks_a_product_code_at_least_as_well_as_vector_only,
    collections_and_pages_of_documents_are_listed,
    an_answer_streams_its_sources_first,
    an_empty_collection_answers_404_before_any_stream,
    a_named_model_answers_through_the_upstream_alone,
    bad_requests_are_refused_with_422,
    a_collection_of_another_vector_length_is_refused,
    an_ingest_that_fails_midway_leaves_nothing,
    a_long_document_is_split_into_searchable_chunks,
);

/// Servers opening one new SQLite file at once (replicas started together, the tests of one run)
/// all come up on it: SQLite's migrator takes no lock, so the one that commits second must find the
/// first one's tables applied and go on instead of failing with `table collections already exists`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servers_opening_a_new_sqlite_file_at_once_all_migrate() {
    for round in 0..10 {
        let file = std::env::temp_dir().join(format!("aitier-race-{}.db", uuid::Uuid::new_v4()));
        let url = format!("sqlite://{}", file.display());
        let opened = futures::future::join_all((0..4).map(|_| aitier::store::open(&url))).await;
        for (i, store) in opened.iter().enumerate() {
            match store {
                Ok(store) => assert!(store.collections().await.unwrap().is_empty()),
                Err(e) => panic!("round {round}, store {i}: {e}"),
            }
        }
        drop(opened);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
        }
    }
}
