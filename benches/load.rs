//! Mixed load over HTTP: N concurrent clients for D seconds, each cycling through embed, classify,
//! chat (streamed), search and ingest. Prints the count of every status per route, p50/p99 per
//! route, the server's RSS at start and end, its peak and its steady range (sampled each second),
//! and flags any answer other than 2xx, 429 or 503 with `Retry-After`.
//!
//! ```text
//! benches/load.sh                     # starts the server twice (open; keys + rate limit) and runs this
//! load-<hash> --url http://127.0.0.1:8000 --clients 64 --secs 60 [--key KEY] [--pid PID]
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;

const ROUTES: [&str; 5] = ["embed", "classify", "chat", "search", "ingest"];

struct Options {
    url: String,
    clients: usize,
    secs: u64,
    key: Option<String>,
    pid: Option<u32>,
}

fn options() -> Options {
    let mut o = Options {
        url: "http://127.0.0.1:8000".into(),
        clients: 64,
        secs: 60,
        key: None,
        pid: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_default();
        match flag.as_str() {
            "--url" => o.url = value(),
            "--clients" => o.clients = value().parse().unwrap_or(64),
            "--secs" => o.secs = value().parse().unwrap_or(60),
            "--key" => o.key = Some(value()),
            "--pid" => o.pid = value().parse().ok(),
            // `cargo bench` passes `--bench`; anything else is ignored too.
            _ => {}
        }
    }
    o
}

fn rss_mib(pid: Option<u32>) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// One request: (route, status, latency, whether a 503 or 429 carried Retry-After).
async fn one(
    client: &reqwest::Client,
    o: &Options,
    route: &str,
    n: usize,
) -> (u16, Duration, bool) {
    let (path, body) = match route {
        "embed" => (
            "/api/embed",
            json!({"texts": ["The quick brown fox jumps over the lazy dog."]}),
        ),
        "classify" => (
            "/api/classify/sentiment",
            json!({"text": "The delivery was late and the box was damaged."}),
        ),
        "chat" => (
            "/api/chat/stream",
            json!({"max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "Name a colour."}]}),
        ),
        "search" => (
            "/api/rag/search",
            json!({"query": "how long can I return things?", "collection": "load"}),
        ),
        _ => (
            "/api/rag/documents",
            json!({"collection": "load", "title": format!("doc {n}"),
            "content": format!("Items can be sent back within 30 days. Load document number {n}.")}),
        ),
    };
    let mut request = client.post(format!("{}{path}", o.url)).json(&body);
    if let Some(key) = &o.key {
        request = request.bearer_auth(key);
    }
    let started = Instant::now();
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let retry = response.headers().contains_key("retry-after");
            // The whole body: a stream counts until its last event.
            let _ = response.bytes().await;
            (status, started.elapsed(), retry)
        }
        Err(_) => (0, started.elapsed(), false),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs each benchmark once as a test, with no arguments: there is no
    // server to load then.
    if std::env::args().len() == 1 {
        eprintln!("benches/load: a client for a running server; see the top of benches/load.rs");
        return;
    }
    let o = std::sync::Arc::new(options());
    let rss_start = rss_mib(o.pid);
    let deadline = Instant::now() + Duration::from_secs(o.secs);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    // The server's RSS once a second while the clients run.
    let sampler = tokio::spawn({
        let pid = o.pid;
        async move {
            let mut samples = Vec::new();
            while Instant::now() < deadline {
                samples.extend(rss_mib(pid));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            samples
        }
    });
    let mut tasks = Vec::new();
    for c in 0..o.clients {
        let (o, client) = (o.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut i = c;
            while Instant::now() < deadline {
                let route = ROUTES[i % ROUTES.len()];
                let (status, latency, retry) = one(&client, &o, route, c * 1_000_000 + i).await;
                seen.push((route, status, latency, retry));
                if status == 429 || status == 503 {
                    // A client honouring Retry-After would wait; a short pause keeps this honest
                    // without idling the run.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                i += 1;
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let rss_end = rss_mib(o.pid);
    let samples = sampler.await.unwrap();
    let mut counts: BTreeMap<(&str, u16), usize> = BTreeMap::new();
    let mut latencies: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut unexpected = 0;
    for (route, status, latency, retry) in &all {
        *counts.entry((route, *status)).or_default() += 1;
        if (200..300).contains(status) {
            latencies.entry(route).or_default().push(*latency);
        }
        let fine = (200..300).contains(status) || ((*status == 429 || *status == 503) && *retry);
        unexpected += usize::from(!fine);
    }
    println!(
        "{} clients, {} s, {}: {} requests ({:.0} req/s)",
        o.clients,
        o.secs,
        if o.key.is_some() {
            "with a key"
        } else {
            "no key"
        },
        all.len(),
        all.len() as f64 / o.secs as f64
    );
    for route in ROUTES {
        let statuses: Vec<String> = counts
            .iter()
            .filter(|((r, _), _)| *r == route)
            .map(|((_, s), n)| format!("{s}: {n}"))
            .collect();
        let mut ok = latencies.remove(route).unwrap_or_default();
        ok.sort();
        println!(
            "  {route:9} {:40} 2xx p50 {:7.1} ms  p99 {:7.1} ms",
            statuses.join(", "),
            percentile(&ok, 0.5),
            percentile(&ok, 0.99)
        );
    }
    let show = |r: Option<f64>| r.map_or("?".into(), |m| format!("{m:.0} MiB"));
    println!("  RSS start {}  end {}", show(rss_start), show(rss_end));
    // Steady: after the first sixth of the run (10 s of 60), while the caches fill.
    let steady = &samples[samples.len() / 6..];
    if let (Some(peak), Some(low), Some(high)) = (
        samples.iter().copied().reduce(f64::max),
        steady.iter().copied().reduce(f64::min),
        steady.iter().copied().reduce(f64::max),
    ) {
        let mean = steady.iter().sum::<f64>() / steady.len() as f64;
        let spread = (high - low) / mean * 100.0;
        println!(
            "  RSS peak {peak:.0} MiB; steady (after {} s) {low:.0}-{high:.0} MiB, spread {spread:.0}% of its mean ({})",
            samples.len() / 6,
            if spread <= 20.0 {
                "flat within ±10%"
            } else {
                "not flat"
            }
        );
    }
    println!("  unexpected answers (not 2xx, 429/503 with Retry-After): {unexpected}");
}
