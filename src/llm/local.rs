//! The local chat model: a GGUF llama-architecture model run by our own int8 kernels on its stored
//! Q4_0 / Q4_1 / Q8_0 weights (other types are converted to Q8_0 at load).

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use tokenizers::Tokenizer;

use super::LlmError;
use super::decode::{Decoder, FinishReason, Generation, GenerationParams, Step};
use super::gguf_tokenizer::tokenizer_from_gguf;
use super::kernels::Isa;
use super::llama::{Input, Llama};
use super::template::{ChatMessage, ChatTemplate};

/// Tokens that end an assistant turn in common chat templates, besides the declared eos.
const END_OF_TURN: [&str; 3] = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"];

pub struct LocalModel {
    /// The weights; every sequence brings its own KV cache.
    llama: Llama,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    end_of_turn: Vec<u32>,
    context: usize,
    /// Put first in a conversation that has no system message (`None`: the template decides).
    system_prompt: Option<String>,
}

/// The system message a local model is given when a conversation has none (see
/// `--chat-system-prompt`).
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";

fn metadata_u32(content: &Content, key: &str) -> Option<u32> {
    content.metadata.get(key).and_then(|v| v.to_u32().ok())
}

impl LocalModel {
    pub fn load(path: &Path) -> Result<Self, LlmError> {
        let load = |e: &dyn std::fmt::Display| LlmError::Load(format!("{}: {e}", path.display()));
        let mut reader = std::io::BufReader::new(std::fs::File::open(path).map_err(|e| load(&e))?);
        let content = Content::read(&mut reader).map_err(|e| load(&e))?;
        let tokenizer = tokenizer_from_gguf(&content)?;
        let token =
            |key: &str| metadata_u32(&content, key).and_then(|id| tokenizer.id_to_token(id));
        let template = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| {
                LlmError::Load("the GGUF metadata has no tokenizer.chat_template".into())
            })?;
        let template = ChatTemplate::new(
            template.clone(),
            token("tokenizer.ggml.bos_token_id").unwrap_or_default(),
            token("tokenizer.ggml.eos_token_id").unwrap_or_default(),
        )?;
        let mut end_of_turn: Vec<u32> = END_OF_TURN
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        end_of_turn.extend(metadata_u32(&content, "tokenizer.ggml.eos_token_id"));
        let context = content
            .metadata
            .iter()
            .find(|(k, _)| k.ends_with(".context_length"))
            .and_then(|(_, v)| v.to_u32().ok())
            .unwrap_or(2048) as usize;
        let isa = Isa::detect();
        let llama = Llama::from_gguf(&content, &mut reader, isa)?;
        tracing::info!(
            model = %path.display(),
            layers = llama.config().n_layer,
            kernels = ?isa,
            "chat model loaded"
        );
        Ok(Self {
            llama,
            tokenizer,
            template,
            end_of_turn,
            context,
            system_prompt: Some(DEFAULT_SYSTEM_PROMPT.to_string()),
        })
    }

    /// Threads the forward pass splits its matmuls over (default 1).
    pub fn set_threads(&mut self, threads: usize) {
        self.llama.set_threads(threads);
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn context_length(&self) -> usize {
        self.context
    }

    /// Serves at most `tokens` of context, prompt and answer together (never more than the
    /// model's own).
    pub fn limit_context(&mut self, tokens: usize) {
        self.context = self.context.min(tokens);
    }

    /// The system message put first in a conversation that has none; `None` leaves it to the
    /// chat template (some add their own). [`DEFAULT_SYSTEM_PROMPT`] after `load`.
    pub fn set_system_prompt(&mut self, system_prompt: Option<String>) {
        self.system_prompt = system_prompt;
    }

    /// The prompt the chat template makes of `messages`.
    pub fn prompt(&self, messages: &[ChatMessage]) -> Result<String, LlmError> {
        match &self.system_prompt {
            Some(system) if messages.first().is_none_or(|m| m.role != "system") => {
                let mut with_system = Vec::with_capacity(messages.len() + 1);
                with_system.push(ChatMessage::new("system", system));
                with_system.extend_from_slice(messages);
                // Some templates refuse a system message (Gemma's, Mistral's "roles must
                // alternate"): the conversation then goes as it came.
                self.template
                    .render(&with_system)
                    .or_else(|_| self.template.render(messages))
            }
            _ => self.template.render(messages),
        }
    }

    /// The prompt's length in tokens, or `ContextExceeded` when it and `max_tokens` do not fit.
    pub fn check(&self, messages: &[ChatMessage], max_tokens: usize) -> Result<usize, LlmError> {
        Ok(self.prompt_ids(messages, max_tokens)?.len())
    }

    /// The tokens of `text` as it is, without a template.
    pub fn tokens(&self, text: &str) -> Result<Vec<u32>, LlmError> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// The tokens of the prompt the chat template makes of `messages`, however long.
    pub fn prompt_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, LlmError> {
        self.tokens(&self.prompt(messages)?)
    }

    /// The prompt's tokens, or `ContextExceeded` when they and `max_tokens` do not fit.
    pub(crate) fn prompt_ids(
        &self,
        messages: &[ChatMessage],
        max_tokens: usize,
    ) -> Result<Vec<u32>, LlmError> {
        let ids = self.prompt_tokens(messages)?;
        if ids.len() + max_tokens > self.context {
            return Err(LlmError::ContextExceeded {
                prompt: ids.len(),
                max_tokens,
                context: self.context,
            });
        }
        Ok(ids)
    }

    pub(crate) fn llama(&self) -> &Llama {
        &self.llama
    }

    pub(crate) fn end_of_turn(&self) -> &[u32] {
        &self.end_of_turn
    }

    /// Generates the assistant's answer, one sequence on the calling thread, from an empty cache
    /// (the engine behind [`super::ChatService`] batches sequences and reuses prompt prefixes).
    /// `on_delta` gets each new piece of text (possibly empty) after every token, and stops
    /// generation by returning `Break`: a consumer that went away stops the work within one token.
    pub fn generate(
        &self,
        messages: &[ChatMessage],
        params: &GenerationParams,
        mut on_delta: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation, LlmError> {
        let prompt = self.prompt_ids(messages, params.max_tokens)?;
        let mut decoder = Decoder::new(params.clone(), &prompt);
        let mut cache = self.llama.new_cache();
        let mut logits = self.llama.forward(&mut [Input {
            cache: &mut cache,
            tokens: &prompt,
        }])?;
        let finish = loop {
            match decoder.step(&self.tokenizer, &self.end_of_turn, &logits)? {
                Step::Finished(reason) => break reason,
                Step::Token { token, delta } => {
                    if on_delta(&delta).is_break() {
                        break FinishReason::Cancelled;
                    }
                    if decoder.exhausted() {
                        break FinishReason::Length;
                    }
                    logits = self.llama.forward(&mut [Input {
                        cache: &mut cache,
                        tokens: &[token],
                    }])?;
                }
            }
        };
        let (tail, generation) = decoder.finish(finish);
        if let Some(tail) = tail {
            let _ = on_delta(&tail);
        }
        Ok(generation)
    }
}
