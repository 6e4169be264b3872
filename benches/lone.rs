//! Lone-request latency over HTTP: one short request at a time, as a user of a quiet frontend sends
//! them, on either our server or any server with the same route (the Python peer's `/api/embed`
//! takes the same body), so both sides of a comparison are measured by the same client.
//!
//! ```text
//! cargo bench --bench lone --no-run   # then run the binary it names, outside the cargo lock:
//! lone-<hash> --url http://127.0.0.1:8000 --url http://127.0.0.1:8100 --rounds 2
//! ```
//!
//! For each round, each server in turn (A-B-A-B), each sentence (`--words 2,10,40`) and each pause
//! before a request (`--pauses-ms 0,20,500`): `--requests` requests (30), one after the other on one
//! connection, or a new connection each with `--new-connection` (as `curl` does). It prints the p50
//! and p90 of the client's time, and the p50 of each part the server reports in `Server-Timing`
//! (ours: `queue`, `inference`, `total`). `--path /api/classify/sentiment` sends `{"text": ..}`
//! instead of `{"texts": [..]}`.
//!
//! A request after a pause is slower than one right after another, on every server: on a VM, what
//! the host ran on the idle CPUs meanwhile is refilled first (README, "Benchmarks").

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Review sentences of 2, 10 and 40 words.
const SENTENCES: [(usize, &str); 3] = [
    (2, "Great product."),
    (10, "The room was clean and the staff were very friendly."),
    (
        40,
        "The hotel staff were friendly and the room was clean, but the breakfast was cold and the \
         wifi kept dropping all evening. We would still come back next summer because the beach \
         is lovely, the pool is quiet and the price was fair.",
    ),
];

struct Options {
    urls: Vec<String>,
    path: String,
    words: Vec<usize>,
    pauses: Vec<Duration>,
    requests: usize,
    rounds: usize,
    new_connection: bool,
}

fn options() -> Options {
    let mut o = Options {
        urls: Vec::new(),
        path: "/api/embed".into(),
        words: vec![10],
        pauses: vec![
            Duration::ZERO,
            Duration::from_millis(20),
            Duration::from_millis(500),
        ],
        requests: 30,
        rounds: 2,
        new_connection: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    let list = |s: String| -> Vec<u64> { s.split(',').filter_map(|v| v.parse().ok()).collect() };
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_default();
        match flag.as_str() {
            "--url" => o.urls.push(value()),
            "--path" => o.path = value(),
            "--words" => o.words = list(value()).into_iter().map(|w| w as usize).collect(),
            "--pauses-ms" => {
                o.pauses = list(value())
                    .into_iter()
                    .map(Duration::from_millis)
                    .collect()
            }
            "--requests" => o.requests = value().parse().unwrap_or(30),
            "--rounds" => o.rounds = value().parse().unwrap_or(2),
            "--new-connection" => o.new_connection = true,
            // `cargo bench` passes `--bench`; anything else is ignored too.
            _ => {}
        }
    }
    o
}

/// The parts of a `Server-Timing` header (`queue;dur=0.05, inference;dur=2.41, total;dur=2.80`),
/// in milliseconds.
fn server_timing(header: Option<&reqwest::header::HeaderValue>) -> Vec<(String, f64)> {
    let Some(text) = header.and_then(|h| h.to_str().ok()) else {
        return Vec::new();
    };
    text.split(',')
        .filter_map(|part| {
            let (name, dur) = part.trim().split_once(";dur=")?;
            Some((name.to_string(), dur.parse().ok()?))
        })
        .collect()
}

fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

/// `requests` requests of `body` to `url`, each after `pause`: the client's times and the server's
/// reported parts, in milliseconds.
async fn series(
    o: &Options,
    url: &str,
    body: &Value,
    pause: Duration,
) -> Result<(Vec<f64>, BTreeMap<String, Vec<f64>>), String> {
    let builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .tcp_nodelay(true);
    // No idle connection kept: each request opens its own, as `curl` does.
    let builder = if o.new_connection {
        builder.pool_max_idle_per_host(0)
    } else {
        builder
    };
    let http = builder.build().map_err(|e| e.to_string())?;
    // Warm-up: the connection, and the server's first passes.
    for _ in 0..3 {
        http.post(url)
            .json(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
    }
    let (mut times, mut parts) = (Vec::new(), BTreeMap::<String, Vec<f64>>::new());
    for _ in 0..o.requests {
        tokio::time::sleep(pause).await;
        let sent = Instant::now();
        let response = http
            .post(url)
            .json(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let timing = server_timing(response.headers().get("server-timing"));
        response.bytes().await.map_err(|e| e.to_string())?;
        times.push(sent.elapsed().as_secs_f64() * 1e3);
        if !status.is_success() {
            return Err(format!("{url}: HTTP {status}"));
        }
        for (name, ms) in timing {
            parts.entry(name).or_default().push(ms);
        }
    }
    Ok((times, parts))
}

/// The CPU's name, family and model as Linux reports them.
fn cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map_or(String::from("?"), |(_, v)| v.trim().to_string())
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{} (family {} model {}), {cores} cores",
        field("model name"),
        field("cpu family"),
        field("model")
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo test --all-targets` runs each benchmark once as a test, with no arguments: there is no
    // server to measure then.
    if std::env::args().len() == 1 {
        eprintln!("benches/lone: a client for running servers; see the top of benches/lone.rs");
        return;
    }
    let o = options();
    assert!(!o.urls.is_empty(), "benches/lone: give at least one --url");
    println!("machine: {}", cpu());
    let connection = if o.new_connection {
        "a new connection each"
    } else {
        "one connection"
    };
    println!(
        "{} requests per row, {connection}, p50 / p90 ms",
        o.requests
    );
    for round in 1..=o.rounds {
        for base in &o.urls {
            let url = format!("{base}{}", o.path);
            for &words in &o.words {
                let Some(&(_, text)) = SENTENCES.iter().find(|(w, _)| *w == words) else {
                    panic!("benches/lone: --words takes 2, 10 or 40");
                };
                let body = if o.path.contains("classify") {
                    json!({ "text": text })
                } else {
                    json!({ "texts": [text] })
                };
                for &pause in &o.pauses {
                    let (times, parts) = series(&o, &url, &body, pause)
                        .await
                        .unwrap_or_else(|e| panic!("benches/lone: {e}"));
                    let server: Vec<String> = parts
                        .into_iter()
                        .map(|(name, v)| format!("{name} {:.2}", quantile(v, 0.5)))
                        .collect();
                    println!(
                        "round {round} | {url} | {words} words | pause {} ms | client {:.2} / {:.2} | server p50: {}",
                        pause.as_millis(),
                        quantile(times.clone(), 0.5),
                        quantile(times, 0.9),
                        if server.is_empty() {
                            "-".into()
                        } else {
                            server.join(", ")
                        }
                    );
                }
            }
        }
    }
}
