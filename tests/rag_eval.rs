//! `aitier rag eval` on the dev set (`tests/fixtures/ragdev`: 36 documents, 107 questions of five
//! kinds), with the real binary and MiniLM, on SQLite and on PostgreSQL: the figures the README
//! quotes, held to floors so that a change to retrieval cannot quietly make it worse.

mod common;

use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_aitier");
const MINILM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/all-MiniLM-L6-v2");
const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ragdev/docs");
const QUESTIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/ragdev/questions.jsonl"
);

fn run(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .args(["--embedding-model", MINILM])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn evaluate(database: &str) -> Value {
    let collection = format!("ragdev-{}", uuid::Uuid::new_v4().simple());
    let summary = run(&[
        "ingest",
        DOCS,
        "--collection",
        &collection,
        "--database-url",
        database,
    ]);
    assert!(summary.contains("36 new"), "{summary}");
    let report = run(&[
        "rag",
        "eval",
        QUESTIONS,
        "--collection",
        &collection,
        "--database-url",
        database,
        "--json",
    ]);
    serde_json::from_str(&report).unwrap()
}

fn mode<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["modes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mode"] == name)
        .unwrap()
}

fn figure(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap()
}

fn assert_floors(report: &Value) {
    let (vector, text, hybrid) = (
        mode(report, "vector"),
        mode(report, "text"),
        mode(report, "hybrid"),
    );
    assert_eq!(hybrid["questions"], 92, "{report:#}");
    assert_eq!(hybrid["unanswerable"], 15);
    assert!(figure(hybrid, "recall_at_5") >= 0.97, "{report:#}");
    assert!(figure(hybrid, "mrr_at_10") >= 0.88, "{report:#}");
    assert!(
        figure(&hybrid["kinds"]["keyword"], "recall_at_1") >= 0.95,
        "{report:#}"
    );
    // Hybrid is at least as good as the better of its halves on every kind of question.
    for kind in ["paraphrase", "number", "keyword", "name"] {
        for key in ["recall_at_1", "recall_at_5", "mrr_at_10"] {
            let best = figure(&vector["kinds"][kind], key).max(figure(&text["kinds"][kind], key));
            assert!(
                figure(&hybrid["kinds"][kind], key) >= best - 1e-9,
                "{kind} {key}: {report:#}"
            );
        }
    }
    // /api/rag/query refuses most questions the documents cannot answer, almost none they can.
    assert!(figure(hybrid, "refused_unanswerable") >= 0.75, "{report:#}");
    assert!(figure(hybrid, "refused_answerable") <= 0.03, "{report:#}");
}

#[test]
fn the_dev_set_meets_its_floors_on_sqlite() {
    let dir = std::env::temp_dir().join(format!("aitier-ragdev-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let report = evaluate(&format!("sqlite://{}", dir.join("rag.db").display()));
    assert_floors(&report);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_dev_set_meets_its_floors_on_postgres() {
    let Some(url) = common::postgres_url() else {
        return;
    };
    assert_floors(&evaluate(&url));
}

#[test]
fn a_bad_questions_file_is_an_error_naming_the_line() {
    let dir = std::env::temp_dir().join(format!("aitier-ragdev-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let questions = dir.join("q.jsonl");
    std::fs::write(
        &questions,
        "{\"question\": \"ok\", \"title\": null}\nnot json\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["rag", "eval", questions.to_str().unwrap()])
        .args(["--embedding-model", MINILM])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("q.jsonl:2"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
