//! Dynamic micro-batching on a dedicated thread per model: requests that arrive together share one
//! forward pass. The queue in front of it is bounded, so overload is refused at once (503) instead of
//! growing latency without limit.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{InferenceError, ModelError, SequenceModel, Tokenized};

#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Name used in thread names, logs and errors.
    pub name: String,
    pub max_batch_size: usize,
    /// Bound on sequences x padded length of one forward pass.
    pub max_batch_tokens: usize,
    /// How long to hold a batch open for more requests, counted from the first request's arrival.
    pub max_wait: Duration,
    /// Texts (not requests) waiting for a worker before new requests are refused; a request larger
    /// than this still runs when the queue is empty.
    pub queue_capacity: usize,
    /// Worker threads sharing the queue, each running its own batches.
    pub workers: usize,
}

/// The model's output for one text.
#[derive(Debug, Clone)]
pub struct Pooled {
    pub vector: Vec<f32>,
    pub tokens: usize,
    pub truncated: bool,
}

/// Up to this many bytes of text, a request is tokenized on the async thread that received it.
const TOKENIZE_INLINE_BYTES: usize = 2048;

type Reply = oneshot::Sender<Result<Vec<Pooled>, ModelError>>;

struct Job {
    seqs: Vec<Tokenized>,
    reply: Reply,
    enqueued: Instant,
    /// When the job's batch started, for the request's `Server-Timing` (queue vs inference).
    started: Arc<OnceLock<Instant>>,
    /// The queue's count of waiting texts, which this job's texts leave when a worker takes it.
    waiting: Arc<AtomicUsize>,
}

/// A job a worker has taken, ready to be batched.
struct Prepared {
    seqs: Vec<Tokenized>,
    reply: Reply,
    enqueued: Instant,
    started: Arc<OnceLock<Instant>>,
}

impl Prepared {
    fn tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.ids.len()).sum()
    }
}

/// Handle to a model's worker. Cloning shares the worker and its queue.
#[derive(Clone)]
pub struct Batcher {
    tx: SyncSender<Job>,
    /// For tokenizing on the caller's side, before the queue (see [`Batcher::run`]).
    model: Arc<dyn SequenceModel>,
    name: Arc<str>,
    /// Texts waiting in the queue: the bound is in texts, not requests, so that one request of
    /// 256 texts counts as the work it is.
    waiting: Arc<AtomicUsize>,
    capacity: usize,
}

impl Batcher {
    /// Starts the worker threads. They run until every handle is dropped.
    pub fn spawn(model: Arc<dyn SequenceModel>, config: BatchConfig) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_capacity);
        let rx = Arc::new(Mutex::new(Queue { rx, carried: None }));
        let running = Arc::new(AtomicUsize::new(0));
        let name: Arc<str> = config.name.clone().into();
        for i in 0..config.workers.max(1) {
            let (model, rx, running, config) =
                (model.clone(), rx.clone(), running.clone(), config.clone());
            std::thread::Builder::new()
                .name(format!("aitier-{}-{i}", config.name))
                .spawn(move || worker(model.as_ref(), &rx, &running, &config))?;
        }
        Ok(Self {
            tx,
            model,
            name,
            waiting: Arc::new(AtomicUsize::new(0)),
            capacity: config.queue_capacity,
        })
    }

    /// Runs the model on `texts` (one output per text, in order), or refuses at once when the queue
    /// is full. The texts are tokenized here, before the queue, so that a worker gathering a batch
    /// (under the queue's lock) never waits on another's tokenization. Dropping the future before
    /// it completes lets the worker skip the job.
    pub async fn run(&self, texts: Vec<String>) -> Result<Vec<Pooled>, InferenceError> {
        let (reply, rx) = oneshot::channel();
        let n = texts.len();
        // A request larger than the whole queue still runs when nothing waits.
        let before = self.waiting.fetch_add(n, Ordering::SeqCst);
        let overloaded = || {
            metrics::counter!("aitier_embedding_queue_full_total", "model" => self.name.to_string())
                .increment(1);
            InferenceError::Overloaded {
                model: self.name.to_string(),
            }
        };
        if before > 0 && before + n > self.capacity {
            self.waiting.fetch_sub(n, Ordering::SeqCst);
            return Err(overloaded());
        }
        let seqs = match self.tokenize(texts).await {
            Ok(seqs) => seqs,
            Err(e) => {
                self.waiting.fetch_sub(n, Ordering::SeqCst);
                return Err(e.into());
            }
        };
        let (enqueued, started) = (Instant::now(), Arc::new(OnceLock::new()));
        let job = Job {
            seqs,
            reply,
            enqueued,
            started: started.clone(),
            waiting: self.waiting.clone(),
        };
        self.tx.try_send(job).map_err(|e| {
            self.waiting.fetch_sub(n, Ordering::SeqCst);
            match e {
                TrySendError::Full(_) => overloaded(),
                TrySendError::Disconnected(_) => self.stopped(),
            }
        })?;
        metrics::gauge!("aitier_embedding_queue_depth", "model" => self.name.to_string())
            .set(self.waiting.load(Ordering::Relaxed) as f64);
        let result = rx.await.map_err(|_| self.stopped())?;
        if let Some(&batch) = started.get() {
            crate::telemetry::record_model_time(batch - enqueued, batch.elapsed());
        }
        Ok(result?)
    }

    /// The length of each text in the model's tokens, special tokens included, up to its
    /// maximum length (a longer text counts as the maximum). Runs the tokenizer only.
    pub async fn token_counts(&self, texts: Vec<String>) -> Result<Vec<usize>, InferenceError> {
        Ok(self
            .tokenize(texts)
            .await?
            .iter()
            .map(|t| t.ids.len())
            .collect())
    }

    /// Tokenizes `texts`: on this thread when they are short (a few sentences take tens of
    /// microseconds), else on the blocking pool, so that a large request does not hold up the
    /// async runtime.
    async fn tokenize(&self, texts: Vec<String>) -> Result<Vec<Tokenized>, ModelError> {
        let inline = texts.iter().map(String::len).sum::<usize>() <= TOKENIZE_INLINE_BYTES;
        let model = self.model.clone();
        let all = move || guarded(|| texts.iter().map(|t| model.tokenize(t)).collect());
        if inline {
            return all();
        }
        tokio::task::spawn_blocking(all)
            .await
            .unwrap_or_else(|e| Err(ModelError::Panic(e.to_string())))
    }

    fn stopped(&self) -> InferenceError {
        InferenceError::WorkerStopped {
            model: self.name.to_string(),
        }
    }
}

/// The workers' side of the queue. A job that did not fit the last batch waits in `carried`, under
/// the same lock, so whichever worker gathers next takes it first (a job kept by one worker could
/// wait behind another worker blocked on an empty queue).
struct Queue {
    rx: Receiver<Job>,
    carried: Option<Prepared>,
}

/// Takes a batch from the shared queue (one worker at a time gathers), then runs it while the
/// other workers gather theirs. `running` counts the workers running a batch now: a batch waits
/// for company only while another one runs, so on an idle server a lone request starts at once
/// rather than after `max_wait` (2 of the 6 ms a short sentence took), and under load the
/// batches form as before.
fn worker(
    model: &dyn SequenceModel,
    queue: &Mutex<Queue>,
    running: &AtomicUsize,
    config: &BatchConfig,
) {
    // The forward passes run in a rayon pool of the worker's own, whose one thread is this one
    // (from `build` on, so the passes need no `install`): candle's ops then run their parallel
    // loops where they are, rather than handing each one to rayon's global pool and sleeping until
    // it is done (≈100 such hand-offs in a pass of a short sentence, a third of its time on an idle
    // server). The pool spawns no thread: a pool thread of its own would cost two more hand-offs
    // per batch, and the one back is a wake-up of this thread, which on a VM whose other core
    // sleeps took 1-4 ms of a lone request's 5-6. The pool lives as long as the worker.
    let _compute = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .use_current_thread()
        .build()
        .inspect_err(|e| {
            tracing::warn!(model = %config.name, error = %e, "no compute pool of its own: the passes use rayon's pool");
        });
    loop {
        let jobs = {
            let mut queue = queue.lock().unwrap_or_else(PoisonError::into_inner);
            let Queue { rx, carried } = &mut *queue;
            let Some(jobs) = gather(rx, config, carried, running) else {
                return;
            };
            running.fetch_add(1, Ordering::SeqCst);
            jobs
        };
        run_jobs(model, jobs, config);
        running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits for a first job, then adds the jobs already queued and, while another worker runs a
/// batch (`running`), those that arrive until the batch is full or the first job has waited
/// `max_wait`. A job that would overflow the batch is carried to the next one. `None` when every
/// sender is gone.
fn gather(
    rx: &Receiver<Job>,
    config: &BatchConfig,
    carried: &mut Option<Prepared>,
    running: &AtomicUsize,
) -> Option<Vec<Prepared>> {
    let first = loop {
        if let Some(prepared) = carried.take() {
            break prepared;
        }
        if let Some(prepared) = prepare(rx.recv().ok()?, &config.name) {
            break prepared;
        }
    };
    let deadline = if running.load(Ordering::SeqCst) > 0 {
        first.enqueued + config.max_wait
    } else {
        first.enqueued
    };
    let mut seqs = first.seqs.len();
    let mut tokens = first.tokens();
    let mut jobs = vec![first];
    while seqs < config.max_batch_size && tokens < config.max_batch_tokens {
        let job = match rx.try_recv() {
            Ok(job) => job,
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        let Some(prepared) = prepare(job, &config.name) else {
            continue;
        };
        if seqs + prepared.seqs.len() > config.max_batch_size
            || tokens + prepared.tokens() > config.max_batch_tokens
        {
            *carried = Some(prepared);
            break;
        }
        seqs += prepared.seqs.len();
        tokens += prepared.tokens();
        jobs.push(prepared);
    }
    Some(jobs)
}

/// A job as a worker takes it; `None` when its client has gone.
fn prepare(job: Job, name: &str) -> Option<Prepared> {
    let n = job.seqs.len();
    let left = job.waiting.fetch_sub(n, Ordering::SeqCst) - n;
    metrics::gauge!("aitier_embedding_queue_depth", "model" => name.to_string()).set(left as f64);
    if job.reply.is_closed() {
        return None;
    }
    Some(Prepared {
        seqs: job.seqs,
        reply: job.reply,
        enqueued: job.enqueued,
        started: job.started,
    })
}

/// Runs the sequences of all `jobs` sorted by length, in sub-batches that respect the limits, so
/// short texts are not padded to the length of a long one; then answers every job.
fn run_jobs(model: &dyn SequenceModel, jobs: Vec<Prepared>, config: &BatchConfig) {
    let started = Instant::now();
    let label = config.name.clone();
    for job in &jobs {
        let _ = job.started.set(started);
        metrics::histogram!("aitier_embedding_queue_wait_seconds", "model" => label.clone())
            .record((started - job.enqueued).as_secs_f64());
    }
    let mut order: Vec<(usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, job)| (0..job.seqs.len()).map(move |s| (j, s)))
        .collect();
    order.sort_by_key(|&(j, s)| jobs[j].seqs[s].ids.len());

    let mut outputs: Vec<Vec<Option<Vec<f32>>>> =
        jobs.iter().map(|job| vec![None; job.seqs.len()]).collect();
    let mut failures: Vec<Option<ModelError>> = vec![None; jobs.len()];
    let mut passes = 0;
    for chunk in sub_batches(&order, |&(j, s)| jobs[j].seqs[s].ids.len(), config) {
        passes += 1;
        let batch: Vec<&Tokenized> = chunk.iter().map(|&(j, s)| &jobs[j].seqs[s]).collect();
        let result = guarded(|| super::second_core::pass(|| model.forward(&batch)));
        match result {
            Ok(vectors) if vectors.len() == chunk.len() => {
                for (&(j, s), v) in chunk.iter().zip(vectors) {
                    outputs[j][s] = Some(v);
                }
            }
            Ok(vectors) => {
                let e = ModelError::Forward(format!(
                    "{} outputs for {} inputs",
                    vectors.len(),
                    chunk.len()
                ));
                chunk
                    .iter()
                    .for_each(|&(j, _)| failures[j] = Some(e.clone()));
            }
            Err(e) => chunk
                .iter()
                .for_each(|&(j, _)| failures[j] = Some(e.clone())),
        }
    }
    metrics::histogram!("aitier_embedding_batch_size", "model" => label.clone())
        .record(order.len() as f64);
    metrics::histogram!("aitier_embedding_batch_duration_seconds", "model" => label.clone())
        .record(started.elapsed().as_secs_f64());
    let tokens: usize = jobs.iter().map(Prepared::tokens).sum();
    metrics::counter!("aitier_embedding_tokens_total", "model" => label).increment(tokens as u64);
    tracing::debug!(
        model = %config.name,
        requests = jobs.len(),
        sequences = order.len(),
        passes,
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "batch done"
    );
    for ((job, outs), failure) in jobs.into_iter().zip(outputs).zip(failures) {
        let result = match failure {
            Some(e) => Err(e),
            None => Ok(job
                .seqs
                .into_iter()
                .zip(outs)
                .map(|(seq, v)| Pooled {
                    vector: v.unwrap_or_default(),
                    tokens: seq.ids.len(),
                    truncated: seq.truncated,
                })
                .collect()),
        };
        let _ = job.reply.send(result);
    }
}

/// Splits length-sorted items into runs of at most `max_batch_size` items whose padded size
/// (count x longest) stays within `max_batch_tokens`; an item longer than that runs alone.
fn sub_batches<'a, T>(
    sorted: &'a [T],
    len: impl Fn(&T) -> usize,
    config: &BatchConfig,
) -> Vec<&'a [T]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    for i in 0..sorted.len() {
        let count = i - start + 1;
        if count > 1
            && (count > config.max_batch_size || count * len(&sorted[i]) > config.max_batch_tokens)
        {
            chunks.push(&sorted[start..i]);
            start = i;
        }
    }
    if start < sorted.len() {
        chunks.push(&sorted[start..]);
    }
    chunks
}

/// `f`'s result, or its panic as [`ModelError::Panic`].
fn guarded<T>(f: impl FnOnce() -> Result<T, ModelError>) -> Result<T, ModelError> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|panic| Err(ModelError::Panic(panic_message(panic.as_ref()))))
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records each forward pass's batch size; sleeps to let requests pile up; panics on "boom".
    struct Recorder {
        batches: Mutex<Vec<usize>>,
        threads: Mutex<std::collections::HashSet<String>>,
        delay: Duration,
    }

    impl SequenceModel for Recorder {
        fn tokenize(&self, text: &str) -> Result<Tokenized, ModelError> {
            if text == "panic" {
                panic!("a tokenizer bug");
            }
            let ids: Vec<u32> = text.bytes().map(u32::from).collect();
            Ok(Tokenized {
                type_ids: vec![0; ids.len()],
                ids,
                truncated: false,
            })
        }
        fn forward(&self, batch: &[&Tokenized]) -> Result<Vec<Vec<f32>>, ModelError> {
            if batch.iter().any(|t| t.ids == b"boom".map(u32::from)) {
                panic!("boom");
            }
            self.batches.lock().unwrap().push(batch.len());
            let thread = std::thread::current()
                .name()
                .unwrap_or_default()
                .to_string();
            self.threads.lock().unwrap().insert(thread);
            std::thread::sleep(self.delay);
            Ok(batch.iter().map(|t| vec![t.ids.len() as f32]).collect())
        }
        fn dims(&self) -> usize {
            1
        }
    }

    fn config(queue_capacity: usize) -> BatchConfig {
        BatchConfig {
            name: "test".into(),
            max_batch_size: 8,
            max_batch_tokens: 1000,
            max_wait: Duration::from_millis(20),
            queue_capacity,
            workers: 1,
        }
    }

    fn recorder(delay_ms: u64) -> Arc<Recorder> {
        Arc::new(Recorder {
            batches: Mutex::new(Vec::new()),
            threads: Mutex::new(Default::default()),
            delay: Duration::from_millis(delay_ms),
        })
    }

    #[tokio::test]
    async fn concurrent_requests_share_a_forward_pass_and_get_their_own_answers() {
        // While the first pass runs, the others queue and share the next.
        let model = recorder(20);
        let batcher = Batcher::spawn(model.clone(), config(64)).unwrap();
        let answers = futures::future::join_all((1..=6).map(|n| {
            let batcher = batcher.clone();
            async move { batcher.run(vec!["x".repeat(n)]).await.unwrap() }
        }))
        .await;
        for (n, answer) in (1..=6).zip(answers) {
            assert_eq!(answer[0].vector, vec![n as f32]);
            assert_eq!(answer[0].tokens, n);
        }
        let batches = model.batches.lock().unwrap().clone();
        assert!(batches.len() < 6, "no batching happened: {batches:?}");
    }

    #[tokio::test]
    async fn a_lone_request_on_an_idle_server_does_not_wait_for_company() {
        let mut config = config(64);
        config.max_wait = Duration::from_secs(5);
        config.workers = 2;
        let batcher = Batcher::spawn(recorder(0), config).unwrap();
        let start = Instant::now();
        batcher.run(vec!["alone".into()]).await.unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "waited {:?} for company",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn while_a_batch_runs_the_next_one_waits_for_company() {
        let model = recorder(300);
        let mut config = config(64);
        config.max_wait = Duration::from_millis(150);
        config.workers = 2;
        let batcher = Batcher::spawn(model.clone(), config).unwrap();
        let send = |text: &str| {
            let (b, text) = (batcher.clone(), text.to_string());
            tokio::spawn(async move { b.run(vec![text]).await })
        };
        let first = send("a");
        tokio::time::sleep(Duration::from_millis(30)).await; // one worker now runs "a"
        let second = send("b");
        tokio::time::sleep(Duration::from_millis(30)).await;
        let third = send("c");
        for answer in [first, second, third] {
            assert!(answer.await.unwrap().is_ok());
        }
        assert_eq!(*model.batches.lock().unwrap(), vec![1, 2]);
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_at_once() {
        let batcher = Batcher::spawn(recorder(300), config(1)).unwrap();
        let busy = tokio::spawn({
            let b = batcher.clone();
            async move { b.run(vec!["a".into()]).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await; // the worker is now busy
        let queued = tokio::spawn({
            let b = batcher.clone();
            async move { b.run(vec!["b".into()]).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let refused = batcher.run(vec!["c".into()]).await;
        assert!(matches!(refused, Err(InferenceError::Overloaded { .. })));
        assert!(busy.await.unwrap().is_ok());
        assert!(queued.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_tokenizer_that_panics_fails_its_request_alone_inline_or_on_the_blocking_pool() {
        let batcher = Batcher::spawn(recorder(0), config(64)).unwrap();
        let long = "x".repeat(TOKENIZE_INLINE_BYTES);
        for texts in [
            vec!["panic".to_string()],
            vec![long.clone(), "panic".into()],
        ] {
            let failed = batcher.run(texts).await;
            assert!(
                matches!(failed, Err(InferenceError::Model(ModelError::Panic(_)))),
                "{failed:?}"
            );
        }
        // Nothing of the failed requests stays counted against the queue.
        assert_eq!(batcher.waiting.load(Ordering::SeqCst), 0);
        let answers = batcher.run(vec!["fine".into(), long]).await.unwrap();
        assert_eq!(answers[1].tokens, TOKENIZE_INLINE_BYTES);
    }

    #[tokio::test]
    async fn a_panicking_model_fails_the_request_and_the_worker_lives_on() {
        let batcher = Batcher::spawn(recorder(0), config(8)).unwrap();
        let failed = batcher.run(vec!["boom".into()]).await;
        assert!(matches!(
            failed,
            Err(InferenceError::Model(ModelError::Panic(_)))
        ));
        assert!(batcher.run(vec!["fine".into()]).await.is_ok());
    }

    #[tokio::test]
    async fn workers_run_batches_side_by_side() {
        let model = recorder(50);
        let mut config = config(64);
        config.max_batch_size = 1;
        config.workers = 2;
        let batcher = Batcher::spawn(model.clone(), config).unwrap();
        let answers = futures::future::join_all((1..=4).map(|n| {
            let batcher = batcher.clone();
            async move { batcher.run(vec!["y".repeat(n)]).await.unwrap() }
        }))
        .await;
        for (n, answer) in (1..=4).zip(answers) {
            assert_eq!(answer[0].vector, vec![n as f32]);
        }
        let threads = model.threads.lock().unwrap().clone();
        assert_eq!(threads.len(), 2, "{threads:?}");
    }

    #[tokio::test]
    async fn a_job_left_over_from_a_full_batch_is_served_without_new_traffic() {
        // Two jobs of two texts with room for three: the second is carried over; the other worker
        // must pick it up although no third request ever comes.
        let model = recorder(30);
        let mut config = config(64);
        config.max_batch_size = 3;
        config.workers = 2;
        let batcher = Batcher::spawn(model, config).unwrap();
        let all = futures::future::join_all((1..=2).map(|n| {
            let batcher = batcher.clone();
            async move { batcher.run(vec!["z".repeat(n), "zz".into()]).await }
        }));
        let answers = tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .expect("a carried job waited for traffic that never came");
        assert!(answers.iter().all(Result::is_ok));
    }

    #[test]
    fn sub_batches_respect_both_limits() {
        let lens = [1, 1, 2, 3, 100, 400, 900, 2000];
        let chunks = sub_batches(&lens, |&l| l, &config(1));
        let sizes: Vec<Vec<usize>> = chunks.iter().map(|c| c.to_vec()).collect();
        assert_eq!(
            sizes,
            vec![vec![1, 1, 2, 3, 100], vec![400], vec![900], vec![2000]]
        );
    }
}
