//! Our own forward pass of a quantised llama-architecture model, on candle's quantised matmuls.
//! candle's `quantized_llama::ModelWeights` keeps its KV cache in private fields and takes one
//! position for a whole batch; this one takes caches we own, so it can (a) start a prompt from the
//! cache of a shared prefix and (b) advance several sequences, each at its own position, in one
//! pass. The matmuls then run on the stacked `[tokens, dim]` activations of every sequence: the
//! weights (≈140 MB in Q8_0, more than any cache) are read once per step instead of once per
//! sequence, which is where batching gets its throughput. Attention and RoPE run per sequence.

use std::borrow::Cow;
use std::io::{Cursor, Read, Seek};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};

use super::LlmError;
use super::attention::{BLOCK_MIN, Heads, attend, attend_block};
use super::kv::{KvCache, Rope, rms_norm};

/// The GGUF at `path` with the tensors candle has no fast kernel for (Q4_1, Q5_0, Q5_1)
/// requantised to Q8_0, as an in-memory GGUF: on SmolLM2 that took decoding from ≈25 to ≈73
/// tokens/s with the same greedy output (../shared/FINDINGS.md).
pub fn requantised_gguf(path: &Path) -> Result<(Content, Cursor<Vec<u8>>), LlmError> {
    let device = Device::Cpu;
    let load = |e: &dyn std::fmt::Display| LlmError::Load(format!("{}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(|e| load(&e))?;
    let content = Content::read(&mut file).map_err(|e| load(&e))?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let tensor = content
            .tensor(&mut file, name, &device)
            .map_err(|e| load(&e))?;
        let tensor = match tensor.dtype() {
            GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
                QTensor::quantize(&tensor.dequantize(&device)?, GgmlDType::Q8_0)?
            }
            _ => tensor,
        };
        tensors.push((name.clone(), tensor));
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
    Ok((content, rewritten))
}

/// candle's fast x86 kernels for Q8_0 (weights repacked in 16-row tiles, activations quantised
/// per 256 values, AVX-512 VNNI) only take inputs whose width is a multiple of 256. SmolLM2's width
/// is 576: padding it to 768 with zero weights does a third more arithmetic yet runs 4–10× faster
/// than the generic Q8_0 dot products, and reuses each weight tile for every row of a batch
/// (measured on this machine, one thread: [4, 576]×[576, 3072] 591 µs, [4, 768]×[768, 3072] 53 µs).
const FAST_WIDTH: usize = 256;

/// Which matmul kernels the weights are laid out for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Q8_0 weights padded to a multiple of [`FAST_WIDTH`] for candle's tiled VNNI kernels. Their
    /// activations are quantised per 256 values rather than per 32, so the logits differ a little
    /// from the reference (tests/llm_llama.rs measures by how much).
    Fast,
    /// The kernels candle's `quantized_llama` uses: bit-identical logits on short prompts.
    Reference,
}

/// A projection whose output columns are several weight matrices side by side (q|k|v, gate|up):
/// one matmul instead of three means one pass of the thread pool's barrier instead of three.
struct Linear {
    matmul: QMatMul,
    /// Input width, and the padded width the matmul takes.
    k: usize,
    padded: usize,
    out: usize,
}

impl Linear {
    /// Stacks the rows of `parts` (`[out_i, in]` each) into one `[Σ out_i, in]` matrix. Rows are
    /// whole quantisation blocks, so stacking is concatenating their bytes; padding a Q8_0 row is
    /// appending zero blocks (scale 0).
    fn stacked(parts: Vec<QTensor>, kernels: Kernels) -> Result<Self, LlmError> {
        let dtype = parts[0].dtype();
        let (_, k) = parts[0].shape().dims2()?;
        let padded = if dtype == GgmlDType::Q8_0 && kernels == Kernels::Fast {
            k.next_multiple_of(FAST_WIDTH)
        } else {
            k
        };
        let row = k / dtype.block_size() * dtype.type_size();
        let pad = vec![0u8; (padded - k) / dtype.block_size() * dtype.type_size()];
        let mut out = 0;
        let mut bytes = Vec::new();
        for part in &parts {
            let (n, pk) = part.shape().dims2()?;
            if part.dtype() != dtype || pk != k {
                return Err(LlmError::Load("projections of mixed types".into()));
            }
            out += n;
            for r in part.data()?.chunks_exact(row) {
                bytes.extend_from_slice(r);
                bytes.extend_from_slice(&pad);
            }
        }
        let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype)?;
        let matmul = QMatMul::from_qtensor(QTensor::new(storage, (out, padded))?)?;
        Ok(Self {
            matmul,
            k,
            padded,
            out,
        })
    }

    /// `[rows, k]` → `[rows, out]`, row-major.
    fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>, LlmError> {
        let x = if self.padded == self.k {
            Tensor::from_slice(x, (rows, self.k), &Device::Cpu)?
        } else {
            let mut p = vec![0f32; rows * self.padded];
            for (dst, src) in p.chunks_exact_mut(self.padded).zip(x.chunks_exact(self.k)) {
                dst[..self.k].copy_from_slice(src);
            }
            Tensor::from_vec(p, (rows, self.padded), &Device::Cpu)?
        };
        let y = self.matmul.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        debug_assert_eq!(y.len(), rows * self.out);
        Ok(y)
    }
}

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
