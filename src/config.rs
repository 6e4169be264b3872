//! Command line and environment configuration: one clap parser, every flag also read from `AITIER_*`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod commands;

use crate::secret::Secret;

pub use commands::{
    CalibrateArgs, ClassifierCommand, EvalArgs, EvalMode, IngestArgs, LabelledArgs, RagCommand,
    RagEvalArgs, TrainArgs,
};

/// aitier: an AI middle tier (embeddings, classification, streamed chat, RAG) in one binary.
#[derive(Debug, Parser)]
#[command(
    name = "aitier",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// `serve`'s flags, so that a bare `aitier --port 9000` serves.
    #[command(flatten)]
    pub serve: ServeArgs,
}

// Parsed once at start-up: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Print the OpenAPI document to stdout (what `openapi.json` holds).
    Openapi,
    /// Train or evaluate classifiers.
    #[command(subcommand)]
    Classifier(ClassifierCommand),
    /// Ingest .txt and .md files (folders recursively) into a RAG collection.
    Ingest(IngestArgs),
    /// Measure retrieval on a collection.
    #[command(subcommand)]
    Rag(RagCommand),
}

/// The page, probes, the scraper and the API's own description carry no key (the page asks for
/// one when the API does).
pub const DEFAULT_OPEN_PATHS: &str = "/,/health,/health/ready,/metrics,/openapi.json,/docs";

/// A file under data/, created on first run: retrieval works without a database server.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/aitier.db";

impl Cli {
    /// The serve arguments, whether given to the `serve` subcommand or at the top level.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Serve(self.serve))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Text,
    /// One JSON object per line, for log collectors in production.
    Json,
}

/// The widest instruction set the models' kernels may use (`--max-isa`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MaxIsa {
    /// AVX-512 with VNNI where the CPU has it (and AMX tiles for long batches), else narrower.
    Avx512,
    /// AVX2 and FMA at most.
    Avx2,
    /// SSE2 at most, which every x86-64 CPU has (as a CPU without AVX2 runs).
    Sse2,
    /// Portable code only.
    Scalar,
}

impl MaxIsa {
    /// Keeps the kernels of this process within this set; before any model loads.
    pub fn apply(self) {
        aitier_kernels::limit_isa(match self {
            MaxIsa::Avx512 => aitier_kernels::Isa::Avx512Vnni,
            MaxIsa::Avx2 => aitier_kernels::Isa::Avx2,
            MaxIsa::Sse2 => aitier_kernels::Isa::Sse2,
            MaxIsa::Scalar => aitier_kernels::Isa::Scalar,
        });
    }
}

/// `Debug` prints every field; secrets are [`Secret`]s, which print redacted.
#[derive(Clone, Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on. 127.0.0.1 keeps a newcomer's server private; containers use 0.0.0.0.
    #[arg(long, env = "AITIER_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Port to listen on; `PORT` is what Render and most PaaS set. 0 picks a free port.
    #[arg(long, env = "PORT", default_value_t = 8000)]
    pub port: u16,

    /// Embedding model: a local directory (config.json, tokenizer.json, model.safetensors) or a
    /// Hugging Face repo id resolved through the Hub cache. `models/fetch` provides the default.
    #[arg(
        long,
        env = "AITIER_EMBEDDING_MODEL",
        default_value = "models/all-MiniLM-L6-v2"
    )]
    pub embedding_model: String,

    /// Name under which the embedding model is served (`model` in responses and in `/v1/embeddings`
    /// requests). Defaults to the last path segment of `--embedding-model`.
    #[arg(long, env = "AITIER_EMBEDDING_MODEL_NAME")]
    pub embedding_model_name: Option<String>,

    /// Hugging Face cache directory for models given by repo id (defaults to hf-hub's own:
    /// `$HF_HOME/hub` or `~/.cache/huggingface/hub`).
    #[arg(long, env = "AITIER_HF_CACHE")]
    pub hf_cache: Option<PathBuf>,

    /// Hugging Face token, for gated or private repos. Never logged.
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<Secret>,

    /// Most sequences in one forward pass. Larger batches use the cores better but every request in
    /// the batch waits for the slowest one.
    #[arg(long, env = "AITIER_MAX_BATCH_SIZE", default_value_t = 32)]
    pub max_batch_size: usize,

    /// Most tokens (sequences x padded length) in one forward pass; bounds the memory of a batch of
    /// long texts.
    #[arg(long, env = "AITIER_MAX_BATCH_TOKENS", default_value_t = 8192)]
    pub max_batch_tokens: usize,

    /// How long a worker holds a batch open for more requests while another worker runs one, in
    /// milliseconds: more throughput under load. On an idle server a request starts at once.
    #[arg(long, env = "AITIER_MAX_BATCH_WAIT_MS", default_value_t = 2)]
    pub max_batch_wait_ms: u64,

    /// Texts that may wait for a model before new requests get 503 + Retry-After. Counted in texts,
    /// not requests, so that one request of 256 texts weighs what it costs; a bounded queue keeps
    /// latency bounded under overload instead of letting it grow without limit.
    #[arg(long, env = "AITIER_QUEUE_CAPACITY", default_value_t = 1024)]
    pub queue_capacity: usize,

    /// Worker threads per model, each running its own batches single-threaded. On a small machine
    /// one batch per core beats one batch spread over every core (no synchronisation between ops).
    /// Defaults to the number of cores.
    #[arg(long, env = "AITIER_WORKERS")]
    pub workers: Option<usize>,

    /// Folder of named classifiers: each subfolder is an embedding head (classifier.json) or a
    /// Hugging Face sequence-classification checkpoint (config.json with id2label).
    #[arg(
        long,
        env = "AITIER_CLASSIFIERS_DIR",
        default_value = "models/classifiers"
    )]
    pub classifiers_dir: PathBuf,

    /// Classifier behind /api/classify/sentiment: a name under --classifiers-dir or a Hugging Face
    /// repo id (e.g. distilbert/distilbert-base-uncased-finetuned-sst-2-english). Loaded and warmed
    /// at start-up.
    #[arg(long, env = "AITIER_SENTIMENT_MODEL", default_value = "sentiment")]
    pub sentiment_model: String,

    /// Let clients name Hugging Face repo ids as `model_id` (downloaded into the Hub cache on first
    /// use). Convenient, but any client can then make the server download any public classifier:
    /// turn it off on a public deployment and configure classifiers by folder instead.
    #[arg(long, env = "AITIER_HUB_MODEL_IDS", default_value_t = true, action = clap::ArgAction::Set)]
    pub hub_model_ids: bool,

    /// Classifiers kept loaded at once (least recently used ones are dropped).
    #[arg(long, env = "AITIER_CLASSIFIER_CACHE", default_value_t = 3)]
    pub classifier_cache: usize,

    /// Local chat models: GGUF files of the llama or qwen2 architecture, comma-separated or the
    /// flag repeated, each served by an engine of its own; the first answers requests that name
    /// no model. `none` serves no chat.
    #[arg(
        long,
        env = "AITIER_CHAT_MODEL",
        value_delimiter = ',',
        default_value = "models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    pub chat_model: Vec<String>,

    /// Names the chat models are served under (`model` in chat requests), in the order of
    /// `--chat-model`. A model without one is named after its GGUF file's folder.
    #[arg(long, env = "AITIER_CHAT_MODEL_NAME", value_delimiter = ',')]
    pub chat_model_name: Vec<String>,

    /// Generations that run at once: the batch size of the chat engine, which decodes one token of
    /// every running generation per forward pass. A decode step reads all the weights whatever the
    /// batch, so up to about 4 the batch costs little more than one sequence (SmolLM2, 2 cores:
    /// ≈95 tok/s alone, ≈270 tok/s aggregate for 4); beyond that the arithmetic dominates.
    #[arg(long, env = "AITIER_MAX_CONCURRENT_GENERATIONS", default_value_t = 4)]
    pub max_concurrent_generations: usize,

    /// Threads the chat engine splits each matmul over (default: one per core). A decode step
    /// is a few milliseconds of work handed out ≈120 times, so the threads must be free when it
    /// comes: on a machine shared with other busy processes, 1 is steadier.
    #[arg(long, env = "AITIER_CHAT_THREADS")]
    pub chat_threads: Option<usize>,

    /// The widest instruction set the kernels may use, when narrower than the CPU's. The fastest
    /// set is picked at start-up; `avx2` stays off AVX-512 (on CPUs where it lowers the clock, or
    /// to measure the AVX2 path on an AVX-512 machine), `sse2` off AVX (the path of a CPU without
    /// AVX2), `scalar` off SIMD altogether. Embeddings are the same bits on `avx512` and `avx2`
    /// (up to AMX's rounding on long batches); chat logits too.
    #[arg(long, env = "AITIER_MAX_ISA", value_enum, default_value_t = MaxIsa::Avx512)]
    pub max_isa: MaxIsa,

    /// Most tokens of a conversation, prompt and answer together (default: the model's own
    /// context, 8192 for SmolLM2), as llama.cpp's `-c` or vLLM's `--max-model-len`. A smaller
    /// context bounds each generation's KV cache and prefill time: a longer conversation gets 422
    /// before any work, and `/api/tokenize` reports this limit. One value for every chat model, or
    /// one per model in the order of `--chat-model` (comma-separated): each model's memory
    /// budget is its context × `--max-concurrent-generations` sequences of KV cache.
    #[arg(long, env = "AITIER_CHAT_CONTEXT", value_delimiter = ',',
        value_parser = clap::value_parser!(u32).range(16..))]
    pub chat_context: Vec<u32>,

    /// The system message put first in a conversation that has none, for the local chat models.
    /// Empty: the chat template's own choice. SmolLM2's template adds "You are a helpful AI
    /// assistant named SmolLM, trained by Hugging Face", after which the 4-bit 135M model answers
    /// "What is the capital of France?" with garbled French; llama.cpp's server and
    /// llama-cpp-python, formatting ChatML, add none and answer "The capital of France is Paris."
    /// as SmolLM2 does after this default. It replaces every local model's template default
    /// (Qwen2.5's "You are Qwen, created by Alibaba Cloud…" too); a template that refuses a
    /// system message gets the conversation as it came.
    #[arg(
        long,
        env = "AITIER_CHAT_SYSTEM_PROMPT",
        default_value = crate::llm::DEFAULT_SYSTEM_PROMPT
    )]
    pub chat_system_prompt: String,

    /// Generations that may wait for a slot; beyond them a chat request gets 503 + Retry-After
    /// before its stream starts. A waiting client gets its headers and a `queued` comment at once.
    #[arg(long, env = "AITIER_GENERATION_QUEUE", default_value_t = 8)]
    pub generation_queue: usize,

    /// Most tokens one chat request may generate, whatever it asks for (`max_tokens` up to 4096):
    /// a request over it generates this many and finishes with `length`, like llama.cpp's
    /// `--n-predict`. Unset: the request's own `max_tokens`.
    #[arg(long, env = "AITIER_MAX_TOKENS_LIMIT")]
    pub max_tokens_limit: Option<usize>,

    /// Base URL of an OpenAI-compatible upstream for chat (OpenAI, vLLM, llama.cpp's server,
    /// another aitier's `/v1`). Setting it or `OPENAI_API_KEY` turns the upstream provider on.
    #[arg(long, env = "OPENAI_BASE_URL", hide_env_values = true)]
    pub openai_base_url: Option<String>,

    /// API key sent to the upstream as a bearer token. Never logged, never shown by `--help`.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<Secret>,

    /// Chat models served by the upstream, comma separated; an entry ending in `*` is a prefix
    /// (`gpt-*`), and `*` alone sends every name. Empty (the default): every model name except the
    /// local model's goes upstream — allowed on loopback only, since it lets any client spend the
    /// upstream key on any model: a server listening beyond loopback refuses to start without it.
    #[arg(long, env = "AITIER_UPSTREAM_MODELS", value_delimiter = ',')]
    pub upstream_models: Vec<String>,

    /// Other names for the served models, comma separated `alias=model`
    /// (`gpt-4o-mini=SmolLM2-135M-Instruct,text-embedding-3-small=all-MiniLM-L6-v2`): a frontend
    /// written for OpenAI's model names runs unchanged. Requests may use either name; answers name
    /// the model that answered; `GET /v1/models` lists the aliases too. An alias must name a
    /// served model (local, embedding or upstream) and may not hide one.
    #[arg(long, env = "AITIER_MODEL_ALIASES", value_delimiter = ',')]
    pub model_aliases: Vec<String>,

    /// Longest wait for the upstream, in seconds: for its response to start and between two
    /// chunks of a stream. Past it the request gets 504 (or an `error` event once streaming).
    #[arg(long, env = "AITIER_UPSTREAM_TIMEOUT_SECS", default_value_t = 30)]
    pub upstream_timeout_secs: u64,

    /// Longest an upstream generation may take in all, in seconds; then it ends with an `error`
    /// event (or 504 before the stream starts).
    #[arg(long, env = "AITIER_UPSTREAM_DEADLINE_SECS", default_value_t = 600)]
    pub upstream_deadline_secs: u64,
    /// Where documents and their vectors live: `sqlite://PATH` (the default, a file created on first
    /// run, sqlite-vec + FTS5: nothing to install, one writer at a time) or `postgres://…`
    /// (pgvector HNSW + full-text GIN index: concurrent writers, several servers, approximate but
    /// sub-linear search). Migrations run at start-up; while the database is unreachable the RAG
    /// routes answer 503 and the server keeps retrying. A password in it is never logged.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: Secret,

    /// Largest accepted request body, in bytes; larger bodies get 413.
    #[arg(long, env = "AITIER_BODY_LIMIT", default_value_t = 2 * 1024 * 1024)]
    pub body_limit: usize,

    /// Time a request may take until its response starts, in seconds; then 503. Streams are not cut.
    #[arg(long, env = "AITIER_REQUEST_TIMEOUT_SECS", default_value_t = 60)]
    pub request_timeout_secs: u64,

    /// Origins allowed to call the API from a browser, comma separated (`*` for any). Empty (the
    /// default) allows no cross-origin access.
    #[arg(long, env = "AITIER_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Let browsers send credentials (cookies, Authorization) cross-origin. Not allowed with `*`.
    #[arg(long, env = "AITIER_CORS_CREDENTIALS", default_value_t = false)]
    pub cors_credentials: bool,

    /// API keys clients must send, as `Authorization: Bearer KEY` (what OpenAI SDKs send) or
    /// `X-API-Key: KEY`: comma separated, or `@FILE` with one per line. `KEY:read`, `KEY:write`,
    /// `KEY:admin` or `KEY:read+write` set a key's scopes (read: embed, classify, chat, search,
    /// query; write: ingest, delete; admin: everything); a bare key is read+write. Keys are at
    /// least 16 characters, compared in constant time, never logged. Unset: no key is asked for,
    /// which a server listening beyond loopback refuses unless --allow-anonymous.
    #[arg(long, env = "AITIER_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<Secret>,

    /// Serve without API keys on a non-loopback address: anyone who reaches the port can use every
    /// route (embed, chat on the upstream's key, ingest, delete). For a private network only.
    #[arg(long, env = "AITIER_ALLOW_ANONYMOUS", default_value_t = false)]
    pub allow_anonymous: bool,

    /// Paths answered without a key when keys are set, comma separated; an entry also opens the
    /// paths below it (`/docs` opens `/docs/index.html`), except `/`, which opens the page alone.
    /// Probes and scrapers carry no key; the page asks its user for one.
    #[arg(
        long,
        env = "AITIER_OPEN_PATHS",
        value_delimiter = ',',
        default_value = DEFAULT_OPEN_PATHS
    )]
    pub open_paths: Vec<String>,

    /// Work each caller (API key, or client address without keys) may ask for per minute; past it,
    /// 429 with `Retry-After`. Counted in work units, not requests: 1 text embedded or classified,
    /// 1 chunk ingested (≈800 characters), 1 search, 100 chat tokens (the prompt at ≈4 characters
    /// a token plus `max_tokens`). Unset: no limit.
    #[arg(long, env = "AITIER_RATE_LIMIT")]
    pub rate_limit: Option<u32>,

    /// Work units a caller may spend at once before the per-minute rate applies (defaults to a
    /// minute's worth). A request that costs more than this is a 422 (it could never pass).
    #[arg(long, env = "AITIER_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,

    /// Behind a reverse proxy (Render, a load balancer): take the client's address from the last
    /// `X-Forwarded-For` entry, which the nearest proxy appends, for per-address rate limits.
    /// Without a proxy a client could name any address this way, so it is off by default.
    #[arg(long, env = "AITIER_TRUST_FORWARDED_FOR", default_value_t = false)]
    pub trust_forwarded_for: bool,

    /// Log format; the level comes from `RUST_LOG` (default `info`).
    #[arg(long, env = "AITIER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// On SIGTERM or ctrl-c, how long in-flight requests may finish before the server exits, in
    /// seconds.
    #[arg(long, env = "AITIER_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,
}

impl ServeArgs {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    /// The model aliases, checked for form (whether they name served models is checked once the
    /// names are known, at start-up).
    pub fn aliases(&self) -> Result<crate::aliases::ModelAliases, crate::aliases::AliasError> {
        crate::aliases::ModelAliases::parse(&self.model_aliases)
    }

    /// The chat upstream, when a base URL or an API key is configured.
    pub fn upstream(&self) -> Option<crate::llm::Upstream> {
        if self.openai_base_url.is_none() && self.openai_api_key.is_none() {
            return None;
        }
        Some(crate::llm::Upstream::new(crate::llm::UpstreamConfig {
            base_url: self.openai_base_url.clone(),
            api_key: self.openai_api_key.as_ref().map(|k| k.expose().to_string()),
            models: self.upstream_models.clone(),
            timeout: Duration::from_secs(self.upstream_timeout_secs),
            deadline: Duration::from_secs(self.upstream_deadline_secs),
        }))
    }

    /// The local chat models as `(name, file)`, the default first; none when chat is turned off.
    pub fn chat_models(&self) -> Result<Vec<(String, String)>, String> {
        let files: Vec<&String> = self.chat_model.iter().filter(|f| !f.is_empty()).collect();
        if files.iter().any(|f| *f == "none") {
            if files.len() > 1 {
                return Err("--chat-model none turns chat off: it takes no other model".into());
            }
            return Ok(Vec::new());
        }
        if self.chat_model_name.len() > files.len() {
            return Err(format!(
                "--chat-model-name gives {} names for {} chat models",
                self.chat_model_name.len(),
                files.len()
            ));
        }
        let mut models: Vec<(String, String)> = Vec::with_capacity(files.len());
        for (i, file) in files.into_iter().enumerate() {
            let name = self.chat_model_name.get(i).cloned().unwrap_or_else(|| {
                let path = std::path::Path::new(file);
                path.parent()
                    .and_then(|p| p.file_name())
                    .or(path.file_stem())
                    .and_then(|n| n.to_str())
                    .unwrap_or("local")
                    .to_string()
            });
            if name.trim().is_empty() {
                return Err(format!("--chat-model-name: an empty name for {file}"));
            }
            if models.iter().any(|(n, _)| *n == name) {
                return Err(format!(
                    "two chat models are named '{name}': name them with --chat-model-name"
                ));
            }
            models.push((name, file.clone()));
        }
        Ok(models)
    }

    /// The context limit of chat model `i` of `models` (`--chat-context`), if any.
    pub fn chat_context(&self, i: usize, models: usize) -> Result<Option<usize>, String> {
        match self.chat_context.as_slice() {
            [] => Ok(None),
            [all] => Ok(Some(*all as usize)),
            each if each.len() == models => Ok(Some(each[i] as usize)),
            each => Err(format!(
                "--chat-context gives {} limits for {models} chat models: give one, or one per model",
                each.len()
            )),
        }
    }

    /// Worker threads per model: as configured, else one per core.
    pub fn workers(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }

    /// The served name of the embedding model.
    pub fn embedding_model_name(&self) -> String {
        self.embedding_model_name
            .clone()
            .unwrap_or_else(|| crate::inference::source::model_name(&self.embedding_model))
    }

    /// Settings clap cannot check alone.
    pub fn validate(&self) -> Result<(), String> {
        if self.cors_credentials && self.cors_origins.iter().any(|o| o.trim() == "*") {
            return Err(
                "--cors-credentials cannot be combined with --cors-origins '*': browsers refuse it; list the origins".into(),
            );
        }
        let limits = [
            ("--max-batch-size", self.max_batch_size),
            ("--max-batch-tokens", self.max_batch_tokens),
            ("--queue-capacity", self.queue_capacity),
            ("--workers", self.workers.unwrap_or(1)),
            ("--classifier-cache", self.classifier_cache),
            (
                "--max-concurrent-generations",
                self.max_concurrent_generations,
            ),
            ("--max-tokens-limit", self.max_tokens_limit.unwrap_or(1)),
            ("--rate-limit", self.rate_limit.unwrap_or(1) as usize),
            (
                "--rate-limit-burst",
                self.rate_limit_burst.unwrap_or(1) as usize,
            ),
            (
                "--upstream-timeout-secs",
                self.upstream_timeout_secs as usize,
            ),
            (
                "--upstream-deadline-secs",
                self.upstream_deadline_secs as usize,
            ),
        ];
        let url = self.database_url.expose();
        if !["sqlite:", "postgres:", "postgresql:"]
            .iter()
            .any(|scheme| url.starts_with(scheme))
        {
            return Err(format!(
                "--database-url must be sqlite://PATH or postgres://…, not '{}'",
                crate::store::redact(url)
            ));
        }
        if let Some(keys) = &self.api_keys {
            crate::auth::ApiKeys::parse(keys.expose())?;
        }
        self.aliases().map_err(|e| e.to_string())?;
        if let Some(path) = self
            .open_paths
            .iter()
            .map(|p| p.trim())
            .find(|p| !p.is_empty() && !p.starts_with('/'))
        {
            return Err(format!(
                "--open-paths entries are paths starting with '/', not '{path}'"
            ));
        }
        if !self.host.is_loopback() {
            if self.api_keys.is_none() && !self.allow_anonymous {
                return Err(format!(
                    "refusing to listen on {} without API keys: anyone reaching it could use every route. Set AITIER_API_KEYS (or --api-keys), listen on 127.0.0.1, or pass --allow-anonymous to serve openly",
                    self.host
                ));
            }
            if self.upstream_models.iter().all(|m| m.trim().is_empty())
                && (self.openai_base_url.is_some() || self.openai_api_key.is_some())
            {
                return Err(format!(
                    "refusing to listen on {} with a chat upstream for every model name: list the upstream's models with --upstream-models (AITIER_UPSTREAM_MODELS, e.g. gpt-4o-mini), or '*' to send every name upstream",
                    self.host
                ));
            }
        }
        if let Some((flag, _)) = limits.iter().find(|(_, value)| *value == 0) {
            return Err(format!("{flag} must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
