//! Chat providers behind one trait: the local GGUF model and an OpenAI-compatible upstream. Both
//! check and admit a request before its stream starts (so every refusal is a status code, not a
//! broken stream) and then deliver the same [`ChatEvent`]s over a channel whose closing stops the
//! work behind it.

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::{ChatEvent, ChatMessage, ChatService, GenerationParams, LlmError};

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The request cannot be answered as asked (a conversation too long for the context).
    #[error(transparent)]
    Invalid(LlmError),
    /// Every generation slot and queue place is taken.
    #[error("Too many chat requests for {0}; retry after 1 s")]
    Busy(String),
    /// The upstream could not be reached, refused the request or answered nonsense.
    #[error("{0}")]
    Upstream(String),
    /// The upstream did not answer in time.
    #[error("{0}")]
    UpstreamTimeout(String),
    #[error(transparent)]
    Internal(anyhow::Error),
}

/// The stream of one generation; dropping it stops the generation.
pub type ChatStream = mpsc::Receiver<ChatEvent>;

pub trait ChatProvider: Send + Sync {
    /// Checks and admits a request for `model`, then starts it. Every failure that can be known
    /// before the first token comes back here; later ones arrive as [`ChatEvent::Error`].
    fn start(
        &self,
        model: String,
        messages: Vec<ChatMessage>,
        params: GenerationParams,
    ) -> BoxFuture<'_, Result<ChatStream, ChatError>>;
}

impl ChatProvider for ChatService {
    fn start(
        &self,
        _model: String,
        messages: Vec<ChatMessage>,
        params: GenerationParams,
    ) -> BoxFuture<'_, Result<ChatStream, ChatError>> {
        Box::pin(async move {
            // Tokenizing a long conversation is CPU work: off the runtime.
            let (model, to_check, max_tokens) =
                (self.model().clone(), messages.clone(), params.max_tokens);
            tokio::task::spawn_blocking(move || model.check(&to_check, max_tokens))
                .await
                .map_err(|e| ChatError::Internal(e.into()))?
                .map_err(|e| match e {
                    e @ LlmError::ContextExceeded { .. } => ChatError::Invalid(e),
                    e => ChatError::Internal(e.into()),
                })?;
            let admission = self
                .admit()
                .ok_or_else(|| ChatError::Busy(self.name().to_string()))?;
            Ok(self.stream(admission, messages, params))
        })
    }
}
