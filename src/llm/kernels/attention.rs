//! Causal attention of new tokens over their sequence's KV cache, as plain loops. Prompts use the
//! same loops as decode steps: a token's attention is then computed by the same operations
//! whether it was prefilled with its whole prompt or alone after a cached prefix.
//! (Prompt attention once ran as blocks of candle matmuls, whose rounding depends on the block's
//! shape: the cold and the cached path gave different logits, and on a near-tie different text.)

use half::f16;

/// Attention head layout. Query head `h` reads key/value head `h / group`, as candle's `repeat_kv`
/// arranges them, without copying the cache.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl Heads {
    pub(crate) fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    pub(crate) fn group(&self) -> usize {
        self.n_head / self.n_kv_head
    }

    pub(crate) fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// `eˣ` by Cody-Waite range reduction and a degree-5 polynomial (Cephes' `expf`), within 2 ulp
/// over the clamped range [−87, 88] (beyond it, the value at its end). The AVX2 path
/// (`x86::exp8`) does the same operations on eight lanes, fused where this one is, so the two
/// give the same bits; libm's `expf` was 5% of a prompt's prefill.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p.mul_add(r, *c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

pub(crate) const EXP_MIN: f32 = -87.0;
pub(crate) const EXP_MAX: f32 = 88.0;
/// ln 2 in two parts, the first exact in few bits so that `n × LN2_HI` is exact.
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
pub(crate) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// Softmax of `row[..visible] × scale` in place; the positions after `visible` get weight 0.
#[inline(always)]
pub(crate) fn softmax_visible(row: &mut [f32], visible: usize, scale: f32) {
    let max = row[..visible]
        .iter()
        .fold(f32::NEG_INFINITY, |m, v| m.max(v * scale));
    let mut sum = 0.0;
    for s in &mut row[..visible] {
        *s = exp(*s * scale - max);
        sum += *s;
    }
    for s in &mut row[..visible] {
        *s /= sum;
    }
    row[visible..].fill(0.0);
}

/// One input's new tokens: token `j`'s heads at `qkv[j * width..]`, at position `start + j`; and
/// the key/value heads to attend with, whose query heads only are written, token after token.
/// A decode step's heads can so be split between threads: a head's rows go through the same
/// operations whichever others run with it.
pub struct Queries<'a> {
    pub qkv: &'a [f32],
    pub width: usize,
    pub start: usize,
    pub count: usize,
    pub kv_heads: std::ops::Range<usize>,
}

impl Queries<'_> {
    /// Values written per token: the query heads of `kv_heads`.
    pub(crate) fn out_dim(&self, heads: Heads) -> usize {
        self.kv_heads.len() * heads.group() * heads.head_dim
    }

    /// The first query head written: query head `h` goes to output column `(h - first) ×
    /// head_dim`.
    pub(crate) fn first_head(&self, heads: Heads) -> usize {
        self.kv_heads.start * heads.group()
    }
}

/// Query tokens of a prompt attended together: each key and value row is then read once for all
/// of them (and for the query heads that share it), instead of once per token and head.
pub const QUERY_BLOCK: usize = 4;

/// Every token of `queries` over the cache that holds it and the ones before, writing `count`
/// rows of [`Queries::out_dim`] to `out` (`n_head × head_dim` for every head). Tokens go in
/// blocks of [`QUERY_BLOCK`], and the query heads that share a key/value head go together, but
/// each (token, head) row gets exactly the operations, in the same order, that it gets alone (a
/// decode step is a block of one): its scores are [`dot`]s in position order, its softmax is its
/// own, its output sums the values in position order from zero. So a prompt token's attention
/// is the same bits whether it was prefilled with others or after a cached prefix.
///
/// The portable path of [`crate::attend_tokens`]; x86 CPUs with AVX2 run their own loops, which
/// keep the same rule (a row's operations do not depend on the rows beside it).
#[inline(always)]
pub fn attend_tokens(
    heads: Heads,
    queries: &Queries<'_>,
    keys: &[f16],
    values: &[f16],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (hd, kv_dim, group) = (heads.head_dim, heads.kv_dim(), heads.group());
    let out_dim = queries.out_dim(heads);
    let &Queries {
        qkv,
        width,
        start,
        count,
        ref kv_heads,
    } = queries;
    let first = queries.first_head(heads);
    // A key or value row of the cache, widened.
    let mut row32 = vec![0f32; hd];
    for j0 in (0..count).step_by(QUERY_BLOCK) {
        let nj = QUERY_BLOCK.min(count - j0);
        // Positions the block's last token sees; token j0 + jj sees `start + j0 + jj + 1`.
        let span = start + j0 + nj;
        let visible = |jj: usize| start + j0 + jj + 1;
        for g in kv_heads.clone() {
            let off = g * hd;
            scores.clear();
            scores.resize(nj * group * span, 0.0);
            for t in 0..span {
                widen(&keys[t * kv_dim + off..t * kv_dim + off + hd], &mut row32);
                let k = &row32[..];
                for jj in (0..nj).filter(|&jj| t < visible(jj)) {
                    let row = &qkv[(j0 + jj) * width..];
                    for hh in 0..group {
                        let h = g * group + hh;
                        scores[(jj * group + hh) * span + t] = dot(&row[h * hd..(h + 1) * hd], k);
                    }
                }
            }
            for jj in 0..nj {
                for hh in 0..group {
                    let at = (jj * group + hh) * span;
                    softmax_visible(&mut scores[at..at + span], visible(jj), heads.scale());
                    let at = (j0 + jj) * out_dim + (g * group + hh - first) * hd;
                    out[at..at + hd].fill(0.0);
                }
            }
            for t in 0..span {
                widen(&values[t * kv_dim + off..t * kv_dim + off + hd], &mut row32);
                let v = &row32[..];
                for jj in (0..nj).filter(|&jj| t < visible(jj)) {
                    for hh in 0..group {
                        let w = scores[(jj * group + hh) * span + t];
                        let at = (j0 + jj) * out_dim + (g * group + hh - first) * hd;
                        let o = &mut out[at..at + hd];
                        for (o, v) in o.iter_mut().zip(v) {
                            *o += w * v;
                        }
                    }
                }
            }
        }
    }
}

/// `f16` values as `f32` (exactly).
#[inline(always)]
fn widen(from: &[f16], to: &mut [f32]) {
    to.iter_mut().zip(from).for_each(|(t, f)| *t = f.to_f32());
}

/// Dot product with eight independent accumulators, so that the compiler vectorises it (a single
/// running sum is a dependency chain it must not reorder).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}
