//! The continuous-batching engine: one dedicated thread owns every running sequence and the
//! prompt-prefix cache. Between steps it takes in new requests (prefilling each prompt from the
//! longest cached prefix); each step then decodes one token for every running sequence in a single
//! forward pass. On a CPU the weights' memory traffic dominates a decode step, so four sequences
//! per pass cost little more than one. Each sequence samples on its own and streams to its own
//! channel; a closed channel cancels that sequence before the next step.
//!
//! Compute threads: each matmul's columns are split over `--chat-threads` threads (our kernels,
//! see `kernels/lib.rs`), one per core by default. On this 2-core machine two threads took a decode
//! step from 21 to 13 ms when nothing else ran; on a machine shared with busy processes a thread
//! that waits for a held core stalls every step, and 1 is steadier.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::decode::{Decoder, Step};
use super::llama::Input;
use super::prefix::PrefixCache;
use super::{
    ChatMessage, FinishReason, Generation, GenerationParams, KvCache, LlmError, LocalModel,
};

/// What a generation stream carries.
#[derive(Debug)]
pub enum ChatEvent {
    /// Not running yet: waiting for a free generation slot.
    Queued,
    Delta(String),
    Done(Generation),
    Error(String),
}

/// Prompt tokens a pending prompt runs per engine step: at ≈2 ms per token on one core, a long
/// prompt holds the running sequences back for about half a second at a time.
const PREFILL_CHUNK: usize = 256;

/// KV state kept for reuse by later prompts (≈1,400 SmolLM2 tokens; see [`PrefixCache`]).
const PREFIX_CACHE_BYTES: usize = 64 << 20;

/// The pause before the engine restarts after a panic, doubled on each panic that follows within
/// [`RESTART_CALM`] of the last restart (a bug hit by every request must not spin a core), up to
/// [`RESTART_BACKOFF_MAX`]. Readiness answers 503 while it lasts.
const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
const RESTART_CALM: Duration = Duration::from_secs(60);

/// One admitted request, handed to the engine thread.
pub(crate) struct Job {
    pub messages: Vec<ChatMessage>,
    pub params: GenerationParams,
    /// Unbounded so that a slow reader never stalls the other sequences of the batch; it holds at
    /// most `max_tokens` small deltas.
    pub events: mpsc::UnboundedSender<ChatEvent>,
    /// Held until the sequence ends: the caller's admission and batch-slot permits.
    pub slot: Box<dyn Send>,
}

/// Counters for tests and logs.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Prompt tokens run through the model.
    pub prefilled_tokens: AtomicU64,
    /// Prompt tokens whose KV came from the prefix cache instead.
    pub reused_tokens: AtomicU64,
    /// Decode steps, and the sequences they advanced (their ratio is the mean batch size).
    pub steps: AtomicU64,
    pub stepped_sequences: AtomicU64,
    /// Panics the engine recovered from.
    pub restarts: AtomicU64,
    /// Set from the moment a panic unwinds until the engine serves again.
    pub restarting: AtomicBool,
    /// A test asks for a panic in the next decode step ([`Engine::inject_panic`]).
    panic_requested: AtomicBool,
    /// ... and holds the restart until it has looked at the server meanwhile.
    hold_restart: AtomicBool,
}

/// Returned by [`Engine::inject_panic`]: the engine's restart waits until this is dropped.
#[doc(hidden)]
pub struct RestartHold(Arc<EngineStats>);

impl Drop for RestartHold {
    fn drop(&mut self) {
        self.0.hold_restart.store(false, Ordering::SeqCst);
    }
}

pub(crate) struct Engine {
    jobs: std_mpsc::Sender<Job>,
    pub stats: Arc<EngineStats>,
}

struct Sequence {
    decoder: Decoder,
    cache: KvCache,
    /// Sampled, not yet in the cache: the next step's input.
    next: u32,
    events: mpsc::UnboundedSender<ChatEvent>,
    _slot: Box<dyn Send>,
}

struct Worker {
    model: Arc<LocalModel>,
    max_batch: usize,
    active: Arc<AtomicUsize>,
    stats: Arc<EngineStats>,
    prefixes: PrefixCache,
}

impl Engine {
    /// Starts the engine thread; it ends when the `Engine` is dropped and the last job is done.
    pub fn start(model: Arc<LocalModel>, max_batch: usize, active: Arc<AtomicUsize>) -> Self {
        let (jobs, rx) = std_mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let worker = Worker {
            model,
            max_batch: max_batch.max(1),
            active,
            stats: stats.clone(),
            prefixes: PrefixCache::new(PREFIX_CACHE_BYTES),
        };
        std::thread::Builder::new()
            .name("chat-engine".into())
            .spawn(move || worker.supervise(rx))
            .expect("spawn the chat engine thread");
        Self { jobs, stats }
    }

    /// Makes the engine panic in its next decode step, as a bug would: for the tests of recovery.
    /// The restart that follows waits until the returned hold is dropped, so that a test can see
    /// the server while it restarts however slow the machine.
    #[doc(hidden)]
    pub fn inject_panic(&self) -> RestartHold {
        self.stats.hold_restart.store(true, Ordering::SeqCst);
        self.stats.panic_requested.store(true, Ordering::SeqCst);
        RestartHold(self.stats.clone())
    }

    /// Where jobs go; sending fails once the engine thread is gone.
    pub fn sender(&self) -> std_mpsc::Sender<Job> {
        self.jobs.clone()
    }
}

/// A request whose prompt is being prefilled, a chunk per engine step.
struct Prefill {
    job: Job,
    prompt: Vec<u32>,
    cache: KvCache,
}

thread_local! {
    /// The counters and the sequence gauge of the engine this thread runs, for [`raise_on_panic`].
    static ENGINE: std::cell::RefCell<Option<(Arc<EngineStats>, Arc<AtomicUsize>)>> = const { std::cell::RefCell::new(None) };
}

/// Chains a panic hook that counts the restart, raises [`EngineStats::restarting`] and empties the
/// sequence gauge when an engine thread panics. The hook runs before the unwinding drops the
/// engine's sequences (every one the gauge counted), so all three show before any stream sees its
/// channel close: readiness never answers 200 between the two, nor the gauge counts the dead.
fn raise_on_panic() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = ENGINE.try_with(|engine| {
                if let Ok(engine) = engine.try_borrow()
                    && let Some((stats, active)) = engine.as_ref()
                {
                    stats.restarts.fetch_add(1, Ordering::SeqCst);
                    stats.restarting.store(true, Ordering::SeqCst);
                    active.store(0, Ordering::SeqCst);
                }
            });
            previous(info);
        }));
    });
}

impl Worker {
    /// Runs the engine and restarts it after a panic. The panic drops every request the engine
    /// held: their channels close, and their streams end with an error (see `ChatService`); their
    /// permits return. Requests still in `jobs` wait for the restarted engine. The prefix cache
    /// starts empty again, since a panic may have left a cache half-written.
    fn supervise(mut self, jobs: std_mpsc::Receiver<Job>) {
        raise_on_panic();
        // Kept for the life of the engine: from here on, this thread is the first of the model's
        // compute threads, and runs its passes where it calls them.
        let _compute = self.model.llama().pool_here();
        ENGINE
            .with(|engine| *engine.borrow_mut() = Some((self.stats.clone(), self.active.clone())));
        let mut backoff = RESTART_BACKOFF_MIN;
        let mut last_restart: Option<Instant> = None;
        loop {
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| self.run(&jobs)));
            let Err(panic) = run else { return };
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string panic".into());
            if last_restart.is_some_and(|t| t.elapsed() > RESTART_CALM) {
                backoff = RESTART_BACKOFF_MIN;
            }
            tracing::error!(panic = %what, restart_in = ?backoff,
                "the chat engine panicked: its requests failed, it restarts");
            self.prefixes = PrefixCache::new(PREFIX_CACHE_BYTES);
            self.stats.panic_requested.store(false, Ordering::SeqCst);
            std::thread::sleep(backoff);
            while self.stats.hold_restart.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
            last_restart = Some(Instant::now());
            self.stats.restarting.store(false, Ordering::SeqCst);
            tracing::info!("the chat engine serves again");
        }
    }

    fn run(&mut self, jobs: &std_mpsc::Receiver<Job>) {
        let mut running: Vec<Sequence> = Vec::new();
        let mut prefilling: Vec<Prefill> = Vec::new();
        let mut waiting: VecDeque<Job> = VecDeque::new();
        loop {
            if running.is_empty() && prefilling.is_empty() && waiting.is_empty() {
                match jobs.recv() {
                    Ok(job) => waiting.push_back(job),
                    Err(_) => return,
                }
            }
            waiting.extend(jobs.try_iter());
            let room = self
                .max_batch
                .saturating_sub(running.len() + prefilling.len());
            let joining: Vec<Job> = waiting.drain(..room.min(waiting.len())).collect();
            prefilling.extend(self.admit(joining));
            // A client that went away frees its place before the next step costs anything.
            let (gone, kept): (Vec<_>, Vec<_>) = prefilling
                .into_iter()
                .partition(|p| p.job.events.is_closed());
            prefilling = kept;
            for p in gone {
                drop(p.job.slot);
                self.active.fetch_sub(1, Ordering::SeqCst);
            }
            let (gone, kept): (Vec<_>, Vec<_>) =
                running.into_iter().partition(|s| s.events.is_closed());
            running = kept;
            for seq in gone {
                self.end(seq, FinishReason::Cancelled);
            }
            if !prefilling.is_empty() {
                let (pending, started) = self.prefill(prefilling);
                prefilling = pending;
                running.extend(started);
            }
            if !running.is_empty() {
                running = self.step(running);
            }
        }
    }

    /// Tokenises the new requests and starts each from its longest cached prefix.
    fn admit(&mut self, jobs: Vec<Job>) -> Vec<Prefill> {
        let mut admitted = Vec::with_capacity(jobs.len());
        for job in jobs {
            self.active.fetch_add(1, Ordering::SeqCst);
            match self.model.prompt_ids(&job.messages, job.params.max_tokens) {
                Ok(prompt) => {
                    let cache = match self.prefixes.lookup(&prompt) {
                        Some(hit) => {
                            self.stats
                                .reused_tokens
                                .fetch_add(hit.reused as u64, Ordering::Relaxed);
                            hit.cache
                        }
                        None => self.model.llama().new_cache(),
                    };
                    tracing::debug!(
                        prompt = prompt.len(),
                        reused = cache.len(),
                        "chat sequence joins the batch"
                    );
                    admitted.push(Prefill { job, prompt, cache });
                }
                Err(e) => {
                    self.fail(job.events, job.slot, &e);
                }
            }
        }
        admitted
    }

    /// Runs the next chunk of every pending prompt in one forward pass (prompts that arrive
    /// together share the weights' reads, as decode steps do). A chunk is at most
    /// [`PREFILL_CHUNK`] tokens, so a long prompt delays the running sequences' next tokens by one
    /// chunk at a time rather than by its whole prefill. Prompts now complete sample their first
    /// token and join the running sequences.
    fn prefill(&mut self, mut pending: Vec<Prefill>) -> (Vec<Prefill>, Vec<Sequence>) {
        let mut inputs: Vec<Input> = pending
            .iter_mut()
            .map(|p| {
                let done = p.cache.len();
                let end = p.prompt.len().min(done + PREFILL_CHUNK);
                Input {
                    cache: &mut p.cache,
                    tokens: &p.prompt[done..end],
                }
            })
            .collect();
        let tokens: usize = inputs.iter().map(|i| i.tokens.len()).sum();
        let logits = match self.model.llama().forward(&mut inputs) {
            Ok(logits) => logits,
            Err(e) => {
                for p in pending {
                    self.fail(p.job.events, p.job.slot, &e);
                }
                return (Vec::new(), Vec::new());
            }
        };
        self.stats
            .prefilled_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        let vocab = self.model.llama().config().vocab;
        let (mut still, mut started) = (Vec::new(), Vec::new());
        for (p, logits) in pending.into_iter().zip(logits.chunks_exact(vocab)) {
            if p.cache.len() < p.prompt.len() {
                still.push(p);
                continue;
            }
            let seq = Sequence {
                decoder: Decoder::new(p.job.params, &p.prompt),
                cache: p.cache,
                next: 0,
                events: p.job.events,
                _slot: p.job.slot,
            };
            started.extend(self.advance(seq, logits));
        }
        (still, started)
    }

    /// One decode step for every running sequence, in one forward pass.
    fn step(&mut self, mut running: Vec<Sequence>) -> Vec<Sequence> {
        if self.stats.panic_requested.swap(false, Ordering::SeqCst) {
            panic!("a panic injected by a test");
        }
        let tokens: Vec<u32> = running.iter().map(|s| s.next).collect();
        let mut inputs: Vec<Input> = running
            .iter_mut()
            .zip(&tokens)
            .map(|(s, t)| Input {
                cache: &mut s.cache,
                tokens: std::slice::from_ref(t),
            })
            .collect();
        let logits = self.model.llama().forward(&mut inputs);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .stepped_sequences
            .fetch_add(running.len() as u64, Ordering::Relaxed);
        let logits = match logits {
            Ok(logits) => logits,
            Err(e) => {
                for seq in running {
                    self.fail(seq.events, seq._slot, &e);
                }
                return Vec::new();
            }
        };
        let vocab = self.model.llama().config().vocab;
        running
            .into_iter()
            .zip(logits.chunks_exact(vocab))
            .filter_map(|(seq, row)| self.advance(seq, row))
            .collect()
    }

    /// Samples a sequence's next token and streams its text; `None` once it has ended.
    fn advance(&mut self, mut seq: Sequence, logits: &[f32]) -> Option<Sequence> {
        let model = &self.model;
        match seq
            .decoder
            .step(model.tokenizer(), model.end_of_turn(), logits)
        {
            Err(e) => self.fail(seq.events, seq._slot, &e),
            Ok(Step::Finished(reason)) => self.end(seq, reason),
            Ok(Step::Token { token, delta }) => {
                if !delta.is_empty() && seq.events.send(ChatEvent::Delta(delta)).is_err() {
                    return self.end(seq, FinishReason::Cancelled);
                }
                if seq.decoder.exhausted() {
                    return self.end(seq, FinishReason::Length);
                }
                seq.next = token;
                Some(seq)
            }
        }
    }

    /// Sends the rest of the text and the totals, and keeps the sequence's cache for later prompts.
    /// The slot is freed before the gauge drops, so that whoever sees the gauge drop finds the
    /// place free.
    fn end(&mut self, seq: Sequence, reason: FinishReason) -> Option<Sequence> {
        let Sequence {
            decoder,
            cache,
            events,
            _slot,
            ..
        } = seq;
        let tokens = decoder.tokens().to_vec();
        let (tail, generation) = decoder.finish(reason);
        if let Some(tail) = tail {
            let _ = events.send(ChatEvent::Delta(tail));
        }
        let _ = events.send(ChatEvent::Done(generation));
        self.prefixes.insert(tokens, cache);
        drop(_slot);
        self.active.fetch_sub(1, Ordering::SeqCst);
        None
    }

    fn fail(
        &self,
        events: mpsc::UnboundedSender<ChatEvent>,
        slot: Box<dyn Send>,
        e: &LlmError,
    ) -> Option<Sequence> {
        tracing::error!(error = %e, "chat generation failed");
        let _ = events.send(ChatEvent::Error(e.to_string()));
        drop(slot);
        self.active.fetch_sub(1, Ordering::SeqCst);
        None
    }
}
