//! Our own forward pass of a quantised llama-family model, on our own int8 kernels: the `llama`
//! architecture (SmolLM2, Llama) and `qwen2` (Qwen2 and Qwen2.5), which differs only in biases on
//! q, k and v and in the rotary convention ([`Architecture`]).
//! candle's `quantized_llama::ModelWeights` keeps its KV cache in private fields and takes one
//! position for a whole batch; this one takes caches we own, so it can (a) start a prompt from the
//! cache of a shared prefix and (b) advance several sequences, each at its own position, in one
//! pass. The matmuls then run on the stacked `[tokens, dim]` activations of every sequence: the
//! weights (≈95 MB for SmolLM2, more than any cache) are read once per step instead of once per
//! sequence, which is where batching gets its throughput. Attention and RoPE run per sequence.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::Content;

use super::LlmError;
use super::kernels::attention::{Heads, QUERY_BLOCK, Queries};
use super::kernels::{Isa, QMatrix, attend_tokens, silu_mul};
use super::kv::{KvCache, Rope, RopeStyle, rms_norm};
use super::linear::{Compute, Linear, load_matrix};

struct Layer {
    attn_norm: Vec<f32>,
    qkv: Linear,
    /// q|k|v biases side by side, as the columns of `qkv` (qwen2); `None` without biases (llama).
    qkv_bias: Option<Vec<f32>>,
    wo: Linear,
    ffn_norm: Vec<f32>,
    gate_up: Linear,
    down: Linear,
}

/// The GGUF architectures this forward pass runs (`general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
}

impl Architecture {
    fn from_gguf(ct: &Content) -> Result<Self, LlmError> {
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .map_or("llama", String::as_str);
        match arch {
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(LlmError::Load(format!(
                "the GGUF architecture '{other}' is not supported (llama and qwen2 are)"
            ))),
        }
    }

    /// The prefix of its metadata keys.
    pub fn key(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }

    fn rope(self) -> RopeStyle {
        match self {
            Self::Llama => RopeStyle::Interleaved,
            Self::Qwen2 => RopeStyle::Halves,
        }
    }
}

/// Shapes read from the GGUF metadata.
#[derive(Debug, Clone, Copy)]
pub struct LlamaConfig {
    pub arch: Architecture,
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
    /// The token embeddings; also the output projection when the model ties them (one copy).
    embeddings: Arc<QMatrix>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Linear,
    rope: Rope,
    compute: Compute,
}

fn f32_vec(t: QTensor) -> Result<Vec<f32>, LlmError> {
    Ok(t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?)
}

impl Llama {
    /// Loads the weights for the kernels of `isa` ([`Isa::detect`] for the fastest here), run on
    /// the calling thread ([`Self::set_threads`] to split them).
    pub fn from_gguf<R: Read + Seek>(ct: &Content, r: &mut R, isa: Isa) -> Result<Self, LlmError> {
        let dev = Device::Cpu;
        let arch = Architecture::from_gguf(ct)?;
        let meta = |key: &str| {
            let key = format!("{}.{key}", arch.key());
            ct.metadata
                .get(&key)
                .ok_or_else(|| LlmError::Load(format!("the GGUF metadata has no {key}")))
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
        let norm = f32_vec(tensor("output_norm.weight")?)?;
        let embeddings = Arc::new(load_matrix(ct, r, "token_embd.weight")?);
        let vocab = embeddings.rows();
        if embeddings.cols() != dim {
            return Err(LlmError::Load(format!(
                "token_embd.weight has rows of {}, the model's width is {dim}",
                embeddings.cols()
            )));
        }
        let output = if ct.tensor_infos.contains_key("output.weight") {
            Linear::stacked(vec![load_matrix(ct, r, "output.weight")?])?
        } else {
            Linear::new(embeddings.clone())
        };
        let mut layers = Vec::with_capacity(n_layer);
        let mut ffn_dim = 0;
        for i in 0..n_layer {
            let mut m = |n: &str| load_matrix(ct, r, &format!("blk.{i}.{n}.weight"));
            let (q, k, v) = (m("attn_q")?, m("attn_k")?, m("attn_v")?);
            let (gate, up) = (m("ffn_gate")?, m("ffn_up")?);
            let (wo, down) = (m("attn_output")?, m("ffn_down")?);
            ffn_dim = gate.rows();
            let mut vector = |n: &str| f32_vec(ct.tensor(r, &format!("blk.{i}.{n}"), &dev)?);
            let qkv_bias = match arch {
                Architecture::Llama => None,
                Architecture::Qwen2 => Some(
                    [
                        vector("attn_q.bias")?,
                        vector("attn_k.bias")?,
                        vector("attn_v.bias")?,
                    ]
                    .concat(),
                ),
            };
            if let Some(bias) = &qkv_bias
                && bias.len() != q.rows() + k.rows() + v.rows()
            {
                return Err(LlmError::Load(format!(
                    "blk.{i}: {} q, k and v biases for {} columns",
                    bias.len(),
                    q.rows() + k.rows() + v.rows()
                )));
            }
            layers.push(Layer {
                attn_norm: vector("attn_norm.weight")?,
                qkv: Linear::stacked(vec![q, k, v])?,
                qkv_bias,
                wo: Linear::stacked(vec![wo])?,
                ffn_norm: vector("ffn_norm.weight")?,
                gate_up: Linear::stacked(vec![gate, up])?,
                down: Linear::stacked(vec![down])?,
            });
        }
        tracing::debug!(
            bytes = layers
                .iter()
                .map(|l| l.qkv.bytes() + l.wo.bytes() + l.gate_up.bytes() + l.down.bytes())
                .sum::<usize>()
                + output.bytes(),
            ?isa,
            ?arch,
            "weights loaded"
        );
        let head_dim = dim / n_head;
        let rope_dim = get("rope.dimension_count").unwrap_or(head_dim);
        Ok(Self {
            config: LlamaConfig {
                arch,
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
            rope: Rope::new(rope_dim, base.unwrap_or(10_000.0), context, arch.rope()),
            compute: Compute::new(isa, 1),
        })
    }

    /// Splits every projection's columns over `threads` threads (1: the calling thread only). The
    /// logits do not change: each column is computed the same way on any thread.
    pub fn set_threads(&mut self, threads: usize) {
        self.compute = Compute::new(self.compute.isa, threads.max(1));
    }

    pub fn threads(&self) -> usize {
        self.compute.threads()
    }

    /// Makes the calling thread the first of the compute threads for as long as the returned pool
    /// lives (`None` with one thread): the passes it runs then start and end on it, with no
    /// hand-off to another thread and back. The chat engine keeps one on its thread.
    pub fn pool_here(&self) -> Option<rayon::ThreadPool> {
        self.compute.pool_here()
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
        let dim = self.config.dim;
        for &t in tokens {
            let t = t as usize;
            if t >= self.config.vocab {
                return Err(LlmError::Tokenizer(format!("token id {t} out of range")));
            }
            let at = out.len();
            out.resize(at + dim, 0.0);
            self.embeddings.dequantize_row(t, &mut out[at..]);
        }
        Ok(())
    }

    /// Runs every input's tokens through the model in one pass, appending them to its cache, and
    /// returns the logits after each input's last token: `[inputs, vocab]`, row-major. A prompt is
    /// one input with many tokens; a decode step is many inputs with one token each.
    ///
    /// Every token goes through the same operations in the same order whatever else is in the
    /// pass: the matmul kernels compute each row on its own (see [`super::kernels`]) and attention
    /// runs token by token. So a token's logits are the same bits whether its prompt was prefilled
    /// cold, after a cached prefix, in chunks, or next to other sequences, and greedy decoding
    /// gives the same text whatever ran before.
    pub fn forward(&self, inputs: &mut [Input<'_>]) -> Result<Vec<f32>, LlmError> {
        // The whole pass runs on the compute threads (on this one when it is the first of them,
        // see `pool_here`): each projection's split is then picked up by a thread still awake
        // from the last one, instead of being handed from this thread to sleeping ones and back
        // (≈20 µs each way on a VM, 180 times a step).
        self.compute.run(|| self.pass(inputs))
    }

    fn pass(&self, inputs: &mut [Input<'_>]) -> Result<Vec<f32>, LlmError> {
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
        let mut h = Vec::new();
        let mut attn = vec![0f32; rows * q_dim];
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, c.eps, &mut h);
            let mut qkv = layer.qkv.forward(&self.compute, &h, rows);
            let width = q_dim + 2 * kv_dim;
            if let Some(bias) = &layer.qkv_bias {
                for row in qkv.chunks_exact_mut(width) {
                    row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
                }
            }
            // Rotary positions, then each input's new keys and values join its cache.
            let mut row = 0;
            for input in inputs.iter_mut() {
                let start = input.cache.len();
                for j in 0..input.tokens.len() {
                    let r = &mut qkv[(row + j) * width..(row + j + 1) * width];
                    let (q, kv) = r.split_at_mut(q_dim);
                    self.rope.apply(q, c.head_dim, start + j);
                    self.rope.apply(&mut kv[..kv_dim], c.head_dim, start + j);
                    let (k, v) = kv.split_at(kv_dim);
                    input.cache.push(l, k, v);
                }
                row += input.tokens.len();
            }
            // Attention: every input's tokens in blocks of QUERY_BLOCK over the compute threads.
            // A block computes its rows exactly as it would within its whole prompt. A decode
            // step's one token goes by key/value head instead, so that a lone sequence's
            // attention, which grows with its length, runs on every thread too.
            let mut tasks = Vec::new();
            let (mut rest, mut row) = (&mut attn[..], 0);
            for input in inputs.iter() {
                let (keys, values) = input.cache.layer(l);
                let (start, count) = (input.cache.len(), input.tokens.len());
                let (mine, tail) = rest.split_at_mut(count * q_dim);
                rest = tail;
                let decode = count == 1;
                let chunk = if decode {
                    q_dim / c.n_kv_head
                } else {
                    QUERY_BLOCK * q_dim
                };
                for (b, out) in mine.chunks_mut(chunk).enumerate() {
                    // (first token, tokens, key/value heads) of the task.
                    let (j0, n, kv_heads) = if decode {
                        (0, 1, b..b + 1)
                    } else {
                        (b * QUERY_BLOCK, out.len() / q_dim, 0..c.n_kv_head)
                    };
                    let queries = Queries {
                        qkv: &qkv[(row + j0) * width..(row + j0 + n) * width],
                        width,
                        start: start + j0,
                        count: n,
                        kv_heads,
                    };
                    tasks.push((queries, keys.as_slice(), values.as_slice(), out));
                }
                row += count;
            }
            let isa = self.compute.isa;
            self.compute
                .each(tasks, Vec::new, |scores, (queries, keys, values, out)| {
                    attend_tokens(isa, heads, &queries, keys, values, scores, out)
                });
            let o = layer.wo.forward(&self.compute, &attn, rows);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            rms_norm(&x, &layer.ffn_norm, c.eps, &mut h);
            let gu = layer.gate_up.forward(&self.compute, &h, rows);
            let mut act = vec![0f32; rows * c.ffn_dim];
            silu_mul(&gu, c.ffn_dim, &mut act);
            let d = layer.down.forward(&self.compute, &act, rows);
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
        Ok(self.output.forward(&self.compute, &h, inputs.len()))
    }
}
