//! The subcommands' arguments: `ingest`, `classifier train` and `classifier eval`.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use super::DEFAULT_DATABASE_URL;

#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    /// Files and folders to ingest; folders are walked recursively for .txt and .md files.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// The collection to add them to.
    #[arg(long, default_value = "documents")]
    pub collection: String,
    /// The database, as for `serve` (the server can run meanwhile: writes take turns).
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    /// Embedding model; it must be the one the server searches with.
    #[arg(
        long,
        env = "AITIER_EMBEDDING_MODEL",
        default_value = "models/all-MiniLM-L6-v2"
    )]
    pub embedding_model: String,
}

#[derive(Debug, Subcommand)]
pub enum RagCommand {
    /// Measure retrieval on a labelled question set: recall@1/5 and MRR@10 per mode and per kind,
    /// and how often `/api/rag/query` would refuse (404) questions with and without an answer.
    Eval(RagEvalArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RagEvalArgs {
    /// JSON lines: `question`, the answering document's `title` (or `id`; null or absent when the
    /// collection cannot answer it), and optionally a `kind` to break the figures down by.
    pub questions: PathBuf,
    /// The collection to search (ingest it first, e.g. with `aitier ingest`).
    #[arg(long, default_value = "documents")]
    pub collection: String,
    /// Modes to measure (repeat the flag for several); all three by default.
    #[arg(long, value_enum)]
    pub mode: Vec<crate::rag::Mode>,
    /// Print the figures as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Also write every candidate chunk of each question with its raw vector and text scores
    /// (JSON lines), for tuning the fusion.
    #[arg(long, hide = true)]
    pub dump: Option<PathBuf>,
    /// The database, as for `serve`.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    /// Embedding model; it must be the one the collection was built with.
    #[arg(
        long,
        env = "AITIER_EMBEDDING_MODEL",
        default_value = "models/all-MiniLM-L6-v2"
    )]
    pub embedding_model: String,
}

#[derive(Debug, Subcommand)]
pub enum ClassifierCommand {
    /// Train an embedding head from a labelled CSV and write it to the classifiers folder.
    Train(TrainArgs),
    /// Classify a labelled CSV or JSON-lines file with a classifier and print its metrics.
    Eval(EvalArgs),
    /// Fit how sure an embedding head is of texts of several sentences, on labelled texts.
    Calibrate(CalibrateArgs),
}

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// The labelled CSV (with a header row).
    #[arg(long)]
    pub data: PathBuf,
    /// Column holding the text.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Column holding the label (compared lower-cased).
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// Name of the classifier: it is written to <classifiers-dir>/<name>/ and served as
    /// /api/classify/<name>. Defaults to the data file's stem.
    #[arg(long)]
    pub name: Option<String>,
    /// Embedding model the head reads (a local directory or Hugging Face repo id).
    #[arg(
        long,
        env = "AITIER_EMBEDDING_MODEL",
        default_value = "models/all-MiniLM-L6-v2"
    )]
    pub embedding_model: String,
    /// Share of each label held out for evaluation.
    #[arg(long, default_value_t = 0.1)]
    pub holdout: f64,
    /// Seed of the held-out split; the same data and seed give the same classifier.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Full-batch optimisation steps.
    #[arg(long, default_value_t = 300)]
    pub epochs: usize,
    /// L2 penalty on the weights: higher is smoother, lower fits the training data closer.
    #[arg(long, default_value_t = 1e-4)]
    pub l2: f64,
    /// Weigh each label by n / (labels x n_label), so that a rare label counts as much as a common
    /// one; `false` lets the majority label dominate.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub class_weights: bool,
    /// Fine-tune this many of the embedding model's top layers with the head (low-rank updates,
    /// stored beside the head); 0 keeps the embedding model frozen.
    #[arg(long, default_value_t = 0)]
    pub tune_layers: usize,
    /// Rank of the fine-tuned layers' updates.
    #[arg(long, default_value_t = 16)]
    pub tune_rank: usize,
    /// Passes over the training rows when fine-tuning.
    #[arg(long, default_value_t = 2)]
    pub tune_epochs: usize,
    /// Peak learning rate when fine-tuning.
    #[arg(long, default_value_t = 1e-3)]
    pub tune_lr: f64,
    /// Texts per fine-tuning step.
    #[arg(long, default_value_t = 32)]
    pub tune_batch: usize,
    /// Training texts are cut to this many tokens when fine-tuning.
    #[arg(long, default_value_t = 128)]
    pub tune_max_tokens: usize,
    /// Distillation: a CSV of texts (the --text-column) with another classifier's probability of
    /// each label in a column named after it, as `scores` in its answers. Fine-tuning learns to
    /// answer those probabilities beside the labelled rows; needs --tune-layers.
    #[arg(long)]
    pub teacher_data: Option<PathBuf>,
    /// Folder of named classifiers.
    #[arg(
        long,
        env = "AITIER_CLASSIFIERS_DIR",
        default_value = "models/classifiers"
    )]
    pub classifiers_dir: PathBuf,
}

/// A classifier and how to read labelled files for it: what `eval` and `calibrate` share.
#[derive(Debug, Clone, Args)]
pub struct LabelledArgs {
    /// Classifier name (under --classifiers-dir) or Hugging Face repo id.
    #[arg(long, default_value = "sentiment")]
    pub name: String,
    #[arg(long, default_value = "text")]
    pub text_column: String,
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// Read only the first N rows of each file.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(
        long,
        env = "AITIER_EMBEDDING_MODEL",
        default_value = "models/all-MiniLM-L6-v2"
    )]
    pub embedding_model: String,
    #[arg(
        long,
        env = "AITIER_CLASSIFIERS_DIR",
        default_value = "models/classifiers"
    )]
    pub classifiers_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// A CSV with a header row, or JSON lines (`.jsonl`) with the two fields. Repeat for several
    /// sets: each is measured and reported on its own, named by its file stem.
    #[arg(long, required = true)]
    pub data: Vec<PathBuf>,
    /// Write each set's metrics into the classifier's `classifier.json` (`metrics.dev.<set>`), where
    /// `GET /api/classifiers` shows them. Only for sets the classifier was not trained or tuned on.
    #[arg(long)]
    pub record: bool,
    /// Read whole texts (truncated at the model's maximum length) or sentence by sentence. Default:
    /// an embedding head's own setting; a Hugging Face checkpoint reads a text whole when it fits,
    /// else in windows of whole sentences.
    #[arg(long, value_enum)]
    pub mode: Option<EvalMode>,
    #[command(flatten)]
    pub set: LabelledArgs,
}

#[derive(Debug, Clone, Args)]
pub struct CalibrateArgs {
    /// Labelled texts of several sentences (a CSV with a header row, or JSON lines), kept apart
    /// from the sets the classifier is measured on: the pooled probabilities of each text are
    /// sharpened by the temperature that fits these labels best (least negative log-likelihood),
    /// written to the classifier's `classifier.json` as `text_temperature`. Texts of one sentence
    /// are left out.
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    pub set: LabelledArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EvalMode {
    Whole,
    Sentences,
}
