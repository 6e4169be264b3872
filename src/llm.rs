//! Chat models behind one trait ([`ChatProvider`]): the local provider runs GGUF chat models with
//! candle (tokenizer and chat template from the GGUF metadata); the upstream provider relays any
//! OpenAI-compatible server through async-openai.

mod decode;
mod engine;
mod gguf_tokenizer;
mod kv;
mod linear;
mod llama;
mod local;
mod prefix;
mod provider;
mod router;
mod sampler;
mod service;
mod template;
mod upstream;

use aitier_kernels as kernels;

pub use decode::{FinishReason, Generation, GenerationParams};
pub use engine::{ChatEvent, EngineStats, RestartHold};
pub use gguf_tokenizer::tokenizer_from_gguf;
pub use kernels::{Format, Isa, QActs, QMatrix, matmul};
pub use kv::KvCache;
pub use llama::{Architecture, Input, Llama, LlamaConfig};
pub use local::{DEFAULT_SYSTEM_PROMPT, LocalModel};
pub use prefix::PrefixCache;
pub use provider::{ChatError, ChatProvider, ChatStream};
pub use router::{Local, Route, RouteError, route};
pub use service::{Admission, ChatService};
pub use template::{ChatMessage, ChatTemplate};
pub use upstream::{Upstream, UpstreamConfig};

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("could not load the model: {0}")]
    Load(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error(
        "the conversation is {prompt} tokens; with max_tokens {max_tokens} it exceeds the context of {context}"
    )]
    ContextExceeded {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<kernels::ShapeError> for LlmError {
    fn from(e: kernels::ShapeError) -> Self {
        LlmError::Load(e.0)
    }
}
