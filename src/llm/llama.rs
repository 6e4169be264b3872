//! Our own forward pass of a quantised llama-architecture model, on candle's quantised matmuls.
//! candle's `quantized_llama::ModelWeights` keeps its KV cache in private fields and takes one
//! position for a whole batch; this one takes caches we own, so it can (a) start a prompt from the
//! cache of a shared prefix and (b) advance several sequences, each at its own position, in one
//! pass. The matmuls then run on the stacked `[tokens, dim]` activations of every sequence: the
//! weights (≈140 MB in Q8_0, more than any cache) are read once per step instead of once per
//! sequence, which is where batching gets its throughput. Attention and RoPE run per sequence.

use std::borrow::Cow;
use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{QStorage, QTensor};

use super::LlmError;
use super::attention::{BLOCK_MIN, Heads, attend, attend_block};
use super::kv::{KvCache, Rope, rms_norm};
use super::linear::{Kernels, Linear};

struct Layer {
    attn_norm: Vec<f32>,
    qkv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    gate_up: Linear,
    down: Linear,
}

/// Shapes read from the GGUF metadata.
#[derive(Debug, Clone, Copy)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub dim: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub vocab: usize,
    eps: f32,
}

impl LlamaConfig {
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}

/// One sequence's part in a forward pass: its cache and the tokens that follow it.
pub struct Input<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
}

/// The weights: immutable once loaded, shared by every sequence.
pub struct Llama {
    config: LlamaConfig,
    embeddings: Arc<QTensor>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Linear,
    rope: Rope,
}

fn f32_vec(t: QTensor) -> Result<Vec<f32>, LlmError> {
    Ok(t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?)
}

impl Llama {
    pub fn from_gguf<R: Read + Seek>(
        ct: &Content,
        r: &mut R,
        kernels: Kernels,
    ) -> Result<Self, LlmError> {
        let dev = Device::Cpu;
        let meta = |key: &str| {
            ct.metadata
                .get(&format!("llama.{key}"))
                .ok_or_else(|| LlmError::Load(format!("the GGUF metadata has no llama.{key}")))
        };
        let get = |key: &str| -> Result<usize, LlmError> { Ok(meta(key)?.to_u32()? as usize) };
        let (n_layer, dim, n_head) = (
            get("block_count")?,
            get("embedding_length")?,
            get("attention.head_count")?,
        );
        let n_kv_head = get("attention.head_count_kv")?;
        let eps = meta("attention.layer_norm_rms_epsilon")?.to_f32()?;
        let base = meta("rope.freq_base").and_then(|v| Ok(v.to_f32()?));
        let context = get("context_length").unwrap_or(4096);
        let mut tensor = |name: &str| -> Result<QTensor, LlmError> {
            ct.tensor(r, name, &dev)
                .map_err(|e| LlmError::Load(format!("{name}: {e}")))
        };
        let embeddings = Arc::new(tensor("token_embd.weight")?);
        let (vocab, _) = embeddings.shape().dims2()?;
        let output = match tensor("output.weight") {
            Ok(t) => Linear::stacked(vec![t], kernels)?,
            Err(_) => Linear::stacked(
                vec![QTensor::new(
                    QStorage::from_data(embeddings.data()?, &dev, embeddings.dtype())?,
                    (vocab, dim),
                )?],
                kernels,
            )?,
        };
        let norm = f32_vec(tensor("output_norm.weight")?)?;
        let mut layers = Vec::with_capacity(n_layer);
        let mut ffn_dim = 0;
        for i in 0..n_layer {
            let mut t = |n: &str| tensor(&format!("blk.{i}.{n}.weight"));
            let (q, k, v) = (t("attn_q")?, t("attn_k")?, t("attn_v")?);
            let (gate, up) = (t("ffn_gate")?, t("ffn_up")?);
            ffn_dim = gate.shape().dims2()?.0;
            layers.push(Layer {
                attn_norm: f32_vec(t("attn_norm")?)?,
                qkv: Linear::stacked(vec![q, k, v], kernels)?,
                wo: Linear::stacked(vec![t("attn_output")?], kernels)?,
                ffn_norm: f32_vec(t("ffn_norm")?)?,
                gate_up: Linear::stacked(vec![gate, up], kernels)?,
                down: Linear::stacked(vec![t("ffn_down")?], kernels)?,
            });
        }
        let head_dim = dim / n_head;
        let rope_dim = get("rope.dimension_count").unwrap_or(head_dim);
        Ok(Self {
            config: LlamaConfig {
                n_layer,
                dim,
                n_head,
                n_kv_head,
                head_dim,
                ffn_dim,
                vocab,
                eps,
            },
            embeddings,
            layers,
            norm,
            output,
            rope: Rope::new(rope_dim, base.unwrap_or(10_000.0), context),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// An empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.n_layer, self.config.kv_dim())
    }

    /// The embedding rows of `tokens`, dequantised one row at a time (the table stays quantised:
    /// as f32 it would be another 110 MB for SmolLM2).
    fn embed(&self, tokens: &[u32], out: &mut Vec<f32>) -> Result<(), LlmError> {
        let dtype = self.embeddings.dtype();
        let row = self.config.dim / dtype.block_size() * dtype.type_size();
        let data = self.embeddings.data()?;
        for &t in tokens {
            let t = t as usize;
            if t >= self.config.vocab {
                return Err(LlmError::Tokenizer(format!("token id {t} out of range")));
            }
            let bytes = Cow::Borrowed(&data[t * row..(t + 1) * row]);
            let storage = QStorage::from_data(bytes, &Device::Cpu, dtype)?;
            let q = QTensor::new(storage, (self.config.dim,))?;
            out.extend(q.dequantize(&Device::Cpu)?.to_vec1::<f32>()?);
        }
        Ok(())
    }

    /// Runs every input's tokens through the model in one pass, appending them to its cache, and
    /// returns the logits after each input's last token: `[inputs, vocab]`, row-major. A prompt is
    /// one input with many tokens; a decode step is many inputs with one token each. Attention runs
    /// as loops for single tokens and as matmuls for several (see [`Self::prefill`]).
    pub fn forward(&self, inputs: &mut [Input<'_>]) -> Result<Vec<f32>, LlmError> {
        self.run(inputs, false)
    }

    /// [`Self::forward`] for prompts: attention always as matmuls, even for a one-token rest after
    /// a cached prefix. A prompt's tokens are then computed the same way whether or not part of it
    /// came from the prefix cache (the two attention paths round differently, and on a near-tie
    /// that difference alone could change a greedy answer).
    pub fn prefill(&self, inputs: &mut [Input<'_>]) -> Result<Vec<f32>, LlmError> {
        self.run(inputs, true)
    }

    fn run(&self, inputs: &mut [Input<'_>], prefill: bool) -> Result<Vec<f32>, LlmError> {
        let c = self.config;
        let rows: usize = inputs.iter().map(|i| i.tokens.len()).sum();
        if inputs.iter().any(|i| i.tokens.is_empty()) {
            return Err(LlmError::Load("an input without tokens".into()));
        }
        if let Some(i) = inputs
            .iter()
            .find(|i| i.cache.len() + i.tokens.len() > self.rope.positions())
        {
            return Err(LlmError::ContextExceeded {
                prompt: i.cache.len() + i.tokens.len(),
                max_tokens: 0,
                context: self.rope.positions(),
            });
        }
        let mut x = Vec::with_capacity(rows * c.dim);
        for input in inputs.iter() {
            self.embed(input.tokens, &mut x)?;
        }
        let (kv_dim, q_dim) = (c.kv_dim(), c.n_head * c.head_dim);
        let heads = Heads {
            n_head: c.n_head,
            n_kv_head: c.n_kv_head,
            head_dim: c.head_dim,
        };
        let (mut h, mut scores) = (Vec::new(), Vec::new());
        let mut attn = vec![0f32; rows * q_dim];
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, c.eps, &mut h);
            let mut qkv = layer.qkv.forward(&h, rows)?;
            let width = q_dim + 2 * kv_dim;
            let mut row = 0;
            for input in inputs.iter_mut() {
                let start = input.cache.len();
                let (keys, values) = input.cache.layer_mut(l);
                for j in 0..input.tokens.len() {
                    let r = &mut qkv[(row + j) * width..(row + j + 1) * width];
                    let (q, kv) = r.split_at_mut(q_dim);
                    self.rope.apply(q, c.head_dim, start + j);
                    self.rope.apply(&mut kv[..kv_dim], c.head_dim, start + j);
                    keys.extend_from_slice(&kv[..kv_dim]);
                    values.extend_from_slice(&kv[kv_dim..]);
                }
                let count = input.tokens.len();
                let out = &mut attn[row * q_dim..(row + count) * q_dim];
                if prefill || count >= BLOCK_MIN {
                    let queries = &qkv[row * width..(row + count) * width];
                    attend_block(heads, queries, width, start, count, keys, values, out)?;
                } else {
                    for j in 0..count {
                        let q = &qkv[(row + j) * width..(row + j) * width + q_dim];
                        let out = &mut out[j * q_dim..(j + 1) * q_dim];
                        attend(heads, q, keys, values, start + j + 1, &mut scores, out);
                    }
                }
                row += input.tokens.len();
            }
            let o = layer.wo.forward(&attn, rows)?;
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            rms_norm(&x, &layer.ffn_norm, c.eps, &mut h);
            let gu = layer.gate_up.forward(&h, rows)?;
            let act: Vec<f32> = gu
                .chunks_exact(2 * c.ffn_dim)
                .flat_map(|r| {
                    let (g, u) = r.split_at(c.ffn_dim);
                    g.iter().zip(u).map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                })
                .collect();
            let d = layer.down.forward(&act, rows)?;
            x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
        }
        let mut last = Vec::with_capacity(inputs.len() * c.dim);
        let mut row = 0;
        for input in inputs.iter_mut() {
            row += input.tokens.len();
            last.extend_from_slice(&x[(row - 1) * c.dim..row * c.dim]);
            input.cache.advance(input.tokens.len());
        }
        rms_norm(&last, &self.norm, c.eps, &mut h);
        self.output.forward(&h, inputs.len())
    }
}
