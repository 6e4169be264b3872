//! RAG figures on both backends: ingest throughput with the real MiniLM (chunks/s, end to end:
//! chunking, embedding, one transaction per document), then vector search latency (p50/p99) and
//! recall@10 against an exact scan at 10k and 100k chunks. The search corpus is synthetic, written
//! through the store layer: clustered random unit vectors (100 clusters, 384 dimensions) with short
//! random texts, because embedding 100k chunks with the real model would take hours on 2 cores.
//!
//!   cargo bench --bench rag                      # SQLite only
//!   AITIER_TEST_DATABASE_URL=$(tests/pg start) cargo bench --bench rag   # and PostgreSQL
//!   RAG_BENCH_SIZES=10000 RAG_BENCH_BACKENDS=postgres cargo bench --bench rag  # a subset

use std::sync::Arc;
use std::time::{Duration, Instant};

use aitier::inference::{BatchConfig, EmbeddingService, Slot, source};
use aitier::rag::{Chunker, NewText, Rag};
use aitier::store::{self, Database, Inserted, NewChunk, NewDocument, Scope, Store};
use futures::StreamExt;
use serde_json::Map;

const DIMS: usize = 384;
const CLUSTERS: usize = 100;
const CHUNKS_PER_DOCUMENT: usize = 1000;

/// xorshift64*: a small, seeded generator (the figures must not depend on a crate's RNG).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let u = self.uniform().max(1e-7);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

fn normalize(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// A point of a cluster: its centre plus Gaussian noise, on the unit sphere.
fn around(rng: &mut Rng, centre: &[f32], spread: f32) -> Vec<f32> {
    normalize(centre.iter().map(|c| c + spread * rng.normal()).collect())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn words(rng: &mut Rng, n: usize) -> String {
    (0..n)
        .map(|_| format!("w{}", rng.next() % 5000))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn embedding() -> anyhow::Result<Arc<Slot<EmbeddingService>>> {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/models/all-MiniLM-L6-v2");
    let files = source::resolve(model, &source::HubOptions::default()).await?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let service = EmbeddingService::load(
        files,
        BatchConfig {
            name: "all-MiniLM-L6-v2".into(),
            max_batch_size: 32,
            max_batch_tokens: 8192,
            max_wait: Duration::from_millis(2),
            queue_capacity: 1024,
            workers,
        },
    )
    .await?;
    let slot = Arc::new(Slot::empty("all-MiniLM-L6-v2"));
    slot.fill(service);
    Ok(slot)
}

/// Ingests synthetic documents of several paragraphs through the whole pipeline.
async fn ingest_throughput(
    store: Arc<dyn Store>,
    url: &str,
    embeddings: Arc<Slot<EmbeddingService>>,
    chunker: Chunker,
) -> anyhow::Result<()> {
    let rag = Rag::new(Arc::new(Database::with_store(url, store)), embeddings);
    rag.set_chunker(chunker);
    let mut rng = Rng(7);
    let collection = format!("bench-ingest-{}", rng.next() % 1_000_000);
    let sentence = |rng: &mut Rng| {
        const VOCAB: &[&str] = &[
            "the",
            "customer",
            "returns",
            "a",
            "blender",
            "within",
            "thirty",
            "days",
            "and",
            "gets",
            "refund",
            "warehouse",
            "inspects",
            "parcel",
            "delivery",
            "courier",
            "tracking",
            "warranty",
            "covers",
            "defects",
            "kettle",
            "limescale",
            "descale",
            "support",
            "team",
        ];
        let n = 8 + (rng.next() % 12) as usize;
        let mut s: Vec<&str> = (0..n)
            .map(|_| VOCAB[(rng.next() % VOCAB.len() as u64) as usize])
            .collect();
        s[0] = "The";
        format!("{}.", s.join(" "))
    };
    let documents = 60;
    let texts: Vec<NewText> = (0..documents)
        .map(|i| NewText {
            collection: collection.clone(),
            title: format!("document {i}"),
            content: (0..6)
                .map(|_| {
                    (0..6)
                        .map(|_| sentence(&mut rng))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect::<Vec<_>>()
                .join("\n\n"),
            source: None,
            metadata: Map::new(),
        })
        .collect();
    // As `aitier ingest` does: two documents in flight per embedding worker.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (mut chunks, started) = (0i64, Instant::now());
    let mut results = futures::stream::iter(texts)
        .map(|text| rag.ingest(text))
        .buffer_unordered(workers * 2);
    while let Some(inserted) = results.next().await {
        if let Inserted::New(doc) = inserted? {
            chunks += doc.chunks;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "  ingest (real MiniLM, {documents} documents, {chunks} chunks): {:.1} chunks/s, {:.1} documents/s",
        chunks as f64 / elapsed,
        documents as f64 / elapsed
    );
    Ok(())
}

/// Writes `size` synthetic chunks, then times vector searches against exact ones.
async fn search_at(
    store: &dyn Store,
    pg_url: Option<&str>,
    size: usize,
    centres: &[Vec<f32>],
) -> anyhow::Result<()> {
    let mut rng = Rng(size as u64 * 31 + 1);
    let collection = format!("bench-search-{size}-{}", rng.next() % 1_000_000);
    let spread = 0.8 / (DIMS as f32).sqrt();
    let started = Instant::now();
    for d in 0..size.div_ceil(CHUNKS_PER_DOCUMENT) {
        let chunks = (0..CHUNKS_PER_DOCUMENT.min(size - d * CHUNKS_PER_DOCUMENT))
            .map(|i| {
                let centre = &centres[(rng.next() % CLUSTERS as u64) as usize];
                NewChunk {
                    text: words(&mut rng, 30),
                    start: i * 100,
                    end: i * 100 + 99,
                    embedding: around(&mut rng, centre, spread),
                }
            })
            .collect();
        store
            .insert_document(
                NewDocument {
                    collection: collection.clone(),
                    title: format!("synthetic {d}"),
                    source: None,
                    metadata: Map::new(),
                    content_hash: format!("{collection}-{d}"),
                    chunks,
                },
                DIMS,
            )
            .await?;
    }
    let write = started.elapsed().as_secs_f64();
    // Planner statistics as autovacuum would have them in a steady state (right after a bulk
    // write they describe an almost empty table, and PostgreSQL plans an exact scan).
    if let Some(url) = pg_url {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(url).await?;
        sqlx::query("ANALYZE").execute(&mut conn).await?;
    }
    let filter = Map::new();
    let scope = Scope {
        collection: &collection,
        limit: 10,
        filter: &filter,
    };
    let queries: Vec<Vec<f32>> = (0..if size > 50_000 { 100 } else { 200 })
        .map(|_| {
            let centre = &centres[(rng.next() % CLUSTERS as u64) as usize];
            around(&mut rng, centre, spread)
        })
        .collect();
    // Warm the caches (and the index) before timing.
    for q in queries.iter().take(5) {
        store.vector_search(scope, q).await?;
    }
    let (mut latencies, mut text_latencies, mut recall) = (Vec::new(), Vec::new(), 0.0);
    for q in &queries {
        let t = Instant::now();
        let found = store.vector_search(scope, q).await?;
        latencies.push(t.elapsed());
        let exact = store.exact_vector_search(scope, q).await?;
        let hits = found
            .iter()
            .filter(|h| exact.iter().any(|e| e.chunk_id == h.chunk_id))
            .count();
        recall += hits as f64 / exact.len().max(1) as f64;
        let text = words(&mut rng, 3);
        let t = Instant::now();
        store.text_search(scope, &text).await?;
        text_latencies.push(t.elapsed());
    }
    latencies.sort();
    text_latencies.sort();
    println!(
        "  {size:>6} chunks: write {:.0} chunks/s (synthetic, store only); vector search p50 {:.2} ms, p99 {:.2} ms, recall@10 {:.3}; full text p50 {:.2} ms, p99 {:.2} ms ({} queries)",
        size as f64 / write,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        recall / queries.len() as f64,
        percentile(&text_latencies, 0.5),
        percentile(&text_latencies, 0.99),
        queries.len()
    );
    Ok(())
}

/// A fresh PostgreSQL database for the run, so that the benchmark's chunks share no index with the
/// tests' (dropped first if an earlier run left it).
async fn fresh_pg_database(url: &str) -> anyhow::Result<String> {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(url).await?;
    sqlx::query("DROP DATABASE IF EXISTS aitier_bench")
        .execute(&mut admin)
        .await?;
    sqlx::query("CREATE DATABASE aitier_bench")
        .execute(&mut admin)
        .await?;
    let (base, _) = url.rsplit_once('/').unwrap_or((url, ""));
    Ok(format!("{base}/aitier_bench"))
}

fn main() -> anyhow::Result<()> {
    // `cargo test --all-targets` runs each benchmark once as a test, without `--bench`: minutes of
    // 100k-chunk loads have no place there. `cargo bench --bench rag` passes `--bench`.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("benches/rag: run it with `cargo bench --bench rag`");
        return Ok(());
    }
    // As the server does: one compute thread per embedding worker (set before any thread starts).
    aitier::inference::use_one_compute_thread_per_worker();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::var("RAG_BENCH_SIZES")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let mut rng = Rng(42);
    let centres: Vec<Vec<f32>> = (0..CLUSTERS)
        .map(|_| normalize((0..DIMS).map(|_| rng.normal()).collect()))
        .collect();
    let embeddings = embedding().await?;
    let dir = std::env::temp_dir().join(format!("aitier-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // RAG_BENCH_BACKENDS=sqlite or =postgres runs one of them.
    let only = std::env::var("RAG_BENCH_BACKENDS").unwrap_or_default();
    let mut backends = Vec::new();
    if !only.contains("postgres") || only.contains("sqlite") {
        backends.push(format!("sqlite://{}/bench.db", dir.display()));
    }
    if !only.contains("sqlite") || only.contains("postgres") {
        match std::env::var("AITIER_TEST_DATABASE_URL") {
            Ok(url) => backends.push(fresh_pg_database(&url).await?),
            Err(_) => {
                eprintln!("AITIER_TEST_DATABASE_URL is not set: PostgreSQL skipped (see tests/pg)")
            }
        }
    }
    for url in backends {
        let store = store::open(&url).await?;
        println!("{} ({})", store.backend(), store::redact(&url));
        ingest_throughput(store.clone(), &url, embeddings.clone(), chunker()?).await?;
        for &size in &sizes {
            let pg = (store.backend() == "postgres").then_some(url.as_str());
            search_at(store.as_ref(), pg, size, &centres).await?;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// MiniLM's chunker: 256 tokens, less [CLS] and [SEP].
fn chunker() -> anyhow::Result<Chunker> {
    let tokenizer = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/all-MiniLM-L6-v2/tokenizer.json"
    );
    Chunker::from_file(std::path::Path::new(tokenizer), 254)
}
