//! `/metrics` over real HTTP: request counts by route and status, embedding queue and batch
//! figures, chat queue and token timings, rate-limit refusals; `Server-Timing` on inference
//! responses.

mod common;

use serde_json::json;

async fn scrape(server: &common::TestServer) -> String {
    let response = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let kind = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(kind.starts_with("text/plain"), "{kind}");
    response.text().await.unwrap()
}

#[tokio::test]
async fn requests_batches_and_refusals_show_in_prometheus_format() {
    let server = common::spawn(&["--rate-limit", "6"]).await;
    let response = server
        .client
        .post(server.url("/api/embed"))
        .json(&json!({"texts": ["one", "two", "three"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let timing = response.headers()["server-timing"]
        .to_str()
        .unwrap()
        .to_string();
    for part in ["queue;dur=", "inference;dur=", "total;dur="] {
        assert!(timing.contains(part), "{timing}");
    }
    // 3 of 6 units spent; 4 more are refused.
    let refused = server
        .client
        .post(server.url("/api/embed"))
        .json(&json!({"texts": ["a", "b", "c", "d"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    let text = scrape(&server).await;
    for needle in [
        "aitier_http_requests_total{route=\"/api/embed\",method=\"POST\",status=\"200\"}",
        "aitier_http_requests_total{route=\"/api/embed\",method=\"POST\",status=\"429\"}",
        "aitier_http_request_duration_seconds_bucket{route=\"/api/embed\"",
        "aitier_embedding_queue_wait_seconds_bucket",
        "aitier_embedding_batch_size_bucket",
        "aitier_embedding_queue_depth",
        "aitier_rate_limited_total",
        "aitier_db_connections{state=\"open\"}",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[tokio::test]
async fn chat_reports_its_queue_time_to_first_token_tokens_and_active_generations() {
    let server = common::spawn(&[
        "--chat-model",
        common::GGUF,
        "--max-concurrent-generations",
        "1",
        "--generation-queue",
        "1",
    ])
    .await;
    // A long answer holds the only generation slot...
    let mut holder = server
        .client
        .post(server.url("/api/chat/stream"))
        .json(&json!({"max_tokens": 4096,
                      "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(holder.status(), 200);
    common::read_until(&mut holder, "delta").await;
    // ... so a second request waits in the queue, and the queue shows in `/metrics`.
    let waiting = {
        let client = server.client.clone();
        let url = server.url("/v1/chat/completions");
        tokio::spawn(async move {
            client
                .post(url)
                .json(&json!({"model": "SmolLM2-135M-Instruct", "max_tokens": 8,
                              "messages": [{"role": "user", "content": "Say hi."}]}))
                .send()
                .await
                .unwrap()
        })
    };
    let depth = "aitier_chat_queue_depth{model=\"SmolLM2-135M-Instruct\"}";
    common::within(
        async {
            while !scrape(&server).await.contains(&format!("{depth} 1\n")) {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        },
        "queued request in aitier_chat_queue_depth",
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // The holder leaves; the waiting request runs, and its `Server-Timing` shows the wait.
    drop(holder);
    let response = common::within(waiting, "answer after the queue")
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let timing = response.headers()["server-timing"]
        .to_str()
        .unwrap()
        .to_string();
    let dur = |name: &str| -> f64 {
        let part = timing
            .split(", ")
            .find_map(|p| p.strip_prefix(&format!("{name};dur=")))
            .unwrap_or_else(|| panic!("no {name} in {timing}"));
        part.parse().unwrap()
    };
    let (queue, inference, total) = (dur("queue"), dur("inference"), dur("total"));
    assert!(queue >= 300.0 && queue <= total, "{timing}");
    assert!(
        inference > 0.0 && queue + inference <= total + 1.0,
        "{timing}"
    );
    let text = scrape(&server).await;
    for needle in [
        "aitier_chat_ttft_seconds_bucket{provider=\"local\"",
        "aitier_chat_inter_token_seconds_bucket{provider=\"local\"",
        "aitier_chat_completion_tokens_total{provider=\"local\"}",
        "aitier_chat_active_generations{provider=\"local\"}",
        "aitier_chat_prefix_cache_tokens_total",
        "aitier_chat_queue_wait_seconds_count{model=\"SmolLM2-135M-Instruct\"} 2",
        &format!("{depth} 0\n"),
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}
