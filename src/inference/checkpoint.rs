//! Opening a transformers checkpoint: its `config.json`, its weights, its tokenizer (truncating at
//! the model's maximum length and flagging what it cut).

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde_json::Value;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::encoder::EncoderConfig;
use super::source::{ModelFiles, Weights};
use super::{ModelError, Tokenized};

pub struct Checkpoint {
    pub config: Value,
    pub encoder: EncoderConfig,
    pub weights: VarBuilder<'static>,
}

fn load_err(what: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Load(format!("{what}: {e}"))
}

pub fn read_json(path: &std::path::Path) -> Result<Value, ModelError> {
    let bytes = std::fs::read(path).map_err(|e| load_err(&path.display().to_string(), e))?;
    serde_json::from_slice(&bytes).map_err(|e| load_err(&path.display().to_string(), e))
}

pub fn open(files: &ModelFiles) -> Result<Checkpoint, ModelError> {
    let config = read_json(&files.config)?;
    let encoder = EncoderConfig::from_json(&config).map_err(|e| load_err("config.json", e))?;
    let device = Device::Cpu;
    let weights = match &files.weights {
        // SAFETY: candle memory-maps the weights file; it must not be modified while the model is
        // loaded, which holds for model files that aitier only reads.
        Weights::Safetensors(path) => unsafe {
            VarBuilder::from_mmaped_safetensors(std::slice::from_ref(path), DType::F32, &device)
        },
        Weights::PyTorch(path) => VarBuilder::from_pth(path, DType::F32, &device),
    }
    .map_err(|e| load_err("weights", e))?;
    Ok(Checkpoint {
        config,
        encoder,
        weights,
    })
}

/// The tokenizer, without padding, truncating at `max_tokens`.
pub fn tokenizer(files: &ModelFiles, max_tokens: usize) -> Result<Tokenizer, ModelError> {
    let mut tokenizer =
        Tokenizer::from_file(&files.tokenizer).map_err(|e| load_err("tokenizer.json", e))?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_tokens,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .map_err(|e| load_err("tokenizer truncation", e))?;
    Ok(tokenizer)
}

pub fn tokenize(tokenizer: &Tokenizer, text: &str) -> Result<Tokenized, ModelError> {
    let encoding = tokenizer
        .encode(text, true)
        .map_err(|e| ModelError::Tokenize(e.to_string()))?;
    Ok(Tokenized {
        truncated: !encoding.get_overflowing().is_empty(),
        ids: encoding.get_ids().to_vec(),
        type_ids: encoding.get_type_ids().to_vec(),
    })
}
