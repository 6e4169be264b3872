//! The real binary: clear start-up errors, and a graceful exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_aitier");
const MINILM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/all-MiniLM-L6-v2");

/// The server binary with a SQLite file of its own, so that a test run leaves nothing in the
/// checkout's `data/` and each test starts from a new database.
fn server() -> Command {
    let file = std::env::temp_dir().join(format!("aitier-cli-{}.db", uuid::Uuid::new_v4()));
    let mut command = Command::new(BIN);
    command.env("DATABASE_URL", format!("sqlite://{}", file.display()));
    command
}

#[test]
fn a_missing_model_stops_start_up_with_a_message_naming_it() {
    let out = Command::new(BIN)
        .args(["--port", "0", "--embedding-model", "nobody/no-such-model"])
        .env(
            "AITIER_HF_CACHE",
            std::env::temp_dir().join("aitier-cli-empty-cache"),
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nobody/no-such-model"), "{stderr}");
    assert!(stderr.contains("models/fetch"), "{stderr}");
}

#[test]
fn sigterm_drains_and_exits_cleanly() {
    let mut child = server()
        .args([
            "--port",
            "0",
            "--log-format",
            "json",
            "--embedding-model",
            MINILM,
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the server logs before exiting")
            .unwrap();
        let event: serde_json::Value = serde_json::from_str(&line).expect("JSON log lines");
        if event["message"] == "listening" {
            break event["addr"].as_str().unwrap().to_string();
        }
    };
    assert!(
        std::net::TcpStream::connect(&addr).is_ok(),
        "nothing listens on {addr}"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            assert!(exit.success(), "exit status {exit}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn help_never_prints_a_secret_from_the_environment() {
    let out = Command::new(BIN)
        .arg("--help")
        .env("OPENAI_API_KEY", "sk-leak-openai-0000")
        .env("AITIER_API_KEYS", "leak-client-key-0000000")
        .env("HF_TOKEN", "hf_leak_token_0000")
        .env("DATABASE_URL", "postgres://u:leak-password@db/aitier")
        .env("OPENAI_BASE_URL", "https://u:leak-base@upstream/v1")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("AITIER_API_KEYS"), "{help}");
    assert!(!help.contains("leak"), "{help}");
}

#[test]
fn api_keys_never_reach_the_log() {
    const KEY: &str = "log-leak-check-0123456789";
    let mut child = server()
        .args([
            "--port",
            "0",
            "--log-format",
            "json",
            "--chat-model",
            "none",
        ])
        .args(["--embedding-model", MINILM, "--api-keys", KEY])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut log = Vec::new();
    let addr = loop {
        let line = lines.next().expect("the server logs").unwrap();
        let event: serde_json::Value = serde_json::from_str(&line).expect("JSON log lines");
        log.push(line);
        if event["message"] == "listening" {
            break event["addr"].as_str().unwrap().to_string();
        }
    };
    // A request with the key, and one with a wrong key, both over plain HTTP.
    for key in [KEY, "log-leak-check-wrong-key"] {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            stream,
            "GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    log.extend(lines.map_while(Result::ok));
    let log = log.join("\n");
    assert!(
        log.contains("/v1/models"),
        "the requests were not logged:\n{log}"
    );
    assert!(!log.contains("log-leak-check"), "{log}");
}

/// Sends one HTTP/1.1 request over a plain socket (`Connection: close`): the status code and the
/// body.
fn exchange(addr: &str, method: &str, path: &str, json: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let body = json.map_or(String::new(), |b| {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )
    });
    let end = if json.is_some() { "" } else { "\r\n" };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{end}{body}"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (answer[9..12].parse().unwrap(), body.to_string())
}

/// Sends `GET path` over a plain socket and returns the status code.
fn get_status(addr: &str, path: &str) -> u16 {
    exchange(addr, "GET", path, None).0
}

#[test]
fn readiness_probes_while_loading_are_not_logged_as_errors() {
    let mut child = server()
        .args([
            "--port",
            "0",
            "--log-format",
            "json",
            "--chat-model",
            "none",
        ])
        .args(["--embedding-model", MINILM])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut log = Vec::new();
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a log line");
        let event: serde_json::Value = serde_json::from_str(&line).expect("JSON log lines");
        log.push(line);
        if event["message"] == "listening" {
            break event["addr"].as_str().unwrap().to_string();
        }
    };
    let mut statuses = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = get_status(&addr, "/health/ready");
        statuses.push(status);
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A request the server refuses, too: a client error is not a server error.
    assert_eq!(get_status(&addr, "/no/such/route"), 404);
    std::thread::sleep(Duration::from_millis(200));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    log.extend(rx.try_iter());
    assert!(
        statuses.contains(&503),
        "ready at once, nothing tested: {statuses:?}"
    );
    let errors: Vec<&String> = log.iter().filter(|l| l.contains("\"ERROR\"")).collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

/// Sends `POST path` with a JSON body over a plain socket: the status and the JSON answer.
fn post_json(addr: &str, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (status, json) = exchange(addr, "POST", path, Some(&body.to_string()));
    (status, serde_json::from_str(&json).expect("a JSON body"))
}

/// What a server run with `--max-isa isa` answers: the chat kernels it logged, two embeddings and
/// a greedy chat answer.
fn answers_within(isa: &str) -> (String, serde_json::Value, String) {
    /// Stops the server however the test ends.
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            let _ = self.0.wait();
        }
    }
    let mut child = Stop(
        server()
            .args(["--port", "0", "--log-format", "json", "--max-isa", isa])
            .args(["--embedding-model", MINILM])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let (mut addr, mut kernels) = (None, None);
    while addr.is_none() || kernels.is_none() {
        let line = lines.next().expect("the server logs").unwrap();
        let event: serde_json::Value = serde_json::from_str(&line).expect("JSON log lines");
        match event["message"].as_str() {
            Some("listening") => addr = event["addr"].as_str().map(String::from),
            Some("chat model loaded") if event["kernels"].is_string() => {
                kernels = event["kernels"].as_str().map(String::from)
            }
            _ => {}
        }
    }
    let addr = addr.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while get_status(&addr, "/health/ready") != 200 {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let texts = [
        "The room was spotless.",
        "A long day of meetings ended late.",
    ];
    let (status, embedded) = post_json(&addr, "/api/embed", &serde_json::json!({ "texts": texts }));
    assert_eq!(status, 200, "{embedded}");
    let question = "What is the capital of France?";
    let (status, chat) = post_json(
        &addr,
        "/v1/chat/completions",
        &serde_json::json!({
            "model": "SmolLM2-135M-Instruct",
            "messages": [{ "role": "user", "content": question }],
            "max_tokens": 24,
            "temperature": 0,
        }),
    );
    assert_eq!(status, 200, "{chat}");
    // Stopped while its log is still open: a closed pipe would fail the server's last lines.
    drop(child);
    let answer = chat["choices"][0]["message"]["content"].as_str().unwrap();
    (
        kernels.unwrap(),
        embedded["embeddings"].clone(),
        answer.to_string(),
    )
}

/// `--max-isa avx2` keeps the kernels off AVX-512, and the answers are the same bits: the two x86
/// paths of every kernel compute the same operations in the same order.
#[test]
fn max_isa_narrows_the_kernels_and_keeps_the_answers() {
    let (widest, embeddings, answer) = answers_within("avx512");
    let (narrow, embeddings_avx2, answer_avx2) = answers_within("avx2");
    assert_eq!(narrow, "Avx2");
    if widest == "Avx2" {
        eprintln!("AVX-512 VNNI: not on this CPU, not run (AVX2 compared with itself)");
    } else {
        assert_eq!(widest, "Avx512Vnni");
    }
    assert!(
        embeddings.as_array().is_some_and(|e| e.len() == 2),
        "{embeddings}"
    );
    assert_eq!(embeddings, embeddings_avx2);
    assert!(!answer.is_empty());
    assert_eq!(answer, answer_avx2);
}

/// `--max-isa sse2` runs what a CPU without AVX2 runs: the encoders' panels and the chat matmul
/// on SSE2 vectors, which round each product before adding it (within rounding of the fused
/// paths). The chat answer is only asked to be one: a greedy answer within rounding can part at
/// a near-tie (this prompt's first token is one on the portable loops).
#[test]
fn max_isa_sse2_runs_the_path_of_a_cpu_without_avx2() {
    let (_, embeddings, _) = answers_within("avx512");
    let (kernels, embeddings_sse2, answer) = answers_within("sse2");
    assert_eq!(kernels, "Sse2");
    let vectors = |e: &serde_json::Value| -> Vec<Vec<f64>> {
        serde_json::from_value(e.clone()).expect("two vectors of numbers")
    };
    let (wide, sse2) = (vectors(&embeddings), vectors(&embeddings_sse2));
    assert_eq!(wide.len(), 2);
    for (a, b) in wide.iter().zip(&sse2) {
        assert_eq!(a.len(), b.len());
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(
            worst < 1e-5,
            "SSE2 embeddings {worst} from the fused paths'"
        );
    }
    assert!(!answer.is_empty());
}
