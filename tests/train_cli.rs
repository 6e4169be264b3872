//! `aitier classifier train` and `calibrate` through the real binary: clear errors for bad data,
//! the same seed giving the same classifier, and a calibration that makes long texts' scores honest.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_aitier");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aitier-train-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(ROOT)
        .args(["classifier", "train", "--data"])
        .arg(data)
        .args([
            "--text-column",
            "text",
            "--label-column",
            "label",
            "--name",
            "reviews",
        ])
        .arg("--classifiers-dir")
        .arg(out)
        .args([
            "--embedding-model",
            "models/all-MiniLM-L6-v2",
            "--epochs",
            "100",
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The committed review-style set as a CSV, plus a row with an empty text.
fn reviews_csv(dir: &Path) -> PathBuf {
    let mut writer = csv::Writer::from_path(dir.join("reviews.csv")).unwrap();
    writer.write_record(["text", "label"]).unwrap();
    let rows = std::fs::read_to_string(format!("{ROOT}/tests/fixtures/sentiment_offdomain.jsonl"))
        .unwrap();
    for line in rows.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        writer
            .write_record([
                row["text"].as_str().unwrap(),
                row["label"].as_str().unwrap(),
            ])
            .unwrap();
    }
    writer.write_record(["", "positive"]).unwrap();
    writer.flush().unwrap();
    dir.join("reviews.csv")
}

#[test]
fn a_missing_file_is_named() {
    let dir = scratch("missing-file");
    let out = train(&dir.join("nope.csv"), &dir, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nope.csv"), "{}", stderr(&out));
}

#[test]
fn a_missing_column_lists_the_columns_there_are() {
    let dir = scratch("missing-column");
    let data = dir.join("d.csv");
    std::fs::write(&data, "body,label\nhello,positive\nbye,negative\n").unwrap();
    let out = train(&data, &dir, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("no column 'text'") && err.contains("body, label"),
        "{err}"
    );
}

#[test]
fn fewer_than_two_labels_is_refused() {
    let dir = scratch("one-label");
    let data = dir.join("d.csv");
    std::fs::write(
        &data,
        "text,label\nhello,positive\nnice,Positive\n,negative\n",
    )
    .unwrap();
    let out = train(&data, &dir, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("at least two labels"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.join("reviews").exists());
}

/// Measuring a classifier on texts of one label (a user's set of complaints) is not training: the
/// committed sentiment classifier reads them and the confusion matrix has its three rows.
#[test]
fn eval_reads_a_file_of_one_label() {
    let dir = scratch("eval-one-label");
    let data = dir.join("complaints.csv");
    std::fs::write(
        &data,
        "text,label\n\
         The screen cracked the first week and support never answered.,negative\n\
         Worst purchase I have made this year.,negative\n",
    )
    .unwrap();
    let stdout = eval(Path::new("models/classifiers"), "sentiment", &data);
    assert!(stdout.contains("2 examples, accuracy 1.000"), "{stdout}");
    assert!(stdout.contains("neutral |"), "{stdout}");
}

#[test]
fn the_same_seed_gives_the_same_classifier() {
    let dir = scratch("determinism");
    let data = reviews_csv(&dir);
    let (a, b, c) = (dir.join("a"), dir.join("b"), dir.join("c"));
    for (out, seed) in [(&a, "7"), (&b, "7"), (&c, "8")] {
        let run = train(&data, out, &["--seed", seed, "--holdout", "0.2"]);
        assert!(run.status.success(), "{}", stderr(&run));
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(
            stdout.contains("60 examples") && stdout.contains("1 skipped"),
            "{stdout}"
        );
        assert!(stdout.contains("macro-F1"), "{stdout}");
    }
    let read = |d: &PathBuf, f: &str| std::fs::read(d.join("reviews").join(f)).unwrap();
    assert_eq!(read(&a, "head.safetensors"), read(&b, "head.safetensors"));
    assert_eq!(read(&a, "heldout.jsonl"), read(&b, "heldout.jsonl"));
    assert_ne!(read(&a, "heldout.jsonl"), read(&c, "heldout.jsonl"));
    let meta: serde_json::Value = serde_json::from_slice(&read(&a, "classifier.json")).unwrap();
    assert_eq!(
        meta["labels"],
        serde_json::json!(["negative", "neutral", "positive"])
    );
    assert_eq!(meta["training"]["skipped_empty"], 1);
    assert_eq!(meta["metrics"]["heldout"]["examples"], 12);
}

#[test]
fn a_name_that_would_escape_the_folder_is_refused() {
    let dir = scratch("bad-name");
    let data = reviews_csv(&dir);
    let out = Command::new(BIN)
        .current_dir(ROOT)
        .args(["classifier", "train", "--data"])
        .arg(&data)
        .args(["--name", "../escape", "--classifiers-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is not usable"), "{}", stderr(&out));
    assert!(!dir.join("..").join("escape").exists());
}

/// `classifier eval` of the classifier `name` under `dir` on `data`: its printed figures.
fn eval(dir: &Path, name: &str, data: &Path) -> String {
    let run = Command::new(BIN)
        .current_dir(ROOT)
        .args(["classifier", "eval", "--name", name, "--classifiers-dir"])
        .arg(dir)
        .arg("--data")
        .arg(data)
        .args(["--embedding-model", "models/all-MiniLM-L6-v2"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    String::from_utf8_lossy(&run.stdout).into_owned()
}

#[test]
fn fine_tuned_layers_are_written_and_served() {
    let dir = scratch("tuned");
    let data = reviews_csv(&dir);
    let out = dir.join("out");
    let run = train(
        &data,
        &out,
        &[
            "--holdout",
            "0.2",
            "--tune-layers",
            "1",
            "--tune-epochs",
            "3",
            "--tune-batch",
            "8",
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("held-out, frozen encoder") && stdout.contains("layers 5..6"),
        "{stdout}"
    );
    let classifier = out.join("reviews");
    let tensors = candle_core::safetensors::load(
        classifier.join("tuned.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    // Only the top layer, all four projections with their updates, biases and both norms.
    assert_eq!(tensors.len(), 4 * 3 + 2 * 2, "{:?}", tensors.keys());
    assert!(tensors.keys().all(|k| k.starts_with("layer.5.")));
    let update = tensors["layer.5.intermediate.lora_b"]
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(update > 0.0, "the update of the top layer stayed zero");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(classifier.join("classifier.json")).unwrap())
            .unwrap();
    assert_eq!(meta["training"]["fine_tuning"]["layers"], 1);

    // The registry applies the tuned layer: without it the same head scores differently.
    let tuned = eval(&out, "reviews", &data);
    std::fs::remove_file(classifier.join("tuned.safetensors")).unwrap();
    let frozen = eval(&out, "reviews", &data);
    let line = |s: &str| {
        s.lines()
            .find(|l| l.contains("accuracy"))
            .unwrap()
            .to_string()
    };
    assert_ne!(line(&tuned), line(&frozen));
}

/// `--teacher-data`: fine-tuning learns a teacher's probabilities beside the labels. A teacher
/// that says the opposite of every label, three times over, pulls the classifier away from the
/// labels; the same run without it does not. Bad teacher files are refused with a clear error.
#[test]
fn fine_tuning_learns_a_teachers_probabilities() {
    let dir = scratch("teacher");
    let data = reviews_csv(&dir);
    let mut opposite = csv::Writer::from_path(dir.join("teacher.csv")).unwrap();
    opposite
        .write_record(["text", "negative", "neutral", "positive"])
        .unwrap();
    let rows = std::fs::read_to_string(format!("{ROOT}/tests/fixtures/sentiment_offdomain.jsonl"))
        .unwrap();
    for _ in 0..3 {
        for line in rows.lines() {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            let p = match row["label"].as_str().unwrap() {
                "positive" => ["0.9", "0.05", "0.05"],
                "negative" => ["0.05", "0.05", "0.9"],
                _ => ["0.45", "0.1", "0.45"],
            };
            let text = row["text"].as_str().unwrap();
            opposite.write_record([text, p[0], p[1], p[2]]).unwrap();
        }
    }
    opposite.flush().unwrap();
    let tune = [
        "--holdout",
        "0",
        "--tune-layers",
        "1",
        "--tune-epochs",
        "3",
        "--tune-batch",
        "8",
    ];
    let accuracy = |out: &Path| -> f64 {
        let stdout = eval(out, "reviews", &data);
        let figure = stdout.split("accuracy ").nth(1).unwrap();
        figure[..5].parse().unwrap()
    };
    let plain = dir.join("plain");
    let run = train(&data, &plain, &tune);
    assert!(run.status.success(), "{}", stderr(&run));
    let taught = dir.join("taught");
    let teacher = dir.join("teacher.csv");
    let mut args: Vec<&str> = tune.to_vec();
    args.extend(["--teacher-data", teacher.to_str().unwrap()]);
    let run = train(&data, &taught, &args);
    assert!(run.status.success(), "{}", stderr(&run));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("180 texts with a teacher's probabilities"),
        "{stdout}"
    );
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(taught.join("reviews").join("classifier.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["training"]["teacher_data"]["examples"], 180);
    let (plain, taught) = (accuracy(&plain), accuracy(&taught));
    assert!(
        taught < plain - 0.2,
        "the opposite teacher moved accuracy on its own texts from {plain} only to {taught}"
    );

    // Without fine-tuning there is nothing to learn them with; a broken row is named.
    let run = train(
        &data,
        &dir.join("frozen"),
        &["--teacher-data", teacher.to_str().unwrap()],
    );
    assert!(!run.status.success());
    assert!(stderr(&run).contains("--tune-layers"), "{}", stderr(&run));
    let broken = dir.join("broken.csv");
    std::fs::write(
        &broken,
        "text,negative,neutral,positive\nGood.,0,0,1\nBad.,0.9,0.9,0.9\n",
    )
    .unwrap();
    let mut args: Vec<&str> = tune.to_vec();
    args.extend(["--teacher-data", broken.to_str().unwrap()]);
    let run = train(&data, &dir.join("broken"), &args);
    assert!(!run.status.success());
    assert!(
        stderr(&run).contains("row 2") && stderr(&run).contains("sum to 1"),
        "{}",
        stderr(&run)
    );
}

/// `classifier calibrate` on the committed sentiment classifier and the calibration texts
/// models/fetch builds (IMDB reviews first): it fits a sharpening that makes the scores of
/// reviews honest, records it, and refuses a file with too few texts of several sentences.
#[test]
fn calibrate_fits_how_sure_a_head_is_of_long_texts() {
    let dir = scratch("calibrate");
    let classifier = dir.join("sentiment");
    std::fs::create_dir_all(&classifier).unwrap();
    for file in ["head.safetensors", "tuned.safetensors"] {
        std::fs::copy(
            format!("{ROOT}/models/classifiers/sentiment/{file}"),
            classifier.join(file),
        )
        .unwrap();
    }
    let mut meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(format!(
            "{ROOT}/models/classifiers/sentiment/classifier.json"
        ))
        .unwrap(),
    )
    .unwrap();
    meta.as_object_mut().unwrap().remove("text_sharpening");
    std::fs::write(classifier.join("classifier.json"), meta.to_string()).unwrap();
    let calibrate = |data: &Path| {
        Command::new(BIN)
            .current_dir(ROOT)
            .args(["classifier", "calibrate", "--classifiers-dir"])
            .arg(&dir)
            .arg("--data")
            .arg(data)
            .args([
                "--limit",
                "120",
                "--embedding-model",
                "models/all-MiniLM-L6-v2",
            ])
            .output()
            .unwrap()
    };
    let run = calibrate(Path::new(&format!(
        "{ROOT}/models/sentiment-data/calibration.csv"
    )));
    assert!(run.status.success(), "{}", stderr(&run));
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    // "... calibration error 0.25 -> 0.03, ..."
    let errors: Vec<f64> = stdout
        .split("calibration error ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .map(|s| s.split(" -> ").map(|x| x.trim().parse().unwrap()).collect())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        errors[1] < errors[0] && errors[1] < 0.1,
        "calibration error {errors:?}: {stdout}"
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(classifier.join("classifier.json")).unwrap())
            .unwrap();
    let sharpening = meta["text_sharpening"].as_f64().unwrap();
    assert!(sharpening > 0.0, "{meta}");
    assert_eq!(
        meta["training"]["text_calibration"]["sharpening"],
        sharpening
    );

    let short = dir.join("short.csv");
    std::fs::write(
        &short,
        "text,label\nGreat phone.,positive\nIt broke.,negative\n",
    )
    .unwrap();
    let run = calibrate(&short);
    assert!(!run.status.success());
    assert!(
        stderr(&run).contains("too few to calibrate on"),
        "{}",
        stderr(&run)
    );
}
