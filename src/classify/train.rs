//! Training an embedding head from a labelled CSV: embed every text, hold out a stratified split,
//! fit softmax regression (L2, class weights) with candle, report held-out metrics, and write the
//! classifier. The same data and seed give the same classifier, byte for byte.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::head::{HEAD_FILE, HeadMeta, InferenceMode, LinearHead, META_FILE};
use super::metrics::{Metrics, evaluate, print_metrics};
use super::rng::SplitMix64;
use super::soft::{self, SoftError};
use super::tune::{self, Target, TuneExample, TuneOptions};
use crate::inference::source::{self, HubOptions};
use crate::inference::{BatchConfig, BertEmbedder, EmbeddingService, SequenceModel};

/// File of held-out rows written beside a trained classifier, for later evaluation.
pub const HELDOUT_FILE: &str = "heldout.jsonl";

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub data: PathBuf,
    pub text_column: String,
    pub label_column: String,
    pub name: String,
    pub embedding_model: String,
    pub holdout: f64,
    pub seed: u64,
    pub output_dir: PathBuf,
    pub epochs: usize,
    pub l2: f64,
    pub class_weights: bool,
    /// Fine-tune the embedding model's top layers with the head.
    pub tune: Option<TuneOptions>,
    /// Texts with a teacher's probabilities, fine-tuned on beside the labelled rows.
    pub teacher_data: Option<PathBuf>,
    pub hub: HubOptions,
    pub batch: BatchConfig,
    pub progress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} has no column '{column}'; its columns are: {available}")]
    MissingColumn {
        path: PathBuf,
        column: String,
        available: String,
    },
    #[error("{path}: {source}")]
    Csv { path: PathBuf, source: csv::Error },
    #[error("need at least two labels to train a classifier, found {found}: {labels:?}")]
    TooFewLabels { found: usize, labels: Vec<String> },
    #[error("--holdout must be at least 0 and below 1, not {0}")]
    Holdout(f64),
    #[error(
        "--name '{0}' is not usable: letters, digits, '.', '_' and '-' only (it becomes a folder and a URL segment)"
    )]
    Name(String),
    #[error("embedding model: {0}")]
    Model(String),
    #[error("--teacher-data: {0}")]
    Soft(#[from] SoftError),
    #[error("--teacher-data is learnt while fine-tuning: give --tune-layers too")]
    TeacherWithoutTuning,
    #[error("training: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("writing the classifier: {0}")]
    Write(#[from] std::io::Error),
}

/// A labelled row.
#[derive(Debug, Clone)]
pub struct Example {
    pub text: String,
    pub label: usize,
}

/// The rows of a CSV, labels in sorted order; empty texts or labels are skipped and counted.
pub struct Dataset {
    pub labels: Vec<String>,
    pub examples: Vec<Example>,
    pub skipped_empty: usize,
}

pub fn read_csv(path: &Path, text_column: &str, label_column: &str) -> Result<Dataset, TrainError> {
    let file = std::fs::File::open(path).map_err(|source| TrainError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let csv_err = |source| TrainError::Csv {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(file);
    let headers = reader.byte_headers().map_err(csv_err)?.clone();
    let names: Vec<String> = headers
        .iter()
        .map(|h| String::from_utf8_lossy(h).trim().to_string())
        .collect();
    let column = |wanted: &str| {
        names
            .iter()
            .position(|n| n == wanted)
            .ok_or_else(|| TrainError::MissingColumn {
                path: path.to_path_buf(),
                column: wanted.to_string(),
                available: names.join(", "),
            })
    };
    let (text_at, label_at) = (column(text_column)?, column(label_column)?);
    let mut rows = Vec::new();
    let mut skipped_empty = 0;
    for record in reader.byte_records() {
        let record = record.map_err(csv_err)?;
        // Real-world CSVs carry stray bytes; a lossy read keeps the row instead of failing.
        let field = |i| {
            String::from_utf8_lossy(record.get(i).unwrap_or_default())
                .trim()
                .to_string()
        };
        let (text, label) = (field(text_at), field(label_at).to_lowercase());
        if text.is_empty() || label.is_empty() {
            skipped_empty += 1;
        } else {
            rows.push((text, label));
        }
    }
    let labels: Vec<String> = rows
        .iter()
        .map(|(_, l)| l.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let examples = rows
        .into_iter()
        .map(|(text, label)| Example {
            label: labels.binary_search(&label).unwrap_or(0),
            text,
        })
        .collect();
    Ok(Dataset {
        labels,
        examples,
        skipped_empty,
    })
}

/// Indices of the training and held-out rows: the same share of every label is held out.
pub fn stratified_split(
    examples: &[Example],
    labels: usize,
    holdout: f64,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let mut rng = SplitMix64(seed);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for label in 0..labels {
        let mut rows: Vec<usize> = (0..examples.len())
            .filter(|&i| examples[i].label == label)
            .collect();
        rng.shuffle(&mut rows);
        // Every label keeps at least one training row, however small it is.
        let held =
            (((rows.len() as f64) * holdout).round() as usize).min(rows.len().saturating_sub(1));
        test.extend_from_slice(&rows[..held]);
        train.extend_from_slice(&rows[held..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    (train, test)
}

/// Embeds texts on the embedding service, showing progress.
pub async fn embed_all(
    service: &EmbeddingService,
    texts: Vec<String>,
    normalize: bool,
    progress: bool,
) -> Result<Vec<Vec<f32>>, TrainError> {
    let bar = if progress {
        ProgressBar::new(texts.len() as u64).with_style(
            ProgressStyle::with_template(
                "embedding {bar:40} {pos}/{len} texts ({per_sec}, {eta} left)",
            )
            .expect("a valid template"),
        )
    } else {
        ProgressBar::hidden()
    };
    let chunks: Vec<Vec<String>> = texts.chunks(64).map(<[String]>::to_vec).collect();
    let mut vectors = Vec::with_capacity(texts.len());
    let mut stream = futures::stream::iter(chunks)
        .map(|chunk| service.embed(chunk, normalize))
        .buffered(8);
    while let Some(result) = stream.next().await {
        let embedded = result.map_err(|e| TrainError::Model(e.to_string()))?;
        bar.inc(embedded.len() as u64);
        vectors.extend(embedded.into_iter().map(|e| e.vector));
    }
    bar.finish_and_clear();
    Ok(vectors)
}

/// Fits softmax regression: cross-entropy, class-weighted when `balanced` (each class weighs
/// n / (labels x n_class), so a rare class counts as much as a common one), plus `l2` x |W|^2;
/// full-batch AdamW from zero weights, which makes the result a pure function of the data.
pub fn fit(
    features: &[Vec<f32>],
    truth: &[usize],
    labels: usize,
    epochs: usize,
    l2: f64,
    balanced: bool,
) -> Result<LinearHead, candle_core::Error> {
    let device = Device::Cpu;
    let (n, dims) = (features.len(), features.first().map_or(0, Vec::len));
    let x = Tensor::from_vec(features.concat(), (n, dims), &device)?;
    let class_weight = class_weights(truth, labels, balanced);
    let mut target = vec![0f32; n * labels];
    for (i, &t) in truth.iter().enumerate() {
        target[i * labels + t] = class_weight[t];
    }
    let total: f32 = truth.iter().map(|&t| class_weight[t]).sum();
    let target = (Tensor::from_vec(target, (n, labels), &device)? / total as f64)?;
    let w = Var::zeros((labels, dims), DType::F32, &device)?;
    let b = Var::zeros(labels, DType::F32, &device)?;
    let mut optimizer = AdamW::new(
        vec![w.clone(), b.clone()],
        ParamsAdamW {
            lr: 0.05,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    for _ in 0..epochs {
        let logits = x
            .matmul(&w.as_tensor().t()?)?
            .broadcast_add(b.as_tensor())?;
        let log_p = candle_nn::ops::log_softmax(&logits, 1)?;
        let loss =
            ((log_p * &target)?.sum_all()?.neg()? + (w.as_tensor().sqr()?.sum_all()? * l2)?)?;
        optimizer.backward_step(&loss)?;
    }
    Ok(LinearHead {
        weight: w.as_tensor().flatten_all()?.to_vec1()?,
        bias: b.as_tensor().to_vec1()?,
        dims,
    })
}

/// Each label's weight in the loss: n / (labels x n_label) when `balanced`, else 1.
fn class_weights(truth: &[usize], labels: usize, balanced: bool) -> Vec<f32> {
    let mut counts = vec![0usize; labels];
    truth.iter().for_each(|&t| counts[t] += 1);
    counts
        .iter()
        .map(|&c| {
            if balanced {
                truth.len() as f32 / (labels as f32 * c.max(1) as f32)
            } else {
                1.0
            }
        })
        .collect()
}

/// Trains and writes `output_dir/name/`, replacing any earlier classifier of that name only once
/// the new one is complete.
pub async fn train(options: &TrainOptions) -> Result<Option<Metrics>, TrainError> {
    if !(0.0..1.0).contains(&options.holdout) {
        return Err(TrainError::Holdout(options.holdout));
    }
    if !super::registry::valid_name(&options.name) {
        return Err(TrainError::Name(options.name.clone()));
    }
    if options.teacher_data.is_some() && options.tune.is_none() {
        return Err(TrainError::TeacherWithoutTuning);
    }
    let data = read_csv(&options.data, &options.text_column, &options.label_column)?;
    if data.labels.len() < 2 {
        return Err(TrainError::TooFewLabels {
            found: data.labels.len(),
            labels: data.labels,
        });
    }
    let taught = match &options.teacher_data {
        Some(path) => {
            let rows = soft::read_soft_csv(path, &options.text_column, &data.labels)?;
            println!(
                "{}: {} texts with a teacher's probabilities",
                path.display(),
                rows.len()
            );
            rows
        }
        None => Vec::new(),
    };
    println!(
        "{}: {} examples, labels {:?}, {} skipped (empty text or label)",
        options.data.display(),
        data.examples.len(),
        data.labels,
        data.skipped_empty
    );
    let (train_rows, test_rows) = stratified_split(
        &data.examples,
        data.labels.len(),
        options.holdout,
        options.seed,
    );

    let files = source::resolve(&options.embedding_model, &options.hub)
        .await
        .map_err(|e| TrainError::Model(e.to_string()))?;
    let model_err = |e: crate::inference::ModelError| TrainError::Model(e.to_string());
    let embedder = Arc::new(
        tokio::task::spawn_blocking(move || BertEmbedder::load(&files))
            .await
            .map_err(|e| TrainError::Model(format!("loader task failed: {e}")))?
            .map_err(model_err)?,
    );
    let service = EmbeddingService::with_model(
        embedder.clone(),
        embedder.max_tokens(),
        options.batch.clone(),
    )
    .map_err(model_err)?;
    let texts: Vec<String> = data.examples.iter().map(|e| e.text.clone()).collect();
    let vectors = embed_all(&service, texts, true, options.progress).await?;

    let pick = |rows: &[usize]| -> (Vec<Vec<f32>>, Vec<usize>) {
        rows.iter()
            .map(|&i| (vectors[i].clone(), data.examples[i].label))
            .unzip()
    };
    let (x_train, y_train) = pick(&train_rows);
    let (epochs, l2, balanced) = (options.epochs, options.l2, options.class_weights);
    let labels = data.labels.len();
    let weights = class_weights(&y_train, labels, balanced);
    let head =
        tokio::task::spawn_blocking(move || fit(&x_train, &y_train, labels, epochs, l2, balanced))
            .await
            .map_err(|e| TrainError::Model(format!("training task failed: {e}")))??;
    let (mut x_test, y_test) = pick(&test_rows);

    let (mut head, adapter) = match &options.tune {
        None => (head, None),
        Some(tune) => {
            if !test_rows.is_empty() {
                let probabilities: Vec<Vec<f32>> =
                    x_test.iter().map(|x| head.probabilities(x, &[])).collect();
                let frozen = evaluate(&data.labels, &y_test, &probabilities);
                print_metrics("held-out, frozen encoder", &data.labels, &frozen);
            }
            let labelled = train_rows.iter().map(|&i| {
                (
                    &data.examples[i].text,
                    Target::Label(data.examples[i].label),
                )
            });
            let soft = taught
                .iter()
                .map(|e| (&e.text, Target::Soft(e.probabilities.clone())));
            let examples = labelled
                .chain(soft)
                .map(|(text, target)| {
                    Ok(TuneExample {
                        tokens: tune::cut(embedder.tokenize(text)?, tune.max_tokens),
                        target,
                    })
                })
                .collect::<Result<Vec<_>, crate::inference::ModelError>>()
                .map_err(model_err)?;
            let (base, tune) = (embedder.clone(), tune.clone());
            let (adapter, head) = tokio::task::spawn_blocking(move || {
                tune::fine_tune(&base, &examples, &head, &weights, &tune)
            })
            .await
            .map_err(|e| TrainError::Model(format!("training task failed: {e}")))?
            .map_err(|e| TrainError::Model(e.to_string()))?;
            let tuned = adapter
                .apply(embedder.encoder())
                .map_err(|e| TrainError::Model(e.to_string()))?;
            let tuned = EmbeddingService::with_model(
                Arc::new(embedder.with_encoder(tuned)),
                embedder.max_tokens(),
                options.batch.clone(),
            )
            .map_err(model_err)?;
            let held: Vec<String> = test_rows
                .iter()
                .map(|&i| data.examples[i].text.clone())
                .collect();
            x_test = embed_all(&tuned, held, true, options.progress).await?;
            (head, Some(adapter))
        }
    };

    // Temperature scaling on the held-out rows, so that a score means what it says.
    let temperature = calibrate(&mut head, &x_test, &y_test);
    if let Some(t) = temperature {
        println!("calibration: logits divided by {t:.2} (temperature fitted on the held-out rows)");
    }
    let metrics = if test_rows.is_empty() {
        println!("no rows held out: nothing to measure the classifier on");
        None
    } else {
        let probabilities: Vec<Vec<f32>> =
            x_test.iter().map(|x| head.probabilities(x, &[])).collect();
        let metrics = evaluate(&data.labels, &y_test, &probabilities);
        print_metrics("held-out (whole texts)", &data.labels, &metrics);
        Some(metrics)
    };

    let meta = HeadMeta {
        kind: "embedding-head".into(),
        labels: data.labels.clone(),
        embedding_model: options.embedding_model.clone(),
        normalize: true,
        inference: InferenceMode::default(),
        logit_bias: Vec::new(),
        text_sharpening: None,
        training: json!({
            "data": options.data.display().to_string(),
            "text_column": options.text_column,
            "label_column": options.label_column,
            "examples": data.examples.len(),
            "skipped_empty": data.skipped_empty,
            "train_examples": train_rows.len(),
            "holdout": options.holdout,
            "seed": options.seed,
            "epochs": options.epochs,
            "l2": options.l2,
            "class_weights": options.class_weights,
            "optimizer": "AdamW lr 0.05, full batch, cross-entropy",
            "fine_tuning": options.tune.as_ref().map(|t| json!({
                "layers": t.layers,
                "rank": t.rank,
                "epochs": t.epochs,
                "batch": t.batch,
                "lr": t.lr,
                "max_tokens": t.max_tokens,
                "method": "LoRA on the top layers' projections (biases and layer norms in full), warm-started from the frozen head, AdamW, linear warm-up and decay",
            })),
            "teacher_data": options.teacher_data.as_ref().map(|p| json!({
                "data": p.display().to_string(),
                "examples": taught.len(),
            })),
            "temperature": temperature,
            "label_counts": label_counts(&data),
        }),
        metrics: json!({ "heldout": metrics }),
    };
    let heldout: String = test_rows
        .iter()
        .map(|&i| {
            let e = &data.examples[i];
            json!({"text": e.text, "label": data.labels[e.label]}).to_string() + "\n"
        })
        .collect();
    write_classifier(
        &options.output_dir,
        &options.name,
        &head,
        adapter.as_ref(),
        &meta,
        &heldout,
    )?;
    println!("wrote {}", options.output_dir.join(&options.name).display());
    Ok(metrics)
}

/// Fits one temperature T on held-out rows (least negative log-likelihood of softmax(logits / T),
/// over T in 0.25..=4) and folds it into the head's weights. `None` without held-out rows.
pub fn calibrate(head: &mut LinearHead, features: &[Vec<f32>], truth: &[usize]) -> Option<f32> {
    if features.is_empty() {
        return None;
    }
    let logits: Vec<Vec<f32>> = features
        .iter()
        .map(|x| {
            head.weight
                .chunks(head.dims)
                .zip(&head.bias)
                .map(|(row, b)| row.iter().zip(x).map(|(w, v)| w * v).sum::<f32>() + b)
                .collect()
        })
        .collect();
    let nll = |t: f32| -> f64 {
        logits
            .iter()
            .zip(truth)
            .map(|(z, &y)| {
                let scaled: Vec<f32> = z.iter().map(|v| v / t).collect();
                -f64::from(super::head::softmax(&scaled)[y].max(1e-12)).ln()
            })
            .sum()
    };
    let t = (5..=160)
        .map(|i| i as f32 * 0.025)
        .min_by(|&a, &b| nll(a).total_cmp(&nll(b)))?;
    head.weight.iter_mut().for_each(|w| *w /= t);
    head.bias.iter_mut().for_each(|b| *b /= t);
    Some(t)
}

fn label_counts(data: &Dataset) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for e in &data.examples {
        *counts.entry(data.labels[e.label].clone()).or_insert(0) += 1;
    }
    counts
}

fn write_classifier(
    dir: &Path,
    name: &str,
    head: &LinearHead,
    adapter: Option<&tune::Adapter>,
    meta: &HeadMeta,
    heldout: &str,
) -> Result<(), TrainError> {
    let target = dir.join(name);
    let staging = dir.join(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    head.save(&staging)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    if let Some(adapter) = adapter {
        adapter
            .save(&staging)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    std::fs::write(
        staging.join(META_FILE),
        serde_json::to_string_pretty(meta).map_err(std::io::Error::other)? + "\n",
    )?;
    std::fs::write(staging.join(HELDOUT_FILE), heldout)?;
    debug_assert!(staging.join(HEAD_FILE).is_file());
    let _ = std::fs::remove_dir_all(&target);
    std::fs::rename(&staging, &target)?;
    Ok(())
}

/// Shared by `classifier eval`: the served embedding model for heads, loaded once.
pub async fn embedding_service(
    reference: &str,
    hub: &HubOptions,
    batch: BatchConfig,
) -> Result<Arc<EmbeddingService>, TrainError> {
    let files = source::resolve(reference, hub)
        .await
        .map_err(|e| TrainError::Model(e.to_string()))?;
    Ok(Arc::new(
        EmbeddingService::load(files, batch)
            .await
            .map_err(|e| TrainError::Model(e.to_string()))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_is_stratified_and_seeded() {
        let examples: Vec<Example> = (0..100)
            .map(|i| Example {
                text: i.to_string(),
                label: usize::from(i % 4 == 0),
            })
            .collect();
        let (train, test) = stratified_split(&examples, 2, 0.2, 7);
        assert_eq!(train.len() + test.len(), 100);
        let positives = test.iter().filter(|&&i| examples[i].label == 1).count();
        assert_eq!((test.len(), positives), (20, 5));
        assert_eq!(stratified_split(&examples, 2, 0.2, 7).1, test);
        assert_ne!(stratified_split(&examples, 2, 0.2, 8).1, test);
    }

    #[test]
    fn softmax_regression_separates_separable_data() {
        let features: Vec<Vec<f32>> = (0..40)
            .map(|i| {
                let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
                vec![sign * (1.0 + (i as f32) / 40.0), 0.3]
            })
            .collect();
        let truth: Vec<usize> = (0..40).map(|i| i % 2).collect();
        let head = fit(&features, &truth, 2, 200, 1e-4, true).unwrap();
        let probabilities: Vec<Vec<f32>> = features
            .iter()
            .map(|x| head.probabilities(x, &[]))
            .collect();
        let m = evaluate(&["a".into(), "b".into()], &truth, &probabilities);
        assert_eq!(m.accuracy, 1.0);
        assert_eq!(m.confusion, vec![vec![20, 0], vec![0, 20]]);
    }
}
