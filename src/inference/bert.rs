//! Sentence embeddings from a BERT-family encoder: masked mean (or CLS) pooling over the last hidden
//! state, as sentence-transformers computes them.

use tokenizers::Tokenizer;

use super::checkpoint::{self, read_json};
use super::encoder::{Batch, Encoder, first_token, mean_pool};
use super::source::ModelFiles;
use super::{ModelError, SequenceModel, Tokenized};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pooling {
    Mean,
    Cls,
}

#[derive(Clone)]
pub struct BertEmbedder {
    model: Encoder,
    tokenizer: Tokenizer,
    pooling: Pooling,
    hidden: usize,
    max_tokens: usize,
}

impl BertEmbedder {
    pub fn load(files: &ModelFiles) -> Result<Self, ModelError> {
        let checkpoint = checkpoint::open(files)?;
        let config = &checkpoint.encoder;
        let model = Encoder::load(&checkpoint.weights, config)
            .map_err(|e| ModelError::Load(format!("weights: {e}")))?;
        // sentence-transformers' own limit (`max_seq_length`) when it has one.
        let max_tokens = match &files.sentence_config {
            Some(path) => read_json(path)?["max_seq_length"]
                .as_u64()
                .map_or(config.max_tokens(), |n| {
                    (n as usize).min(config.max_tokens())
                }),
            None => config.max_tokens(),
        };
        let pooling = match &files.pooling {
            Some(path) if read_json(path)?["pooling_mode_cls_token"].as_bool() == Some(true) => {
                Pooling::Cls
            }
            _ => Pooling::Mean,
        };
        Ok(Self {
            model,
            tokenizer: checkpoint::tokenizer(files, max_tokens)?,
            pooling,
            hidden: config.hidden,
            max_tokens,
        })
    }

    /// Longest input in tokens; longer texts are truncated.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn encoder(&self) -> &Encoder {
        &self.model
    }

    /// The same embedder (tokenizer, pooling) over another encoder: a fine-tuned one.
    pub fn with_encoder(&self, model: Encoder) -> Self {
        Self {
            model,
            ..self.clone()
        }
    }

    /// Pooled states of packed last hidden states, as [`SequenceModel::forward`] computes them.
    pub fn pool(
        &self,
        packed: &candle_core::Tensor,
        lens: &[usize],
    ) -> candle_core::Result<candle_core::Tensor> {
        match self.pooling {
            Pooling::Cls => first_token(packed, lens),
            Pooling::Mean => mean_pool(packed, lens),
        }
    }
}

impl SequenceModel for BertEmbedder {
    fn tokenize(&self, text: &str) -> Result<Tokenized, ModelError> {
        checkpoint::tokenize(&self.tokenizer, text)
    }

    fn forward(&self, batch: &[&Tokenized]) -> Result<Vec<Vec<f32>>, ModelError> {
        let lens: Vec<usize> = batch.iter().map(|t| t.ids.len()).collect();
        let packed = self.model.forward(&Batch {
            ids: batch.iter().map(|t| t.ids.as_slice()).collect(),
            type_ids: batch.iter().map(|t| t.type_ids.as_slice()).collect(),
        })?;
        Ok(self.pool(&packed, &lens)?.to_vec2::<f32>()?)
    }

    fn dims(&self) -> usize {
        self.hidden
    }

    fn as_bert(&self) -> Option<&BertEmbedder> {
        Some(self)
    }
}
