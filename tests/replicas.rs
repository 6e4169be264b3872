//! Two servers on one PostgreSQL (how aitier scales past one machine): the same documents ingested
//! through both at once are stored once each, every answer is 200 or 201 (never 500), and a search
//! on either sees the same results. PostgreSQL only: SQLite is one file on one machine.

mod common;

use serde_json::{Value, json};

fn documents(collection: &str) -> Vec<Value> {
    let topics = [
        (
            "Returns",
            "Items can be sent back within 30 days of delivery for a full refund.",
        ),
        (
            "Shipping",
            "Orders leave the warehouse within two working days; express takes one.",
        ),
        (
            "Warranty",
            "Every device carries a two-year warranty against manufacturing defects.",
        ),
        (
            "Payment",
            "We accept cards, bank transfers and invoices for business customers.",
        ),
        (
            "Support",
            "The help desk answers by chat from 8 to 18, Monday to Friday.",
        ),
        (
            "Product XK-4471",
            "The XK-4471 kettle boils 1.7 litres and switches off by itself.",
        ),
    ];
    topics
        .iter()
        .map(|(title, content)| {
            json!({"collection": collection, "title": title,
                   "content": format!("{content} {content} {title}.")})
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_ingest_the_same_documents_once_and_search_alike() {
    let Some(url) = common::postgres_url() else {
        return;
    };
    let a = common::spawn(&["--database-url", &url]).await;
    let b = common::spawn(&["--database-url", &url]).await;
    let collection = format!("replicas-{}", uuid::Uuid::new_v4().simple());
    let docs = documents(&collection);

    // Every document through both servers at once, twice each.
    let mut requests = Vec::new();
    for doc in &docs {
        for server in [&a, &b, &a, &b] {
            requests.push(server.post("/api/rag/documents", doc));
        }
    }
    let answers = futures::future::join_all(requests).await;
    let mut created = 0;
    for (status, body) in &answers {
        assert!(*status == 200 || *status == 201, "{status}: {body}");
        created += usize::from(*status == 201);
    }
    assert_eq!(created, docs.len(), "one 201 per document");
    // Every answer for a document names the same stored document.
    for (i, chunk) in answers.chunks(4).enumerate() {
        let ids: Vec<&Value> = chunk.iter().map(|(_, body)| &body["id"]).collect();
        assert!(ids.iter().all(|id| *id == ids[0]), "document {i}: {ids:?}");
    }

    for server in [&a, &b] {
        let listed: Value = server
            .client
            .get(server.url(&format!(
                "/api/rag/documents?collection={collection}&limit=100"
            )))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(listed["total"], docs.len(), "{listed}");
    }
    let query =
        json!({"query": "how long do I have to send something back?", "collection": collection});
    let (status_a, hits_a) = a.post("/api/rag/search", &query).await;
    let (status_b, hits_b) = b.post("/api/rag/search", &query).await;
    assert_eq!((status_a, status_b), (200, 200), "{hits_a} {hits_b}");
    let ids = |hits: &Value| -> Vec<Value> {
        hits.as_array()
            .unwrap()
            .iter()
            .map(|h| h["chunk_id"].clone())
            .collect()
    };
    assert!(!ids(&hits_a).is_empty());
    assert_eq!(ids(&hits_a), ids(&hits_b));
    assert_eq!(hits_a[0]["title"], "Returns", "{hits_a}");
}
