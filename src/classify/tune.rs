//! Fine-tuning the top layers of the embedding model together with a classifier's head: low-rank
//! updates (LoRA) of each tuned layer's four projections, with its biases and layer norms trained
//! in full, by candle's autograd. The frozen layers below run once per text, before training.
//!
//! The result is an [`Adapter`] (`tuned.safetensors`, about 0.4 MB a layer at rank 16) that a
//! classifier applies to the served embedding model at load time: the untouched layers share its
//! tensors, only the tuned ones are rebuilt.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use super::ClassifyError;
use super::head::LinearHead;
use super::rng::SplitMix64;
use crate::inference::{
    Batch, BertEmbedder, Encoder, Grad, LINEAR_NAMES, LayerWeights, NORM_NAMES, Tokenized,
};

pub const ADAPTER_FILE: &str = "tuned.safetensors";

/// How the top layers are tuned.
#[derive(Debug, Clone)]
pub struct TuneOptions {
    /// Tuned layers, counted from the top.
    pub layers: usize,
    /// Rank of each projection's update.
    pub rank: usize,
    pub epochs: usize,
    pub batch: usize,
    /// Peak learning rate of the low-rank factors and the head (biases and norms take a fifth).
    pub lr: f64,
    pub seed: u64,
    /// Longer training texts are cut to this many tokens.
    pub max_tokens: usize,
    pub progress: bool,
}

/// One tuned layer: `(a [rank, in], b [out, rank])` per projection (the update is `b · a`, scale
/// folded in), and the projections' biases and layer norms in full.
/// In the order of [`LINEAR_NAMES`] and [`NORM_NAMES`].
pub struct TunedLayer {
    pub lora: Vec<(Tensor, Tensor)>,
    pub biases: Vec<Tensor>,
    pub norms: [(Tensor, Tensor); 2],
}

/// The tuned layers of an encoder, by layer index.
pub struct Adapter {
    pub layers: Vec<(usize, TunedLayer)>,
}

impl Adapter {
    /// The encoder with the tuned layers merged in (`w + b · a`); other tensors are shared.
    pub fn apply(&self, base: &Encoder) -> Result<Encoder, ClassifyError> {
        let mut tuned = base.clone();
        for (i, layer) in &self.layers {
            if *i >= base.depth() {
                return Err(ClassifyError::Invalid(format!(
                    "{ADAPTER_FILE} tunes layer {i} but the model has {} layers",
                    base.depth()
                )));
            }
            let mut weights = base.layer_weights(*i)?;
            for (k, ((a, b), bias)) in layer.lora.iter().zip(&layer.biases).enumerate() {
                let w = &weights.linears[k].0;
                let delta = b.matmul(a)?;
                if delta.dims() != w.dims() || bias.dims() != weights.linears[k].1.dims() {
                    return Err(ClassifyError::Invalid(format!(
                        "{ADAPTER_FILE}: layer {i} {} does not fit the model",
                        LINEAR_NAMES[k]
                    )));
                }
                weights.linears[k] = ((w + delta)?, bias.clone());
            }
            weights.norms = layer.norms.clone();
            tuned = tuned.with_layer(*i, &weights)?;
        }
        Ok(tuned)
    }

    pub fn save(&self, dir: &Path) -> Result<(), ClassifyError> {
        let mut tensors = HashMap::new();
        for (i, layer) in &self.layers {
            for (name, ((a, b), bias)) in LINEAR_NAMES
                .iter()
                .zip(layer.lora.iter().zip(&layer.biases))
            {
                tensors.insert(format!("layer.{i}.{name}.lora_a"), a.clone());
                tensors.insert(format!("layer.{i}.{name}.lora_b"), b.clone());
                tensors.insert(format!("layer.{i}.{name}.bias"), bias.clone());
            }
            for (k, name) in NORM_NAMES.iter().enumerate() {
                tensors.insert(format!("layer.{i}.{name}.weight"), layer.norms[k].0.clone());
                tensors.insert(format!("layer.{i}.{name}.bias"), layer.norms[k].1.clone());
            }
        }
        candle_core::safetensors::save(&tensors, dir.join(ADAPTER_FILE))?;
        Ok(())
    }

    /// `Ok(None)` when the classifier has no tuned layers.
    pub fn load(dir: &Path) -> Result<Option<Self>, ClassifyError> {
        let path = dir.join(ADAPTER_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
        let mut indices: Vec<usize> = tensors
            .keys()
            .filter_map(|k| k.strip_prefix("layer.")?.split('.').next()?.parse().ok())
            .collect();
        indices.sort_unstable();
        indices.dedup();
        let get = |name: String| {
            tensors
                .get(&name)
                .cloned()
                .ok_or_else(|| ClassifyError::Invalid(format!("{ADAPTER_FILE} has no '{name}'")))
        };
        let layers = indices
            .into_iter()
            .map(|i| {
                let pair = |n: &str, first: &str, second: &str| {
                    Ok::<_, ClassifyError>((
                        get(format!("layer.{i}.{n}.{first}"))?,
                        get(format!("layer.{i}.{n}.{second}"))?,
                    ))
                };
                let lora = LINEAR_NAMES
                    .iter()
                    .map(|n| pair(n, "lora_a", "lora_b"))
                    .collect::<Result<_, _>>()?;
                let biases = LINEAR_NAMES
                    .iter()
                    .map(|n| get(format!("layer.{i}.{n}.bias")))
                    .collect::<Result<_, _>>()?;
                let [n0, n1] = NORM_NAMES;
                let norms = [pair(n0, "weight", "bias")?, pair(n1, "weight", "bias")?];
                Ok((
                    i,
                    TunedLayer {
                        lora,
                        biases,
                        norms,
                    },
                ))
            })
            .collect::<Result<Vec<_>, ClassifyError>>()?;
        Ok(Some(Self { layers }))
    }
}

/// The trainable variables of one tuned layer.
struct LayerVars {
    index: usize,
    base: LayerWeights,
    lora: Vec<(Var, Var)>,
    biases: Vec<Var>,
    norms: Vec<(Var, Var)>,
}

/// LoRA's usual scale: updates are `alpha / rank · b · a` with alpha = 2 · rank.
const LORA_SCALE: f64 = 2.0;

impl LayerVars {
    fn new(
        encoder: &Encoder,
        index: usize,
        rank: usize,
        rng: &mut SplitMix64,
    ) -> candle_core::Result<Self> {
        let base = encoder.layer_weights(index)?;
        let device = Device::Cpu;
        let lora = base
            .linears
            .iter()
            .map(|(w, _)| {
                let (out, inp) = w.dims2()?;
                // a ~ N(0, 1/in), b = 0: the layer starts as the base layer.
                let std = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..rank * inp)
                    .map(|_| (rng.normal() * std) as f32)
                    .collect();
                Ok((
                    Var::from_tensor(&Tensor::from_vec(a, (rank, inp), &device)?)?,
                    Var::zeros((out, rank), DType::F32, &device)?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let biases = base
            .linears
            .iter()
            .map(|(_, b)| Var::from_tensor(&b.copy()?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norms = base
            .norms
            .iter()
            .map(|(w, b)| Ok((Var::from_tensor(&w.copy()?)?, Var::from_tensor(&b.copy()?)?)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            index,
            base,
            lora,
            biases,
            norms,
        })
    }

    /// The layer's current weights, as tensors that autograd traces back to the variables.
    fn weights(&self) -> candle_core::Result<LayerWeights> {
        let mut linears = self.base.linears.clone();
        for (k, (a, b)) in self.lora.iter().enumerate() {
            let delta = (b.as_tensor().matmul(a.as_tensor())? * LORA_SCALE)?;
            linears[k] = ((&linears[k].0 + delta)?, self.biases[k].as_tensor().clone());
        }
        Ok(LayerWeights {
            linears,
            norms: self.norm_tensors(),
        })
    }

    fn norm_tensors(&self) -> [(Tensor, Tensor); 2] {
        [0, 1].map(|k| {
            (
                self.norms[k].0.as_tensor().clone(),
                self.norms[k].1.as_tensor().clone(),
            )
        })
    }

    fn low_rank(&self) -> Vec<Var> {
        self.lora
            .iter()
            .flat_map(|(a, b)| [a.clone(), b.clone()])
            .collect()
    }

    fn full(&self) -> Vec<Var> {
        let norms = self.norms.iter().flat_map(|(w, b)| [w.clone(), b.clone()]);
        self.biases.iter().cloned().chain(norms).collect()
    }

    /// The trained layer, the update's scale folded into `b`.
    fn finish(&self) -> candle_core::Result<(usize, TunedLayer)> {
        let lora = self
            .lora
            .iter()
            .map(|(a, b)| Ok((a.as_tensor().clone(), (b.as_tensor() * LORA_SCALE)?)))
            .collect::<candle_core::Result<_>>()?;
        Ok((
            self.index,
            TunedLayer {
                lora,
                biases: self.biases.iter().map(|b| b.as_tensor().clone()).collect(),
                norms: self.norm_tensors(),
            },
        ))
    }
}

/// A training text: its tokens (cut to the training length) and what the head should answer.
pub struct TuneExample {
    pub tokens: Tokenized,
    pub target: Target,
}

/// What a training text should be classified as.
pub enum Target {
    /// A label, weighed by its class weight.
    Label(usize),
    /// A teacher's probability of each label (weight 1): distillation.
    Soft(Vec<f32>),
}

/// Fine-tunes the top `options.layers` layers of `embedder` and `head` (warm-started: the head
/// fitted on the frozen embeddings) on `examples`, minimising class-weighted cross-entropy of the
/// head on the pooled, L2-normalised embedding (against a teacher's probabilities for a
/// [`Target::Soft`] text). Returns the adapter and the tuned head.
pub fn fine_tune(
    embedder: &BertEmbedder,
    examples: &[TuneExample],
    head: &LinearHead,
    class_weight: &[f32],
    options: &TuneOptions,
) -> Result<(Adapter, LinearHead), ClassifyError> {
    if let Some(bad) = examples.iter().find_map(|e| match &e.target {
        Target::Soft(p) if p.len() != head.labels() => Some(p.len()),
        _ => None,
    }) {
        return Err(ClassifyError::Invalid(format!(
            "a soft target has {bad} probabilities for {} labels",
            head.labels()
        )));
    }
    let encoder = embedder.encoder();
    let depth = encoder.depth();
    let first = depth.saturating_sub(options.layers.min(depth));
    let device = Device::Cpu;
    let started = std::time::Instant::now();

    // The frozen bottom, once per text, longest-first batches of similar lengths.
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].tokens.ids.len()));
    let mut states: Vec<Option<Tensor>> = vec![None; examples.len()];
    for chunk in order.chunks(64) {
        let ids: Vec<&[u32]> = chunk
            .iter()
            .map(|&i| examples[i].tokens.ids.as_slice())
            .collect();
        let types: Vec<&[u32]> = chunk
            .iter()
            .map(|&i| examples[i].tokens.type_ids.as_slice())
            .collect();
        let lens: Vec<usize> = ids.iter().map(|s| s.len()).collect();
        let batch = Batch {
            ids,
            type_ids: types,
        };
        let packing = encoder.packing(&lens)?;
        let x = encoder.embed(&batch)?;
        let x = encoder.run_layers(x, &packing, 0..first, Grad::No)?;
        let mut offset = 0;
        for (&i, &len) in chunk.iter().zip(&lens) {
            states[i] = Some(x.narrow(0, offset, len)?);
            offset += len;
        }
    }
    let states: Vec<Tensor> = states
        .into_iter()
        .collect::<Option<_>>()
        .ok_or_else(|| ClassifyError::Invalid("a training text was not computed".into()))?;
    if options.progress {
        println!(
            "fine-tuning: layers {first}..{depth} of {} texts computed below them in {:.0} s",
            examples.len(),
            started.elapsed().as_secs_f64()
        );
    }

    let mut rng = SplitMix64(options.seed ^ 0x7475_6e65);
    let layers = (first..depth)
        .map(|i| LayerVars::new(encoder, i, options.rank, &mut rng))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let (labels, dims) = (head.labels(), head.dims);
    let head_w = Var::from_tensor(&Tensor::from_vec(
        head.weight.clone(),
        (labels, dims),
        &device,
    )?)?;
    let head_b = Var::from_tensor(&Tensor::from_vec(head.bias.clone(), labels, &device)?)?;
    let mut fast_vars: Vec<Var> = layers.iter().flat_map(LayerVars::low_rank).collect();
    fast_vars.extend([head_w.clone(), head_b.clone()]);
    let slow_vars: Vec<Var> = layers.iter().flat_map(LayerVars::full).collect();
    let params = |lr: f64| ParamsAdamW {
        lr,
        weight_decay: 0.01,
        ..Default::default()
    };
    let mut fast = AdamW::new(fast_vars, params(options.lr))?;
    let mut slow = AdamW::new(slow_vars, params(options.lr / 5.0))?;

    let steps_per_epoch = examples.len().div_ceil(options.batch.max(1));
    let total_steps = (steps_per_epoch * options.epochs).max(1);
    let warmup = (total_steps / 16).max(1);
    let mut step = 0usize;
    let mut recent_loss = 0f64;
    for epoch in 0..options.epochs {
        let mut shuffled: Vec<usize> = (0..examples.len()).collect();
        rng.shuffle(&mut shuffled);
        for chunk in shuffled.chunks(options.batch.max(1)) {
            let rate = if step < warmup {
                (step + 1) as f64 / warmup as f64
            } else {
                (total_steps - step) as f64 / (total_steps - warmup).max(1) as f64
            };
            fast.set_learning_rate(options.lr * rate);
            slow.set_learning_rate(options.lr / 5.0 * rate);
            let lens: Vec<usize> = chunk
                .iter()
                .map(|&i| examples[i].tokens.ids.len())
                .collect();
            let parts: Vec<&Tensor> = chunk.iter().map(|&i| &states[i]).collect();
            let mut x = Tensor::cat(&parts, 0)?;
            let packing = encoder.packing(&lens)?;
            for layer in &layers {
                let built = encoder.build_layer(&layer.weights()?);
                x = encoder.layer_forward(&built, &x, &packing, Grad::Yes)?;
            }
            let pooled = embedder.pool(&x, &lens)?;
            let normed = pooled.broadcast_div(&pooled.sqr()?.sum_keepdim(1)?.sqrt()?)?;
            let logits = normed
                .matmul(&head_w.as_tensor().t()?)?
                .broadcast_add(head_b.as_tensor())?;
            let mut target = vec![0f32; chunk.len() * labels];
            let mut total = 0f32;
            for (row, &i) in chunk.iter().enumerate() {
                let row = &mut target[row * labels..(row + 1) * labels];
                match &examples[i].target {
                    Target::Label(y) => {
                        row[*y] = class_weight[*y];
                        total += class_weight[*y];
                    }
                    Target::Soft(p) => {
                        row.copy_from_slice(p);
                        total += 1.0;
                    }
                }
            }
            let target =
                (Tensor::from_vec(target, (chunk.len(), labels), &device)? / f64::from(total))?;
            let loss = (candle_nn::ops::log_softmax(&logits, 1)? * target)?
                .sum_all()?
                .neg()?;
            let grads = loss.backward()?;
            fast.step(&grads)?;
            slow.step(&grads)?;
            recent_loss += f64::from(loss.to_scalar::<f32>()?);
            step += 1;
            if options.progress && step.is_multiple_of(100) {
                println!(
                    "fine-tuning: epoch {}, step {step}/{total_steps}, loss {:.4}, {:.0} s",
                    epoch + 1,
                    recent_loss / 100.0,
                    started.elapsed().as_secs_f64()
                );
                recent_loss = 0.0;
            }
        }
    }
    if options.progress {
        println!(
            "fine-tuning: {step} steps done in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    let adapter = Adapter {
        layers: layers
            .iter()
            .map(LayerVars::finish)
            .collect::<candle_core::Result<Vec<_>>>()?,
    };
    let tuned_head = LinearHead {
        weight: head_w.as_tensor().flatten_all()?.to_vec1()?,
        bias: head_b.as_tensor().to_vec1()?,
        dims,
    };
    Ok((adapter, tuned_head))
}

/// `tokens` cut to at most `max` tokens, keeping the closing special token.
pub fn cut(mut tokens: Tokenized, max: usize) -> Tokenized {
    if tokens.ids.len() > max && max >= 2 {
        let last = tokens.ids[tokens.ids.len() - 1];
        let last_type = tokens.type_ids[tokens.type_ids.len() - 1];
        tokens.ids.truncate(max - 1);
        tokens.type_ids.truncate(max - 1);
        tokens.ids.push(last);
        tokens.type_ids.push(last_type);
        tokens.truncated = true;
    }
    tokens
}
