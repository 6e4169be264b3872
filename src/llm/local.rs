//! The local chat model: a GGUF llama-architecture model run by candle's quantized kernels.
//! Tensors in a quantisation without a fast candle kernel (Q4_1, Q5_0, Q5_1) are requantised to
//! Q8_0 at load: on SmolLM2 that took decoding from ≈25 to ≈73 tokens/s with the same greedy output
//! (../shared/FINDINGS.md).

use std::io::Cursor;
use std::ops::ControlFlow;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::ModelWeights;
use tokenizers::Tokenizer;

use super::LlmError;
use super::gguf_tokenizer::tokenizer_from_gguf;
use super::template::{ChatMessage, ChatTemplate};

/// Tokens that end an assistant turn in common chat templates, besides the declared eos.
const END_OF_TURN: [&str; 3] = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"];

#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_tokens: usize,
    /// `None` or 0: greedy.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// The same seed gives the same text; `None` draws one.
    pub seed: Option<u64>,
    /// 1.0 turns it off; greedy decoding of small models loops without one.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// Generation stops before any of these; they are not part of the answer.
    pub stop: Vec<String>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: None,
            top_p: None,
            seed: None,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            stop: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End of turn or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The consumer asked to stop (a client went away).
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

pub struct LocalModel {
    /// Never run: each generation clones it (the weights are shared) for a fresh KV cache.
    pristine: ModelWeights,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    end_of_turn: Vec<u32>,
    context: usize,
    device: Device,
}

fn metadata_u32(content: &Content, key: &str) -> Option<u32> {
    content.metadata.get(key).and_then(|v| v.to_u32().ok())
}

impl LocalModel {
    pub fn load(path: &Path) -> Result<Self, LlmError> {
        let device = Device::Cpu;
        let load = |e: &dyn std::fmt::Display| LlmError::Load(format!("{}: {e}", path.display()));
        let mut file = std::fs::File::open(path).map_err(|e| load(&e))?;
        let content = Content::read(&mut file).map_err(|e| load(&e))?;
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

        // Requantise the tensors candle has no fast kernel for, then load from the rewritten file.
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
        let mut requantised = 0;
        for name in names {
            let tensor = content
                .tensor(&mut file, name, &device)
                .map_err(|e| load(&e))?;
            let tensor = match tensor.dtype() {
                GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
                    requantised += 1;
                    QTensor::quantize(&tensor.dequantize(&device)?, GgmlDType::Q8_0)?
                }
                _ => tensor,
            };
            tensors.push((name.clone(), tensor));
        }
        if requantised > 0 {
            tracing::info!(
                model = %path.display(),
                tensors = requantised,
                "requantised Q4_1/Q5_x tensors to Q8_0: candle has no fast kernel for them"
            );
        }
        let metadata: Vec<(&str, &Value)> = content
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut rewritten = Cursor::new(Vec::new());
        gguf_file::write(&mut rewritten, &metadata, &refs)?;
        drop(tensors);
        rewritten.set_position(0);
        let content = Content::read(&mut rewritten)?;
        let pristine = ModelWeights::from_gguf(content, &mut rewritten, &device)?;
        Ok(Self {
            pristine,
            tokenizer,
            template,
            end_of_turn,
            context,
            device,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn context_length(&self) -> usize {
        self.context
    }

    /// The prompt the chat template makes of `messages`.
    pub fn prompt(&self, messages: &[ChatMessage]) -> Result<String, LlmError> {
        self.template.render(messages)
    }

    /// The prompt's length in tokens, or `ContextExceeded` when it and `max_tokens` do not fit.
    pub fn check(&self, messages: &[ChatMessage], max_tokens: usize) -> Result<usize, LlmError> {
        let prompt = self.prompt(messages)?;
        let tokens = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?
            .len();
        if tokens + max_tokens > self.context {
            return Err(LlmError::ContextExceeded {
                prompt: tokens,
                max_tokens,
                context: self.context,
            });
        }
        Ok(tokens)
    }

    /// Generates the assistant's answer. `on_delta` gets each new piece of text (possibly empty)
    /// after every token, and stops generation by returning `Break`: a consumer that went away
    /// stops the work within one token.
    pub fn generate(
        &self,
        messages: &[ChatMessage],
        params: &GenerationParams,
        mut on_delta: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation, LlmError> {
        let prompt = self.prompt(messages)?;
        let prompt_ids = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec();
        if prompt_ids.len() + params.max_tokens > self.context {
            return Err(LlmError::ContextExceeded {
                prompt: prompt_ids.len(),
                max_tokens: params.max_tokens,
                context: self.context,
            });
        }
        let sampling = match (params.temperature.filter(|t| *t > 0.0), params.top_p) {
            (None, _) => Sampling::ArgMax,
            (Some(temperature), Some(p)) if p < 1.0 => Sampling::TopP { p, temperature },
            (Some(temperature), _) => Sampling::All { temperature },
        };
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        let mut sampler = LogitsProcessor::from_sampling(seed, sampling);
        let mut model = self.pristine.clone();
        let mut context = prompt_ids.clone();
        let input = Tensor::new(prompt_ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let mut logits = model.forward(&input, 0)?.squeeze(0)?;
        // Text not yet handed out: the tail that could still become a stop string waits.
        let hold = params.stop.iter().map(String::len).max().unwrap_or(1) - 1;
        let (mut generated, mut emitted, mut text) = (Vec::new(), 0usize, String::new());
        let finish = loop {
            if generated.len() >= params.max_tokens {
                break FinishReason::Length;
            }
            let scored = if params.repeat_penalty == 1.0 {
                logits.clone()
            } else {
                let recent = &context[context.len().saturating_sub(params.repeat_last_n)..];
                candle_transformers::utils::apply_repeat_penalty(
                    &logits,
                    params.repeat_penalty,
                    recent,
                )?
            };
            let next = sampler.sample(&scored)?;
            if self.end_of_turn.contains(&next) {
                break FinishReason::Stop;
            }
            generated.push(next);
            context.push(next);
            text = self
                .tokenizer
                .decode(&generated, true)
                .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
            if let Some(at) = params
                .stop
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(at);
                break FinishReason::Stop;
            }
            // A multi-byte character split across tokens decodes as U+FFFD until it is whole.
            let mut end = if text.ends_with('\u{FFFD}') {
                emitted
            } else {
                text.len().saturating_sub(hold).max(emitted)
            };
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let delta = &text[emitted.min(end)..end];
            emitted = end.max(emitted);
            if on_delta(delta).is_break() {
                break FinishReason::Cancelled;
            }
            let input = Tensor::new(&[next], &self.device)?.unsqueeze(0)?;
            logits = model.forward(&input, context.len() - 1)?.squeeze(0)?;
        };
        if finish != FinishReason::Cancelled && emitted < text.len() {
            let _ = on_delta(&text[emitted..]);
        }
        Ok(Generation {
            text,
            finish_reason: finish,
            prompt_tokens: prompt_ids.len(),
            completion_tokens: generated.len(),
        })
    }
}
