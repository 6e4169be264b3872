//! A BERT-family encoder (BERT, RoBERTa, DistilBERT, MPNet) tuned for CPU batches: the token-wise layers (projections, feed-forward, layer norms)
//! run on the batch's real tokens packed end to end, so padding costs nothing there; only attention
//! sees a padded view. Q, K and V are one fused projection, and GELU uses a vectorisable erf.

use aitier_kernels::{DenseWeights, PANEL};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, InplaceOp2, Layout, Module, Shape, Tensor,
};
use candle_nn::{LayerNorm, Linear, VarBuilder, layer_norm, linear};
use rayon::prelude::*;
use serde_json::Value;

/// The transformer families aitier loads; they differ in tensor names and position ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Bert,
    Roberta,
    DistilBert,
    /// RoBERTa's positions, no token types, and a relative position bias on every layer's
    /// attention scores (all-mpnet-base-v2).
    MpNet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU with erf, as `gelu` means in transformers.
    Gelu,
    /// GELU with tanh (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
}

/// What the encoder needs from a checkpoint's `config.json`, whatever the family calls it.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    pub type_vocab_size: usize,
    pub eps: f64,
    pub activation: Activation,
    /// First position id: RoBERTa counts from `pad_token_id + 1`.
    pub position_offset: usize,
    /// Buckets of MPNet's relative position bias; 0 without one.
    pub relative_buckets: usize,
}

impl EncoderConfig {
    pub fn from_json(config: &Value) -> Result<Self, String> {
        let model_type = config["model_type"].as_str().unwrap_or("bert");
        let family = match model_type {
            "bert" => Family::Bert,
            "roberta" | "xlm-roberta" | "camembert" => Family::Roberta,
            "distilbert" => Family::DistilBert,
            "mpnet" => Family::MpNet,
            other => {
                return Err(format!(
                    "model_type '{other}' is not supported (bert, roberta, distilbert, mpnet are)"
                ));
            }
        };
        let get = |keys: &[&str]| -> Result<usize, String> {
            keys.iter()
                .find_map(|k| config[*k].as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| format!("config.json has no {}", keys.join(" or ")))
        };
        let act = config["hidden_act"]
            .as_str()
            .or(config["activation"].as_str())
            .unwrap_or("gelu");
        let activation = match act {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => return Err(format!("activation '{other}' is not supported")),
        };
        if family == Family::DistilBert && config["sinusoidal_pos_embds"].as_bool() == Some(true) {
            return Err("DistilBERT with sinusoidal position embeddings is not supported".into());
        }
        Ok(Self {
            family,
            vocab_size: get(&["vocab_size"])?,
            hidden: get(&["hidden_size", "dim"])?,
            layers: get(&["num_hidden_layers", "n_layers"])?,
            heads: get(&["num_attention_heads", "n_heads"])?,
            intermediate: get(&["intermediate_size", "hidden_dim"])?,
            max_positions: get(&["max_position_embeddings"])?,
            type_vocab_size: match family {
                Family::DistilBert | Family::MpNet => 0,
                _ => get(&["type_vocab_size"]).unwrap_or(2),
            },
            eps: config["layer_norm_eps"].as_f64().unwrap_or(1e-12),
            activation,
            position_offset: match family {
                Family::Roberta | Family::MpNet => get(&["pad_token_id"]).unwrap_or(1) + 1,
                _ => 0,
            },
            relative_buckets: match family {
                Family::MpNet => get(&["relative_attention_num_buckets"]).unwrap_or(32),
                _ => 0,
            },
        })
    }

    /// Longest sequence the position embeddings allow.
    pub fn max_tokens(&self) -> usize {
        self.max_positions.saturating_sub(self.position_offset)
    }
}

#[derive(Clone)]
pub struct Layer {
    qkv: Projection,
    attention_out: Projection,
    attention_norm: LayerNorm,
    intermediate: Projection,
    output: Projection,
    output_norm: LayerNorm,
}

/// Weights (elements) from which a projection also keeps its weight in `f16`, for the few-rows
/// kernel: a pass of few rows streams every weight once from memory, and all-MiniLM-L6-v2's
/// 42 MB of `f32` projections do not fit a 32 MB L3 (its 21 MB in `f16` do). Its smallest
/// projection has 147,456; tiny test models stay in `f32` throughout.
const HALF_FROM: usize = 1 << 16;

/// A linear layer. A large one ([`HALF_FROM`]) on the CPU, with a bias and a width that is a
/// multiple of [`PANEL`], is rounded to `f16` at load and kept only so, laid out in column panels
/// (`[n / PANEL, k, PANEL]`, [`aitier_kernels::panels`]), which the x86 kernels multiply without
/// horizontal sums: all-MiniLM-L6-v2's six layers of projections for a 13-token sentence on one
/// core of an Intel Xeon (AVX-512), median of 50 passes after 200 ms idle, 7.0 → 3.6 ms. The
/// rounding moves all-MiniLM-L6-v2's normalised embeddings by at most ≈1e-4 (cosine ≥ 0.9999997).
///
/// Batches run on the panels too, [`PANEL_ROWS`] rows at a time. Fine-tuning and differentiable
/// passes get the same values widened to `f32` ([`Projection::linear`]), so there is no `f32`
/// copy, which cost twice the memory (all-MiniLM-L6-v2 42 MB, all-mpnet-base-v2 340 MB).
#[derive(Clone)]
enum Projection {
    /// `f32`: candle's matmul, or [`Dense`] for a few rows. Small layers (tiny test models),
    /// layers off the CPU, without a bias or of another width, and layers built for fine-tuning.
    Full(Linear),
    /// `f16` in panels, with an `f32` bias.
    Panels { weight: Tensor, bias: Tensor },
}

impl Projection {
    fn new(linear: Linear) -> candle_core::Result<Self> {
        let weight = linear.weight();
        let (n, k) = weight.dims2()?;
        let bias = match linear.bias() {
            Some(bias) if weight.elem_count() >= HALF_FROM && weight.device().is_cpu() => bias,
            _ => return Ok(Self::Full(linear)),
        };
        let half = weight.to_dtype(DType::F16)?.flatten_all()?.to_vec1()?;
        Ok(match aitier_kernels::panels(&half, n, k) {
            Some(laid) => Self::Panels {
                weight: Tensor::from_vec(laid, (n / PANEL, k, PANEL), weight.device())?,
                bias: bias.clone(),
            },
            None => Self::Full(linear),
        })
    }

    /// The layer in `f32` (for panels, their `f16` values widened, row-major again).
    fn linear(&self) -> candle_core::Result<Linear> {
        match self {
            Self::Full(linear) => Ok(linear.clone()),
            Self::Panels { weight, bias } => {
                let (panels, k, _) = weight.dims3()?;
                let rows = weight.transpose(1, 2)?.reshape((panels * PANEL, k))?;
                Ok(Linear::new(rows.to_dtype(DType::F32)?, Some(bias.clone())))
            }
        }
    }
}

/// A word embedding table as large as a real model's, on the CPU, rounded to `f16` and kept so;
/// a pass widens the rows it gathers. Half the memory (all-MiniLM-L6-v2 47 → 23 MB,
/// all-mpnet-base-v2 94 → 47 MB); it moves all-MiniLM-L6-v2's normalised embeddings by at most
/// 2.7e-5 more (four texts and 32 of one batch).
fn half_table(table: Tensor) -> candle_core::Result<Tensor> {
    match table.elem_count() >= HALF_FROM && table.device().is_cpu() {
        true => table.to_dtype(DType::F16),
        false => Ok(table),
    }
}

#[derive(Clone)]
pub struct Encoder {
    word: Tensor,
    position: Tensor,
    token_type: Option<Tensor>,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    activation: Activation,
    position_offset: u32,
    eps: f64,
    /// MPNet's relative position bias, `[buckets, heads]`.
    relative: Option<Tensor>,
}

/// The sequences of one forward pass, as token ids with their type ids.
pub struct Batch<'a> {
    pub ids: Vec<&'a [u32]>,
    pub type_ids: Vec<&'a [u32]>,
}

/// Tensor names inside one layer of a family.
struct LayerNames {
    layer: &'static str,
    q: &'static str,
    k: &'static str,
    v: &'static str,
    attention_out: &'static str,
    attention_norm: &'static str,
    intermediate: &'static str,
    output: &'static str,
    output_norm: &'static str,
}

const BERT_NAMES: LayerNames = LayerNames {
    layer: "encoder.layer",
    q: "attention.self.query",
    k: "attention.self.key",
    v: "attention.self.value",
    attention_out: "attention.output.dense",
    attention_norm: "attention.output.LayerNorm",
    intermediate: "intermediate.dense",
    output: "output.dense",
    output_norm: "output.LayerNorm",
};

const MPNET_NAMES: LayerNames = LayerNames {
    layer: "encoder.layer",
    q: "attention.attn.q",
    k: "attention.attn.k",
    v: "attention.attn.v",
    attention_out: "attention.attn.o",
    attention_norm: "attention.LayerNorm",
    intermediate: "intermediate.dense",
    output: "output.dense",
    output_norm: "output.LayerNorm",
};

const DISTILBERT_NAMES: LayerNames = LayerNames {
    layer: "transformer.layer",
    q: "attention.q_lin",
    k: "attention.k_lin",
    v: "attention.v_lin",
    attention_out: "attention.out_lin",
    attention_norm: "sa_layer_norm",
    intermediate: "ffn.lin1",
    output: "ffn.lin2",
    output_norm: "output_layer_norm",
};

impl Encoder {
    /// Loads the encoder from `vb`, whose root may or may not carry the family's prefix (`bert.`,
    /// `roberta.`, `distilbert.`, `mpnet.`): sentence-transformers checkpoints have none, classifiers do.
    pub fn load(vb: &VarBuilder, config: &EncoderConfig) -> candle_core::Result<Self> {
        let (names, prefix) = match config.family {
            Family::Bert => (&BERT_NAMES, "bert"),
            Family::Roberta => (&BERT_NAMES, "roberta"),
            Family::DistilBert => (&DISTILBERT_NAMES, "distilbert"),
            Family::MpNet => (&MPNET_NAMES, "mpnet"),
        };
        let vb = if vb.contains_tensor(&format!("{prefix}.embeddings.word_embeddings.weight")) {
            vb.pp(prefix)
        } else {
            vb.clone()
        };
        let (h, eps) = (config.hidden, config.eps);
        let emb = vb.pp("embeddings");
        let table = |name: &str, rows: usize| emb.pp(name).get((rows, h), "weight");
        let layers = (0..config.layers)
            .map(|i| {
                let l = vb.pp(format!("{}.{i}", names.layer));
                let (q, k, v) = (
                    linear(h, h, l.pp(names.q))?,
                    linear(h, h, l.pp(names.k))?,
                    linear(h, h, l.pp(names.v))?,
                );
                let bias = |x: &Linear| {
                    x.bias()
                        .cloned()
                        .ok_or_else(|| candle_core::Error::Msg("attention without bias".into()))
                };
                let weight = Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?;
                let qkv_bias = Tensor::cat(&[bias(&q)?, bias(&k)?, bias(&v)?], 0)?;
                let intermediate = linear(h, config.intermediate, l.pp(names.intermediate))?;
                Ok(Layer {
                    qkv: Projection::new(Linear::new(weight, Some(qkv_bias)))?,
                    attention_out: Projection::new(linear(h, h, l.pp(names.attention_out))?)?,
                    attention_norm: layer_norm(h, eps, l.pp(names.attention_norm))?,
                    intermediate: Projection::new(intermediate)?,
                    output: Projection::new(linear(config.intermediate, h, l.pp(names.output))?)?,
                    output_norm: layer_norm(h, eps, l.pp(names.output_norm))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            word: half_table(table("word_embeddings", config.vocab_size)?)?,
            position: table("position_embeddings", config.max_positions)?,
            token_type: match config.type_vocab_size {
                0 => None,
                n => Some(table("token_type_embeddings", n)?),
            },
            embedding_norm: layer_norm(h, eps, emb.pp("LayerNorm"))?,
            layers,
            heads: config.heads,
            head_dim: h / config.heads,
            activation: config.activation,
            position_offset: config.position_offset as u32,
            eps,
            relative: match config.relative_buckets {
                0 => None,
                n => Some(
                    vb.pp("encoder.relative_attention_bias")
                        .get((n, config.heads), "weight")?,
                ),
            },
        })
    }

    /// The last hidden state of every real token, packed: `[total tokens, hidden]`, sequence after
    /// sequence in batch order.
    pub fn forward(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let lens: Vec<usize> = batch.ids.iter().map(|s| s.len()).collect();
        let packing = self.packing(&lens)?;
        let x = self.embed(batch)?;
        self.run_layers(x, &packing, 0..self.layers.len(), Grad::No)
    }

    /// How sequences of `lens` tokens are packed, with what their attention scores get added: the
    /// padding mask, and MPNet's relative position bias, computed once for every layer.
    pub fn packing(&self, lens: &[usize]) -> candle_core::Result<Packing> {
        let mut packing = Packing::new(lens, self.word.device())?;
        if let Some(table) = &self.relative {
            packing.mask = relative_bias(table, packing.longest)?.broadcast_add(&packing.mask)?;
        }
        Ok(packing)
    }

    /// The embedding layer's output for every real token, packed: `[total tokens, hidden]`.
    pub fn embed(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let device = self.word.device();
        let lens: Vec<usize> = batch.ids.iter().map(|s| s.len()).collect();
        let total: usize = lens.iter().sum();
        let ids: Vec<u32> = batch.ids.iter().flat_map(|s| s.iter().copied()).collect();
        let types: Vec<u32> = batch
            .type_ids
            .iter()
            .flat_map(|s| s.iter().copied())
            .collect();
        let first = self.position_offset;
        let positions: Vec<u32> = lens.iter().flat_map(|&l| first..first + l as u32).collect();
        let mut embedded = (self
            .word
            .embedding(&Tensor::from_vec(ids, total, device)?)?
            .to_dtype(DType::F32)?
            + self
                .position
                .embedding(&Tensor::from_vec(positions, total, device)?)?)?;
        if let Some(token_type) = &self.token_type {
            embedded =
                (embedded + token_type.embedding(&Tensor::from_vec(types, total, device)?)?)?;
        }
        self.embedding_norm.forward(&embedded)
    }

    /// Runs `layers` of the stack on packed hidden states. With [`Grad::Yes`] every op is one that
    /// candle can differentiate (layer norm, softmax and GELU spelled out), for fine-tuning.
    pub fn run_layers(
        &self,
        mut x: Tensor,
        packing: &Packing,
        layers: std::ops::Range<usize>,
        grad: Grad,
    ) -> candle_core::Result<Tensor> {
        for layer in &self.layers[layers] {
            x = self.layer_forward(layer, &x, packing, grad)?;
        }
        Ok(x)
    }

    /// Number of transformer layers.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// The weights of layer `i`, for fine-tuning. Every layer [`Encoder::load`] builds has its
    /// biases.
    pub fn layer_weights(&self, i: usize) -> candle_core::Result<LayerWeights> {
        let l = &self.layers[i];
        let missing = || candle_core::Error::Msg(format!("layer {i} has no bias"));
        let pair = |w: &Tensor, b: Option<&Tensor>| -> candle_core::Result<(Tensor, Tensor)> {
            Ok((w.clone(), b.cloned().ok_or_else(missing)?))
        };
        let linear = |x: &Projection| {
            let linear = x.linear()?;
            pair(linear.weight(), linear.bias())
        };
        let norm = |n: &LayerNorm| pair(n.weight(), n.bias());
        Ok(LayerWeights {
            linears: [
                linear(&l.qkv)?,
                linear(&l.attention_out)?,
                linear(&l.intermediate)?,
                linear(&l.output)?,
            ],
            norms: [norm(&l.attention_norm)?, norm(&l.output_norm)?],
        })
    }

    /// The same encoder (tensors shared, not copied) with layer `i` replaced, for serving: its
    /// large projections rounded to `f16` and laid out in panels as the loaded layers' are
    /// ([`Projection::new`]).
    pub fn with_layer(&self, i: usize, weights: &LayerWeights) -> candle_core::Result<Self> {
        let mut layer = self.build_layer(weights);
        for projection in [
            &mut layer.qkv,
            &mut layer.attention_out,
            &mut layer.intermediate,
            &mut layer.output,
        ] {
            *projection = Projection::new(projection.linear()?)?;
        }
        let mut tuned = self.clone();
        tuned.layers[i] = layer;
        Ok(tuned)
    }

    /// A layer from its weights (fine-tuning's: in `f32` only).
    pub fn build_layer(&self, weights: &LayerWeights) -> Layer {
        let [qkv, attention_out, intermediate, output] = weights
            .linears
            .clone()
            .map(|(w, b)| Projection::Full(Linear::new(w, Some(b))));
        let [attention_norm, output_norm] = weights
            .norms
            .clone()
            .map(|(w, b)| LayerNorm::new(w, b, self.eps));
        Layer {
            qkv,
            attention_out,
            attention_norm,
            intermediate,
            output,
            output_norm,
        }
    }

    /// One layer of the stack (its weights may come from elsewhere: fine-tuning builds them from
    /// trainable variables at every step).
    pub fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        packing: &Packing,
        grad: Grad,
    ) -> candle_core::Result<Tensor> {
        let (n, longest) = (packing.lens.len(), packing.longest);
        let h = self.heads * self.head_dim;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let qkv = project(&layer.qkv, x, grad, false)?;
        let (q, k, v) = match grad {
            Grad::No => {
                let heads = qkv.apply_op1_no_bwd(&ToHeads {
                    packing,
                    heads: self.heads,
                })?;
                (heads.get(0)?, heads.get(1)?, heads.get(2)?)
            }
            Grad::Yes => {
                let qkv = qkv.index_select(&packing.to_padded, 0)?.reshape((
                    n,
                    longest,
                    3,
                    self.heads,
                    self.head_dim,
                ))?;
                let part = |i: usize| {
                    qkv.narrow(2, i, 1)?
                        .squeeze(2)?
                        .transpose(1, 2)?
                        .contiguous()
                };
                (part(0)?, part(1)?, part(2)?)
            }
        };
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&packing.mask)?;
        let probs = match grad {
            Grad::No => candle_nn::ops::softmax_last_dim(&scores)?,
            Grad::Yes => candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?,
        };
        let context = probs.matmul(&v)?;
        let context = match grad {
            Grad::No => context.apply_op1_no_bwd(&FromHeads { packing })?,
            Grad::Yes => context
                .transpose(1, 2)?
                .reshape((n * longest, h))?
                .index_select(&packing.to_packed, 0)?,
        };
        let attended = project(&layer.attention_out, &context, grad, false)?;
        let x = add_norm(&layer.attention_norm, attended, x, grad)?;
        let fused = (self.activation, grad) == (Activation::Gelu, Grad::No);
        let hidden = project(&layer.intermediate, &x, grad, fused)?;
        let hidden = match (self.activation, grad) {
            _ if fused => hidden,
            (Activation::Gelu, _) => hidden.gelu_erf()?,
            (Activation::GeluTanh, _) => hidden.gelu()?,
            (Activation::Relu, _) => hidden.relu()?,
        };
        let output = project(&layer.output, &hidden, grad, false)?;
        add_norm(&layer.output_norm, output, &x, grad)
    }
}

/// Rows (packed tokens) up to which a projection with row-major weights runs on [`Dense`] rather
/// than candle's matmul: a sentence. On an Intel Xeon (AVX-512, 2 cores), A-B-A-B against candle's
/// matmul alone, a lone request's latency: 2 words 13.6-13.8 -> 8.2-8.7 ms, 10 words 15.0-15.1 ->
/// 10.2-10.6 ms; at ≈50 tokens the two were even, and at ≈56 candle's matmul was ahead.
const DENSE_ROWS: usize = 32;
/// ... when the pass runs alone, on two cores ([`super::second_core`]): candle's matmul then runs
/// on one (each worker's compute thread), the few-rows kernel on both.
const DENSE_ROWS_SPLIT: usize = 96;
/// With its weights in panels, any number of rows runs on [`Dense`], alone or not, in chunks of
/// this many rows (which bounds the kernels' per-call scratch: the AMX path packs its input). One
/// thread, all-MiniLM-L6-v2's four projections (`benches/dense_rows.rs`, Intel Xeon, AVX-512) took
/// 0.50 against candle's 2.14 ms at 13 rows, 2.9 against 4.7 at 64, 8.7 against 10.2 at 256 and
/// 17.1 against 21.0 at 416.
const PANEL_ROWS: usize = 512;

/// `x · weightᵀ + bias`, then GELU ([`GeluErf`]) with `gelu`: on [`Dense`] for a few rows outside
/// training (panels at any number of rows), else candle's matmul.
fn project(
    projection: &Projection,
    x: &Tensor,
    grad: Grad,
    gelu: bool,
) -> candle_core::Result<Tensor> {
    let dense = |most: usize| -> candle_core::Result<bool> {
        Ok(grad == Grad::No
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && (1..=most).contains(&x.dim(0)?))
    };
    let linear = match projection {
        Projection::Panels { weight, bias } if dense(usize::MAX)? => {
            let rows = x.dim(0)?;
            if rows <= PANEL_ROWS {
                return x.apply_op3_no_bwd(weight, bias, &Dense { gelu });
            }
            let chunks = (0..rows).step_by(PANEL_ROWS).map(|start| {
                x.narrow(0, start, PANEL_ROWS.min(rows - start))?
                    .apply_op3_no_bwd(weight, bias, &Dense { gelu })
            });
            return Tensor::cat(&chunks.collect::<candle_core::Result<Vec<_>>>()?, 0);
        }
        Projection::Panels { .. } => projection.linear()?,
        Projection::Full(linear) => {
            let most = match super::second_core::splitting() {
                true => DENSE_ROWS_SPLIT,
                false => DENSE_ROWS,
            };
            match linear.bias() {
                Some(bias) if dense(most)? => {
                    return x.apply_op3_no_bwd(linear.weight(), bias, &Dense { gelu });
                }
                _ => linear.clone(),
            }
        }
    };
    match gelu {
        true => linear.forward(x)?.apply_op1_no_bwd(&GeluErf),
        false => linear.forward(x),
    }
}

/// A projection of few rows on our own kernel ([`aitier_kernels::dense`]): a general matmul
/// spends longer repacking the weights for each call than multiplying a sentence's tokens by them
/// (a lone 12-token sentence took 15-19 ms through candle on 2 cores). With `gelu`, GELU is
/// applied to the output in place rather than by another op into another tensor.
struct Dense {
    gelu: bool,
}

impl CustomOp3 for Dense {
    fn name(&self) -> &'static str {
        "dense-few-rows"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // Rank 3: `f16` in panels ([`Projection`]).
        let (panels, (n, wk)) = match *w_layout.shape().dims() {
            [p, wk, PANEL] => (true, (p * PANEL, wk)),
            _ => (false, w_layout.shape().dims2()?),
        };
        let w = match (w, panels) {
            (CpuStorage::F32(w), false) => DenseWeights::F32(w),
            (CpuStorage::F16(w), false) => DenseWeights::F16(w),
            (CpuStorage::F16(w), true) => DenseWeights::Panels(w),
            _ => candle_core::bail!("dense-few-rows wants f32 or f16 weights"),
        };
        let (
            CpuStorage::F32(x),
            CpuStorage::F32(b),
            Some((x0, x1)),
            Some((w0, w1)),
            Some((b0, b1)),
        ) = (
            x,
            b,
            x_layout.contiguous_offsets(),
            w_layout.contiguous_offsets(),
            b_layout.contiguous_offsets(),
        )
        else {
            candle_core::bail!("dense-few-rows wants contiguous tensors, f32 inputs and biases");
        };
        let (rows, k) = x_layout.shape().dims2()?;
        if k != wk || b1 - b0 != n {
            candle_core::bail!(
                "dense-few-rows: [{rows}, {k}] by [{n}, {wk}] with {} biases",
                b1 - b0
            );
        }
        // On this worker's compute thread, and on the second core when this pass runs alone.
        let mut out = super::second_core::dense(&x[x0..x1], rows, w.range(w0..w1), &b[b0..b1]);
        if self.gelu {
            gelu_in_place(&mut out);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }
}

/// Whether a forward pass must be differentiable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grad {
    No,
    Yes,
}

/// A layer's weights: its four projections (fused QKV, attention output, intermediate, output) as
/// `(weight [out, in], bias [out])`, and its two layer norms as `(weight, bias)`.
#[derive(Clone)]
pub struct LayerWeights {
    pub linears: [(Tensor, Tensor); 4],
    pub norms: [(Tensor, Tensor); 2],
}

/// Names of [`LayerWeights::linears`] and [`LayerWeights::norms`], in order.
pub const LINEAR_NAMES: [&str; 4] = ["qkv", "attention_out", "intermediate", "output"];
pub const NORM_NAMES: [&str; 2] = ["attention_norm", "output_norm"];

/// `norm(fresh + residual)`, where `fresh` is a projection's new output: outside training, in
/// place in `fresh` ([`AddNorm`]).
fn add_norm(
    norm: &LayerNorm,
    fresh: Tensor,
    residual: &Tensor,
    grad: Grad,
) -> candle_core::Result<Tensor> {
    match grad {
        Grad::No if fresh.is_contiguous() && residual.is_contiguous() && norm.bias().is_some() => {
            fresh.inplace_op2(residual, &AddNorm { norm })?;
            Ok(fresh)
        }
        Grad::No => norm.forward(&(fresh + residual)?),
        Grad::Yes => differentiable_layer_norm(norm, &(fresh + residual)?),
    }
}

/// A residual sum and the layer norm after it, in one pass over the first tensor, in place: the
/// operations of candle's sum and its fused layer norm in their order, so the same bits, without
/// the two new tensors they write (a zeroed one for the norm) and a rayon task per row.
struct AddNorm<'a> {
    norm: &'a LayerNorm,
}

impl InplaceOp2 for AddNorm<'_> {
    fn name(&self) -> &'static str {
        "add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        fresh: &mut CpuStorage,
        fresh_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> candle_core::Result<()> {
        let (
            CpuStorage::F32(x),
            CpuStorage::F32(residual),
            Some((x0, x1)),
            Some((r0, r1)),
            Some(bias),
        ) = (
            fresh,
            residual,
            fresh_layout.contiguous_offsets(),
            residual_layout.contiguous_offsets(),
            self.norm.bias(),
        )
        else {
            candle_core::bail!("add-layer-norm wants contiguous f32 tensors and a bias");
        };
        let (alpha, beta) = (self.norm.weight().to_vec1::<f32>()?, bias.to_vec1::<f32>()?);
        let width = alpha.len();
        if fresh_layout.shape() != residual_layout.shape()
            || fresh_layout.shape().dims().last() != Some(&width)
            || beta.len() != width
        {
            candle_core::bail!(
                "add-layer-norm: {:?} + {:?} by {width}",
                fresh_layout.shape(),
                residual_layout.shape()
            );
        }
        let eps = self.norm.eps() as f32;
        let rows = x[x0..x1].chunks_exact_mut(width);
        for (row, residual) in rows.zip(residual[r0..r1].chunks_exact(width)) {
            let (mut sum, mut sum2) = (0f32, 0f32);
            for (v, r) in row.iter_mut().zip(residual) {
                *v += r;
                sum += *v;
                sum2 += *v * *v;
            }
            let mean = sum / width as f32;
            let var = sum2 / width as f32 - mean * mean;
            let inv_std = (var + eps).sqrt().recip();
            for ((v, alpha), beta) in row.iter_mut().zip(&alpha).zip(&beta) {
                *v = (*v - mean) * inv_std * alpha + beta;
            }
        }
        Ok(())
    }
}

/// Layer norm with plain tensor ops, which candle's autograd can follow (its fused kernel cannot).
fn differentiable_layer_norm(norm: &LayerNorm, x: &Tensor) -> candle_core::Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(candle_core::D::Minus1)?)?;
    let variance = centred.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    let normed = centred.broadcast_div(&(variance + norm.eps())?.sqrt()?)?;
    let scaled = normed.broadcast_mul(norm.weight())?;
    match norm.bias() {
        Some(bias) => scaled.broadcast_add(bias),
        None => Ok(scaled),
    }
}

/// Where each sequence's tokens sit in the packed layout (`[total tokens, hidden]`) and in the
/// padded one attention needs (`[sequences, longest, hidden]`), with what the attention scores
/// get added ([`Encoder::packing`]).
pub struct Packing {
    lens: Vec<usize>,
    longest: usize,
    to_padded: Tensor,
    to_packed: Tensor,
    /// The padding mask, `[sequences, 1, 1, longest]`; with MPNet's relative position bias added,
    /// `[sequences, heads, longest, longest]`.
    mask: Tensor,
}

impl Packing {
    fn new(lens: &[usize], device: &candle_core::Device) -> candle_core::Result<Self> {
        let (n, longest) = (lens.len(), lens.iter().copied().max().unwrap_or(1));
        let total: usize = lens.iter().sum();
        // Padded slot (b, p) reads packed token offset_b + p, or token 0 when p is padding (masked).
        let mut to_padded = vec![0u32; n * longest];
        let mut to_packed = Vec::with_capacity(total);
        let mut mask = vec![f32::MIN; n * longest];
        let mut offset = 0;
        for (b, &len) in lens.iter().enumerate() {
            for p in 0..len {
                to_padded[b * longest + p] = (offset + p) as u32;
                to_packed.push((b * longest + p) as u32);
                mask[b * longest + p] = 0.0;
            }
            offset += len;
        }
        Ok(Self {
            lens: lens.to_vec(),
            longest,
            to_padded: Tensor::from_vec(to_padded, n * longest, device)?,
            to_packed: Tensor::from_vec(to_packed, total, device)?,
            mask: Tensor::from_vec(mask, (n, 1, 1, longest), device)?,
        })
    }
}

/// MPNet's relative position bias for sequences of up to `longest` tokens, `[1, heads, longest,
/// longest]`: query `i` and key `j` read the row of `table` (`[buckets, heads]`) for `j - i`.
fn relative_bias(table: &Tensor, longest: usize) -> candle_core::Result<Tensor> {
    let buckets = table.dim(0)?;
    let index: Vec<u32> = (0..longest)
        .flat_map(|i| (0..longest).map(move |j| relative_bucket(j as i64 - i as i64, buckets)))
        .collect();
    let index = Tensor::from_vec(index, longest * longest, table.device())?;
    table
        .embedding(&index)?
        .reshape((longest, longest, ()))?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()
}

/// The bucket of a key `distance` tokens after its query (before when negative), as MPNet (and T5)
/// count them: half the buckets for keys before, half for keys after; within each, exact distances
/// up to a quarter of the buckets, then logarithmic up to 128 tokens, then the last bucket.
fn relative_bucket(distance: i64, buckets: usize) -> u32 {
    const MAX_DISTANCE: f32 = 128.0;
    let half = (buckets / 2) as i64;
    let before = -distance;
    let side = if before < 0 { half } else { 0 };
    let n = before.abs();
    let exact = half / 2;
    let bucket = if n < exact {
        n
    } else {
        // In f32, as the reference computes it.
        let log = ((n as f32 / exact as f32).ln() / (MAX_DISTANCE / exact as f32).ln()
            * (half - exact) as f32) as i64;
        (exact + log).min(half - 1)
    };
    (side + bucket) as u32
}

/// The values of a contiguous `f32` tensor, for a custom op named `op`.
fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("{op} wants a contiguous f32 tensor"),
    }
}

/// A fused QKV projection's packed output `[tokens, 3 × hidden]` as q, k and v by head in the
/// padded layout attention needs, `[3, sequences, heads, longest, head_dim]`, padding zero (masked
/// out of the scores). One pass, where candle's ops gathered the padded rows (zeroed first) and
/// then copied each part out of them: 3-4% of a 32-sentence pass (`perf`, Intel Xeon).
struct ToHeads<'a> {
    packing: &'a Packing,
    heads: usize,
}

impl CustomOp1 for ToHeads<'_> {
    fn name(&self) -> &'static str {
        "qkv-to-heads"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = contiguous_f32(storage, layout, self.name())?;
        let Packing { lens, longest, .. } = self.packing;
        let n = lens.len();
        let (tokens, width) = layout.shape().dims2()?;
        let (heads, h) = (self.heads, width / 3);
        if tokens != lens.iter().sum::<usize>() || width != 3 * h || !h.is_multiple_of(heads) {
            candle_core::bail!("qkv-to-heads: [{tokens}, {width}] for {lens:?} and {heads} heads");
        }
        let d = h / heads;
        let mut out = vec![0f32; 3 * n * heads * longest * d];
        let rows = data.chunks_exact(width);
        let slots = lens
            .iter()
            .enumerate()
            .flat_map(|(b, &len)| (0..len).map(move |p| (b, p)));
        for (row, (b, p)) in rows.zip(slots) {
            for (part, head) in (0..3).flat_map(|part| (0..heads).map(move |head| (part, head))) {
                let at = (((part * n + b) * heads + head) * longest + p) * d;
                let from = part * h + head * d;
                out[at..at + d].copy_from_slice(&row[from..from + d]);
            }
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((3, n, heads, *longest, d)),
        ))
    }
}

/// Attention's output by head, `[sequences, heads, longest, head_dim]`, back to packed
/// `[tokens, hidden]` (padding dropped) in one pass ([`ToHeads`]'s reverse).
struct FromHeads<'a> {
    packing: &'a Packing,
}

impl CustomOp1 for FromHeads<'_> {
    fn name(&self) -> &'static str {
        "heads-to-packed"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = contiguous_f32(storage, layout, self.name())?;
        let Packing { lens, longest, .. } = self.packing;
        let (n, heads, padded, d) = layout.shape().dims4()?;
        if n != lens.len() || padded != *longest {
            candle_core::bail!("heads-to-packed: [{n}, {heads}, {padded}, {d}] for {lens:?}");
        }
        let total: usize = lens.iter().sum();
        let mut out = Vec::with_capacity(total * heads * d);
        for (b, &len) in lens.iter().enumerate() {
            for p in 0..len {
                for head in 0..heads {
                    let at = ((b * heads + head) * padded + p) * d;
                    out.extend_from_slice(&data[at..at + d]);
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((total, heads * d))))
    }
}

/// Mean of each sequence's token states: `[sequences, hidden]` from packed `[tokens, hidden]`.
pub fn mean_pool(packed: &Tensor, lens: &[usize]) -> candle_core::Result<Tensor> {
    let total: usize = lens.iter().sum();
    let mut weights = vec![0f32; lens.len() * total];
    let mut offset = 0;
    for (b, &len) in lens.iter().enumerate() {
        weights[b * total + offset..b * total + offset + len].fill(1.0 / len as f32);
        offset += len;
    }
    Tensor::from_vec(weights, (lens.len(), total), packed.device())?.matmul(packed)
}

/// The first token's state of each sequence (`[CLS]` pooling).
pub fn first_token(packed: &Tensor, lens: &[usize]) -> candle_core::Result<Tensor> {
    let starts: Vec<u32> = lens
        .iter()
        .scan(0u32, |offset, &len| {
            let start = *offset;
            *offset += len as u32;
            Some(start)
        })
        .collect();
    let n = starts.len();
    packed.index_select(&Tensor::from_vec(starts, n, packed.device())?, 0)
}

/// GELU with the exact erf form, computed with a rational approximation of erf that is accurate to
/// float precision and, unlike libm's `erff`, vectorises.
struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-vectorised"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = contiguous_f32(storage, layout, self.name())?;
        let mut out = data.to_vec();
        gelu_in_place(&mut out);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// [`GeluErf`]'s arithmetic on `values`, in place.
fn gelu_in_place(values: &mut [f32]) {
    // pulp compiles the loop for the best instruction set this CPU has (AVX-512 or AVX2),
    // chosen at run time, so that it vectorises.
    let arch = pulp::Arch::new();
    values.par_chunks_mut(16 * 1024).for_each(|chunk| {
        arch.dispatch(|| {
            for v in chunk.iter_mut() {
                let x = *v;
                *v = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            }
        })
    });
}

/// erf as a ratio of an odd and an even polynomial on [-4, 4] (outside it erf is ±1 in f32); the
/// coefficients are those of Eigen's and XLA's float erf. Plain `a * b + c` rather than `mul_add`:
/// it vectorises just as well, and in debug builds `mul_add` is a call into libm per step.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_474e-2;
    x * p / q
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf in double precision from its Maclaurin series,
    /// 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1)), accurate enough for |x| <= 4.
    fn erf_reference(x: f64) -> f64 {
        let mut sum = 0.0;
        let mut term = x;
        for n in 0..200 {
            let add = term / (2 * n + 1) as f64;
            sum += add;
            term *= -x * x / (n + 1) as f64;
            if add.abs() < 1e-17 {
                break;
            }
        }
        (2.0 / std::f64::consts::PI.sqrt() * sum).clamp(-1.0, 1.0)
    }

    #[test]
    fn the_vectorised_erf_matches_the_exact_one() {
        let mut worst = 0f64;
        for i in -5000..=5000 {
            let x = i as f64 / 1000.0;
            let err = (erf(x as f32) as f64 - erf_reference(x.clamp(-4.0, 4.0))).abs();
            worst = worst.max(err);
        }
        assert!(worst < 2e-6, "worst error {worst}");
    }
}
