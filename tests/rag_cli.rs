//! `aitier ingest`, the real binary on the fixture corpus: a summary of new / unchanged / failed
//! files, and a non-zero exit code when any failed.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_aitier");
const MINILM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/all-MiniLM-L6-v2");
const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rag");

fn ingest(paths: &[&str], database: &str) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("ingest")
        .args(paths)
        .args([
            "--collection",
            "cli",
            "--database-url",
            database,
            "--embedding-model",
            MINILM,
        ])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ingest_walks_folders_reports_what_changed_and_fails_on_a_bad_file() {
    let dir = std::env::temp_dir().join(format!("aitier-ingest-{}", uuid::Uuid::new_v4()));
    let extra = dir.join("more");
    std::fs::create_dir_all(&extra).unwrap();
    let database = format!("sqlite://{}", dir.join("rag.db").display());

    let (ok, stdout, stderr) = ingest(&[CORPUS], &database);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("20 files into 'cli': 20 new") && stdout.contains("0 failed"),
        "{stdout}"
    );

    // Again, plus a new Markdown file, a file that is not UTF-8, and one that is neither .txt nor .md.
    std::fs::write(
        extra.join("new.md"),
        "# Fresh\n\nA new note about gardening tools.",
    )
    .unwrap();
    std::fs::write(extra.join("broken.txt"), [0xff, 0xfe, 0x00, 0x41]).unwrap();
    std::fs::write(extra.join("ignored.csv"), "a,b\n1,2\n").unwrap();
    let (ok, stdout, stderr) = ingest(&[CORPUS, extra.to_str().unwrap()], &database);
    assert!(!ok, "a failed file must fail the command: {stdout}");
    assert!(
        stdout.contains("22 files into 'cli': 1 new")
            && stdout.contains("20 unchanged")
            && stdout.contains("1 failed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("broken.txt") || stderr.contains("broken.txt"),
        "{stdout}\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
