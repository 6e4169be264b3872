//! Admission and streaming for the local chat model: up to `concurrent` generations run at once,
//! decoded together by the batching [`Engine`] thread; a bounded number wait; beyond that a request
//! is refused before its stream starts. Deltas flow through a small channel; when the client goes
//! away the channel closes and its sequence leaves the batch at the next step.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::engine::{ChatEvent, Engine, EngineStats, Job, RestartHold};
use super::{ChatMessage, GenerationParams, LlmError, LocalModel};

pub struct ChatService {
    name: String,
    model: Arc<LocalModel>,
    /// Generations running at once.
    running: Arc<Semaphore>,
    /// Generations admitted (running or waiting).
    admitted: Arc<Semaphore>,
    /// Generations running now (a gauge for tests and logs).
    active: Arc<AtomicUsize>,
    /// The sizes of `running` and `admitted`.
    concurrent: usize,
    admitted_places: usize,
    engine: Engine,
}

/// A place in the line, taken before the stream starts; released when dropped.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
}

impl ChatService {
    /// `concurrent` is also the engine's batch size: that many sequences share each decode step.
    pub fn new(name: String, model: LocalModel, concurrent: usize, queue: usize) -> Self {
        let model = Arc::new(model);
        let active = Arc::new(AtomicUsize::new(0));
        let concurrent = concurrent.max(1);
        Self {
            name,
            engine: Engine::start(model.clone(), concurrent, active.clone()),
            model,
            running: Arc::new(Semaphore::new(concurrent)),
            admitted: Arc::new(Semaphore::new(concurrent + queue)),
            active,
            concurrent,
            admitted_places: concurrent + queue,
        }
    }

    /// The engine's counters: prompt tokens prefilled and reused from the prefix cache, decode
    /// steps and the sequences they advanced.
    pub fn stats(&self) -> &EngineStats {
        &self.engine.stats
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn model(&self) -> &Arc<LocalModel> {
        &self.model
    }

    /// True from an engine panic until the engine serves again.
    pub fn restarting(&self) -> bool {
        self.engine.stats.restarting.load(Ordering::SeqCst)
    }

    /// Makes the engine panic in its next decode step: for the tests of recovery.
    #[doc(hidden)]
    pub fn inject_panic(&self) -> RestartHold {
        self.engine.inject_panic()
    }

    /// Generations running now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Admitted requests still waiting for a generation slot.
    pub fn waiting(&self) -> usize {
        let admitted = self.admitted_places - self.admitted.available_permits();
        let running = self.concurrent - self.running.available_permits();
        admitted.saturating_sub(running)
    }

    /// A place in the line, or `None` when every place is taken.
    pub fn admit(&self) -> Option<Admission> {
        self.admitted
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|permit| Admission { _permit: permit })
    }

    /// The prompt's length in tokens, or the reason it cannot be answered (too long for the
    /// context with `max_tokens`).
    pub fn check(&self, messages: &[ChatMessage], max_tokens: usize) -> Result<usize, LlmError> {
        self.model.check(messages, max_tokens)
    }

    /// Starts the generation for an admitted request; events arrive on the returned channel.
    pub fn stream(
        &self,
        admission: Admission,
        messages: Vec<ChatMessage>,
        params: GenerationParams,
    ) -> mpsc::Receiver<ChatEvent> {
        // A few deltas of slack between the forwarding task and the client; the engine itself
        // never waits on a reader (see [`Job::events`]).
        let (tx, rx) = mpsc::channel(16);
        let (events, mut from_engine) = mpsc::unbounded_channel();
        let running = self.running.clone();
        let jobs = self.engine.sender();
        let model = self.name.clone();
        tokio::spawn(async move {
            let arrived = std::time::Instant::now();
            let permit = match running.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    if tx.send(ChatEvent::Queued).await.is_err() {
                        return;
                    }
                    tokio::select! {
                        permit = running.acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => return,
                        },
                        () = tx.closed() => return,
                    }
                }
            };
            let queued = arrived.elapsed();
            metrics::histogram!("aitier_chat_queue_wait_seconds", "model" => model)
                .record(queued.as_secs_f64());
            let job = Job {
                messages,
                params,
                events,
                slot: Box::new((admission, permit)),
            };
            if jobs.send(job).is_err() {
                let _ = tx
                    .send(ChatEvent::Error("the chat engine has stopped".into()))
                    .await;
                return;
            }
            // Returning drops `from_engine`: the engine sees the closed channel and cancels.
            loop {
                tokio::select! {
                    event = from_engine.recv() => match event {
                        Some(mut event) => {
                            if let ChatEvent::Done(generation) = &mut event {
                                generation.queued = queued;
                            }
                            let last = matches!(event, ChatEvent::Done(_) | ChatEvent::Error(_));
                            if tx.send(event).await.is_err() || last {
                                return;
                            }
                        }
                        // The engine dropped the sequence without ending it: it panicked (and
                        // restarts, see `Engine`).
                        None => {
                            let _ = tx
                                .send(ChatEvent::Error(
                                    "the chat engine failed while generating this answer; try again".into(),
                                ))
                                .await;
                            return;
                        }
                    },
                    () = tx.closed() => return,
                }
            }
        });
        rx
    }
}
