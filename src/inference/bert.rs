//! BERT-family sentence embeddings with candle: masked mean (or CLS) pooling over the last hidden state.

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config;
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::encoder::{Batch, Encoder, first_token, mean_pool};
use super::source::{ModelFiles, Weights};
use super::{ModelError, SequenceModel, Tokenized};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pooling {
    Mean,
    Cls,
}

/// sentence-transformers' `1_Pooling/config.json`, the two modes aitier supports.
#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
}

#[derive(Deserialize)]
struct SentenceConfig {
    max_seq_length: Option<usize>,
}

pub struct BertEmbedder {
    model: Encoder,
    tokenizer: Tokenizer,
    pooling: Pooling,
    hidden: usize,
    max_tokens: usize,
}

impl BertEmbedder {
    pub fn load(files: &ModelFiles) -> Result<Self, ModelError> {
        let load_err =
            |what: &str, e: &dyn std::fmt::Display| ModelError::Load(format!("{what}: {e}"));
        let config: Config = read_json(&files.config).map_err(|e| load_err("config.json", &e))?;
        let device = Device::Cpu;
        let vb = match &files.weights {
            // SAFETY: candle memory-maps the weights file; it must not be modified while the model
            // is loaded, which holds for model files that aitier only reads.
            Weights::Safetensors(path) => unsafe {
                VarBuilder::from_mmaped_safetensors(std::slice::from_ref(path), DType::F32, &device)
            },
            Weights::PyTorch(path) => VarBuilder::from_pth(path, DType::F32, &device),
        }
        .map_err(|e| load_err("weights", &e))?;
        let model = Encoder::load(vb, &config).map_err(|e| load_err("weights", &e))?;

        let max_positions = config.max_position_embeddings;
        let max_tokens = match &files.sentence_config {
            Some(path) => read_json::<SentenceConfig>(path)
                .map_err(|e| load_err("sentence_bert_config.json", &e))?
                .max_seq_length
                .unwrap_or(max_positions)
                .min(max_positions),
            None => max_positions,
        };
        let pooling = match &files.pooling {
            Some(path) => {
                let cfg: PoolingConfig =
                    read_json(path).map_err(|e| load_err("1_Pooling/config.json", &e))?;
                if cfg.pooling_mode_cls_token {
                    Pooling::Cls
                } else {
                    Pooling::Mean
                }
            }
            None => Pooling::Mean,
        };

        let mut tokenizer =
            Tokenizer::from_file(&files.tokenizer).map_err(|e| load_err("tokenizer.json", &e))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| load_err("tokenizer truncation", &e))?;
        Ok(Self {
            model,
            tokenizer,
            pooling,
            hidden: config.hidden_size,
            max_tokens,
        })
    }

    /// Longest input in tokens; longer texts are truncated.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &std::path::Path) -> anyhow::Result<T> {
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

impl SequenceModel for BertEmbedder {
    fn tokenize(&self, text: &str) -> Result<Tokenized, ModelError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Tokenize(e.to_string()))?;
        Ok(Tokenized {
            truncated: !encoding.get_overflowing().is_empty(),
            ids: encoding.get_ids().to_vec(),
            type_ids: encoding.get_type_ids().to_vec(),
        })
    }

    fn forward(&self, batch: &[&Tokenized]) -> Result<Vec<Vec<f32>>, ModelError> {
        let lens: Vec<usize> = batch.iter().map(|t| t.ids.len()).collect();
        let packed = self.model.forward(&Batch {
            ids: batch.iter().map(|t| t.ids.as_slice()).collect(),
            type_ids: batch.iter().map(|t| t.type_ids.as_slice()).collect(),
        })?;
        let pooled = match self.pooling {
            Pooling::Cls => first_token(&packed, &lens)?,
            Pooling::Mean => mean_pool(&packed, &lens)?,
        };
        Ok(pooled.to_vec2::<f32>()?)
    }

    fn dims(&self) -> usize {
        self.hidden
    }
}
