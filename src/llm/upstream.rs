//! The upstream provider: any OpenAI-compatible server (OpenAI, vLLM, llama.cpp's server, another
//! aitier) through async-openai. Its stream is relayed as [`ChatEvent`]s; every way it can fail
//! ends in an error the client sees: a refused or unreachable upstream before the stream starts
//! (502), a silent one (504), and mid-stream an `error` event — a cut stream, a malformed chunk, a
//! chunk that does not come in time. A client that goes away drops the upstream request.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionStreamOptions, CreateChatCompletionRequest, FinishReason as UpstreamFinish,
    StopConfiguration,
};
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

use super::provider::{ChatError, ChatProvider, ChatStream};
use super::{ChatEvent, ChatMessage, FinishReason, Generation, GenerationParams};

/// OpenAI's API, when only a key is configured.
const OPENAI_API: &str = "https://api.openai.com/v1";

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub base_url: Option<String>,
    pub api_key: Option<String>,
    /// Model names served upstream; a trailing `*` makes an entry a prefix; empty: every name.
    pub models: Vec<String>,
    /// Longest wait for the response to start and between two chunks.
    pub timeout: Duration,
    /// Longest a whole generation may take.
    pub deadline: Duration,
}

pub struct Upstream {
    client: Client<OpenAIConfig>,
    base_url: String,
    models: Vec<String>,
    timeout: Duration,
    deadline: Duration,
    /// Upstream streams being relayed now (a gauge for tests and logs).
    active: Arc<AtomicUsize>,
}

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Self {
        let base_url = config
            .base_url
            .unwrap_or_else(|| OPENAI_API.into())
            .trim_end_matches('/')
            .to_string();
        let client = Client::with_config(
            OpenAIConfig::new()
                .with_api_base(&base_url)
                .with_api_key(config.api_key.unwrap_or_default()),
        );
        Self {
            client,
            base_url,
            models: config
                .models
                .into_iter()
                .map(|m| m.trim().to_string())
                .filter(|m| !m.is_empty())
                .collect(),
            timeout: config.timeout,
            deadline: config.deadline,
            active: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Whether requests for `model` go to this upstream.
    pub fn serves(&self, model: &str) -> bool {
        self.models.is_empty()
            || self.models.iter().any(|m| match m.strip_suffix('*') {
                Some(prefix) => model.starts_with(prefix),
                None => m == model,
            })
    }

    /// The model a request without `model` gets when there is no local model: the first one
    /// named exactly in the configuration.
    pub fn default_model(&self) -> Option<&str> {
        self.models
            .iter()
            .map(String::as_str)
            .find(|m| !m.ends_with('*'))
    }

    /// Upstream streams being relayed now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// The upstream's chat models this server routes to it: the configured names, and whatever
    /// the upstream lists that the routing sends its way. An upstream that cannot list them in
    /// time contributes the configured names only.
    pub async fn models(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .models
            .iter()
            .filter(|m| !m.ends_with('*'))
            .cloned()
            .collect();
        if self.models.is_empty() || self.models.iter().any(|m| m.ends_with('*')) {
            match timeout(self.timeout, self.client.models().list()).await {
                Ok(Ok(list)) => names.extend(
                    list.data
                        .into_iter()
                        .map(|m| m.id)
                        .filter(|id| self.serves(id) && !self.models.contains(id)),
                ),
                Ok(Err(e)) => {
                    tracing::warn!(upstream = %self.base_url, error = %e, "listing upstream models failed")
                }
                Err(_) => {
                    tracing::warn!(upstream = %self.base_url, "listing upstream models timed out")
                }
            }
        }
        names
    }

    #[allow(deprecated)] // `seed` and `max_tokens`: still what most compatible servers read
    fn request(
        model: String,
        messages: Vec<ChatMessage>,
        params: &GenerationParams,
    ) -> CreateChatCompletionRequest {
        let messages = messages
            .into_iter()
            .map(|m| match m.role.as_str() {
                "system" => ChatCompletionRequestMessage::System(
                    ChatCompletionRequestSystemMessage::from(m.content.as_str()),
                ),
                "assistant" => ChatCompletionRequestMessage::Assistant(
                    ChatCompletionRequestAssistantMessage::from(m.content.as_str()),
                ),
                _ => ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage::from(
                    m.content,
                )),
            })
            .collect();
        CreateChatCompletionRequest {
            model,
            messages,
            // `max_tokens` too: older OpenAI-compatible servers know only that one.
            max_completion_tokens: Some(params.max_tokens as u32),
            max_tokens: Some(params.max_tokens as u32),
            temperature: params.temperature.map(|t| t as f32),
            top_p: params.top_p.map(|p| p as f32),
            seed: params.seed.map(|s| s as i64),
            stop: (!params.stop.is_empty())
                .then(|| StopConfiguration::StringArray(params.stop.clone())),
            stream: Some(true),
            stream_options: Some(ChatCompletionStreamOptions {
                include_usage: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn failure(&self, error: OpenAIError) -> ChatError {
        match error {
            OpenAIError::Reqwest(e) if e.is_timeout() => self.too_slow(),
            OpenAIError::Reqwest(e) => ChatError::Upstream(format!(
                "The chat upstream {} could not be reached: {}",
                self.base_url,
                chain(&e)
            )),
            OpenAIError::ApiError(e) => ChatError::Upstream(format!(
                "The chat upstream answered {}: {}",
                e.status_code, e.api_error.message
            )),
            other => ChatError::Upstream(format!("The chat upstream failed: {other}")),
        }
    }

    fn too_slow(&self) -> ChatError {
        ChatError::UpstreamTimeout(format!(
            "The chat upstream {} did not answer within {} s",
            self.base_url,
            self.timeout.as_secs()
        ))
    }
}

/// An error and its causes, `: `-separated (reqwest hides "connection refused" in a source).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl ChatProvider for Upstream {
    fn start(
        &self,
        model: String,
        messages: Vec<ChatMessage>,
        params: GenerationParams,
    ) -> BoxFuture<'_, Result<ChatStream, ChatError>> {
        Box::pin(async move {
            let deadline = Instant::now() + self.deadline;
            let request = Self::request(model, messages, &params);
            let mut upstream = timeout(
                self.timeout.min(self.deadline),
                self.client.chat().create_stream(request),
            )
            .await
            .map_err(|_| self.too_slow())?
            .map_err(|e| self.failure(e))?;
            let (tx, rx) = mpsc::channel(16);
            let (wait, active) = (self.timeout, self.active.clone());
            active.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let outcome = relay(&mut upstream, &tx, wait, deadline).await;
                // Dropping the stream drops the upstream request.
                drop(upstream);
                active.fetch_sub(1, Ordering::SeqCst);
                if let Some(last) = outcome {
                    let _ = tx.send(last).await;
                }
            });
            Ok(rx)
        })
    }
}

/// Forwards the upstream's deltas; returns the last event to send (`None` when the client left).
async fn relay(
    upstream: &mut async_openai::types::chat::ChatCompletionResponseStream,
    tx: &mpsc::Sender<ChatEvent>,
    wait: Duration,
    deadline: Instant,
) -> Option<ChatEvent> {
    let (mut text, mut pieces, mut usage, mut finish) = (String::new(), 0, None, None);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = tokio::select! {
            () = tx.closed() => return None,
            next = timeout(wait.min(left), upstream.next()) => next,
        };
        let chunk = match next {
            Err(_) if left <= wait => {
                return Some(ChatEvent::Error(
                    "The chat upstream took longer than the deadline for a whole answer".into(),
                ));
            }
            Err(_) => {
                return Some(ChatEvent::Error(format!(
                    "The chat upstream sent nothing for {} s",
                    wait.as_secs()
                )));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Some(ChatEvent::Error(format!(
                    "The chat upstream's stream failed: {e}"
                )));
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        usage = chunk.usage.or(usage);
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            if let Some(content) = choice.delta.content.filter(|c| !c.is_empty()) {
                pieces += 1;
                text.push_str(&content);
                if tx.send(ChatEvent::Delta(content)).await.is_err() {
                    return None;
                }
            }
            finish = choice.finish_reason.or(finish);
        }
    }
    let Some(finish) = finish else {
        return Some(ChatEvent::Error(
            "The chat upstream's stream ended before the answer was complete".into(),
        ));
    };
    Some(ChatEvent::Done(Generation {
        text,
        finish_reason: match finish {
            UpstreamFinish::Length => FinishReason::Length,
            _ => FinishReason::Stop,
        },
        prompt_tokens: usage.as_ref().map_or(0, |u| u.prompt_tokens as usize),
        completion_tokens: usage.map_or(pieces, |u| u.completion_tokens as usize),
        queued: std::time::Duration::ZERO,
    }))
}
