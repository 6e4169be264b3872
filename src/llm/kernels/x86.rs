//! The x86 SIMD kernels behind [`super::dot_rows`]: the only unsafe code of the engine.
//!
//! One weight row against up to four activation rows. Per block of 32: the weights are loaded (and
//! for 4-bit formats unpacked) once, then for each activation row an exact integer sum in eight
//! `i32` lanes (lane `i` sums products `4i..4i + 4`), converted to `f32` and multiplied into an
//! eight-lane accumulator by the two scales. AVX2 forms the lanes with `vpmaddubsw` + `vpmaddwd`
//! (no overflow: |w| ≤ 128, |a| ≤ 127 gives at most 32,512 per pair), AVX-512 VNNI with one
//! `vpdpbusd`; the lanes hold the same integers either way, so both paths give the same bits. The
//! 4-bit formats' offsets (`m × s`) are added in a scalar sum, block by block.
//!
//! Safety: every function here is `unsafe` only because of `#[target_feature]`; the safe wrapper
//! [`dot_rows`] checks the CPU first (once, cached by std) and the slice lengths before any load.

use core::arch::x86_64::*;

use super::{BLOCK, Format};

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

/// Activation rows: all values, scales and scaled sums, `rows × kb` blocks.
pub(super) struct Acts<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub rows: usize,
}

/// Safe entry: `w` holds consecutive weight rows in `format`'s blocks, `kb` blocks each; writes
/// `out[r * width + c]` = weight row `c` · activation row `r` for every row of `acts`.
pub(super) fn matmul(
    vnni: bool,
    format: Format,
    w: &[u8],
    kb: usize,
    acts: &Acts<'_>,
    out: &mut [f32],
    width: usize,
) {
    let row_bytes = kb * format.block_bytes();
    let cols = w.len() / row_bytes;
    assert!(w.len() == cols * row_bytes && cols <= width);
    assert!(acts.qs.len() == acts.rows * kb * BLOCK);
    assert!(acts.d.len() == acts.rows * kb && acts.s.len() == acts.rows * kb);
    assert!(out.len() >= acts.rows * width);
    assert!(if vnni {
        avx512_vnni_supported()
    } else {
        avx2_supported()
    });
    // SAFETY: the CPU supports the target features (asserted above); the kernels read weight
    // row `c < cols` within `w`, blocks `b < kb` of activation rows `< acts.rows`, and write
    // `out[r * width + c]` with `r < acts.rows`, `c < cols <= width`: all checked above.
    unsafe {
        if vnni {
            matmul_vnni(format, w, kb, acts, out, width)
        } else {
            matmul_avx2(format, w, kb, acts, out, width)
        }
    }
}

/// The f16 at `p` as f32.
#[inline(always)]
unsafe fn half_at(p: *const u8) -> f32 {
    unsafe {
        let bits = std::ptr::read_unaligned(p as *const u16);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
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

/// One weight row (at `wp`) against activation rows `r0..r0 + R`, with the expression `$dot` of
/// `$u`, `$s` forming the eight `i32` lanes of the products of unsigned bytes `u` and signed
/// bytes `s`. Writes the `R` dot products to `out[(r0 + r) * width]`.
macro_rules! rows_kernel {
    ($R:expr, $format:ident, $wp:ident, $kb:ident, $acts:ident, $r0:ident, $out:ident, |$u:ident, $s:ident| $dot:expr) => {{
        const R: usize = $R;
        let bb = $format.block_bytes();
        let mut acc = [_mm256_setzero_ps(); R];
        let mut offsets = [0f32; R];
        let (qs, ds, ss) = ($acts.qs.as_ptr(), $acts.d.as_ptr(), $acts.s.as_ptr());
        for b in 0..$kb {
            let block = $wp.add(b * bb);
            let dw = half_at(block);
            match $format {
                Format::Q8_0 => {
                    let w = _mm256_loadu_si256(block.add(2) as *const __m256i);
                    let magnitude = _mm256_sign_epi8(w, w);
                    for r in 0..R {
                        let at = ($r0 + r) * $kb + b;
                        let a = _mm256_loadu_si256(qs.add(at * BLOCK) as *const __m256i);
                        let lanes = {
                            let ($u, $s) = (magnitude, _mm256_sign_epi8(a, w));
                            $dot
                        };
                        let scale = _mm256_set1_ps(dw * *ds.add(at));
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), scale, acc[r]);
                    }
                }
                Format::Q4_0 | Format::Q4_1 => {
                    let (m, w) = if $format == Format::Q4_1 {
                        (half_at(block.add(2)), nibbles(block.add(4)))
                    } else {
                        (-8.0 * dw, nibbles(block.add(2)))
                    };
                    for r in 0..R {
                        let at = ($r0 + r) * $kb + b;
                        let a = _mm256_loadu_si256(qs.add(at * BLOCK) as *const __m256i);
                        let lanes = {
                            let ($u, $s) = (w, a);
                            $dot
                        };
                        let scale = _mm256_set1_ps(dw * *ds.add(at));
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), scale, acc[r]);
                        offsets[r] += m * *ss.add(at);
                    }
                }
            }
        }
        for r in 0..R {
            $out[r] = hsum(acc[r]) + offsets[r];
        }
    }};
}

/// The loops around [`rows_kernel`]: every weight row, against the activation rows four at a
/// time (the weight block is unpacked once for the four), then the one to three left.
macro_rules! matmul_body {
    ($format:ident, $w:ident, $kb:ident, $acts:ident, $out:ident, $width:ident, |$u:ident, $s:ident| $dot:expr) => {{
        let row_bytes = $kb * $format.block_bytes();
        let cols = $w.len() / row_bytes;
        let mut dots = [0f32; 4];
        for c in 0..cols {
            let wp = $w.as_ptr().add(c * row_bytes);
            let mut r0 = 0;
            while r0 + 4 <= $acts.rows {
                rows_kernel!(4, $format, wp, $kb, $acts, r0, dots, |$u, $s| $dot);
                for (i, d) in dots.iter().enumerate() {
                    *$out.get_unchecked_mut((r0 + i) * $width + c) = *d;
                }
                r0 += 4;
            }
            match $acts.rows - r0 {
                0 => continue,
                1 => rows_kernel!(1, $format, wp, $kb, $acts, r0, dots, |$u, $s| $dot),
                2 => rows_kernel!(2, $format, wp, $kb, $acts, r0, dots, |$u, $s| $dot),
                _ => rows_kernel!(3, $format, wp, $kb, $acts, r0, dots, |$u, $s| $dot),
            }
            for i in 0..$acts.rows - r0 {
                *$out.get_unchecked_mut((r0 + i) * $width + c) = dots[i];
            }
        }
    }};
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn matmul_avx2(
    format: Format,
    w: &[u8],
    kb: usize,
    acts: &Acts<'_>,
    out: &mut [f32],
    width: usize,
) {
    unsafe {
        let ones = _mm256_set1_epi16(1);
        matmul_body!(format, w, kb, acts, out, width, |u, s| _mm256_madd_epi16(
            _mm256_maddubs_epi16(u, s),
            ones
        ))
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn matmul_vnni(
    format: Format,
    w: &[u8],
    kb: usize,
    acts: &Acts<'_>,
    out: &mut [f32],
    width: usize,
) {
    unsafe {
        let zero = _mm256_setzero_si256();
        matmul_body!(format, w, kb, acts, out, width, |u, s| _mm256_dpbusd_epi32(
            zero, u, s
        ))
    }
}
