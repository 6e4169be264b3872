//! The per-sequence state of the llama forward pass and the small per-token maths around the
//! matmuls (RMS norm, rotary embeddings, attention over one sequence's cache). These run on plain
//! `f32` slices: at SmolLM2's size a candle op costs more in dispatch and allocation than in
//! arithmetic, and a batched decode step would otherwise run hundreds of them per layer.

use half::f16;

/// The keys and values one sequence has seen, one `[tokens, kv_dim]` buffer per layer. Owning it
/// (instead of candle's `ModelWeights` keeping it privately) is what lets sequences at different
/// positions share a forward pass and lets a prompt's cache be kept and reused by a later prompt.
///
/// Held in `f16`, as llama.cpp holds its cache: a decode step reads every cached row of every
/// layer, so its cost grows with the answer's length by half as much as in `f32`, and so does a
/// sequence's memory. A row is rounded once, as it joins, on every path alike.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<(Vec<f16>, Vec<f16>)>,
    kv_dim: usize,
    len: usize,
}

impl KvCache {
    pub fn new(n_layer: usize, kv_dim: usize) -> Self {
        Self {
            layers: vec![(Vec::new(), Vec::new()); n_layer],
            kv_dim,
            len: 0,
        }
    }

    /// Tokens whose keys and values are cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every token from `len` on: what is left is exactly the cache of the first `len`
    /// tokens, because each token's keys and values depend only on the tokens before it.
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        for (k, v) in &mut self.layers {
            k.truncate(len * self.kv_dim);
            v.truncate(len * self.kv_dim);
        }
        self.len = len;
    }

    /// Gives back the room reserved for growth: a cache kept for reuse does not grow.
    pub fn shrink_to_fit(&mut self) {
        for (k, v) in &mut self.layers {
            k.shrink_to_fit();
            v.shrink_to_fit();
        }
    }

    /// A new cache holding the first `len` tokens of this one.
    pub fn prefix(&self, len: usize) -> Self {
        let len = len.min(self.len);
        let n = len * self.kv_dim;
        Self {
            layers: self
                .layers
                .iter()
                .map(|(k, v)| (k[..n].to_vec(), v[..n].to_vec()))
                .collect(),
            kv_dim: self.kv_dim,
            len,
        }
    }

    /// Bytes held, for bounding the prefix cache.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.capacity() + v.capacity()) * size_of::<f16>())
            .sum()
    }

    pub(crate) fn layer(&self, layer: usize) -> &(Vec<f16>, Vec<f16>) {
        &self.layers[layer]
    }

    /// Appends one token's `kv_dim` keys and values to `layer`, rounded to `f16`.
    pub(crate) fn push(&mut self, layer: usize, keys: &[f32], values: &[f32]) {
        let (k, v) = &mut self.layers[layer];
        k.extend(keys.iter().map(|&x| f16::from_f32(x)));
        v.extend(values.iter().map(|&x| f16::from_f32(x)));
    }

    /// Called once all layers have appended `tokens` rows.
    pub(crate) fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }
}

/// `x / rms(x) * weight`, row by row, as candle's `rms_norm` computes it.
pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut Vec<f32>) {
    let dim = weight.len();
    out.clear();
    for row in x.chunks_exact(dim) {
        let m = (row.iter().map(|v| v * v).sum::<f32>() / dim as f32 + eps).sqrt();
        out.extend(row.iter().zip(weight).map(|(v, w)| v / m * w));
    }
}

/// Which dimensions of a head rotate together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i + 1)`: the GPT-J ("NORM") convention, which llama-architecture GGUF files
    /// use (their converter permutes q and k into it), as candle's `rope_i`.
    Interleaved,
    /// Pairs `(i, i + half)`: the GPT-NeoX convention, which qwen2 GGUF files keep, as candle's
    /// `rope`.
    Halves,
}

/// Rotary position tables, `[position][pair]`, computed as candle computes them (f32 throughout)
/// so that the logits match its `quantized_llama` and `quantized_qwen2`.
pub(crate) struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    style: RopeStyle,
}

impl Rope {
    pub fn new(rope_dim: usize, base: f32, positions: usize, style: RopeStyle) -> Self {
        let theta: Vec<f32> = (0..rope_dim)
            .step_by(2)
            .map(|i| 1f32 / base.powf(i as f32 / rope_dim as f32))
            .collect();
        let half = theta.len();
        let (mut cos, mut sin) = (Vec::with_capacity(positions * half), Vec::new());
        sin.reserve(positions * half);
        for p in 0..positions {
            for t in &theta {
                let angle = p as f32 * t;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            cos,
            sin,
            half,
            style,
        }
    }

    pub fn positions(&self) -> usize {
        self.cos.len() / self.half
    }

    /// Rotates each `head_dim` slice of `x` in place for position `pos`, in the model's
    /// [`RopeStyle`]; dimensions past the rotary ones (a partial rotary) are left as they are.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, pos: usize) {
        let half = self.half;
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        let rotate =
            |x0: f32, x1: f32, i: usize| (x0 * cos[i] - x1 * sin[i], x0 * sin[i] + x1 * cos[i]);
        for head in x.chunks_exact_mut(head_dim) {
            match self.style {
                RopeStyle::Interleaved => {
                    for (i, pair) in head.chunks_exact_mut(2).take(half).enumerate() {
                        (pair[0], pair[1]) = rotate(pair[0], pair[1], i);
                    }
                }
                RopeStyle::Halves => {
                    let (low, high) = head[..2 * half].split_at_mut(half);
                    for (i, (a, b)) in low.iter_mut().zip(high).enumerate() {
                        (*a, *b) = rotate(*a, *b, i);
                    }
                }
            }
        }
    }
}
