//! Hugging Face sequence-classification checkpoints (BERT, RoBERTa, DistilBERT, MPNet): the
//! encoder, then the family's head on the first token; the output is one logit per label.

use candle_core::Module;
use candle_nn::{Linear, VarBuilder, linear};
use tokenizers::Tokenizer;

use super::checkpoint;
use super::encoder::{Batch, Encoder, Family, first_token};
use super::source::ModelFiles;
use super::{ModelError, SequenceModel, Tokenized};

enum Head {
    /// `bert.pooler.dense` + tanh, then `classifier`.
    Bert { pooler: Linear, classifier: Linear },
    /// `classifier.dense` + tanh, then `classifier.out_proj`.
    Roberta { dense: Linear, out_proj: Linear },
    /// `pre_classifier` + ReLU, then `classifier`.
    DistilBert { pre: Linear, classifier: Linear },
}

pub struct SequenceClassifier {
    encoder: Encoder,
    head: Head,
    tokenizer: Tokenizer,
    labels: Vec<String>,
}

impl SequenceClassifier {
    pub fn load(files: &ModelFiles) -> Result<Self, ModelError> {
        let checkpoint = checkpoint::open(files)?;
        let labels = labels(&checkpoint.config)?;
        let config = &checkpoint.encoder;
        let weights = |e: candle_core::Error| ModelError::Load(format!("weights: {e}"));
        let encoder = Encoder::load(&checkpoint.weights, config).map_err(weights)?;
        let vb: &VarBuilder = &checkpoint.weights;
        let (h, n) = (config.hidden, labels.len());
        let head = match config.family {
            Family::Bert => Head::Bert {
                pooler: linear(h, h, vb.pp("bert.pooler.dense")).map_err(weights)?,
                classifier: linear(h, n, vb.pp("classifier")).map_err(weights)?,
            },
            Family::Roberta | Family::MpNet => Head::Roberta {
                dense: linear(h, h, vb.pp("classifier.dense")).map_err(weights)?,
                out_proj: linear(h, n, vb.pp("classifier.out_proj")).map_err(weights)?,
            },
            Family::DistilBert => Head::DistilBert {
                pre: linear(h, h, vb.pp("pre_classifier")).map_err(weights)?,
                classifier: linear(h, n, vb.pp("classifier")).map_err(weights)?,
            },
        };
        Ok(Self {
            encoder,
            head,
            tokenizer: checkpoint::tokenizer(files, config.max_tokens())?,
            labels,
        })
    }

    /// Label names in logit order, lower-cased.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }
}

/// Checks a `config.json` before any weights are fetched: a supported family with `id2label`.
/// Returns the labels.
pub fn read_classifier_config(path: &std::path::Path) -> Result<Vec<String>, ModelError> {
    let config = checkpoint::read_json(path)?;
    super::encoder::EncoderConfig::from_json(&config).map_err(ModelError::Load)?;
    labels(&config)
}

/// `id2label` in index order; a checkpoint without one is not a classifier.
fn labels(config: &serde_json::Value) -> Result<Vec<String>, ModelError> {
    let map = config["id2label"].as_object().ok_or_else(|| {
        ModelError::Load("config.json has no id2label: not a sequence classifier".into())
    })?;
    let mut labels: Vec<(usize, String)> = map
        .iter()
        .map(|(id, label)| {
            let id = id
                .parse()
                .map_err(|_| ModelError::Load(format!("id2label key '{id}' is not a number")))?;
            Ok((id, label.as_str().unwrap_or_default().to_lowercase()))
        })
        .collect::<Result<_, ModelError>>()?;
    labels.sort();
    if labels.len() < 2 || labels.iter().enumerate().any(|(i, (id, _))| i != *id) {
        return Err(ModelError::Load(
            "id2label must number at least two labels 0..n".into(),
        ));
    }
    Ok(labels.into_iter().map(|(_, label)| label).collect())
}

impl SequenceModel for SequenceClassifier {
    fn tokenize(&self, text: &str) -> Result<Tokenized, ModelError> {
        checkpoint::tokenize(&self.tokenizer, text)
    }

    fn forward(&self, batch: &[&Tokenized]) -> Result<Vec<Vec<f32>>, ModelError> {
        let lens: Vec<usize> = batch.iter().map(|t| t.ids.len()).collect();
        let packed = self.encoder.forward(&Batch {
            ids: batch.iter().map(|t| t.ids.as_slice()).collect(),
            type_ids: batch.iter().map(|t| t.type_ids.as_slice()).collect(),
        })?;
        let first = first_token(&packed, &lens)?;
        let logits = match &self.head {
            Head::Bert { pooler, classifier } => {
                classifier.forward(&pooler.forward(&first)?.tanh()?)?
            }
            Head::Roberta { dense, out_proj } => {
                out_proj.forward(&dense.forward(&first)?.tanh()?)?
            }
            Head::DistilBert { pre, classifier } => {
                classifier.forward(&pre.forward(&first)?.relu()?)?
            }
        };
        Ok(logits.to_vec2::<f32>()?)
    }

    fn dims(&self) -> usize {
        self.labels.len()
    }
}
