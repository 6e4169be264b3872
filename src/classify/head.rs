//! Embedding heads: softmax regression over sentence embeddings, stored as `head.safetensors`
//! (`weight` [labels, dims], `bias` [labels]) beside `classifier.json` (labels, the embedding model,
//! how the head was trained and how it scored). A head trained with fine-tuning also carries the
//! embedding model's tuned top layers (`tuned.safetensors`, see `tune`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::ClassifyError;

pub const HEAD_FILE: &str = "head.safetensors";
pub const META_FILE: &str = "classifier.json";

/// `classifier.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadMeta {
    /// Always `embedding-head`.
    pub kind: String,
    /// Label names, in weight-row order.
    pub labels: Vec<String>,
    /// The embedding model the head reads (a served model name, directory or repo id).
    pub embedding_model: String,
    /// Whether embeddings are L2-normalised before the head.
    pub normalize: bool,
    /// How texts are read at inference time.
    #[serde(default)]
    pub inference: InferenceMode,
    /// Added to each label's logit (calibration), in label order.
    #[serde(default)]
    pub logit_bias: Vec<f32>,
    /// How much the pooled probabilities of a text of several sentences are sharpened
    /// (`segment::sharpen`), fitted on labelled texts by `aitier classifier calibrate`; none leaves
    /// them as pooled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_sharpening: Option<f32>,
    /// Training data and parameters, for the record.
    pub training: serde_json::Value,
    /// Held-out metrics measured at training time.
    pub metrics: serde_json::Value,
}

/// How a text becomes the head's input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InferenceMode {
    /// One embedding of the whole text (truncated at the model's maximum length).
    Whole,
    /// One embedding per sentence (long texts are not cut at the model's maximum length); the
    /// sentences' probabilities are pooled, polar sentences weighing most (`segment::pool`).
    #[default]
    Sentences,
}

/// A trained head, ready to score embeddings.
#[derive(Debug, Clone)]
pub struct LinearHead {
    /// Row-major [labels, dims].
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub dims: usize,
}

impl LinearHead {
    pub fn labels(&self) -> usize {
        self.bias.len()
    }

    /// Probabilities for one embedding, after adding `logit_bias`.
    pub fn probabilities(&self, embedding: &[f32], logit_bias: &[f32]) -> Vec<f32> {
        let logits: Vec<f32> = self
            .weight
            .chunks(self.dims)
            .zip(&self.bias)
            .enumerate()
            .map(|(i, (row, b))| {
                row.iter().zip(embedding).map(|(w, x)| w * x).sum::<f32>()
                    + b
                    + logit_bias.get(i).copied().unwrap_or(0.0)
            })
            .collect();
        softmax(&logits)
    }

    pub fn save(&self, dir: &Path) -> Result<(), ClassifyError> {
        let device = Device::Cpu;
        let tensors = HashMap::from([
            (
                "weight".to_string(),
                Tensor::from_vec(self.weight.clone(), (self.labels(), self.dims), &device)?,
            ),
            (
                "bias".to_string(),
                Tensor::from_vec(self.bias.clone(), self.labels(), &device)?,
            ),
        ]);
        candle_core::safetensors::save(&tensors, dir.join(HEAD_FILE))?;
        Ok(())
    }

    pub fn load(dir: &Path) -> Result<Self, ClassifyError> {
        let tensors = candle_core::safetensors::load(dir.join(HEAD_FILE), &Device::Cpu)?;
        let get = |name: &str| {
            tensors
                .get(name)
                .ok_or_else(|| ClassifyError::Invalid(format!("{HEAD_FILE} has no '{name}'")))
        };
        let weight = get("weight")?;
        let (labels, dims) = weight.dims2()?;
        if dims == 0 || labels == 0 {
            return Err(ClassifyError::Invalid(format!("{HEAD_FILE} is empty")));
        }
        let bias = get("bias")?.to_vec1::<f32>()?;
        if bias.len() != labels {
            return Err(ClassifyError::Invalid(format!(
                "{HEAD_FILE}: {labels} weight rows but {} biases",
                bias.len()
            )));
        }
        Ok(Self {
            weight: weight.flatten_all()?.to_vec1()?,
            bias,
            dims,
        })
    }
}

pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

pub fn read_meta(dir: &Path) -> Result<HeadMeta, ClassifyError> {
    let bytes = std::fs::read(dir.join(META_FILE))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ClassifyError::Invalid(format!("{}: {e}", dir.join(META_FILE).display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_survives_a_save_and_load() {
        let head = LinearHead {
            weight: vec![1.0, 0.0, 0.0, 1.0, -1.0, -1.0],
            bias: vec![0.1, 0.2, 0.3],
            dims: 2,
        };
        let dir = std::env::temp_dir().join("aitier-head-roundtrip");
        std::fs::create_dir_all(&dir).unwrap();
        head.save(&dir).unwrap();
        let back = LinearHead::load(&dir).unwrap();
        assert_eq!(back.weight, head.weight);
        assert_eq!(back.bias, head.bias);
        let p = back.probabilities(&[2.0, 0.0], &[]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[0] > p[1] && p[1] > p[2]);
    }
}
