//! Causal attention of one token over its sequence's KV cache, as plain loops. Prompts use the same
//! loops, token by token, as decode steps: a token's attention is then computed by the same
//! operations whether it was prefilled with its whole prompt or alone after a cached prefix.
//! (Prompt attention once ran as blocks of candle matmuls, whose rounding depends on the block's
//! shape: the cold and the cached path gave different logits, and on a near-tie different text.)

use super::kv::dot;

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
#[inline(always)]
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
#[inline(always)]
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
        // Plain loops (no iterator adapters): everything here inlines into the caller's
        // vectorised code.
        scores.resize(len, 0.0);
        for (t, score) in scores.iter_mut().enumerate() {
            *score = dot(qh, &keys[t * kv_dim + off..t * kv_dim + off + hd]);
        }
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

/// One input's new tokens: token `j`'s heads at `qkv[j * width..]`, at position `start + j`.
pub(crate) struct Queries<'a> {
    pub qkv: &'a [f32],
    pub width: usize,
    pub start: usize,
    pub count: usize,
}

/// Every token of `queries` over the cache that holds it and the ones before, writing `count`
/// rows of `n_head × head_dim` to `out`. Inlined into `kernels::attend_tokens`, which runs it
/// compiled for the CPU's widest vectors (the same operations, so the same bits, only faster).
#[inline(always)]
pub(crate) fn attend_tokens(
    heads: Heads,
    queries: &Queries<'_>,
    keys: &[f32],
    values: &[f32],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let q_dim = heads.n_head * heads.head_dim;
    for j in 0..queries.count {
        let q = &queries.qkv[j * queries.width..j * queries.width + q_dim];
        let len = queries.start + j + 1;
        attend(
            heads,
            q,
            keys,
            values,
            len,
            scores,
            &mut out[j * q_dim..(j + 1) * q_dim],
        );
    }
}
