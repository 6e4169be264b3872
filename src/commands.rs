//! The `classifier` subcommands: training a head from a CSV, evaluating any classifier on a
//! labelled file, and calibrating a head's confidence on texts of several sentences.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;

use crate::classify::metrics::{evaluate, print_metrics};
use crate::classify::train::{self, Dataset, Example, TrainOptions};
use crate::classify::tune::TuneOptions;
use crate::classify::{Classifier, Classifiers, InferenceMode, META_FILE, RegistryConfig};
use crate::config::{CalibrateArgs, EvalArgs, EvalMode, LabelledArgs, TrainArgs};
use crate::inference::source::{HubOptions, model_name};
use crate::inference::{BatchConfig, Slot};
use serde_json::Value;

fn batch(name: &str) -> BatchConfig {
    BatchConfig {
        name: name.to_string(),
        max_batch_size: 32,
        max_batch_tokens: 8192,
        max_wait: Duration::from_millis(2),
        queue_capacity: 1024,
        workers: std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
    }
}

pub async fn train(args: TrainArgs) -> anyhow::Result<()> {
    let name = match args.name {
        Some(name) => name,
        None => args
            .data
            .file_stem()
            .and_then(|s| s.to_str())
            .context("--name is needed when the data file has no usable name")?
            .to_string(),
    };
    let options = TrainOptions {
        data: args.data,
        text_column: args.text_column,
        label_column: args.label_column,
        name,
        batch: batch(&model_name(&args.embedding_model)),
        embedding_model: args.embedding_model,
        holdout: args.holdout,
        seed: args.seed,
        output_dir: args.classifiers_dir,
        epochs: args.epochs,
        l2: args.l2,
        class_weights: args.class_weights,
        tune: (args.tune_layers > 0).then_some(TuneOptions {
            layers: args.tune_layers,
            rank: args.tune_rank,
            epochs: args.tune_epochs,
            batch: args.tune_batch,
            lr: args.tune_lr,
            seed: args.seed,
            max_tokens: args.tune_max_tokens,
            progress: true,
        }),
        teacher_data: args.teacher_data,
        hub: HubOptions::default(),
        progress: true,
    };
    train::train(&options).await?;
    Ok(())
}

/// The classifier a labelled-set command works on, loaded as the server would.
async fn open_classifier(set: &LabelledArgs) -> anyhow::Result<Arc<dyn Classifier>> {
    let embeddings = Arc::new(Slot::empty(model_name(&set.embedding_model)));
    let hub = HubOptions::default();
    let service = train::embedding_service(
        &set.embedding_model,
        &hub,
        batch(&model_name(&set.embedding_model)),
    )
    .await?;
    embeddings.fill_shared(service);
    let registry = Arc::new(Classifiers::new(
        RegistryConfig {
            dir: set.classifiers_dir.clone(),
            capacity: 1,
            batch: batch(&set.name),
            hub,
            hub_ids: true,
        },
        embeddings,
    ));
    Ok(registry.get(&set.name).await?)
}

/// A local classifier's `classifier.json`: its path and contents.
fn read_meta(set: &LabelledArgs, flag: &str) -> anyhow::Result<(std::path::PathBuf, Value)> {
    let file = set.classifiers_dir.join(&set.name).join(META_FILE);
    let meta = serde_json::from_str(
        &std::fs::read_to_string(&file)
            .with_context(|| format!("{flag} needs a local classifier: {}", file.display()))?,
    )?;
    Ok((file, meta))
}

fn write_meta(file: &std::path::Path, meta: &Value) -> anyhow::Result<()> {
    std::fs::write(file, serde_json::to_string_pretty(meta)? + "\n")?;
    Ok(())
}

pub async fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let classifier = open_classifier(&args.set).await?;
    let mode = args.mode.map(|m| match m {
        EvalMode::Whole => InferenceMode::Whole,
        EvalMode::Sentences => InferenceMode::Sentences,
    });
    let mut recorded = serde_json::Map::new();
    for path in &args.data {
        let data = read_labelled(path, &args.set)?;
        let (truth, probabilities) = classify_set(&classifier, &data, mode).await?;
        let metrics = evaluate(classifier.labels(), &truth, &probabilities);
        print_metrics(&path.display().to_string(), classifier.labels(), &metrics);
        let set = path.file_stem().map_or_else(
            || path.display().to_string(),
            |s| s.to_string_lossy().into_owned(),
        );
        recorded.insert(set, serde_json::to_value(&metrics)?);
    }
    if args.record {
        let (file, mut meta) = read_meta(&args.set, "--record")?;
        let dev = &mut meta["metrics"]["dev"];
        if !dev.is_object() {
            *dev = serde_json::json!({});
        }
        for (set, metrics) in recorded {
            dev[set] = metrics;
        }
        write_meta(&file, &meta)?;
        println!("recorded in {}", file.display());
    }
    Ok(())
}

/// Sharpenings tried by `calibrate`, in hundredths: from none to very sharp.
const TEXT_SHARPENINGS: std::ops::RangeInclusive<u32> = 0..=400;

pub async fn calibrate(args: CalibrateArgs) -> anyhow::Result<()> {
    let (file, mut meta) = read_meta(&args.set, "calibrate")?;
    let mut data = read_labelled(&args.data, &args.set)?;
    let mut sentences = Vec::new();
    data.examples.retain(|e| {
        let n = crate::classify::segment::sentences(&e.text).len();
        sentences.extend((n > 1).then_some(n));
        n > 1
    });
    if data.examples.len() < 50 {
        bail!(
            "{} has {} texts of several sentences: too few to calibrate on",
            args.data.display(),
            data.examples.len()
        );
    }
    // The pooled probabilities as they are without sharpening: the classifier is loaded from a
    // `classifier.json` without it, and the original is put back if that fails.
    let original = meta.clone();
    if let Some(fields) = meta.as_object_mut() {
        fields.remove("text_sharpening");
    }
    write_meta(&file, &meta)?;
    let classified = async {
        let classifier = open_classifier(&args.set).await?;
        let (truth, pooled) =
            classify_set(&classifier, &data, Some(InferenceMode::Sentences)).await?;
        anyhow::Ok((classifier, truth, pooled))
    }
    .await;
    let (classifier, truth, pooled) = match classified {
        Ok(done) => done,
        Err(e) => {
            write_meta(&file, &original)?;
            return Err(e);
        }
    };
    let sharpened = |a: f32| -> Vec<Vec<f32>> {
        pooled
            .iter()
            .zip(&sentences)
            .map(|(p, &n)| crate::classify::segment::sharpen(p, n, a))
            .collect()
    };
    let loss = |a: f32| -> f64 {
        sharpened(a)
            .iter()
            .zip(&truth)
            .map(|(p, &y)| -f64::from(p[y].max(1e-12)).ln())
            .sum::<f64>()
            / truth.len() as f64
    };
    let (best_loss, sharpening) = TEXT_SHARPENINGS
        .map(|a| (loss(a as f32 / 100.0), a as f32 / 100.0))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap_or((loss(0.0), 0.0));
    let labels = classifier.labels();
    let before = evaluate(labels, &truth, &pooled);
    let after = evaluate(labels, &truth, &sharpened(sharpening));
    println!(
        "{}: {} texts of several sentences; pooled probabilities raised to 1 + {sharpening:.2}·ln(sentences): \
         calibration error {:.3} -> {:.3}, log-loss {:.3} -> {:.3} (accuracy {:.3} either way)",
        args.data.display(),
        truth.len(),
        before.calibration_error,
        after.calibration_error,
        loss(0.0),
        best_loss,
        after.accuracy,
    );
    meta["text_sharpening"] = serde_json::json!(sharpening);
    meta["training"]["text_calibration"] = serde_json::json!({
        "data": args.data.display().to_string(),
        "texts": truth.len(),
        "sharpening": sharpening,
        "calibration_error_before": before.calibration_error,
        "calibration_error_after": after.calibration_error,
    });
    write_meta(&file, &meta)?;
    println!("wrote text_sharpening to {}", file.display());
    Ok(())
}

/// Classifies a labelled set: each text's true label (as the classifier's label index) and its
/// probabilities.
async fn classify_set(
    classifier: &Arc<dyn Classifier>,
    data: &Dataset,
    mode: Option<InferenceMode>,
) -> anyhow::Result<(Vec<usize>, Vec<Vec<f32>>)> {
    let labels = classifier.labels().to_vec();
    let truth: Vec<usize> = data
        .examples
        .iter()
        .map(|e| {
            let label = &data.labels[e.label];
            labels
                .iter()
                .position(|l| l == label)
                .with_context(|| format!("label '{label}' is not one of {labels:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let texts: Vec<String> = data.examples.iter().map(|e| e.text.clone()).collect();
    let mut probabilities = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(256) {
        let predictions = classifier.classify_with(chunk.to_vec(), mode).await?;
        probabilities.extend(
            predictions
                .into_iter()
                .map(|p| p.scores.into_iter().map(|(_, s)| s).collect::<Vec<f32>>()),
        );
    }
    Ok((truth, probabilities))
}

/// A labelled CSV, or JSON lines with the text and label fields.
fn read_labelled(path: &std::path::Path, args: &LabelledArgs) -> anyhow::Result<Dataset> {
    let mut data = if path.extension().is_some_and(|e| e == "jsonl") {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let rows: Vec<(String, String)> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let row: serde_json::Value = serde_json::from_str(line)?;
                let field = |name: &str| row[name].as_str().unwrap_or_default().to_string();
                Ok((
                    field(&args.text_column),
                    field(&args.label_column).to_lowercase(),
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        let mut labels: Vec<String> = rows.iter().map(|(_, l)| l.clone()).collect();
        labels.sort();
        labels.dedup();
        if rows.is_empty() {
            bail!("{} has no rows", path.display());
        }
        Dataset {
            examples: rows
                .into_iter()
                .map(|(text, label)| Example {
                    label: labels.binary_search(&label).unwrap_or(0),
                    text,
                })
                .collect(),
            labels,
            skipped_empty: 0,
        }
    } else {
        train::read_csv(path, &args.text_column, &args.label_column)?
    };
    if let Some(limit) = args.limit {
        data.examples.truncate(limit);
    }
    Ok(data)
}

/// `aitier ingest`: every .txt and .md file under the paths into a collection, with a progress bar
/// and a summary. Returns how many failed.
pub async fn ingest(args: crate::config::IngestArgs) -> anyhow::Result<usize> {
    use crate::store::Inserted;

    let files = crate::rag::ingest_files::collect(&args.paths)?;
    if files.is_empty() {
        bail!("no .txt or .md files under the given paths");
    }
    let rag = open_rag(&args.database_url, &args.embedding_model).await?;

    let progress = indicatif::ProgressBar::new(files.len() as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {elapsed} {wide_msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (mut new, mut unchanged, mut failed, mut chunks) = (0usize, 0usize, 0usize, 0i64);
    let started = std::time::Instant::now();
    // Two files in flight per embedding worker: one embeds while the other is chunked or written.
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let (rag, collection) = (&rag, args.collection.as_str());
    let mut results = futures::stream::iter(&files)
        .map(|file| async move {
            let result = crate::rag::ingest_files::ingest_file(rag, file, collection).await;
            (file, result)
        })
        .buffer_unordered(workers * 2);
    while let Some((file, result)) = results.next().await {
        progress.set_message(file.display().to_string());
        match result {
            Ok(Inserted::New(doc)) => {
                new += 1;
                chunks += doc.chunks;
            }
            Ok(Inserted::Existing(_)) => unchanged += 1,
            Err(e) => {
                failed += 1;
                // `suspend`, not `println`: the latter prints nothing when stderr is not a terminal.
                progress.suspend(|| eprintln!("failed: {}: {e:#}", file.display()));
            }
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    println!(
        "{} files into '{}': {new} new ({chunks} chunks), {unchanged} unchanged, {failed} failed, in {:.1} s",
        files.len(),
        args.collection,
        started.elapsed().as_secs_f64()
    );
    Ok(failed)
}

/// The embedding model and the database, opened once for a command (no retry loop: a command
/// fails fast).
async fn open_rag(database_url: &str, embedding_model: &str) -> anyhow::Result<crate::rag::Rag> {
    use crate::store::Database;

    let name = model_name(embedding_model);
    let hub = HubOptions::default();
    let model_files = crate::inference::source::resolve(embedding_model, &hub).await?;
    let tokenizer = model_files.tokenizer.clone();
    let service = crate::inference::EmbeddingService::load(model_files, batch(&name))
        .await
        .with_context(|| format!("embedding model {name}"))?;
    let chunker =
        crate::rag::Chunker::from_file(&tokenizer, service.max_tokens().saturating_sub(2))?;
    let store = crate::store::open(database_url)
        .await
        .with_context(|| format!("database {}", crate::store::redact(database_url)))?;
    let database = Arc::new(Database::with_store(database_url, store));
    let embeddings = Arc::new(Slot::empty(name));
    embeddings.fill(service);
    let rag = crate::rag::Rag::new(database, embeddings);
    rag.set_chunker(chunker);
    Ok(rag)
}

/// `aitier rag eval`: retrieval figures of a collection on a labelled question set.
pub async fn rag_eval(args: crate::config::RagEvalArgs) -> anyhow::Result<()> {
    use crate::rag::Mode;

    let questions = crate::rag::eval::read_questions(&args.questions)?;
    let rag = open_rag(&args.database_url, &args.embedding_model).await?;
    let store = rag.database.store()?;
    if store.collection_dims(&args.collection).await?.is_none() {
        bail!(
            "collection '{}' does not exist in {}",
            args.collection,
            rag.database.url()
        );
    }
    if let Some(path) = &args.dump {
        rag.dump_candidates(&args.collection, &questions, path)
            .await?;
    }
    let modes = if args.mode.is_empty() {
        vec![Mode::Vector, Mode::Text, Mode::Hybrid]
    } else {
        args.mode
    };
    let report = rag.evaluate(&args.collection, &questions, &modes).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
