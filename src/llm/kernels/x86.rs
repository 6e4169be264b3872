//! The x86 SIMD kernels behind [`super::matmul_cols`]: the only unsafe code of the engine.
//!
//! One weight row against up to four activation rows, eight blocks of 32 at a time. Per block the
//! weights are loaded (4-bit ones unpacked) once; for each activation row the products form an
//! exact integer sum in eight `i32` lanes: AVX2 with `vpmaddubsw` + `vpmaddwd` (no overflow: |w| ≤
//! 128, |a| ≤ 127 gives at most 32,512 per pair), AVX-512 VNNI with one `vpdpbusd`. The lanes hold
//! the same integers either way, so both paths give the same bits. Horizontal adds fold eight
//! blocks' lanes into one vector of eight block sums, converted to `f32` and multiplied by the
//! eight weight × activation scales in one fused multiply-add; the 4-bit formats' offsets
//! (`m × s`) take one more. Per row and block that is about a third of the instructions of
//! scaling each block on its own (as llama.cpp's `vec_dot` kernels do).
//!
//! Safety: every function here is `unsafe` only because of `#[target_feature]`; the safe wrapper
//! [`matmul`] checks the CPU first (once, cached by std) and the slice lengths before any load.

use core::arch::x86_64::*;

use super::attention::{self, Heads, Queries};
use super::{BLOCK, Format, GROUP};

pub(super) fn avx2_supported() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

pub(super) fn avx512_vnni_supported() -> bool {
    avx2_supported()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Attention of one input's new tokens on AVX2 + FMA, else the portable loops. Token by token,
/// and per key/value head the query heads that share it: the dot products of a query row with
/// four key rows at a time (each key row read once for all the heads of its group), the softmax
/// of [`attention::softmax_visible`], then the weighted sum of the value rows held in registers.
/// A (token, head) row's operations depend only on its position, never on the tokens computed
/// with it, so a prompt token gets the same bits prefilled in a batch or decoded alone.
pub(super) fn attend_tokens(
    heads: Heads,
    queries: &Queries<'_>,
    keys: &[f32],
    values: &[f32],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (hd, kv_dim) = (heads.head_dim, heads.kv_dim());
    let Queries {
        qkv,
        width,
        start,
        count,
    } = *queries;
    let fits = hd.is_multiple_of(VALUE_DIMS)
        && heads.n_head.is_multiple_of(heads.n_kv_head)
        && count > 0
        && keys.len() >= (start + count) * kv_dim
        && values.len() >= (start + count) * kv_dim
        && qkv.len() >= (count - 1) * width + heads.n_head * hd
        && out.len() >= count * heads.n_head * hd;
    if fits && avx2_supported() {
        // SAFETY: the CPU has AVX2 and FMA (checked above), and every read and write is within
        // the lengths checked above: key and value rows `< start + count`, query rows `< count`,
        // output rows `< count`, head offsets `< n_head * head_dim`.
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

#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    heads: Heads,
    queries: &Queries<'_>,
    keys: &[f32],
    values: &[f32],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (hd, kv_dim, group) = (heads.head_dim, heads.kv_dim(), heads.group());
    let q_dim = heads.n_head * hd;
    let Queries {
        qkv,
        width,
        start,
        count,
    } = *queries;
    unsafe {
        for j in 0..count {
            let visible = start + j + 1;
            let row = qkv.as_ptr().add(j * width);
            for g in 0..heads.n_kv_head {
                let off = g * hd;
                scores.clear();
                scores.resize(group * visible, 0.0);
                for t in (0..visible).step_by(4) {
                    // Past the last visible row, the last one again (its dots are dropped).
                    let k: [*const f32; 4] = std::array::from_fn(|i| {
                        keys.as_ptr().add((t + i).min(visible - 1) * kv_dim + off)
                    });
                    let n = (visible - t).min(4);
                    for hh in 0..group {
                        let q = row.add((g * group + hh) * hd);
                        let mut acc = [_mm256_setzero_ps(); 4];
                        for d in (0..hd).step_by(8) {
                            let qv = _mm256_loadu_ps(q.add(d));
                            for (a, k) in acc.iter_mut().zip(&k) {
                                *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k.add(d)), *a);
                            }
                        }
                        let mut dots = [0f32; 4];
                        _mm_storeu_ps(dots.as_mut_ptr(), sum4(&acc));
                        scores[hh * visible + t..hh * visible + t + n].copy_from_slice(&dots[..n]);
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
                            let v = values.as_ptr().add(t * kv_dim + off + $d);
                            let vs: [__m256; 4] =
                                std::array::from_fn(|i| _mm256_loadu_ps(v.add(8 * i)));
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
                                .add(j * q_dim + (g * group + $h0 + r) * hd + $d);
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

/// One weight matrix's columns, as [`super::QMatrix`] lays them out.
pub(super) struct Weights<'a> {
    pub format: Format,
    pub qs: &'a [u8],
    pub d: &'a [u16],
    pub m: &'a [u16],
    /// Blocks per row (the scale rows hold them padded to a multiple of [`GROUP`]).
    pub blocks: usize,
}

/// Activation rows: all values, scales and scaled sums.
pub(super) struct Acts<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub rows: usize,
}

/// Safe entry: writes `out[r * width + c]` = weight column `c` · activation row `r` for every
/// column of `w` and row of `acts`.
pub(super) fn matmul(vnni: bool, w: &Weights<'_>, acts: &Acts<'_>, out: &mut [f32], width: usize) {
    let (kb, kp) = (w.blocks, w.blocks.next_multiple_of(GROUP));
    let qb = w.format.quant_bytes();
    let cols = w.d.len() / kp;
    assert!(w.d.len() == cols * kp && w.qs.len() == cols * kb * qb && cols <= width);
    assert!(
        w.m.len()
            == if w.format == Format::Q8_0 {
                0
            } else {
                cols * kp
            }
    );
    assert!(acts.qs.len() == acts.rows * kb * BLOCK);
    assert!(acts.d.len() == acts.rows * kp && acts.s.len() == acts.rows * kp);
    assert!(out.len() >= acts.rows * width);
    assert!(if vnni {
        avx512_vnni_supported()
    } else {
        avx2_supported()
    });
    // SAFETY: the CPU supports the target features (asserted above); the kernels read column
    // `c < cols` of `w` (quant bytes of blocks `< kb`, scales `< kp`), the same blocks of
    // activation rows `< acts.rows`, and write `out[r * width + c]`: all within the lengths
    // checked above.
    unsafe {
        if vnni {
            matmul_vnni(w, acts, out, width)
        } else {
            matmul_avx2(w, acts, out, width)
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

/// Folds four pair sums (`hadd` of two blocks' lanes each, blocks `2p` and `2p + 1` in pair
/// `p`) into one vector of the eight block totals (block `i` in lane `i`), always by the same
/// additions.
#[inline(always)]
unsafe fn totals(h: &[__m256i; 4]) -> __m256i {
    unsafe {
        let a = _mm256_hadd_epi32(h[0], h[1]);
        let b = _mm256_hadd_epi32(h[2], h[3]);
        // a = [t0 t1 t2 t3 (low halves) | t0 t1 t2 t3 (high halves)], b likewise for 4–7.
        _mm256_add_epi32(
            _mm256_permute2x128_si256(a, b, 0x20),
            _mm256_permute2x128_si256(a, b, 0x31),
        )
    }
}

/// How far ahead of the weight bytes in use the few-rows path asks for the next ones. Without
/// it a decode step waited on memory: on an Intel Xeon (AVX-512, KVM) one thread read the
/// weights at 6.6 GB/s of the 13-17 it can stream; 1, 2 and 16 KB ahead gave less than 4 KB.
const PREFETCH: usize = 4096;

/// From this many activation rows on, a column's weights are unpacked once for many rows.
const UNPACK_ROWS: usize = 8;

/// Activation rows a pass over the columns reads: as many as fit in this many bytes of L1 (each
/// row `k` quant bytes and eight bytes of scales a block), at least 8 and at most 64.
const TILE_BYTES: usize = 16 * 1024;

fn tile_len(blocks: usize) -> usize {
    (TILE_BYTES / (blocks * (BLOCK + 8))).clamp(8, 64)
}

/// The loops for one instruction set, `$dot` forming the eight `i32` lanes of the products of
/// unsigned bytes `$u` and signed bytes `$s`: every column, its activation rows four at a time
/// (each weight block unpacked once for the four), then the one to three left.
macro_rules! matmul_body {
    ($w:ident, $acts:ident, $out:ident, $width:ident, |$u:ident, $s:ident| $dot:expr,
     |$w0:ident, $a0:ident, $w1:ident, $a1:ident| $pair:expr) => {{
        let (kb, kp) = ($w.blocks, $w.blocks.next_multiple_of(GROUP));
        let qb = $w.format.quant_bytes();
        let cols = $w.d.len() / kp;
        let four_bit = $w.format != Format::Q8_0;
        let mut dots = [0f32; 4];

        // Column `c` against rows `r0..r0 + R` into `dots`.
        macro_rules! rows {
            ($R:expr, $c:ident, $r0:ident) => {{
                const R: usize = $R;
                let mut acc = [_mm256_setzero_ps(); R];
                let mut off = [_mm256_setzero_ps(); R];
                let wq = $w.qs.as_ptr().add($c * kb * qb);
                for g in (0..kp).step_by(GROUP) {
                    // Blocks in pairs: each pair's lanes are folded at once (one `hadd`), so
                    // that few vectors stay live across the group.
                    let mut pairs = [[_mm256_setzero_si256(); 4]; R];
                    for p in 0..GROUP / 2 {
                        let b = g + 2 * p;
                        if b >= kb {
                            break;
                        }
                        let second = b + 1 < kb;
                        // The weights stream from memory once per step: ask for them ahead
                        // (past the column's end is the next column's start; a prefetch past
                        // the matrix's end reads nothing and cannot fault).
                        _mm_prefetch::<_MM_HINT_T0>(
                            wq.wrapping_add(b * qb + PREFETCH) as *const i8
                        );
                        let act = |r: usize, b: usize| {
                            _mm256_loadu_si256($acts.qs.as_ptr().add((($r0 + r) * kb + b) * BLOCK)
                                as *const __m256i)
                        };
                        if four_bit {
                            let w0 = nibbles(wq.add(b * qb));
                            let w1 = if second {
                                nibbles(wq.add((b + 1) * qb))
                            } else {
                                _mm256_setzero_si256()
                            };
                            for r in 0..R {
                                let a1 = if second {
                                    act(r, b + 1)
                                } else {
                                    _mm256_setzero_si256()
                                };
                                let ($w0, $a0, $w1, $a1) = (w0, act(r, b), w1, a1);
                                pairs[r][p] = $pair;
                            }
                        } else {
                            let w0 = _mm256_loadu_si256(wq.add(b * qb) as *const __m256i);
                            let w1 = if second {
                                _mm256_loadu_si256(wq.add((b + 1) * qb) as *const __m256i)
                            } else {
                                _mm256_setzero_si256()
                            };
                            let (m0, m1) = (_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(w1, w1));
                            for r in 0..R {
                                let l0 = {
                                    let ($u, $s) = (m0, _mm256_sign_epi8(act(r, b), w0));
                                    $dot
                                };
                                let l1 = if second {
                                    let ($u, $s) = (m1, _mm256_sign_epi8(act(r, b + 1), w1));
                                    $dot
                                } else {
                                    _mm256_setzero_si256()
                                };
                                pairs[r][p] = _mm256_hadd_epi32(l0, l1);
                            }
                        }
                    }
                    let dw = halves($w.d.as_ptr().add($c * kp + g));
                    let mw = if four_bit {
                        halves($w.m.as_ptr().add($c * kp + g))
                    } else {
                        _mm256_setzero_ps()
                    };
                    for r in 0..R {
                        let at = ($r0 + r) * kp + g;
                        let scale = _mm256_mul_ps(dw, _mm256_loadu_ps($acts.d.as_ptr().add(at)));
                        let sums = _mm256_cvtepi32_ps(totals(&pairs[r]));
                        acc[r] = _mm256_fmadd_ps(sums, scale, acc[r]);
                        if four_bit {
                            let s = _mm256_loadu_ps($acts.s.as_ptr().add(at));
                            off[r] = _mm256_fmadd_ps(mw, s, off[r]);
                        }
                    }
                }
                for r in 0..R {
                    dots[r] = hsum(acc[r]) + hsum(off[r]);
                }
            }};
        }

        // Many rows (a prompt). The rows go a tile at a time, few enough that their activations
        // stay in L1 while every column runs against them ([`tile_len`]). Each column's weights
        // are unpacked once per tile into `unpacked` (in L1), then run against the tile's rows
        // four at a time: each weight vector is loaded once for the four rows, and the pairs of
        // blocks fold as in `rows!`. The offsets (`m × s`), which do not depend on the products,
        // take a pass of their own afterwards with the same operations in the same order, so
        // that the accumulators of four rows fit in registers. The integer block sums are exact
        // whatever the order, and the floats go through the same operations as in `rows!`, so
        // a row gets the same bits on either path.
        macro_rules! tile_rows {
            ($R:expr, $c:ident, $r0:ident, $unpacked:ident, $four_bit:expr) => {{
                const R: usize = $R;
                let zero = _mm256_setzero_si256();
                let mut acc = [_mm256_setzero_ps(); R];
                for g in (0..kp).step_by(GROUP) {
                    // Blocks `g..g + 4` and `g + 4..g + 8` of each row, folded.
                    let mut quads = [[zero; R]; 2];
                    for (h, quad) in quads.iter_mut().enumerate() {
                        let mut first = [zero; R];
                        for q in 0..2 {
                            let b = g + 4 * h + 2 * q;
                            let mut pr = [zero; R];
                            if b < kb {
                                let second = b + 1 < kb;
                                let w0 = *$unpacked.get_unchecked(b);
                                let w1 = if second {
                                    *$unpacked.get_unchecked(b + 1)
                                } else {
                                    zero
                                };
                                let act = |r: usize, b: usize| {
                                    _mm256_loadu_si256(
                                        $acts.qs.as_ptr().add((($r0 + r) * kb + b) * BLOCK)
                                            as *const __m256i,
                                    )
                                };
                                if $four_bit {
                                    for (r, p) in pr.iter_mut().enumerate() {
                                        let a1 = if second { act(r, b + 1) } else { zero };
                                        let ($w0, $a0, $w1, $a1) = (w0, act(r, b), w1, a1);
                                        *p = $pair;
                                    }
                                } else {
                                    let (m0, m1) =
                                        (_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(w1, w1));
                                    for (r, p) in pr.iter_mut().enumerate() {
                                        let l0 = {
                                            let ($u, $s) = (m0, _mm256_sign_epi8(act(r, b), w0));
                                            $dot
                                        };
                                        let l1 = if second {
                                            let ($u, $s) =
                                                (m1, _mm256_sign_epi8(act(r, b + 1), w1));
                                            $dot
                                        } else {
                                            zero
                                        };
                                        *p = _mm256_hadd_epi32(l0, l1);
                                    }
                                }
                            }
                            if q == 0 {
                                first = pr;
                            } else {
                                for r in 0..R {
                                    quad[r] = _mm256_hadd_epi32(first[r], pr[r]);
                                }
                            }
                        }
                    }
                    let dw = halves($w.d.as_ptr().add($c * kp + g));
                    for r in 0..R {
                        let at = ($r0 + r) * kp + g;
                        let scale = _mm256_mul_ps(dw, _mm256_loadu_ps($acts.d.as_ptr().add(at)));
                        let (a, b) = (quads[0][r], quads[1][r]);
                        let totals = _mm256_add_epi32(
                            _mm256_permute2x128_si256(a, b, 0x20),
                            _mm256_permute2x128_si256(a, b, 0x31),
                        );
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(totals), scale, acc[r]);
                    }
                }
                for r in 0..R {
                    dots[r] = hsum(acc[r]);
                }
            }};
        }
        macro_rules! prompt_rows {
            ($four_bit:expr) => {{
                let mut unpacked = vec![_mm256_setzero_si256(); kb];
                let tile = tile_len(kb);
                for t0 in (0..$acts.rows).step_by(tile) {
                    let end = (t0 + tile).min($acts.rows);
                    for c in 0..cols {
                        let wq = $w.qs.as_ptr().add(c * kb * qb);
                        for (b, u) in unpacked.iter_mut().enumerate() {
                            *u = if $four_bit {
                                nibbles(wq.add(b * qb))
                            } else {
                                _mm256_loadu_si256(wq.add(b * qb) as *const __m256i)
                            };
                        }
                        let mut r0 = t0;
                        while r0 < end {
                            let n = (end - r0).min(4);
                            match n {
                                4 => tile_rows!(4, c, r0, unpacked, $four_bit),
                                3 => tile_rows!(3, c, r0, unpacked, $four_bit),
                                2 => tile_rows!(2, c, r0, unpacked, $four_bit),
                                _ => tile_rows!(1, c, r0, unpacked, $four_bit),
                            }
                            for (i, d) in dots.iter().enumerate().take(n) {
                                // The offsets' pass: the same operations as in `rows!`.
                                let mut off = _mm256_setzero_ps();
                                if $four_bit {
                                    for g in (0..kp).step_by(GROUP) {
                                        let mw = halves($w.m.as_ptr().add(c * kp + g));
                                        let s = _mm256_loadu_ps(
                                            $acts.s.as_ptr().add((r0 + i) * kp + g),
                                        );
                                        off = _mm256_fmadd_ps(mw, s, off);
                                    }
                                }
                                *$out.get_unchecked_mut((r0 + i) * $width + c) = d + hsum(off);
                            }
                            r0 += n;
                        }
                    }
                }
            }};
        }

        if $acts.rows >= UNPACK_ROWS {
            if four_bit {
                prompt_rows!(true)
            } else {
                prompt_rows!(false)
            }
        } else {
            for c in 0..cols {
                let mut r0 = 0;
                while r0 + 4 <= $acts.rows {
                    rows!(4, c, r0);
                    for (i, d) in dots.iter().enumerate() {
                        *$out.get_unchecked_mut((r0 + i) * $width + c) = *d;
                    }
                    r0 += 4;
                }
                match $acts.rows - r0 {
                    0 => continue,
                    1 => rows!(1, c, r0),
                    2 => rows!(2, c, r0),
                    _ => rows!(3, c, r0),
                }
                for (i, d) in dots.iter().enumerate().take($acts.rows - r0) {
                    *$out.get_unchecked_mut((r0 + i) * $width + c) = *d;
                }
            }
        }
    }};
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn matmul_avx2(w: &Weights<'_>, acts: &Acts<'_>, out: &mut [f32], width: usize) {
    unsafe {
        let ones = _mm256_set1_epi16(1);
        // A pair of 4-bit blocks: `vpmaddubsw` gives each block's products summed in twos,
        // at most 2 × 15 × 127 = 3,810; `vphaddw` sums them in fours (at most 7,620: no
        // overflow) and one `vpmaddwd` in eights, the lanes of `vphaddd` of two `vpmaddwd`.
        matmul_body!(
            w,
            acts,
            out,
            width,
            |u, s| _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones),
            |w0, a0, w1, a1| _mm256_madd_epi16(
                _mm256_hadd_epi16(_mm256_maddubs_epi16(w0, a0), _mm256_maddubs_epi16(w1, a1)),
                ones
            )
        )
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn matmul_vnni(w: &Weights<'_>, acts: &Acts<'_>, out: &mut [f32], width: usize) {
    unsafe {
        let zero = _mm256_setzero_si256();
        matmul_body!(
            w,
            acts,
            out,
            width,
            |u, s| _mm256_dpbusd_epi32(zero, u, s),
            |w0, a0, w1, a1| _mm256_hadd_epi32(
                _mm256_dpbusd_epi32(zero, w0, a0),
                _mm256_dpbusd_epi32(zero, w1, a1)
            )
        )
    }
}

/// Safe entry of [`super::dense`] (bias aside): 16-lane vectors with `wide`, else 8.
pub(super) fn dense(wide: bool, x: &[f32], rows: usize, w: &[f32], out: &mut [f32]) {
    let k = x.len() / rows;
    let n = w.len() / k;
    assert!(rows * k == x.len() && n * k == w.len() && out.len() == rows * n);
    assert!(if wide {
        is_x86_feature_detected!("avx512f")
    } else {
        avx2_supported()
    });
    // SAFETY: the CPU has the features (asserted above); the kernels read `x[r * k + i]` and
    // `w[j * k + i]` for `r < rows`, `j < n`, `i < k` and write `out[r * n + j]`: within the
    // lengths asserted above.
    unsafe {
        if wide {
            dense_avx512(x, rows, k, w, n, out)
        } else {
            dense_avx2(x, rows, k, w, n, out)
        }
    }
}

/// Weight row `j` against up to four rows of `x` at a time: the weight vector is loaded once
/// for the four, the rows' vectors stay in L1 across all the weight rows. `$lanes` wide vectors,
/// then the last `k % $lanes` products one by one. The row count of a block is a constant, so
/// that its accumulators live in registers.
macro_rules! dense_body {
    ($x:ident, $rows:ident, $k:ident, $w:ident, $n:ident, $out:ident, $lanes:expr, $wrows:expr,
     $zero:expr, $load:path, $fma:path, $sum:path) => {{
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
                        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH / 4) as *const i8);
                        *v = $load(at);
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
                            total += *xr.add(t) * *wj.add(t);
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

/// Three weight rows against four rows of `x`: twelve accumulators, three weight vectors and one
/// row vector fill the sixteen registers. Against two weight rows, all-MiniLM-L6-v2's projections
/// of a 13-token sentence (`examples/dense_bench.rs`, one core, AMD EPYC Zen 3, A-B-A-B): 4.43-5.95
/// -> 3.79-4.14 ms for the six layers. Each output's sum runs in the same order either way.
#[target_feature(enable = "avx2,fma")]
unsafe fn dense_avx2(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
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
            _mm256_fmadd_ps,
            hsum
        )
    }
}

#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn dense_avx512(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
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
            _mm512_fmadd_ps,
            _mm512_reduce_add_ps
        )
    }
}
