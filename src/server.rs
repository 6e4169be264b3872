//! Start-up and shutdown: resolve the models, bind, load and warm the models in the background while
//! already answering `/health`, serve until a signal, then drain with a deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::classify::RegistryConfig;
use crate::config::ServeArgs;
use crate::http;
use crate::inference::source::{self, HubOptions, ModelFiles};
use crate::inference::{BatchConfig, EmbeddingService};
use crate::llm::{ChatService, LocalModel};
use crate::rag::Chunker;
use crate::state::AppState;
use crate::store::Database;

/// How often an unreachable database is tried again at start-up.
const DATABASE_RETRY: Duration = Duration::from_secs(2);

/// A server bound to its port, its models loading in the background.
pub struct Bound {
    listener: TcpListener,
    app: axum::Router,
    state: AppState,
    loader: JoinHandle<anyhow::Result<()>>,
    drain: Duration,
}

/// Resolves the model files (failing fast with a clear message when they cannot be found), binds the
/// listener and starts loading the models.
pub async fn bind(args: &ServeArgs) -> anyhow::Result<Bound> {
    args.validate().map_err(anyhow::Error::msg)?;
    let hub = HubOptions {
        cache_dir: args.hf_cache.clone(),
        token: args.hf_token.clone(),
    };
    log_access(args);
    let files = source::resolve(&args.embedding_model, &hub).await?;
    let listener = TcpListener::bind((args.host, args.port))
        .await
        .with_context(|| format!("could not listen on {}:{}", args.host, args.port))?;
    let batch = BatchConfig {
        name: args.embedding_model_name(),
        max_batch_size: args.max_batch_size,
        max_batch_tokens: args.max_batch_tokens,
        max_wait: Duration::from_millis(args.max_batch_wait_ms),
        queue_capacity: args.queue_capacity,
        workers: args.workers(),
    };
    let registry = RegistryConfig {
        dir: args.classifiers_dir.clone(),
        capacity: args.classifier_cache,
        batch: batch.clone(),
        hub,
        hub_ids: args.hub_model_ids,
    };
    let mut state = AppState::new(
        args.embedding_model_name(),
        registry,
        Some(args.sentiment_model.clone()),
    );
    let threads = args
        .chat_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut chat = Vec::new();
    let models = args.chat_models().map_err(anyhow::Error::msg)?;
    let count = models.len();
    for (i, (name, path)) in models.into_iter().enumerate() {
        if !std::path::Path::new(&path).is_file() {
            anyhow::bail!(
                "chat model {path} not found: run models/fetch, pass another GGUF file with --chat-model, or --chat-model none"
            );
        }
        state = state.with_chat(name);
        chat.push(ChatConfig {
            path: path.into(),
            concurrent: args.max_concurrent_generations,
            queue: args.generation_queue,
            threads,
            context: args.chat_context(i, count).map_err(anyhow::Error::msg)?,
            system_prompt: Some(args.chat_system_prompt.clone()).filter(|s| !s.is_empty()),
        });
    }
    state.max_tokens_limit = args.max_tokens_limit;
    if let Some(upstream) = args.upstream() {
        tracing::info!(upstream = %upstream.base_url(), "chat upstream configured");
        state = state.with_upstream(upstream);
    }
    let aliases = args.aliases()?;
    let local: Vec<&str> = state
        .chat
        .iter()
        .map(|slot| slot.name())
        .chain([state.embeddings.name()])
        .collect();
    aliases.check(&local, |model| {
        state.upstream.as_ref().is_some_and(|up| up.serves(model))
    })?;
    state.aliases = Arc::new(aliases);
    // The database opens (and migrates) in the background, retried until it answers: the server
    // starts and says what is wrong at /health/ready instead of exiting.
    let database = Arc::new(Database::new(args.database_url.expose()));
    state = state.with_rag(database.clone());
    let state_for_loader = state.clone();
    let connecting = tokio::spawn(async move { database.connect(DATABASE_RETRY).await });
    let loader = tokio::spawn(async move {
        load_models(state_for_loader, files, batch, chat).await?;
        connecting
            .await
            .context("database task")?
            .context("database")?;
        Ok(())
    });
    Ok(Bound {
        app: http::app(state.clone(), args),
        listener,
        state,
        loader,
        drain: args.shutdown_timeout(),
    })
}

/// Says once who can use what: how many keys, which paths are open, or that everything is.
fn log_access(args: &ServeArgs) {
    let open = args.open_paths.join(",");
    match &args.api_keys {
        Some(keys) => {
            let count = crate::auth::ApiKeys::parse(keys.expose()).map_or(0, |k| k.len());
            tracing::info!(keys = count, open_paths = %open, "API keys required except on the open paths");
        }
        None if args.host.is_loopback() => {
            tracing::info!(host = %args.host, "no API keys: every route is open to local clients");
        }
        None => tracing::warn!(
            host = %args.host,
            "no API keys (--allow-anonymous): every route, ingest and delete included, is open to anyone who reaches this address"
        ),
    }
}

struct ChatConfig {
    path: std::path::PathBuf,
    concurrent: usize,
    queue: usize,
    threads: usize,
    /// At most this many tokens of context (`--chat-context`).
    context: Option<usize>,
    /// `--chat-system-prompt`; `None` leaves it to the chat template.
    system_prompt: Option<String>,
}

async fn load_models(
    state: AppState,
    files: ModelFiles,
    batch: BatchConfig,
    chat: Vec<ChatConfig>,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let name = batch.name.clone();
    let tokenizer = files.tokenizer.clone();
    let service = EmbeddingService::load(files, batch)
        .await
        .with_context(|| format!("embedding model {name}"))?;
    if let Some(rag) = &state.rag {
        // Chunks are sized in the model's own tokens, [CLS] and [SEP] left out of the budget.
        let max_tokens = service.max_tokens().saturating_sub(2);
        let chunker =
            tokio::task::spawn_blocking(move || Chunker::from_file(&tokenizer, max_tokens))
                .await
                .context("chunker task")??;
        rag.set_chunker(chunker);
    }
    tracing::info!(
        model = %name,
        dims = service.dims(),
        max_tokens = service.max_tokens(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "embedding model loaded and warm"
    );
    state.embeddings.fill(service);
    if let Some(sentiment) = &state.sentiment {
        state
            .classifiers
            .get(&sentiment.id)
            .await
            .with_context(|| format!("sentiment classifier {}", sentiment.id))?;
        sentiment.mark_ready();
    }
    // One after the other: each model's engine and memory are its own.
    for (slot, chat) in state.chat.iter().zip(chat) {
        let started = std::time::Instant::now();
        let path = chat.path.clone();
        let (threads, context) = (chat.threads, chat.context);
        let system_prompt = chat.system_prompt.clone();
        let model = tokio::task::spawn_blocking(move || {
            LocalModel::load(&path).map(|mut m| {
                m.set_threads(threads);
                m.set_system_prompt(system_prompt);
                if let Some(context) = context {
                    m.limit_context(context);
                }
                m
            })
        })
        .await
        .context("chat model loader task")?
        .with_context(|| format!("chat model {}", chat.path.display()))?;
        tracing::info!(
            model = %slot.name(),
            context = model.context_length(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "chat model loaded"
        );
        slot.fill(ChatService::new(
            slot.name().to_string(),
            model,
            chat.concurrent,
            chat.queue,
        ));
    }
    Ok(())
}

impl Bound {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish for at most the drain
    /// timeout. A model that fails to load stops the server with that error.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.listener.local_addr()?, "listening");
        let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
        // Streams write one small event per token: without TCP_NODELAY, Nagle's algorithm holds
        // each write until the client's (delayed, up to 40 ms) ACK of the previous one, which
        // added ≈33 ms to every chat stream's time to first token.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!(error = %e, "could not set TCP_NODELAY");
            }
        });
        // The peer address identifies anonymous callers for rate limits.
        let app = self.app.into_make_service_with_connect_info::<SocketAddr>();
        let stopping = self.state.shutdown.clone();
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown.await;
            // Readiness turns 503 and open streams end with an `error` event at once, so the
            // drain below waits for short requests only.
            stopping.begin();
            tracing::info!("shutting down: draining in-flight requests");
            let _ = signalled_tx.send(());
        });
        let database = self.state.rag.as_ref().map(|rag| rag.database.clone());
        let drain = self.drain;
        let deadline = async move {
            if signalled_rx.await.is_ok() {
                tokio::time::sleep(drain).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let load_failure = async move {
            match self.loader.await {
                Ok(Ok(())) => std::future::pending().await,
                Ok(Err(e)) => e,
                Err(e) => anyhow::Error::new(e).context("model loader task"),
            }
        };
        let outcome = tokio::select! {
            served = server => served.context("server error"),
            () = deadline => {
                tracing::warn!(?drain, "drain timeout reached; exiting with requests in flight");
                Ok(())
            }
            e = load_failure => Err(e),
        };
        if let Some(database) = database {
            // Bounded too: a connection stuck in a query must not hold the exit.
            if tokio::time::timeout(Duration::from_secs(5), database.close())
                .await
                .is_err()
            {
                tracing::warn!("database pool did not close within 5 s");
            }
        }
        tracing::info!("stopped");
        outcome
    }
}

/// Completes on ctrl-c or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled, so a signal that arrives right after start-up is not lost (it would
/// otherwise kill the process with the default action). Call it inside the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).ok();
        let mut interrupt = signal(SignalKind::interrupt()).ok();
        async move {
            tokio::select! {
                () = wait_for(terminate.as_mut()) => {}
                () = wait_for(interrupt.as_mut()) => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(unix)]
async fn wait_for(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}
