//! Admission and streaming for the local chat model: a bounded number of generations run at once
//! (each on a blocking thread), a bounded number wait; beyond that a request is refused before its
//! stream starts. Deltas flow through a small channel; when the client goes away the channel
//! closes and the generation stops at its next token.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::{ChatMessage, Generation, GenerationParams, LlmError, LocalModel};

/// What a generation stream carries.
#[derive(Debug)]
pub enum ChatEvent {
    /// Not running yet: waiting for a free generation slot.
    Queued,
    Delta(String),
    Done(Generation),
    Error(String),
}

pub struct ChatService {
    name: String,
    model: Arc<LocalModel>,
    /// Generations running at once.
    running: Arc<Semaphore>,
    /// Generations admitted (running or waiting).
    admitted: Arc<Semaphore>,
    /// Generations running now (a gauge for tests and logs).
    active: Arc<AtomicUsize>,
}

/// A place in the line, taken before the stream starts; released when dropped.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
}

impl ChatService {
    pub fn new(name: String, model: LocalModel, concurrent: usize, queue: usize) -> Self {
        Self {
            name,
            model: Arc::new(model),
            running: Arc::new(Semaphore::new(concurrent.max(1))),
            admitted: Arc::new(Semaphore::new(concurrent.max(1) + queue)),
            active: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn model(&self) -> &Arc<LocalModel> {
        &self.model
    }

    /// Generations running now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
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
        // A few deltas of slack: the generation never waits long on a slow reader, and a closed
        // channel is noticed at the next token.
        let (tx, rx) = mpsc::channel(16);
        let (model, running, active) = (
            self.model.clone(),
            self.running.clone(),
            self.active.clone(),
        );
        tokio::spawn(async move {
            let _admission = admission;
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
            let worker = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                active.fetch_add(1, Ordering::SeqCst);
                let result = model.generate(&messages, &params, |delta| {
                    if delta.is_empty() {
                        return if tx.is_closed() {
                            ControlFlow::Break(())
                        } else {
                            ControlFlow::Continue(())
                        };
                    }
                    match tx.blocking_send(ChatEvent::Delta(delta.to_string())) {
                        Ok(()) => ControlFlow::Continue(()),
                        Err(_) => ControlFlow::Break(()),
                    }
                });
                active.fetch_sub(1, Ordering::SeqCst);
                let last = match result {
                    Ok(generation) => ChatEvent::Done(generation),
                    Err(e) => ChatEvent::Error(e.to_string()),
                };
                let _ = tx.blocking_send(last);
            });
            if let Err(e) = worker.await {
                tracing::error!(error = %e, "generation task failed");
            }
        });
        rx
    }
}
