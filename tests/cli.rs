//! The real binary: clear start-up errors, and a graceful exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_aitier");
const MINILM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/all-MiniLM-L6-v2");

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
    let mut child = Command::new(BIN)
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
