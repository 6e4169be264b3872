//! The x86 SIMD kernels behind [`super::matmul_cols`]: the only unsafe code of the engine.
//!
//! Eight weight rows (output columns) at a time, one per `f32` lane. Each block's exact integer
//! sum of every column is formed in `i32` lanes: AVX2 with `vpmaddubsw` (+ `vpmaddwd`), AVX-512
//! VNNI with `vpdpbusd`; the lanes hold the same integers either way, so both paths give the same
//! bits. For a prompt the eight columns' weights are first laid out as a panel (lane `c` holds
//! column `c`'s bytes) against which every row's bytes are broadcast, so no horizontal add is
//! needed; for one to three rows (decode steps) horizontal adds fold the columns' products
//! instead. Then per block one multiply of the scales and one fused multiply-add (two for the
//! 4-bit formats' offsets) add the block to each column's lane, in the same order on every path.
//!
//! Safety: every function here is `unsafe` only because of `#[target_feature]`; the safe wrapper
//! [`matmul`] checks the CPU first (once, cached by std) and the slice lengths before any load.

use core::arch::x86_64::*;
use core::mem::MaybeUninit;
use std::cell::RefCell;

use half::f16;

use super::attention::{self, Heads, Queries};
use super::{BLOCK, DenseInput, DenseWeights, Format, Isa, LANES, PANEL};

pub(super) fn avx2_supported() -> bool {
    super::allowed(super::Isa::Avx2)
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

pub(super) fn avx512_vnni_supported() -> bool {
    super::allowed(super::Isa::Avx512Vnni)
        && avx2_supported()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// Attention of one input's new tokens on AVX2 + FMA (with AVX-512VL's 32 registers if `wide`
/// and the CPU has them), else the portable loops. Token by token, and per key/value head the
/// query heads that share it: the dot products of a query row with four key rows at a time (each
/// key row read once for all the heads of its group), the softmax of
/// [`attention::softmax_visible`], then the weighted sum of the value rows held in registers. A
/// (token, head) row's operations depend only on its position, never on the tokens or heads
/// computed with it, so a prompt token gets the same bits prefilled in a batch or decoded alone.
pub(super) fn attend_tokens(
    wide: bool,
    heads: Heads,
    queries: &Queries<'_>,
    keys: &[f16],
    values: &[f16],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (hd, kv_dim) = (heads.head_dim, heads.kv_dim());
    let &Queries {
        qkv,
        width,
        start,
        count,
        ref kv_heads,
    } = queries;
    let fits = hd.is_multiple_of(VALUE_DIMS)
        && heads.n_head.is_multiple_of(heads.n_kv_head)
        && count > 0
        && !kv_heads.is_empty()
        && kv_heads.end <= heads.n_kv_head
        && keys.len() >= (start + count) * kv_dim
        && values.len() >= (start + count) * kv_dim
        && qkv.len() >= (count - 1) * width + heads.n_head * hd
        && out.len() >= count * queries.out_dim(heads);
    // SAFETY (both calls): the CPU has the features (checked first), and every read and write is
    // within the lengths checked above: key and value rows `< start + count`, query rows
    // `< count`, output rows `< count` of `out_dim`, heads `< n_head`.
    if fits && wide && avx512_vnni_supported() {
        unsafe { attend_avx512(heads, queries, keys, values, scores, out) }
    } else if fits && avx2_supported() {
        unsafe { attend_avx2(heads, queries, keys, values, scores, out) }
    } else {
        attention::attend_tokens(heads, queries, keys, values, scores, out)
    }
}

/// Head dimensions a value pass holds in registers (four vectors).
const VALUE_DIMS: usize = 32;

/// The four dot products of four accumulators, each reduced by the same additions.
#[inline(always)]
unsafe fn sum4(acc: &[__m256; 4]) -> __m128 {
    unsafe {
        let h = _mm256_hadd_ps(
            _mm256_hadd_ps(acc[0], acc[1]),
            _mm256_hadd_ps(acc[2], acc[3]),
        );
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1))
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2(
    heads: Heads,
    queries: &Queries<'_>,
    keys: &[f16],
    values: &[f16],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    unsafe { attend_body(heads, queries, keys, values, scores, out) }
}

/// [`attend_avx2`]'s instructions with AVX-512VL's sixteen more vector registers: the value
/// pass's twelve sums, four value vectors and a weight no longer spill to the stack. The same
/// operations in the same order, so the same bits.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
unsafe fn attend_avx512(
    heads: Heads,
    queries: &Queries<'_>,
    keys: &[f16],
    values: &[f16],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    unsafe { attend_body(heads, queries, keys, values, scores, out) }
}

/// The loops of [`attend_tokens`], compiled into each caller's instruction set.
#[inline(always)]
unsafe fn attend_body(
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
    unsafe {
        for j in 0..count {
            let visible = start + j + 1;
            let row = qkv.as_ptr().add(j * width);
            for g in kv_heads.clone() {
                let off = g * hd;
                scores.clear();
                scores.resize(group * visible, 0.0);
                for t in (0..visible).step_by(4) {
                    // Past the last visible row, the last one again (its dots are dropped).
                    let k: [*const u16; 4] = std::array::from_fn(|i| {
                        keys.as_ptr()
                            .cast::<u16>()
                            .add((t + i).min(visible - 1) * kv_dim + off)
                    });
                    let n = (visible - t).min(4);
                    // The heads of the group up to three at a time against the four key rows:
                    // each key vector is loaded once for them (twelve sums in registers), and
                    // each head's sums run as they would alone.
                    macro_rules! dots {
                        ($R:expr, $h0:ident) => {{
                            const R: usize = $R;
                            let q: [*const f32; R] =
                                std::array::from_fn(|r| row.add((g * group + $h0 + r) * hd));
                            let mut acc = [[_mm256_setzero_ps(); 4]; R];
                            for d in (0..hd).step_by(8) {
                                let qv: [__m256; R] =
                                    std::array::from_fn(|r| _mm256_loadu_ps(q[r].add(d)));
                                for (i, k) in k.iter().enumerate() {
                                    let kv = halves(k.add(d));
                                    for r in 0..R {
                                        acc[r][i] = _mm256_fmadd_ps(qv[r], kv, acc[r][i]);
                                    }
                                }
                            }
                            for (r, acc) in acc.iter().enumerate() {
                                let mut dots = [0f32; 4];
                                _mm_storeu_ps(dots.as_mut_ptr(), sum4(acc));
                                let at = ($h0 + r) * visible + t;
                                scores[at..at + n].copy_from_slice(&dots[..n]);
                            }
                        }};
                    }
                    for h0 in (0..group).step_by(3) {
                        match group - h0 {
                            1 => dots!(1, h0),
                            2 => dots!(2, h0),
                            _ => dots!(3, h0),
                        }
                    }
                }
                for hh in 0..group {
                    let s = &mut scores[hh * visible..(hh + 1) * visible];
                    softmax8(s, heads.scale());
                }
                // The heads of the group three at a time, 32 dimensions at a time: twelve sums
                // in registers while the value rows go by once.
                macro_rules! weighted {
                    ($R:expr, $h0:ident, $d:ident) => {{
                        const R: usize = $R;
                        let mut acc = [[_mm256_setzero_ps(); 4]; R];
                        for t in 0..visible {
                            let v = values.as_ptr().cast::<u16>().add(t * kv_dim + off + $d);
                            let vs: [__m256; 4] = std::array::from_fn(|i| halves(v.add(8 * i)));
                            for (r, acc) in acc.iter_mut().enumerate() {
                                let w =
                                    _mm256_set1_ps(*scores.get_unchecked(($h0 + r) * visible + t));
                                for (a, v) in acc.iter_mut().zip(&vs) {
                                    *a = _mm256_fmadd_ps(w, *v, *a);
                                }
                            }
                        }
                        for (r, acc) in acc.iter().enumerate() {
                            let o = out
                                .as_mut_ptr()
                                .add(j * out_dim + (g * group + $h0 + r - first) * hd + $d);
                            for (i, a) in acc.iter().enumerate() {
                                _mm256_storeu_ps(o.add(8 * i), *a);
                            }
                        }
                    }};
                }
                for h0 in (0..group).step_by(3) {
                    for d in (0..hd).step_by(VALUE_DIMS) {
                        match group - h0 {
                            1 => weighted!(1, h0, d),
                            2 => weighted!(2, h0, d),
                            _ => weighted!(3, h0, d),
                        }
                    }
                }
            }
        }
    }
}

/// Columns `8 × group..8 × group + cols` of one weight matrix, as [`super::QMatrix`] lays them
/// out: per group of eight columns and block, the eight columns' quant bytes, then in `d` (and
/// `m`) their eight scales (offsets).
pub(super) struct Weights<'a> {
    pub format: Format,
    pub qs: &'a [u8],
    pub d: &'a [u16],
    pub m: &'a [u16],
    pub group: usize,
    pub cols: usize,
    /// Blocks per column.
    pub blocks: usize,
}

/// Activation rows: all values, and per block a scale and a scaled sum.
pub(super) struct Acts<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub rows: usize,
}

/// Safe entry: writes `out[r * width + c]` = weight column `8 × group + c` · activation row `r`
/// for every column of `w` and row of `acts`.
pub(super) fn matmul(isa: Isa, w: &Weights<'_>, acts: &Acts<'_>, out: &mut [f32], width: usize) {
    let kb = w.blocks;
    let qb = w.format.quant_bytes();
    assert!(kb > 0 && w.cols <= width);
    assert!((w.group + w.cols.div_ceil(LANES)) * kb * LANES <= w.d.len());
    assert!(w.qs.len() == w.d.len() * qb);
    assert!(
        w.m.len()
            == if w.format == Format::Q8_0 {
                0
            } else {
                w.d.len()
            }
    );
    assert!(acts.qs.len() == acts.rows * kb * BLOCK);
    assert!(acts.d.len() == acts.rows * kb && acts.s.len() == acts.rows * kb);
    assert!(out.len() >= acts.rows * width);
    assert!(isa != Isa::Scalar && isa.supported());
    if isa == Isa::Sse2 {
        // The rows widened to `i16` once, for `pmaddwd`.
        let wide: Vec<i16> = acts.qs.iter().map(|&q| q.into()).collect();
        // SAFETY: as below (SSE2 is part of every x86-64 CPU), and `wide` has `acts.qs`'s length.
        return unsafe { matmul_sse2(w, acts, &wide, out, width) };
    }
    let vnni = isa == Isa::Avx512Vnni;
    // SAFETY: the CPU supports the target features (asserted above); the kernels read the
    // groups `group..group + ⌈cols / 8⌉` of `w` (eight columns' quant bytes, scales and offsets
    // of blocks `< kb` each), the same blocks of activation rows `< acts.rows`, and write
    // `out[r * width + c]` for `c < cols`: all within the lengths checked above.
    unsafe {
        if !vnni {
            return matmul_avx2(w, acts, out, width);
        }
        // A prompt's full pairs of groups on 512-bit vectors, the columns left on 256-bit ones.
        let pairs = if acts.rows >= WIDE_ROWS {
            w.cols / (2 * LANES)
        } else {
            0
        };
        if pairs > 0 {
            matmul_vnni_wide(w, pairs, acts, out, width);
        }
        let done = 2 * LANES * pairs;
        if done < w.cols {
            let rest = Weights {
                group: w.group + 2 * pairs,
                cols: w.cols - done,
                ..*w
            };
            // Column `done + c` of `out` is column `c` of `rest`: the writes stay below
            // `(rows - 1) × width + w.cols - done`, within `out[done..]`.
            matmul_vnni(&rest, acts, &mut out[done..], width)
        }
    }
}

/// [`attention::exp`] on eight lanes: the same operations, fused where it fuses, so the same
/// bits.
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    unsafe {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(attention::EXP_MIN)),
            _mm256_set1_ps(attention::EXP_MAX),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(attention::LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(attention::LN2_LO), r);
        let mut p = _mm256_set1_ps(attention::EXP_POLY[0]);
        for c in &attention::EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
    }
}

/// Softmax of `row × scale` in place, eight lanes at a time (a short tail padded): the row's
/// maximum, then `exp(v × scale − max)` and their sum in lanes folded by [`hsum`], then each
/// divided by the sum. A row's result depends on its own values only.
#[inline(always)]
unsafe fn softmax8(row: &mut [f32], scale: f32) {
    unsafe {
        let n = row.len();
        let (full, tail) = (n / 8 * 8, n % 8);
        let mut pad = [f32::NEG_INFINITY; 8];
        pad[..tail].copy_from_slice(&row[full..]);
        let scale8 = _mm256_set1_ps(scale);
        let mut max = _mm256_set1_ps(f32::NEG_INFINITY);
        for i in (0..full).step_by(8) {
            max = _mm256_max_ps(
                max,
                _mm256_mul_ps(_mm256_loadu_ps(row.as_ptr().add(i)), scale8),
            );
        }
        max = _mm256_max_ps(max, _mm256_mul_ps(_mm256_loadu_ps(pad.as_ptr()), scale8));
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), max);
        let max = _mm256_set1_ps(lanes.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)));
        let mut sum = _mm256_setzero_ps();
        for i in (0..full).step_by(8) {
            let p = row.as_mut_ptr().add(i);
            let e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(p), scale8, max));
            _mm256_storeu_ps(p, e);
            sum = _mm256_add_ps(sum, e);
        }
        if tail > 0 {
            let e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(pad.as_ptr()), scale8, max));
            _mm256_storeu_ps(pad.as_mut_ptr(), e);
            pad[tail..].fill(0.0);
            row[full..].copy_from_slice(&pad[..tail]);
            sum = _mm256_add_ps(sum, _mm256_loadu_ps(pad.as_ptr()));
        }
        let sum = _mm256_set1_ps(hsum(sum));
        for i in (0..full).step_by(8) {
            let p = row.as_mut_ptr().add(i);
            _mm256_storeu_ps(p, _mm256_div_ps(_mm256_loadu_ps(p), sum));
        }
        for v in &mut row[full..] {
            *v /= _mm256_cvtss_f32(sum);
        }
    }
}

/// `silu(g) × u` for each row of `gu` (its gate then its up halves, `ffn` each) into `out`, eight
/// lanes at a time; a row's tail goes through [`super::silu_times`] (the same bits).
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gu: &[f32], ffn: usize, out: &mut [f32]) {
    unsafe {
        let one = _mm256_set1_ps(1.0);
        for (row, o) in gu.chunks_exact(2 * ffn).zip(out.chunks_exact_mut(ffn)) {
            let (g, u) = row.split_at(ffn);
            let full = ffn / 8 * 8;
            for i in (0..full).step_by(8) {
                let gv = _mm256_loadu_ps(g.as_ptr().add(i));
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
                let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
                _mm256_storeu_ps(
                    o.as_mut_ptr().add(i),
                    _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr().add(i))),
                );
            }
            for i in full..ffn {
                o[i] = super::silu_times(g[i], u[i]);
            }
        }
    }
}

/// Safe entry of [`silu_mul_avx2`]: false (and nothing written) without AVX2 + FMA.
pub(super) fn silu_mul(gu: &[f32], ffn: usize, out: &mut [f32]) -> bool {
    if !avx2_supported() || gu.len() != 2 * out.len() || ffn == 0 || !out.len().is_multiple_of(ffn)
    {
        return false;
    }
    // SAFETY: the CPU has AVX2 and FMA; each row reads `2 × ffn` values of `gu` and writes `ffn`
    // of `out`, whose lengths were checked above.
    unsafe { silu_mul_avx2(gu, ffn, out) };
    true
}

/// Sum of the eight lanes, always in the same order.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

/// Eight f16 at `p` as f32.
#[inline(always)]
unsafe fn halves(p: *const u16) -> __m256 {
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
}

/// Eight vectors of eight `i32` lanes transposed: lane `c` of output `j` is lane `j` of input
/// `c`.
#[inline(always)]
unsafe fn transpose8(v: &[__m256i; 8]) -> [__m256i; 8] {
    unsafe {
        let lo = |a, b| _mm256_unpacklo_epi32(a, b);
        let hi = |a, b| _mm256_unpackhi_epi32(a, b);
        let (t0, t1, t2, t3) = (
            lo(v[0], v[1]),
            hi(v[0], v[1]),
            lo(v[2], v[3]),
            hi(v[2], v[3]),
        );
        let (t4, t5, t6, t7) = (
            lo(v[4], v[5]),
            hi(v[4], v[5]),
            lo(v[6], v[7]),
            hi(v[6], v[7]),
        );
        let u = [
            _mm256_unpacklo_epi64(t0, t2),
            _mm256_unpackhi_epi64(t0, t2),
            _mm256_unpacklo_epi64(t1, t3),
            _mm256_unpackhi_epi64(t1, t3),
            _mm256_unpacklo_epi64(t4, t6),
            _mm256_unpackhi_epi64(t4, t6),
            _mm256_unpacklo_epi64(t5, t7),
            _mm256_unpackhi_epi64(t5, t7),
        ];
        [
            _mm256_permute2x128_si256(u[0], u[4], 0x20),
            _mm256_permute2x128_si256(u[1], u[5], 0x20),
            _mm256_permute2x128_si256(u[2], u[6], 0x20),
            _mm256_permute2x128_si256(u[3], u[7], 0x20),
            _mm256_permute2x128_si256(u[0], u[4], 0x31),
            _mm256_permute2x128_si256(u[1], u[5], 0x31),
            _mm256_permute2x128_si256(u[2], u[6], 0x31),
            _mm256_permute2x128_si256(u[3], u[7], 0x31),
        ]
    }
}

/// A block's 32 four-bit weights as bytes: low nibbles are weights 0–15, high ones 16–31.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    unsafe {
        let q = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        _mm256_set_m128i(hi, lo)
    }
}

/// Adds one block to eight columns' lanes: `acc + sums × (d_w × d_a)`, then for the 4-bit
/// formats `+ m × s` (`mw` is `None` for Q8_0). Every path of the matmul goes through here, so a
/// column's value does not depend on the path, the rows run with it or its lane.
#[inline(always)]
unsafe fn add_block(
    acc: __m256,
    sums: __m256i,
    dw: __m256,
    da: f32,
    mw: Option<(__m256, f32)>,
) -> __m256 {
    unsafe {
        let scale = _mm256_mul_ps(dw, _mm256_set1_ps(da));
        let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
        match mw {
            Some((mw, s)) => _mm256_fmadd_ps(mw, _mm256_set1_ps(s), acc),
            None => acc,
        }
    }
}

/// Writes the first `out.len()` (at most eight) lanes of `acc` to `out`.
#[inline(always)]
unsafe fn store_lanes(acc: __m256, out: &mut [f32]) {
    unsafe {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        out.copy_from_slice(&lanes[..out.len()]);
    }
}

/// Four vectors of four `i32` lanes per 128-bit half transposed within each half: lane `c` of
/// output `j`'s half is lane `j` of input `c`'s.
#[inline(always)]
unsafe fn transpose4(v: &[__m256i; 4]) -> [__m256i; 4] {
    unsafe {
        let t0 = _mm256_unpacklo_epi32(v[0], v[1]);
        let t1 = _mm256_unpackhi_epi32(v[0], v[1]);
        let t2 = _mm256_unpacklo_epi32(v[2], v[3]);
        let t3 = _mm256_unpackhi_epi32(v[2], v[3]);
        [
            _mm256_unpacklo_epi64(t0, t2),
            _mm256_unpackhi_epi64(t0, t2),
            _mm256_unpacklo_epi64(t1, t3),
            _mm256_unpackhi_epi64(t1, t3),
        ]
    }
}

/// How far ahead of the weight bytes in use the panels ask for the next ones. Without it a
/// decode step waited on memory: on an Intel Xeon (AVX-512, KVM) one thread read the weights at
/// 6.6 GB/s of the 13-17 it can stream; 1, 2 and 16 KB ahead gave less than 4 KB.
const PREFETCH: usize = 4096;

/// Asks for the `len` bytes `PREFETCH` past `p`: the weights stream from memory once per step,
/// a group's blocks one after the other (past the matrix's end a prefetch reads nothing and
/// cannot fault).
#[inline(always)]
unsafe fn prefetch(p: *const u8, len: usize) {
    for at in (0..len).step_by(64) {
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + at) as *const i8) };
    }
}

/// One block of a group's eight columns (their quant bytes at `base`, `qb` each) as a panel:
/// vector `j` holds weights `4j..4j + 4` of each column, lane `c` column `c`. 4-bit weights:
/// columns `c` and `c + 4` in the two halves of one vector, the packed bytes transposed first
/// (half the data), then split into low nibbles (chunks 0-3) and high (4-7).
#[inline(always)]
unsafe fn panel_block(four_bit: bool, base: *const u8, qb: usize) -> [__m256i; 8] {
    unsafe {
        let q = |c: usize| base.add(c * qb);
        if four_bit {
            let mut v = [_mm256_setzero_si256(); 4];
            for (c, v) in v.iter_mut().enumerate() {
                let half = |c: usize| _mm_loadu_si128(q(c) as *const __m128i);
                *v = _mm256_set_m128i(half(c + 4), half(c));
            }
            let t = transpose4(&v);
            let mask = _mm256_set1_epi8(0x0f);
            let lo = |x| _mm256_and_si256(x, mask);
            let hi = |x| _mm256_and_si256(_mm256_srli_epi16(x, 4), mask);
            [
                lo(t[0]),
                lo(t[1]),
                lo(t[2]),
                lo(t[3]),
                hi(t[0]),
                hi(t[1]),
                hi(t[2]),
                hi(t[3]),
            ]
        } else {
            let mut v = [_mm256_setzero_si256(); 8];
            for (c, v) in v.iter_mut().enumerate() {
                *v = _mm256_loadu_si256(q(c) as *const __m256i);
            }
            transpose8(&v)
        }
    }
}

/// Activation rows run against one panel before the next panel is built: a prompt chunk's 256
/// rows stay in L2 while the panels (a few KB each) pass through L1.
const ROW_TILE: usize = 256;

/// The loops for one instruction set. Eight columns at a time, their weights are laid out at
/// once as a panel: per block, eight vectors, vector `j` holding weights `4j..4j + 4` of each of
/// the eight columns (lane `c` is column `c`). An activation row's four bytes `4j..4j + 4` are
/// broadcast to every lane, so that one multiply-add forms four products of each column, and
/// the block's integer sum of every column builds up lane by lane, without horizontal adds:
/// `$four` for 4-bit weights (with `$fin` to finish the sum in `i32`), `$eight` for Q8_0 (`$u`
/// the weights' magnitudes, `$s` the activations with the weights' signs).
///
/// Each block then adds `sum × (d_w × d_a)`, and for the 4-bit formats `m × s`, to the column's
/// `f32` lane, block after block. A column's value therefore goes through the same operations
/// whatever the number of rows, which rows are run together, or which lane the column has.
macro_rules! matmul_body {
    ($w:ident, $acts:ident, $out:ident, $width:ident,
     four: |$p4:ident, $w4:ident, $a4:ident| $four:expr,
     fin: |$f:ident| $fin:expr,
     eight: |$p8:ident, $u:ident, $s:ident| $eight:expr) => {{
        let kb = $w.blocks;
        let qb = $w.format.quant_bytes();
        let four_bit = $w.format != Format::Q8_0;
        let zero = _mm256_setzero_si256();
        let mut panel = vec![zero; kb * 8];

        // Block `b`'s scales (and 4-bit offsets) of a group's eight columns.
        macro_rules! scales {
            ($dp:expr, $mp:expr, $b:expr, $four_bit:expr) => {
                (
                    halves($dp.add($b * LANES)),
                    if $four_bit {
                        Some(halves($mp.add($b * LANES)))
                    } else {
                        None
                    },
                )
            };
        }
        // Row `r`'s block `b` added to its accumulator (see [`add_block`]).
        macro_rules! block {
            ($acc:expr, $sums:expr, $dw:expr, $mw:expr, $r:expr, $b:expr) => {{
                let at = $r * kb + $b;
                add_block(
                    $acc,
                    $sums,
                    $dw,
                    *$acts.d.get_unchecked(at),
                    $mw.map(|m| (m, *$acts.s.get_unchecked(at))),
                )
            }};
        }
        // The accumulators of rows `r0..` into their columns `g..g + live` of `out`.
        macro_rules! store {
            ($acc:expr, $r0:expr, $g:expr, $live:expr) => {
                for (r, a) in $acc.iter().enumerate() {
                    let at = ($r0 + r) * $width + $g;
                    store_lanes(*a, &mut $out[at..at + $live]);
                }
            };
        }

        // Rows `r0..r0 + R` against the panel of columns `g..g + live`.
        macro_rules! rows {
            ($R:expr, $r0:expr, $g:expr, $live:expr, $dp:expr, $mp:expr, $four_bit:expr) => {{
                const R: usize = $R;
                let (r0, g, live) = ($r0, $g, $live);
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..kb {
                    let mut p = [zero; R];
                    for j in 0..8 {
                        let wv = *panel.get_unchecked(b * 8 + j);
                        let bytes = |r: usize| {
                            _mm256_set1_epi32(
                                ($acts.qs.as_ptr().add(((r0 + r) * kb + b) * BLOCK + 4 * j)
                                    as *const i32)
                                    .read_unaligned(),
                            )
                        };
                        if $four_bit {
                            for (r, p) in p.iter_mut().enumerate() {
                                let ($p4, $w4, $a4) = (*p, wv, bytes(r));
                                *p = $four;
                            }
                        } else {
                            let magnitudes = _mm256_sign_epi8(wv, wv);
                            for (r, p) in p.iter_mut().enumerate() {
                                let ($p8, $u, $s) =
                                    (*p, magnitudes, _mm256_sign_epi8(bytes(r), wv));
                                *p = $eight;
                            }
                        }
                    }
                    let (dw, mw) = scales!($dp, $mp, b, $four_bit);
                    for r in 0..R {
                        let sums = if $four_bit {
                            let $f = p[r];
                            $fin
                        } else {
                            p[r]
                        };
                        acc[r] = block!(acc[r], sums, dw, mw, r0 + r, b);
                    }
                }
                store!(acc, r0, g, live);
            }};
        }

        // One to three rows (decode steps): no panel. Each column's block is multiplied with
        // the row's block as it lies, and horizontal adds fold the eight columns' products into
        // one vector, lane `c` column `c`'s block sum: the same exact integers as from a panel,
        // then the same float operations, so the same bits.
        macro_rules! few {
            ($R:expr, $r0:expr, $g:expr, $gi:expr, $live:expr, $dp:expr, $mp:expr, $four_bit:expr) => {{
                const R: usize = $R;
                let (r0, g, gi, live) = ($r0, $g, $gi, $live);
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..kb {
                    let base = $w.qs.as_ptr().add((gi * kb + b) * LANES * qb);
                    prefetch(base, LANES * qb);
                    let column = |c: usize| {
                        let q = base.add(c * qb);
                        if $four_bit {
                            nibbles(q)
                        } else {
                            _mm256_loadu_si256(q as *const __m256i)
                        }
                    };
                    let act = |r: usize| {
                        _mm256_loadu_si256(
                            $acts.qs.as_ptr().add(((r0 + r) * kb + b) * BLOCK) as *const __m256i
                        )
                    };
                    // A 4-bit block's products in eight `i32` lanes.
                    #[allow(clippy::let_and_return)]
                    let sum4 = |w: __m256i, a: __m256i| {
                        let ($p4, $w4, $a4) = (zero, w, a);
                        let $f = $four;
                        $fin
                    };
                    // Per row, columns (2p, 2p + 1) folded into pair p's lanes.
                    let mut pairs = [[zero; 4]; R];
                    for p in 0..4 {
                        let (w0, w1) = (column(2 * p), column(2 * p + 1));
                        for r in 0..R {
                            let a = act(r);
                            pairs[r][p] = if $four_bit {
                                _mm256_hadd_epi32(sum4(w0, a), sum4(w1, a))
                            } else {
                                let ($p8, $u, $s) =
                                    (zero, _mm256_sign_epi8(w0, w0), _mm256_sign_epi8(a, w0));
                                let x = $eight;
                                let ($p8, $u, $s) =
                                    (zero, _mm256_sign_epi8(w1, w1), _mm256_sign_epi8(a, w1));
                                _mm256_hadd_epi32(x, $eight)
                            };
                        }
                    }
                    let (dw, mw) = scales!($dp, $mp, b, $four_bit);
                    for r in 0..R {
                        let h = &pairs[r];
                        let a = _mm256_hadd_epi32(h[0], h[1]);
                        let c = _mm256_hadd_epi32(h[2], h[3]);
                        // a = [c0 c1 c2 c3 (low halves) | c0 c1 c2 c3 (high halves)], c for 4-7.
                        let totals = _mm256_add_epi32(
                            _mm256_permute2x128_si256(a, c, 0x20),
                            _mm256_permute2x128_si256(a, c, 0x31),
                        );
                        acc[r] = block!(acc[r], totals, dw, mw, r0 + r, b);
                    }
                }
                store!(acc, r0, g, live);
            }};
        }

        macro_rules! groups {
            ($four_bit:expr) => {{
                for t0 in (0..$acts.rows).step_by(ROW_TILE) {
                    let end = (t0 + ROW_TILE).min($acts.rows);
                    for g in (0..$w.cols).step_by(LANES) {
                        let live = ($w.cols - g).min(LANES);
                        let gi = $w.group + g / LANES;
                        let (dp, mp) = (
                            $w.d.as_ptr().add(gi * kb * LANES),
                            $w.m.as_ptr().wrapping_add(gi * kb * LANES),
                        );
                        match end - t0 {
                            1 => {
                                few!(1, t0, g, gi, live, dp, mp, $four_bit);
                                continue;
                            }
                            2 => {
                                few!(2, t0, g, gi, live, dp, mp, $four_bit);
                                continue;
                            }
                            3 => {
                                few!(3, t0, g, gi, live, dp, mp, $four_bit);
                                continue;
                            }
                            _ => {}
                        }
                        for b in 0..kb {
                            let base = $w.qs.as_ptr().add((gi * kb + b) * LANES * qb);
                            prefetch(base, LANES * qb);
                            let chunks = panel_block($four_bit, base, qb);
                            panel[b * 8..b * 8 + 8].copy_from_slice(&chunks);
                        }
                        let mut r0 = t0;
                        while r0 < end {
                            match (end - r0).min(4) {
                                4 => rows!(4, r0, g, live, dp, mp, $four_bit),
                                3 => rows!(3, r0, g, live, dp, mp, $four_bit),
                                2 => rows!(2, r0, g, live, dp, mp, $four_bit),
                                _ => rows!(1, r0, g, live, dp, mp, $four_bit),
                            }
                            r0 += (end - r0).min(4);
                        }
                    }
                }
            }};
        }

        if four_bit {
            groups!(true)
        } else {
            groups!(false)
        }
    }};
}

/// Rows of a prompt that [`matmul_sse2`] runs against a column's weights once they are widened.
const SSE2_ROWS: usize = 4;

/// The sums of four vectors of four `i32` lanes: lane `c` of the result is the sum of vector
/// `c`'s lanes (exact integers, so the order is immaterial).
#[inline(always)]
unsafe fn sum4_epi32(v: &[__m128i]) -> __m128i {
    unsafe {
        let ab = _mm_add_epi32(
            _mm_unpacklo_epi32(v[0], v[1]),
            _mm_unpackhi_epi32(v[0], v[1]),
        );
        let cd = _mm_add_epi32(
            _mm_unpacklo_epi32(v[2], v[3]),
            _mm_unpackhi_epi32(v[2], v[3]),
        );
        _mm_add_epi32(_mm_unpacklo_epi64(ab, cd), _mm_unpackhi_epi64(ab, cd))
    }
}

/// The matmul on SSE2, for CPUs without AVX2. Per group of eight columns and block of up to
/// [`SSE2_ROWS`] rows, each column's block of weights is widened to `i16` once (nibbles masked
/// and shifted; Q8_0's bytes sign-extended) and multiplied with every row's block by `pmaddwd`;
/// the eight columns' partial sums fold into two vectors of exact block sums, lane `c` column
/// `c`. Then per block, as the other paths do, `sum × (d_w × d_a)` and for the 4-bit formats
/// `m × s` are added to the column's lane, each product rounded before it is added (no FMA): the
/// same operations whatever rows run together or how the columns are split, within rounding of
/// the fused paths.
#[target_feature(enable = "sse2")]
unsafe fn matmul_sse2(
    w: &Weights<'_>,
    acts: &Acts<'_>,
    wide: &[i16],
    out: &mut [f32],
    width: usize,
) {
    unsafe {
        let kb = w.blocks;
        let qb = w.format.quant_bytes();
        let four_bit = w.format != Format::Q8_0;
        let mask = _mm_set1_epi8(0x0f);
        let zero = _mm_setzero_si128();
        for gi in 0..w.cols.div_ceil(LANES) {
            let g = w.group + gi;
            let live = (w.cols - gi * LANES).min(LANES);
            let qs = w.qs.as_ptr().add(g * kb * LANES * qb);
            let dp = w.d.as_ptr().add(g * kb * LANES);
            let mp = w.m.as_ptr().add(if four_bit { g * kb * LANES } else { 0 });
            for r0 in (0..acts.rows).step_by(SSE2_ROWS) {
                let rows = SSE2_ROWS.min(acts.rows - r0);
                let mut acc = [[_mm_setzero_ps(); 2]; SSE2_ROWS];
                for b in 0..kb {
                    let mut sums = [[zero; LANES]; SSE2_ROWS];
                    for c in 0..LANES {
                        let q = qs.add((b * LANES + c) * qb) as *const __m128i;
                        let v: [__m128i; 4] = if four_bit {
                            let bytes = _mm_loadu_si128(q);
                            let lo = _mm_and_si128(bytes, mask);
                            let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), mask);
                            [
                                _mm_unpacklo_epi8(lo, zero),
                                _mm_unpackhi_epi8(lo, zero),
                                _mm_unpacklo_epi8(hi, zero),
                                _mm_unpackhi_epi8(hi, zero),
                            ]
                        } else {
                            let (a, b) = (_mm_loadu_si128(q), _mm_loadu_si128(q.add(1)));
                            [
                                _mm_srai_epi16::<8>(_mm_unpacklo_epi8(a, a)),
                                _mm_srai_epi16::<8>(_mm_unpackhi_epi8(a, a)),
                                _mm_srai_epi16::<8>(_mm_unpacklo_epi8(b, b)),
                                _mm_srai_epi16::<8>(_mm_unpackhi_epi8(b, b)),
                            ]
                        };
                        for (r, sums) in sums.iter_mut().enumerate().take(rows) {
                            let a =
                                wide.as_ptr().add(((r0 + r) * kb + b) * BLOCK) as *const __m128i;
                            let p = |j: usize| _mm_madd_epi16(v[j], _mm_loadu_si128(a.add(j)));
                            sums[c] =
                                _mm_add_epi32(_mm_add_epi32(p(0), p(1)), _mm_add_epi32(p(2), p(3)));
                        }
                    }
                    let h = |p: *const u16| halves_sse2(_mm_loadl_epi64(p as *const __m128i));
                    let dw = [h(dp.add(b * LANES)), h(dp.add(b * LANES + 4))];
                    let mw = four_bit.then(|| [h(mp.add(b * LANES)), h(mp.add(b * LANES + 4))]);
                    for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                        let at = (r0 + r) * kb + b;
                        let da = _mm_set1_ps(*acts.d.get_unchecked(at));
                        for (half, acc) in acc.iter_mut().enumerate() {
                            let total = sum4_epi32(&sums[r][4 * half..4 * half + 4]);
                            let scale = _mm_mul_ps(dw[half], da);
                            *acc = _mm_add_ps(_mm_mul_ps(_mm_cvtepi32_ps(total), scale), *acc);
                            if let Some(mw) = mw {
                                let s = _mm_set1_ps(*acts.s.get_unchecked(at));
                                *acc = _mm_add_ps(_mm_mul_ps(mw[half], s), *acc);
                            }
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate().take(rows) {
                    let mut lanes = [0f32; LANES];
                    _mm_storeu_ps(lanes.as_mut_ptr(), acc[0]);
                    _mm_storeu_ps(lanes.as_mut_ptr().add(4), acc[1]);
                    let at = (r0 + r) * width + gi * LANES;
                    out[at..at + live].copy_from_slice(&lanes[..live]);
                }
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn matmul_avx2(w: &Weights<'_>, acts: &Acts<'_>, out: &mut [f32], width: usize) {
    unsafe {
        let ones = _mm256_set1_epi16(1);
        // 4-bit weights: `vpmaddubsw` sums the products in twos (at most 2 × 15 × 127 = 3,810)
        // and the eight chunks of a block add up in `i16` (at most 30,480: no overflow), one
        // `vpmaddwd` per block to `i32`. Q8_0: twos reach 2 × 128 × 127 = 32,512, so each chunk
        // goes to `i32` at once.
        matmul_body!(
            w,
            acts,
            out,
            width,
            four: |p, w, a| _mm256_add_epi16(p, _mm256_maddubs_epi16(w, a)),
            fin: |p| _mm256_madd_epi16(p, ones),
            eight: |p, u, s| _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones))
        )
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn matmul_vnni(w: &Weights<'_>, acts: &Acts<'_>, out: &mut [f32], width: usize) {
    unsafe {
        // `vpdpbusd` adds four products to each `i32` lane: the same sums as the AVX2 path.
        matmul_body!(
            w,
            acts,
            out,
            width,
            four: |p, w, a| _mm256_dpbusd_epi32(p, w, a),
            fin: |p| p,
            eight: |p, u, s| _mm256_dpbusd_epi32(p, u, s)
        )
    }
}

/// Rows from which [`matmul_vnni_wide`] runs. A prompt gains (AMD EPYC Zen 5, `benches/engine`,
/// 2 threads, A-B: a 1,000-token prefill 1.16-1.26 -> 0.85-1.04 s); a decode step of four
/// sequences did not (6.1-8.8 against 5.6-9.8 ms, seven rounds), its weights streaming from
/// memory for little arithmetic, so a few rows stay on 256-bit vectors.
const WIDE_ROWS: usize = 16;

/// Prompt rows ([`WIDE_ROWS`] or more) on AVX-512 VNNI, for `pairs` pairs of full groups from
/// the first: the panels of two groups side by side in 512-bit vectors, lane `c` column `c` of sixteen,
/// against which each row's four bytes are broadcast, as [`matmul_body`] does with eight. Each
/// column's block sum is the same integer, and each lane then goes through [`add_block`]'s
/// operations in the same order, so a column gets the same bits as on the 256-bit paths.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn matmul_vnni_wide(
    w: &Weights<'_>,
    pairs: usize,
    acts: &Acts<'_>,
    out: &mut [f32],
    width: usize,
) {
    unsafe {
        let kb = w.blocks;
        let qb = w.format.quant_bytes();
        let four_bit = w.format != Format::Q8_0;
        let zero = _mm512_setzero_si512();
        let mut panel = vec![zero; kb * 8];
        // Sixteen f16 of two groups' block `b` (scales or offsets at `p`) as f32.
        let sixteen = |p: *const u16, gi: usize, b: usize| {
            let lo = _mm_loadu_si128(p.add((gi * kb + b) * LANES) as *const __m128i);
            let hi = _mm_loadu_si128(p.add(((gi + 1) * kb + b) * LANES) as *const __m128i);
            _mm512_cvtph_ps(_mm256_set_m128i(hi, lo))
        };
        for t0 in (0..acts.rows).step_by(ROW_TILE) {
            let end = (t0 + ROW_TILE).min(acts.rows);
            for pair in 0..pairs {
                let gi = w.group + 2 * pair;
                for b in 0..kb {
                    let block = |gi: usize| {
                        let base = w.qs.as_ptr().add((gi * kb + b) * LANES * qb);
                        prefetch(base, LANES * qb);
                        panel_block(four_bit, base, qb)
                    };
                    let (lo, hi) = (block(gi), block(gi + 1));
                    for j in 0..8 {
                        panel[b * 8 + j] =
                            _mm512_inserti64x4(_mm512_castsi256_si512(lo[j]), hi[j], 1);
                    }
                }
                macro_rules! rows {
                    ($R:expr, $r0:expr) => {{
                        const R: usize = $R;
                        let r0 = $r0;
                        let mut acc = [_mm512_setzero_ps(); R];
                        for b in 0..kb {
                            let mut p = [zero; R];
                            for j in 0..8 {
                                let wv = *panel.get_unchecked(b * 8 + j);
                                let bytes = |r: usize| {
                                    _mm512_set1_epi32(
                                        (acts.qs.as_ptr().add(((r0 + r) * kb + b) * BLOCK + 4 * j)
                                            as *const i32)
                                            .read_unaligned(),
                                    )
                                };
                                if four_bit {
                                    for (r, p) in p.iter_mut().enumerate() {
                                        *p = _mm512_dpbusd_epi32(*p, wv, bytes(r));
                                    }
                                } else {
                                    // Q8_0: the weights' magnitudes against the activations
                                    // with the weights' signs (`vpsignb` has no 512-bit form:
                                    // negated where a weight is negative; where it is zero the
                                    // magnitude is, and the product too).
                                    let magnitudes = _mm512_abs_epi8(wv);
                                    let negative = _mm512_movepi8_mask(wv);
                                    for (r, p) in p.iter_mut().enumerate() {
                                        let a = bytes(r);
                                        let signed = _mm512_mask_sub_epi8(a, negative, zero, a);
                                        *p = _mm512_dpbusd_epi32(*p, magnitudes, signed);
                                    }
                                }
                            }
                            let dw = sixteen(w.d.as_ptr(), gi, b);
                            let mw = four_bit.then(|| sixteen(w.m.as_ptr(), gi, b));
                            for (r, acc) in acc.iter_mut().enumerate() {
                                let at = (r0 + r) * kb + b;
                                let scale =
                                    _mm512_mul_ps(dw, _mm512_set1_ps(*acts.d.get_unchecked(at)));
                                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p[r]), scale, *acc);
                                if let Some(mw) = mw {
                                    let s = _mm512_set1_ps(*acts.s.get_unchecked(at));
                                    *acc = _mm512_fmadd_ps(mw, s, *acc);
                                }
                            }
                        }
                        for (r, a) in acc.iter().enumerate() {
                            let at = (r0 + r) * width + 2 * LANES * pair;
                            _mm512_storeu_ps(out[at..at + 2 * LANES].as_mut_ptr(), *a);
                        }
                    }};
                }
                let mut r0 = t0;
                while r0 < end {
                    match (end - r0).min(4) {
                        4 => rows!(4, r0),
                        3 => rows!(3, r0),
                        2 => rows!(2, r0),
                        _ => rows!(1, r0),
                    }
                    r0 += (end - r0).min(4);
                }
            }
        }
    }
}

/// Safe entry of [`super::dense`]: 16-lane vectors on AVX-512, 8 on AVX2; panels also on SSE2's
/// 4. Panels add the bias as they store their sums; row-major weights after.
pub(super) fn dense(
    isa: Isa,
    input: DenseInput,
    w: DenseWeights,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    if let DenseWeights::Panels(w) = w {
        return panels_into(isa, input, w, bias, out);
    }
    let (x, rows) = (input.x(), input.rows());
    let k = x.len() / rows;
    let n = w.len() / k;
    let wide = isa == Isa::Avx512Vnni;
    assert!(rows * k == x.len() && n * k == w.len() && out.len() == rows * n);
    assert!(avx2_supported() && (!wide || is_x86_feature_detected!("avx512f")));
    // SAFETY: the CPU has the features (asserted above; `f16c` is part of `avx2_supported`, and
    // AVX-512F has its own widening); the kernels read `x[r * k + i]` and `w[j * k + i]` for
    // `r < rows`, `j < n`, `i < k` and write `out[r * n + j]`: within the lengths asserted above.
    unsafe {
        match (wide, w) {
            (_, DenseWeights::Panels(_)) => unreachable!("panels returned above"),
            (true, DenseWeights::F32(w)) => dense_avx512(x, rows, k, w, n, out),
            (true, DenseWeights::F16(w)) => dense_avx512(x, rows, k, w, n, out),
            (false, DenseWeights::F32(w)) => dense_avx2(x, rows, k, w, n, out),
            (false, DenseWeights::F16(w)) => dense_avx2(x, rows, k, w, n, out),
        }
    }
    super::add_bias(out, bias);
}

/// [`DenseWeights::Panels`] with the bias added, into `out` (each of its `rows × n` values is
/// stored before it is read: SSE2 carries partial sums through it): on `isa`'s vectors, 16, 8 or
/// 4 lanes.
fn panels(
    isa: Isa,
    input: DenseInput,
    w: &[f16],
    bias: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
) {
    let (x, rows) = (input.x(), input.rows());
    assert!(rows > 0 && x.len().is_multiple_of(rows));
    let k = x.len() / rows;
    assert!(k > 0 && w.len().is_multiple_of(k * PANEL));
    let n = w.len() / k;
    assert!(out.len() == rows * n && bias.is_none_or(|b| b.len() == n));
    assert!(isa != Isa::Scalar && isa.supported());
    if isa == Isa::Avx512Vnni
        && rows >= super::AMX_ROWS
        && k.is_multiple_of(super::amx::DEPTH)
        && super::amx_supported()
    {
        return super::amx::panels(x, rows, w, bias, out);
    }
    let bias = bias.map_or(core::ptr::null(), <[f32]>::as_ptr);
    let (x, w, out) = (x.as_ptr(), w.as_ptr(), out.as_mut_ptr().cast::<f32>());
    // SAFETY: the CPU has the features (asserted above); the kernels read `x[r * k + i]`,
    // `w[(j / PANEL * k + i) * PANEL + j % PANEL]` and `bias[j]` and store `out[r * n + j]`, for
    // `r < rows`, `j < n`, `i < k`: within the lengths asserted above.
    unsafe {
        match isa {
            Isa::Avx512Vnni => panels_avx512(x, rows, k, w, n, bias, out),
            Isa::Avx2 => panels_avx2(x, rows, k, w, n, bias, out),
            _ => panels_sse2(x, rows, k, w, n, bias, out, input.id),
        }
    }
}

/// [`panels`] into initialised values.
fn panels_into(isa: Isa, input: DenseInput, w: &[f16], bias: Option<&[f32]>, out: &mut [f32]) {
    // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and `panels` stores only initialised values.
    let out = unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) };
    panels(isa, input, w, bias, out);
}

/// [`panels`] into a new vector, not zeroed first: the kernel stores every value.
pub(super) fn panels_new(isa: Isa, input: DenseInput, w: &[f16], bias: Option<&[f32]>) -> Vec<f32> {
    let (x, rows) = (input.x(), input.rows());
    assert!(rows > 0 && x.len() >= rows);
    let len = rows * (w.len() / (x.len() / rows));
    let mut out = Vec::with_capacity(len);
    panels(isa, input, w, bias, &mut out.spare_capacity_mut()[..len]);
    // SAFETY: `panels` stored all `len` values (it asserts `out.len() == rows × n`).
    unsafe { out.set_len(len) };
    out
}

/// Weight row `j` against up to four rows of `x` at a time: the weight vector is loaded once
/// for the four, the rows' vectors stay in L1 across all the weight rows. `$lanes` wide vectors,
/// then the last `k % $lanes` products one by one. The row count of a block is a constant, so
/// that its accumulators live in registers.
macro_rules! dense_body {
    ($x:ident, $rows:ident, $k:ident, $w:ident, $n:ident, $out:ident, $lanes:expr, $wrows:expr,
     $zero:expr, $load:path, $wload:path, $fma:path, $sum:path) => {{
        let full = $k - $k % $lanes;
        // Weight rows `j..j + W` against rows `r0..r0 + R` of `x`: W × R accumulators in
        // registers, each vector loaded once for all the products it takes part in.
        macro_rules! block {
            ($W:expr, $R:expr, $j:expr, $r0:expr) => {{
                const W: usize = $W;
                const R: usize = $R;
                let (j, r0) = ($j, $r0);
                let mut acc = [[$zero; R]; W];
                let mut i = 0;
                while i < full {
                    let mut wv = [$zero; W];
                    for (q, v) in wv.iter_mut().enumerate() {
                        let at = $w.as_ptr().add((j + q) * $k + i);
                        // The weights stream from memory; the rows of `x` stay in L1.
                        _mm_prefetch::<_MM_HINT_T0>(
                            (at as *const i8).wrapping_add(PREFETCH) as *const i8
                        );
                        *v = $wload(at);
                    }
                    for r in 0..R {
                        let xv = $load($x.as_ptr().add((r0 + r) * $k + i));
                        for q in 0..W {
                            acc[q][r] = $fma(xv, wv[q], acc[q][r]);
                        }
                    }
                    i += $lanes;
                }
                for q in 0..W {
                    let wj = $w.as_ptr().add((j + q) * $k);
                    for r in 0..R {
                        let xr = $x.as_ptr().add((r0 + r) * $k);
                        let mut total = $sum(acc[q][r]);
                        for t in full..$k {
                            total += *xr.add(t) * (*wj.add(t)).widen();
                        }
                        *$out.get_unchecked_mut((r0 + r) * $n + j + q) = total;
                    }
                }
            }};
        }
        // Against every row of `x`, four at a time, then the one to three left.
        macro_rules! rows {
            ($W:expr, $j:expr) => {{
                let mut r0 = 0;
                while r0 + 4 <= $rows {
                    block!($W, 4, $j, r0);
                    r0 += 4;
                }
                match $rows - r0 {
                    0 => {}
                    1 => block!($W, 1, $j, r0),
                    2 => block!($W, 2, $j, r0),
                    _ => block!($W, 3, $j, r0),
                }
            }};
        }
        // Each weight row once (from memory), `$wrows` at a time, then the ones left.
        let mut j = 0;
        while j + $wrows <= $n {
            rows!($wrows, j);
            j += $wrows;
        }
        while j < $n {
            rows!(1, j);
            j += 1;
        }
    }};
}

/// A weight type of [`dense_body`], read as `f32`: `f32` as it lies, or `f16` widened.
trait Weight: Copy {
    /// One weight, for the tail.
    fn widen(self) -> f32;
    /// Eight weights from `p`, for AVX2 (with F16C for `f16`).
    unsafe fn load8(p: *const Self) -> __m256;
    /// Sixteen weights from `p`, for AVX-512F.
    unsafe fn load16(p: *const Self) -> __m512;
}

impl Weight for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }

    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }
}

impl Weight for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }

    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
}

/// Three weight rows against four rows of `x`: twelve accumulators, three weight vectors and one
/// row vector fill the sixteen registers. Against two weight rows, all-MiniLM-L6-v2's projections
/// of a 13-token sentence (`examples/dense_bench.rs`, one core, AMD EPYC Zen 3, A-B-A-B): 4.43-5.95
/// -> 3.79-4.14 ms for the six layers. Each output's sum runs in the same order either way. `f16`
/// weights are widened as they are loaded (`vcvtph2ps`).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dense_avx2<T: Weight>(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[T],
    n: usize,
    out: &mut [f32],
) {
    unsafe {
        dense_body!(
            x,
            rows,
            k,
            w,
            n,
            out,
            8,
            3,
            _mm256_setzero_ps(),
            _mm256_loadu_ps,
            T::load8,
            _mm256_fmadd_ps,
            hsum
        )
    }
}

#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn dense_avx512<T: Weight>(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[T],
    n: usize,
    out: &mut [f32],
) {
    unsafe {
        dense_body!(
            x,
            rows,
            k,
            w,
            n,
            out,
            16,
            4,
            _mm512_setzero_ps(),
            _mm512_loadu_ps,
            T::load16,
            _mm512_fmadd_ps,
            _mm512_reduce_add_ps
        )
    }
}

/// Rows of `x` that one pass over a panel runs against on AVX-512: two vectors of sixteen columns
/// for each row make 28 accumulators, which leave the two weight vectors and a broadcast row value
/// of the 32 registers.
const PANEL_ROWS_512: usize = 14;
/// The same on AVX2: half a panel (two vectors of eight columns) for each of six rows, twelve
/// accumulators of the sixteen registers.
const PANEL_ROWS_256: usize = 6;

/// Runs `block(r0, rows)` over `rows` rows in as few blocks of at most `most` as can be, of even
/// sizes (13 rows and 14 at most: one block; 20 rows: two of ten).
#[inline(always)]
fn row_blocks(rows: usize, most: usize, mut block: impl FnMut(usize, usize)) {
    let blocks = rows.div_ceil(most);
    let size = rows.div_ceil(blocks);
    let mut r0 = 0;
    while r0 < rows {
        let take = size.min(rows - r0);
        block(r0, take);
        r0 += take;
    }
}

/// The loops of [`DenseWeights::Panels`] for one instruction set: per panel, per group of two
/// vectors of `$lanes` columns and per block of rows ([`row_blocks`]), each input's weights are
/// widened from `f16` once (`vcvtph2ps`) and multiplied into every row's two accumulators against
/// that row's input value, broadcast. No horizontal sums: each output lane sums its inputs in
/// order, one fused multiply-add each, as the other paths do. `$R` lists the block sizes, 1 to
/// `$most`, so that a block's accumulators live in registers.
macro_rules! panels_body {
    ($x:ident, $rows:ident, $k:ident, $w:ident, $n:ident, $bias:ident, $out:ident, $feat:literal,
     $lanes:literal, $most:expr, $zero:expr, $load:path, $widen:path, $set1:path, $fma:path,
     $loadf:path, $add:path, $store:path, $next:literal, [$($R:literal)+]) => {{
        /// Rows `0..R` at `x` against the `2 × $lanes` columns at `w` (a panel's stride apart),
        /// each sum stored with the columns' bias added (when `bias` is not null): the same bits
        /// as adding it after, without another pass over the output. For input `i` it asks for
        /// the line at `ahead + i` lines: into L1 on a panel's first run (`NEXT` false, `ahead`
        /// `PREFETCH` bytes on), else into L2 (`ahead` the next panel).
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn block<const R: usize, const NEXT: bool>(
            x: *const f32,
            k: usize,
            w: *const f16,
            bias: *const f32,
            out: *mut f32,
            n: usize,
            ahead: *const i8,
        ) {
            unsafe {
                let mut acc = [[$zero; 2]; R];
                for i in 0..k {
                    let at = w.add(i * PANEL);
                    let line = ahead.wrapping_add(i * PANEL * size_of::<f16>());
                    if NEXT {
                        _mm_prefetch::<_MM_HINT_T1>(line);
                    } else {
                        _mm_prefetch::<_MM_HINT_T0>(line);
                    }
                    let w0 = $widen($load(at.cast()));
                    let w1 = $widen($load(at.add($lanes).cast()));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let xv = $set1(*x.add(r * k + i));
                        acc[0] = $fma(xv, w0, acc[0]);
                        acc[1] = $fma(xv, w1, acc[1]);
                    }
                }
                if !bias.is_null() {
                    let (b0, b1) = ($loadf(bias), $loadf(bias.add($lanes)));
                    for acc in acc.iter_mut() {
                        acc[0] = $add(acc[0], b0);
                        acc[1] = $add(acc[1], b1);
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    $store(out.add(r * n), acc[0]);
                    $store(out.add(r * n + $lanes), acc[1]);
                }
            }
        }
        // A panel's first run (its first block of rows on its first vectors) reads its lines
        // from L3 or memory, the others from L2. On AVX2 (`$next`) a run of ≤ 6 rows on half a
        // panel takes a line every 5 cycles or so, too fast for the lines it waits on; so the
        // other runs ask for the next panel's lines meanwhile. `dense_bench` on AVX2, six layers
        // of their own, AMD EPYC Zen 4, rounds alternated, median: 13 rows 3.41-3.68 -> 3.17-3.45
        // ms, 40 rows 8.35-8.39 -> 8.00-8.07, 100 rows 19.9-20.1 -> 19.5-19.6. AVX-512 runs up to
        // 14 rows a panel in one run, which streams fast enough alone; past that, asking for the
        // next panel cost it 0.7% (40 and 100 rows), so it asks 4 KB ahead in every run.
        for p in 0..$n / PANEL {
            let mut first = true;
            for col in (0..PANEL).step_by(2 * $lanes) {
                let wp = $w.add(p * $k * PANEL + col);
                let bp = if $bias.is_null() {
                    $bias
                } else {
                    $bias.add(p * PANEL + col)
                };
                row_blocks($rows, $most, |r0, take| {
                    let (xr, o) = ($x.add(r0 * $k), $out.add(r0 * $n + p * PANEL + col));
                    let next = !std::mem::replace(&mut first, false) && $next;
                    let ahead = match next {
                        true => $w.wrapping_add((p + 1) * $k * PANEL) as *const i8,
                        false => (wp as *const i8).wrapping_add(PREFETCH),
                    };
                    match (take, next) {
                        $(($R, false) => block::<$R, false>(xr, $k, wp, bp, o, $n, ahead),)+
                        $(($R, true) => block::<$R, true>(xr, $k, wp, bp, o, $n, ahead),)+
                        _ => unreachable!("a block of {take} rows"),
                    }
                });
            }
        }
    }};
}

/// [`DenseWeights::Panels`] on AVX-512F: a whole panel (two vectors of sixteen columns) at a time.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn panels_avx512(
    x: *const f32,
    rows: usize,
    k: usize,
    w: *const f16,
    n: usize,
    bias: *const f32,
    out: *mut f32,
) {
    unsafe {
        panels_body!(
            x, rows, k, w, n, bias, out, "avx2,fma,f16c,avx512f", 16, PANEL_ROWS_512, _mm512_setzero_ps(), _mm256_loadu_si256, _mm512_cvtph_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_add_ps, _mm512_storeu_ps, false,
            [1 2 3 4 5 6 7 8 9 10 11 12 13 14]
        )
    }
}

/// [`DenseWeights::Panels`] on AVX2 + FMA + F16C: half a panel (two vectors of eight columns) at
/// a time.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panels_avx2(
    x: *const f32,
    rows: usize,
    k: usize,
    w: *const f16,
    n: usize,
    bias: *const f32,
    out: *mut f32,
) {
    unsafe {
        panels_body!(
            x, rows, k, w, n, bias, out, "avx2,fma,f16c", 8, PANEL_ROWS_256, _mm256_setzero_ps(), _mm_loadu_si128, _mm256_cvtph_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_add_ps, _mm256_storeu_ps, true,
            [1 2 3 4 5 6]
        )
    }
}

/// Four `f16` (the low 64 bits of `h`) as `f32`, exactly, on SSE2 (no F16C): the exponent and
/// mantissa bits moved to `f32`'s places and scaled by 2¹¹² (exact for normal and subnormal
/// values alike), infinities and NaNs given `f32`'s top exponent, then the sign.
#[inline(always)]
unsafe fn halves_sse2(h: __m128i) -> __m128 {
    unsafe {
        let bits = _mm_unpacklo_epi16(h, _mm_setzero_si128());
        let magnitude = _mm_and_si128(bits, _mm_set1_epi32(0x7fff));
        let sign = _mm_slli_epi32::<16>(_mm_xor_si128(bits, magnitude));
        let scaled = _mm_mul_ps(
            _mm_castsi128_ps(_mm_slli_epi32::<13>(magnitude)),
            _mm_castsi128_ps(_mm_set1_epi32(0x7780_0000)),
        );
        let special = _mm_cmpgt_epi32(magnitude, _mm_set1_epi32(0x7bff));
        let top = _mm_and_si128(special, _mm_set1_epi32(0x7f80_0000));
        _mm_or_ps(
            _mm_or_ps(scaled, _mm_castsi128_ps(top)),
            _mm_castsi128_ps(sign),
        )
    }
}

/// Four finite `f16`, each in the top half of its lane of `lane` above zeros, as `f32`, exactly,
/// four instructions with the unpacking (against [`halves_sse2`]'s ten): shifted right by three
/// with its sign (sign, then the exponent and mantissa at `f32`'s places), the three bits the
/// sign spread into cleared (the zeros below come through), then scaled by 2¹¹² (exact for
/// normal and subnormal values alike).
#[inline(always)]
unsafe fn finite_halves_sse2(lane: __m128i) -> __m128 {
    unsafe {
        let keep = _mm_set1_epi32(0x8fff_ffffu32 as i32);
        let bits = _mm_and_si128(_mm_srai_epi32::<3>(lane), keep);
        _mm_mul_ps(
            _mm_castsi128_ps(bits),
            _mm_castsi128_ps(_mm_set1_epi32(0x7780_0000)),
        )
    }
}

/// The `count` (a multiple of 32: a panel's lines) `f16` at `from` as `f32` into `into`, exactly,
/// on SSE2, the next `count` asked for meanwhile: eight at a time as finite values, the largest
/// magnitude kept; if that is an infinity or a NaN (never in a model's weights), all again by
/// [`halves_sse2`].
#[inline(always)]
unsafe fn widen_sse2(from: *const f16, count: usize, into: *mut __m128) {
    unsafe {
        let mut largest = _mm_setzero_si128();
        // Zeros the compiler cannot see through: where it knows them, it unpacks into whatever
        // register it likes (their bits end up cleared), which ties each step to the last.
        let zero = std::hint::black_box(_mm_setzero_si128());
        for line in 0..count / 32 {
            // The next panel's line into L2 meanwhile (after the last panel, whatever follows the
            // weights: a prefetch never faults, and the address is only computed, never read).
            _mm_prefetch::<_MM_HINT_T1>(from.wrapping_add(count + 32 * line).cast());
            for j in 4 * line..4 * line + 4 {
                let h = _mm_loadu_si128(from.add(8 * j).cast());
                largest = _mm_max_epi16(largest, _mm_and_si128(h, _mm_set1_epi16(0x7fff)));
                *into.add(2 * j) = finite_halves_sse2(_mm_unpacklo_epi16(zero, h));
                *into.add(2 * j + 1) = finite_halves_sse2(_mm_unpackhi_epi16(zero, h));
            }
        }
        let special = _mm_cmpgt_epi16(largest, _mm_set1_epi16(0x7bff));
        if _mm_movemask_epi8(special) != 0 {
            for j in 0..count / 4 {
                *into.add(j) = halves_sse2(_mm_loadl_epi64(from.add(4 * j).cast()));
            }
        }
    }
}

/// Rows of `x` that one run over a quarter panel takes on SSE2: two vectors of four columns for
/// each of six rows, twelve accumulators of the sixteen registers (as on AVX2).
const PANEL_ROWS_128: usize = 6;

/// Input values (rows × k) that SSE2 broadcasts at a time (1 MB), before it runs every panel over
/// them: with `k` = 384, 170 rows; 1,536, 42 rows (each panel is widened again for each chunk of
/// rows: a thirtieth of the work or less up to `k` ≈ 2,000; past 10,922, chunks of six rows).
const BROADCAST_VALUES: usize = 64 * 1024;

/// Inputs that one run over a quarter panel takes on SSE2 before the next quarter: a block of
/// rows' inputs broadcast and the panel's weights for them stay in L1 for the four quarters.
const SSE2_INPUTS: usize = 64;

thread_local! {
    /// [`panels_sse2`]'s scratch: the panel widened to `f32` (`k × PANEL` values), the inputs
    /// broadcast (each value in all four lanes), both aligned for the loads, and the id of the
    /// [`DenseInput`] whose rows are all broadcast there (0: none).
    static SSE2_SCRATCH: RefCell<(Vec<__m128>, Vec<__m128>, u64)> =
        const { RefCell::new((Vec::new(), Vec::new(), 0)) };
}

/// [`DenseWeights::Panels`] on SSE2, for CPUs without AVX2. The inputs of a chunk of rows
/// ([`BROADCAST_VALUES`]) are broadcast into a scratch of this thread's (input-major for each block
/// of up to six rows); then each panel is widened to `f32` into another (SSE2 has no
/// `vcvtph2ps`: [`widen_sse2`], once per chunk of rows), and run a quarter (two vectors of four
/// columns) against a block of rows at a time, [`SSE2_INPUTS`] inputs at a time, each row's input
/// read as the operand of a multiply: no shuffle in the loop, and fifteen registers are enough.
/// Each output sums its inputs in order, every product rounded before it is added (no FMA), then
/// its bias: within rounding of the fused paths, and the same bits in any call or column split.
/// `input`, unless 0, is the [`DenseInput`] id of `x` (`rows` × `k`, the same values on every call
/// with that id): when its rows fit one chunk, they are broadcast once for all its calls on this
/// thread.
#[target_feature(enable = "sse2")]
#[allow(clippy::too_many_arguments)]
unsafe fn panels_sse2(
    x: *const f32,
    rows: usize,
    k: usize,
    w: *const f16,
    n: usize,
    bias: *const f32,
    out: *mut f32,
    input: u64,
) {
    /// `R` rows, `kc` inputs broadcast input-major at `xb`, against the two vectors of each input
    /// at `wide` (`PANEL / 4` apart), the sums carried on from `out` unless `first`, the bias
    /// added when `last` (and not null).
    #[target_feature(enable = "sse2")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const R: usize>(
        xb: *const __m128,
        kc: usize,
        wide: *const __m128,
        bias: *const f32,
        out: *mut f32,
        n: usize,
        first: bool,
        last: bool,
    ) {
        const STRIDE: usize = PANEL / 4;
        unsafe {
            let mut acc = [[_mm_setzero_ps(); 2]; R];
            if !first {
                for (r, acc) in acc.iter_mut().enumerate() {
                    acc[0] = _mm_loadu_ps(out.add(r * n));
                    acc[1] = _mm_loadu_ps(out.add(r * n + 4));
                }
            }
            let (mut wp, mut xp) = (wide, xb);
            for _ in 0..kc {
                let (w0, w1) = (*wp, *wp.add(1));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xv = *xp.add(r);
                    acc[0] = _mm_add_ps(_mm_mul_ps(xv, w0), acc[0]);
                    acc[1] = _mm_add_ps(_mm_mul_ps(xv, w1), acc[1]);
                }
                // Past the last input they point beyond the buffers (never read): wrapping.
                wp = wp.wrapping_add(STRIDE);
                xp = xp.wrapping_add(R);
            }
            if last && !bias.is_null() {
                let (b0, b1) = (_mm_loadu_ps(bias), _mm_loadu_ps(bias.add(4)));
                for acc in acc.iter_mut() {
                    acc[0] = _mm_add_ps(acc[0], b0);
                    acc[1] = _mm_add_ps(acc[1], b1);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                _mm_storeu_ps(out.add(r * n), acc[0]);
                _mm_storeu_ps(out.add(r * n + 4), acc[1]);
            }
        }
    }
    /// The `take` rows at `x` broadcast input-major into `xb`: input `i` of row `r` at
    /// `i * take + r`. Four inputs of every row at a time, so that the stores run in order: row by
    /// row, each line of `xb` would be written a piece at a time, and leave L1 between the pieces.
    #[target_feature(enable = "sse2")]
    #[inline]
    unsafe fn broadcast(x: *const f32, k: usize, take: usize, xb: *mut __m128) {
        unsafe {
            let full = k - k % 4;
            for i in (0..full).step_by(4) {
                let at = xb.add(i * take);
                for r in 0..take {
                    let v = _mm_loadu_ps(x.add(r * k + i));
                    *at.add(r) = _mm_shuffle_ps::<0x00>(v, v);
                    *at.add(take + r) = _mm_shuffle_ps::<0x55>(v, v);
                    *at.add(2 * take + r) = _mm_shuffle_ps::<0xaa>(v, v);
                    *at.add(3 * take + r) = _mm_shuffle_ps::<0xff>(v, v);
                }
            }
            for i in full..k {
                for r in 0..take {
                    *xb.add(i * take + r) = _mm_set1_ps(*x.add(r * k + i));
                }
            }
        }
    }
    // Rows in chunks whose inputs, broadcast, fit BROADCAST_VALUES (a block of rows at least):
    // each chunk's inputs broadcast once, then every panel widened and run over them.
    let chunk = (BROADCAST_VALUES / k).max(PANEL_ROWS_128).min(rows);
    SSE2_SCRATCH.with_borrow_mut(|(wide, xb, ready)| {
        // Every value is written before it is read: no zeroing on a call.
        wide.resize(k * PANEL / 4, _mm_setzero_ps());
        xb.resize(chunk * k, _mm_setzero_ps());
        // All rows in one chunk, broadcast by an earlier call with the same input: kept.
        let kept = input != 0 && chunk == rows && *ready == input;
        if !kept {
            *ready = 0;
        }
        // SAFETY (all below): the caller's bounds (see `panels`): `w` holds `n / PANEL` panels
        // of `k × PANEL` values, `x` `rows × k`, `bias` `n` (or is null), `out` `rows × n`;
        // `wide` holds one panel, `xb` a chunk of rows.
        unsafe {
            for c0 in (0..rows).step_by(chunk) {
                let cr = chunk.min(rows - c0);
                let (x, out) = (x.add(c0 * k), out.add(c0 * n));
                if !kept {
                    row_blocks(cr, PANEL_ROWS_128, |r0, take| {
                        broadcast(x.add(r0 * k), k, take, xb.as_mut_ptr().add(r0 * k));
                    });
                }
                for p in 0..n / PANEL {
                    widen_sse2(w.add(p * k * PANEL), k * PANEL, wide.as_mut_ptr());
                    row_blocks(cr, PANEL_ROWS_128, |r0, take| {
                        for i0 in (0..k).step_by(SSE2_INPUTS) {
                            let kc = SSE2_INPUTS.min(k - i0);
                            let xr = xb.as_ptr().add(r0 * k + i0 * take);
                            let (first, last) = (i0 == 0, i0 + kc == k);
                            for quarter in 0..4 {
                                let col = p * PANEL + 8 * quarter;
                                let wq = wide.as_ptr().add(i0 * PANEL / 4 + 2 * quarter);
                                let bq = if bias.is_null() { bias } else { bias.add(col) };
                                let o = out.add(r0 * n + col);
                                match take {
                                    1 => block::<1>(xr, kc, wq, bq, o, n, first, last),
                                    2 => block::<2>(xr, kc, wq, bq, o, n, first, last),
                                    3 => block::<3>(xr, kc, wq, bq, o, n, first, last),
                                    4 => block::<4>(xr, kc, wq, bq, o, n, first, last),
                                    5 => block::<5>(xr, kc, wq, bq, o, n, first, last),
                                    6 => block::<6>(xr, kc, wq, bq, o, n, first, last),
                                    _ => unreachable!("a block of {take} rows"),
                                }
                            }
                        }
                    });
                }
            }
        }
        // Broadcast, all rows: kept for the next call with this input.
        if chunk == rows {
            *ready = input;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `f32` bits with a NaN's quiet bit set.
    fn quiet(bits: u32) -> u32 {
        if f32::from_bits(bits).is_nan() {
            bits | 0x0040_0000
        } else {
            bits
        }
    }

    #[test]
    fn sse2_widening_gives_every_f16_the_bits_of_the_exact_conversion() {
        // Every f16 bit pattern, 32 to a panel from 0x0010 on: the fast widening (finite panels),
        // the exact one (panels with an infinity or a NaN, two of them holding finite values
        // too), and `halves_sse2` alone, against `half`'s conversion: the same bits, -0.0 and
        // NaN payloads included (a signalling NaN is not made quiet here, as `half` does; the
        // first multiply does).
        let all: Vec<f16> = (0..=u16::MAX)
            .map(|b| f16::from_bits(b.wrapping_add(16)))
            .collect();
        for w in all.chunks(PANEL) {
            let mut wide = vec![0f32; PANEL];
            // SAFETY: SSE2 is part of x86-64; `w` holds PANEL values and `wide` room for them.
            unsafe { widen_sse2(w.as_ptr(), PANEL, wide.as_mut_ptr().cast()) };
            for (got, h) in wide.iter().zip(w) {
                let want = h.to_f32();
                assert_eq!(quiet(got.to_bits()), want.to_bits(), "{:#06x}", h.to_bits());
            }
            for (i, four) in w.chunks(4).enumerate() {
                // SAFETY: as above; the load reads the four values of `four`.
                let got: [f32; 4] = unsafe {
                    std::mem::transmute(halves_sse2(_mm_loadl_epi64(four.as_ptr().cast())))
                };
                for (got, h) in got.iter().zip(four) {
                    let want = h.to_f32();
                    assert_eq!(
                        quiet(got.to_bits()),
                        want.to_bits(),
                        "{i}: {:#06x}",
                        h.to_bits()
                    );
                }
            }
        }
    }
}
