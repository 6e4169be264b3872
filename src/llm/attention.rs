//! Causal attention of a sequence's new tokens over its own KV cache. A decode step has one new
//! token per sequence: plain loops over the cache beat any tensor op's dispatch. A prompt has many:
//! its attention is quadratic in its length, and candle's f32 matmuls (blocked, vectorised) do the
//! score and value products several times faster than the loops (a 1,000-token prompt spent most
//! of its prefill here before).

use candle_core::{Device, Tensor};

use super::LlmError;
use super::kv::dot;

/// Query tokens from which a prompt's attention goes through matmuls.
pub(crate) const BLOCK_MIN: usize = 2;
/// Query tokens per block of matmuls: bounds the scores held at once to
/// `n_head × BLOCK_ROWS × positions` floats (≈37 MB at SmolLM2's 8,192 positions).
const BLOCK_ROWS: usize = 128;

/// Attention head layout. Query head `h` reads key/value head `h / group`, as candle's `repeat_kv`
/// arranges them, without copying the cache.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl Heads {
    fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    fn group(&self) -> usize {
        self.n_head / self.n_kv_head
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// Softmax of `row[..visible] × scale` in place; the positions after `visible` get weight 0.
fn softmax_visible(row: &mut [f32], visible: usize, scale: f32) {
    let max = row[..visible]
        .iter()
        .fold(f32::NEG_INFINITY, |m, v| m.max(v * scale));
    let mut sum = 0.0;
    for s in &mut row[..visible] {
        *s = (*s * scale - max).exp();
        sum += *s;
    }
    for s in &mut row[..visible] {
        *s /= sum;
    }
    row[visible..].fill(0.0);
}

/// One query token (all its heads in `q`) over the first `len` cached positions.
pub(crate) fn attend(
    heads: Heads,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    len: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (hd, kv_dim) = (heads.head_dim, heads.kv_dim());
    for h in 0..heads.n_head {
        let qh = &q[h * hd..(h + 1) * hd];
        let off = (h / heads.group()) * hd;
        scores.clear();
        scores.extend((0..len).map(|t| dot(qh, &keys[t * kv_dim + off..t * kv_dim + off + hd])));
        softmax_visible(scores, len, heads.scale());
        let oh = &mut out[h * hd..(h + 1) * hd];
        oh.fill(0.0);
        for (t, w) in scores.iter().enumerate() {
            let vt = &values[t * kv_dim + off..t * kv_dim + off + hd];
            for (o, v) in oh.iter_mut().zip(vt) {
                *o += w * v;
            }
        }
    }
}

/// `count` consecutive query tokens at positions `start..start + count` (token `j`'s heads at
/// `queries[j * stride..]`) over a cache that holds them all; writes `count` rows of
/// `n_head × head_dim` to `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_block(
    heads: Heads,
    queries: &[f32],
    stride: usize,
    start: usize,
    count: usize,
    keys: &[f32],
    values: &[f32],
    out: &mut [f32],
) -> Result<(), LlmError> {
    let (n_kv, group, hd, kv_dim) = (
        heads.n_kv_head,
        heads.group(),
        heads.head_dim,
        heads.kv_dim(),
    );
    let q_dim = heads.n_head * hd;
    let cpu = &Device::Cpu;
    for j0 in (0..count).step_by(BLOCK_ROWS) {
        let j1 = (j0 + BLOCK_ROWS).min(count);
        let (n, len) = (j1 - j0, start + j1);
        // [kv head, (query head in group, token), dim]: one batched matmul per block.
        let mut q = Vec::with_capacity(heads.n_head * n * hd);
        for h in 0..heads.n_head {
            for j in j0..j1 {
                q.extend_from_slice(&queries[j * stride + h * hd..j * stride + (h + 1) * hd]);
            }
        }
        let (mut k, mut v) = (Vec::with_capacity(n_kv * len * hd), Vec::new());
        v.reserve(n_kv * len * hd);
        for g in 0..n_kv {
            for p in 0..len {
                k.extend_from_slice(&keys[p * kv_dim + g * hd..p * kv_dim + (g + 1) * hd]);
                v.extend_from_slice(&values[p * kv_dim + g * hd..p * kv_dim + (g + 1) * hd]);
            }
        }
        let q = Tensor::from_vec(q, (n_kv, group * n, hd), cpu)?;
        let k = Tensor::from_vec(k, (n_kv, len, hd), cpu)?;
        let v = Tensor::from_vec(v, (n_kv, len, hd), cpu)?;
        let mut scores = q.matmul(&k.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        for (r, row) in scores.chunks_exact_mut(len).enumerate() {
            softmax_visible(row, start + j0 + r % n + 1, heads.scale());
        }
        let weights = Tensor::from_vec(scores, (n_kv, group * n, len), cpu)?;
        let o = weights.matmul(&v)?.flatten_all()?.to_vec1::<f32>()?;
        for (r, head) in o.chunks_exact(hd).enumerate() {
            let (h, j) = (r / n, j0 + r % n);
            out[j * q_dim + h * hd..j * q_dim + (h + 1) * hd].copy_from_slice(head);
        }
    }
    Ok(())
}
