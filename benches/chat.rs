//! Chat streaming benchmark over HTTP: time to first token and tokens/s for one stream, and the
//! aggregate tokens/s and TTFT p50 of N concurrent streams. Drives either our `/api/chat/stream`
//! or any OpenAI-compatible `/v1/chat/completions` (llama.cpp's server, ours), so both sides of a
//! comparison are measured by the same client.
//!
//! ```text
//! cargo bench --bench chat --no-run   # then run the binary it names, outside the cargo lock:
//! chat-<hash> --url http://127.0.0.1:3000 --api aitier --concurrency 1,4 --reps 3 --max-tokens 128
//! chat-<hash> --url http://127.0.0.1:8101 --api openai ...           # llama.cpp
//! ```
//!
//! `--temperature T --top-p P` samples instead (the default is greedy, no `top_p`).
//!
//! `--prefill N` also sends prompts of about N tokens, a new one each time (no prefix cache), to
//! `/v1/chat/completions` with `max_tokens` 1, and prints the prompt's tokens / time to the answer.
//!
//! TTFT: request sent → first non-empty content delta. Tokens: the `usage` the stream reports, else
//! the number of content deltas (one per token on both servers). Decode rate: (tokens − 1) /
//! (last delta − first delta). Aggregate: all streams' tokens / wall time of the round. Every
//! request uses the same prompt at temperature 0, so after the warm-up both servers answer from
//! their prompt-prefix cache, as a chat server does for a shared system prompt.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

const PROMPT: &str =
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.";

struct Options {
    url: String,
    openai: bool,
    concurrency: Vec<usize>,
    reps: usize,
    max_tokens: usize,
    prefill: usize,
    /// 0: greedy. Above it, each stream samples with its own seed.
    temperature: f64,
    top_p: Option<f64>,
    /// The chat model `/v1/models` lists first (OpenAI streams name it).
    model: Value,
}

#[derive(Debug, Clone, Copy)]
struct Stream {
    tokens: usize,
    ttft: Duration,
    decode_tps: f64,
}

fn options() -> Options {
    let mut o = Options {
        url: "http://127.0.0.1:3000".into(),
        openai: false,
        concurrency: vec![1, 4],
        reps: 3,
        max_tokens: 128,
        prefill: 0,
        temperature: 0.0,
        top_p: None,
        model: Value::Null,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_default();
        match flag.as_str() {
            "--url" => o.url = value(),
            "--api" => o.openai = value() == "openai",
            "--concurrency" => {
                o.concurrency = value().split(',').filter_map(|c| c.parse().ok()).collect()
            }
            "--reps" => o.reps = value().parse().unwrap_or(3),
            "--max-tokens" => o.max_tokens = value().parse().unwrap_or(128),
            "--prefill" => o.prefill = value().parse().unwrap_or(0),
            "--temperature" => o.temperature = value().parse().unwrap_or(0.0),
            "--top-p" => o.top_p = value().parse().ok(),
            // `cargo bench` passes `--bench`; anything else is ignored too.
            _ => {}
        }
    }
    o
}

async fn one(
    client: &reqwest::Client,
    o: &Options,
    prompt: &str,
    max_tokens: usize,
) -> Result<Stream, String> {
    let (path, mut body) = if o.openai {
        let body = json!({"model": o.model, "stream": true,
            "stream_options": {"include_usage": true}});
        ("/v1/chat/completions", body)
    } else {
        ("/api/chat/stream", json!({}))
    };
    body["messages"] = json!([{"role": "user", "content": prompt}]);
    body["max_tokens"] = json!(max_tokens);
    body["temperature"] = json!(o.temperature);
    if let Some(p) = o.top_p {
        body["top_p"] = json!(p);
    }
    let sent = Instant::now();
    let mut response = post(client, &format!("{}{path}", o.url), &body).await?;
    let (mut first, mut last, mut deltas, mut usage) = (None, sent, 0usize, None);
    let mut buffer = String::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find('\n') {
            let line: String = buffer.drain(..=end).collect();
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let Ok(event) = serde_json::from_str::<Value>(data.trim()) else {
                continue;
            };
            let content = if o.openai {
                event["choices"][0]["delta"]["content"].as_str()
            } else {
                event["content"]
                    .as_str()
                    .filter(|_| event["type"] == "delta")
            };
            if let Some(tokens) = event["usage"]["completion_tokens"].as_u64() {
                usage = Some(tokens as usize);
            }
            if event["type"] == "error" {
                return Err(event.to_string());
            }
            if content.is_some_and(|c| !c.is_empty()) {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                deltas += 1;
            }
        }
    }
    let first = first.ok_or("no tokens")?;
    let tokens = usage.unwrap_or(deltas);
    let decode = last.duration_since(first).as_secs_f64();
    Ok(Stream {
        tokens,
        ttft: first - sent,
        decode_tps: if decode > 0.0 {
            (tokens - 1) as f64 / decode
        } else {
            0.0
        },
    })
}

/// `body` POSTed to `url`; an answer other than 2xx is an error.
async fn post(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> Result<reqwest::Response, String> {
    let response = client
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    Ok(response)
}

/// The first model `/v1/models` lists: the chat model on both servers.
async fn first_model(client: &reqwest::Client, o: &Options) -> Result<Value, String> {
    let models: Value = client
        .get(format!("{}/v1/models", o.url))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    Ok(models["data"][0]["id"].clone())
}

/// One non-streamed `/v1/chat/completions` of `prompt` to `model` with `max_tokens` 1 on either
/// server: the prompt's tokens as the server counted them, and the time to the answer.
async fn prefill(
    client: &reqwest::Client,
    o: &Options,
    model: &Value,
    prompt: &str,
) -> Result<(usize, Duration), String> {
    let body = json!({"model": model,
        "messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "temperature": 0.0});
    let sent = Instant::now();
    let response = post(client, &format!("{}/v1/chat/completions", o.url), &body).await?;
    let answer: Value = response.json().await.map_err(|e| e.to_string())?;
    let tokens = answer["usage"]["prompt_tokens"]
        .as_u64()
        .ok_or("no usage.prompt_tokens")?;
    Ok((tokens as usize, sent.elapsed()))
}

/// A prompt of about `tokens` tokens that no earlier request began with.
fn long_prompt(tokens: usize, nonce: usize) -> String {
    let mut text = format!("Request {nonce}. Summarise these measurements in one line.\n");
    // About 28 tokens a line (SmolLM2's tokenizer).
    for i in 0..tokens / 28 {
        text.push_str(&format!(
            "Sample {i} of batch {nonce}: {} grams, {} degrees, label {}.\n",
            (i * 37 + nonce) % 1000,
            (i * 11) % 90,
            ["red", "green", "blue", "amber"][i % 4]
        ));
    }
    text
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs each benchmark once as a test, with no arguments: there is no
    // server to measure then.
    if std::env::args().len() == 1 {
        eprintln!("benches/chat: a client for a running server; see the top of benches/chat.rs");
        return;
    }
    let mut o = options();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .tcp_nodelay(true)
        .build()
        .unwrap();
    o.model = first_model(&client, &o).await.expect("/v1/models");
    // Warm-up: connections, and the prompt in both servers' prefix caches.
    one(&client, &o, PROMPT, 8).await.expect("warm-up stream");
    for &n in &o.concurrency {
        let (mut streams, mut aggregates) = (Vec::new(), Vec::new());
        for _ in 0..o.reps {
            let started = Instant::now();
            let round =
                futures::future::join_all((0..n).map(|_| one(&client, &o, PROMPT, o.max_tokens)))
                    .await;
            let wall = started.elapsed().as_secs_f64();
            let round: Vec<Stream> = round.into_iter().map(|r| r.expect("stream")).collect();
            aggregates.push(round.iter().map(|s| s.tokens).sum::<usize>() as f64 / wall);
            streams.extend(round);
        }
        let ttft = median(streams.iter().map(|s| s.ttft.as_secs_f64() * 1e3).collect());
        let ttft_max = streams
            .iter()
            .map(|s| s.ttft.as_secs_f64() * 1e3)
            .fold(0.0, f64::max);
        let decode = median(streams.iter().map(|s| s.decode_tps).collect());
        let (lo, hi) = (
            streams.iter().map(|s| s.tokens).min().unwrap_or(0),
            streams.iter().map(|s| s.tokens).max().unwrap_or(0),
        );
        println!(
            "{} streams x{}: tokens {lo}-{hi}  TTFT p50 {ttft:.1} ms (max {ttft_max:.1})  decode p50 {decode:.1} tok/s/stream  aggregate p50 {:.1} tok/s (runs: {})",
            n,
            o.reps,
            median(aggregates.clone()),
            aggregates
                .iter()
                .map(|a| format!("{a:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if o.prefill > 0 {
        let model = o.model.clone();
        let mut rates = Vec::new();
        for rep in 0..o.reps {
            let nonce = std::process::id() as usize * 100 + rep;
            let (tokens, took) = prefill(&client, &o, &model, &long_prompt(o.prefill, nonce))
                .await
                .expect("prefill");
            rates.push((tokens, tokens as f64 / took.as_secs_f64()));
        }
        println!(
            "prefill: {} prompts of {}-{} tokens, prompt tokens / time to the answer: {} tok/s",
            o.reps,
            rates.iter().map(|r| r.0).min().unwrap_or(0),
            rates.iter().map(|r| r.0).max().unwrap_or(0),
            rates
                .iter()
                .map(|r| format!("{:.0}", r.1))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}
