//! The encoders' projections of many rows on Intel AMX tiles (`tdpbf16ps`), where the CPU has
//! them (Sapphire Rapids and later): one tile instruction does 8,192 multiply-adds, sixteen times
//! what the two 512-bit FMA units do in the same time. Used for [`super::DenseWeights::Panels`]
//! from [`super::AMX_ROWS`] rows on ([`super::x86`] decides); fewer rows stay on the FMA kernel.
//! In practice the tiles wait on their loads from L2 (about 40 ns a tile product under load on
//! an Intel Xeon, against 8-10 ns from L1): 1.25-1.5× the FMA kernel at 200-400 rows, not 16×.
//!
//! AMX multiplies `bf16` (8-bit mantissas), too coarse for embeddings on its own. So each value is
//! split in two `bf16`, `v = hi + lo`, `hi` the rounded value and `lo` the rest rounded: a weight,
//! rounded to `f16` at load (11 significant bits), splits exactly; an activation keeps 16 bits.
//! Each product is then `hi·hi + lo·hi + hi·lo`, accumulated in `f32` (the dropped `lo·lo` is
//! below 2⁻¹⁶ of the product): within about 1e-5 of the `f32` product, for three tile
//! instructions per block.
//!
//! Per call, the input is split and packed as tiles (`[row block][block of 32 inputs][hi, lo]`,
//! each tile 16 rows × 32 values), and the weights' panels are split into tiles of input pairs
//! (`[panel][block][column half][hi, lo]`, rows `[i / 2][column][i % 2]`), both into scratch kept
//! by the thread. An output row is computed from its own input row only, in the same order
//! whatever the rows or columns around it: a text gets the same bits in any batch, and with its
//! columns split between threads.
//!
//! Safety: the tile instructions are inline assembly on scratch whose lengths are set and checked
//! before any load; [`supported`] checks the CPU and the OS's tile state and asks Linux for the
//! permission to use it, once.

use core::arch::asm;
use core::arch::x86_64::*;
use core::mem::MaybeUninit;
use std::cell::RefCell;
use std::sync::OnceLock;

use half::f16;

use super::PANEL;

/// Rows of one tile.
const ROWS: usize = 16;
/// Columns of one tile (`f32` accumulators; a panel is two).
const COLS: usize = 16;
/// Inputs of one tile row (16 pairs of `bf16`); the panels' `k` must be a multiple.
pub(super) const DEPTH: usize = 32;
/// Values in one tile.
const TILE: usize = ROWS * DEPTH;
/// Rows of the input kept in L2 while every panel passes over them (with `k` = 1536, 786 KB of
/// split input).
const CHUNK_ROWS: usize = 128;

/// Whether this CPU and OS run AMX's `bf16` tiles (asked once; on Linux this also requests the
/// permission for the process).
pub fn supported() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(detect)
}

fn detect() -> bool {
    if !(is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("xsave"))
    {
        return false;
    }
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86_64 CPU.
    let leaf = unsafe { __cpuid_count(7, 0) };
    if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
        return false;
    }
    // OSXSAVE (CPUID 1, ECX bit 27) before XGETBV; XCR0 bits 17 and 18: the OS saves tile state.
    #[allow(unused_unsafe)]
    // SAFETY: as above.
    if unsafe { __cpuid(1) }.ecx & (1 << 27) == 0 {
        return false;
    }
    let (lo, _hi): (u32, u32);
    // SAFETY: XGETBV with ECX = 0 reads XCR0, available when OSXSAVE is set (checked above).
    unsafe {
        asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") _hi, options(nomem, nostack, preserves_flags));
    }
    if lo & (3 << 17) != 3 << 17 {
        return false;
    }
    request_permission()
}

/// Linux gives a process AMX's 8 KB of tile state only when asked
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); a tile instruction before that faults.
#[cfg(target_os = "linux")]
fn request_permission() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: the syscall reads its two integer arguments and touches no memory of ours; the
    // kernel clobbers rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_permission() -> bool {
    false
}

/// 16 `f32` rounded to the nearest `bf16` (ties to even): the top 16 bits of each lane, the low 16
/// zero.
#[inline]
#[target_feature(enable = "avx512f")]
fn round(bits: __m512i) -> __m512i {
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let up = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    _mm512_and_si512(up, _mm512_set1_epi32(0xffff_0000u32 as i32))
}

/// 16 `f32` as `(hi, lo)`, each rounded to `bf16` in its lanes' top 16 bits.
#[inline]
#[target_feature(enable = "avx512f")]
fn split(v: __m512) -> (__m512i, __m512i) {
    let hi = round(_mm512_castps_si512(v));
    let lo = round(_mm512_castps_si512(_mm512_sub_ps(
        v,
        _mm512_castsi512_ps(hi),
    )));
    (hi, lo)
}

/// The input `x` (`rows × k`) split and packed as tiles into `a`: `[rows / 16 (padded to a
/// pair)][k / 32][hi, lo][16 rows][32]`; padding rows zero.
#[target_feature(enable = "avx512f,avx512bw")]
fn pack_input(x: &[f32], rows: usize, k: usize, a: &mut [u16]) {
    let blocks = k / DEPTH;
    assert!(a.len() == 2 * rows.next_multiple_of(2 * ROWS) * k && x.len() == rows * k);
    // Each row block is `2 × 16 × k` values.
    a[rows / ROWS * ROWS * 2 * k..].fill(0);
    for r in 0..rows {
        for b in 0..blocks {
            let at = ((r / ROWS * blocks + b) * 2 * TILE) + r % ROWS * DEPTH;
            for half in 0..2 {
                let from = r * k + b * DEPTH + half * 16;
                let v = &x[from..from + 16];
                let (hi, lo) = &mut a[at + half * 16..].split_at_mut(TILE);
                // SAFETY: `v` holds 16 values, and `hi` and `lo` at least 16 (a tile row's half,
                // inside `a`, whose length is asserted above); AVX-512F and BW are this
                // function's target features.
                unsafe {
                    let (h, l) = split(_mm512_loadu_ps(v.as_ptr()));
                    let h = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(h));
                    let l = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(l));
                    _mm256_storeu_si256(hi[..16].as_mut_ptr().cast(), h);
                    _mm256_storeu_si256(lo[..16].as_mut_ptr().cast(), l);
                }
            }
        }
    }
}

/// The panels `w` (`[n / 32][k][32]` `f16`) split into tiles of input pairs in `b`:
/// `[n / 32][k / 32][column half][hi, lo][16 pairs][16 columns][2]`.
#[target_feature(enable = "avx512f,avx512bw,f16c")]
fn pack_weights(w: &[f16], k: usize, b: &mut [u16]) {
    let blocks = k / DEPTH;
    assert!(b.len() == 2 * w.len() && w.len().is_multiple_of(k * PANEL));
    for p in 0..w.len() / (k * PANEL) {
        for i in (0..k).step_by(2) {
            let row = |i: usize, c: usize| -> __m512 {
                let at = (p * k + i) * PANEL + c * COLS;
                let v = &w[at..at + COLS];
                // SAFETY: `v` holds 16 `f16`, 32 bytes, as the load reads; F16C and AVX-512F
                // are this function's target features.
                unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(v.as_ptr().cast())) }
            };
            for c in 0..2 {
                let (h0, l0) = split(row(i, c));
                let (h1, l1) = split(row(i + 1, c));
                // Lane `j`: input `i`'s weight of column `j` in the low half, input `i + 1`'s in
                // the high half.
                let hi = _mm512_or_si512(_mm512_srli_epi32::<16>(h0), h1);
                let lo = _mm512_or_si512(_mm512_srli_epi32::<16>(l0), l1);
                let at = ((p * blocks + i / DEPTH) * 2 + c) * 2 * TILE + i % DEPTH / 2 * 2 * COLS;
                let out = &mut b[at..at + TILE + 2 * COLS];
                // SAFETY: `out` holds a tile and a row (the `lo` tile's row `at + TILE`), 32
                // values (64 bytes) at each store; AVX-512F is this function's target feature.
                unsafe {
                    _mm512_storeu_si512(out.as_mut_ptr().cast(), hi);
                    _mm512_storeu_si512(out[TILE..].as_mut_ptr().cast(), lo);
                }
            }
        }
    }
}

thread_local! {
    /// The packed input and weights of the last call on this thread, kept for the next one.
    static SCRATCH: RefCell<(Vec<u16>, Vec<u16>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `out[r * n + j] = bias[j] + x[r] · w[j]` for `w` in panels (`[n / 32][k][32]`), on AMX tiles.
/// Every value of `out` is stored. Panics on mismatched lengths, `k` not a multiple of 32, or if
/// [`supported`] is false.
pub(super) fn panels(
    x: &[f32],
    rows: usize,
    w: &[f16],
    bias: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
) {
    assert!(supported(), "AMX is not supported on this CPU");
    assert!(rows > 0 && x.len().is_multiple_of(rows));
    let k = x.len() / rows;
    assert!(k > 0 && k.is_multiple_of(DEPTH) && w.len().is_multiple_of(k * PANEL));
    let n = w.len() / k;
    assert!(out.len() == rows * n && bias.is_none_or(|b| b.len() == n));
    let padded = rows.next_multiple_of(2 * ROWS);
    SCRATCH.with_borrow_mut(|(a, b)| {
        a.resize(2 * padded * k, 0);
        b.resize(2 * n * k, 0);
        // SAFETY: `supported` (asserted above) checked AVX-512F and BW; F16C comes with them on
        // every AMX CPU and is checked there too.
        unsafe {
            pack_input(x, rows, k, &mut a[..2 * padded * k]);
            pack_weights(w, k, &mut b[..2 * n * k]);
        }
        // SAFETY: `a` holds `padded / 16` row blocks of `k / 32` tile pairs, `b` `n / 32`
        // panels of `k / 32` blocks of four tiles, `bias` `n` values and `out` `rows × n`: the
        // lengths set and asserted above.
        unsafe { tiles(&a[..2 * padded * k], rows, k, &b[..2 * n * k], n, bias, out) };
    });
}

/// The tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = ROWS as u8;
        }
        Config(c)
    }
}

/// A tile loaded from `p`, rows `stride` bytes apart.
macro_rules! load {
    ($t:literal, $p:expr, $stride:expr) => {
        asm!(
            concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"),
            p = in(reg) $p,
            s = in(reg) $stride,
            options(nostack, readonly, preserves_flags),
        )
    };
}

/// Tile `$c += $a · $b` in `bf16` pairs, accumulated in `f32`.
macro_rules! dot {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(
            concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
            options(nostack, nomem, preserves_flags),
        )
    };
}

/// The four accumulators += the two row blocks' input (tiles 4, 5) by the two column halves'
/// weights (tiles 6, 7).
macro_rules! dots {
    () => {
        dot!(0, 4, 6);
        dot!(1, 4, 7);
        dot!(2, 5, 6);
        dot!(3, 5, 7);
    };
}

/// Tile `$t` stored at `p`, rows `stride` bytes apart.
macro_rules! store {
    ($t:literal, $p:expr, $stride:expr) => {
        asm!(
            concat!("tilestored [{p} + {s}*1], tmm", $t),
            p = in(reg) $p,
            s = in(reg) $stride,
            options(nostack, preserves_flags),
        )
    };
}

/// The tile loops. Four accumulators (tiles 0-3): rows `r..r+16` and `r+16..r+32` by a panel's
/// columns `0..16` and `16..32`; tiles 4 and 5 hold the two row blocks' input, 6 and 7 the two
/// column halves' weights. Per block of 32 inputs: `hi·hi`, then `lo·hi`, then `hi·lo`.
///
/// # Safety
/// The CPU runs AMX (checked by [`supported`]), and the lengths are as [`panels`] sets them.
unsafe fn tiles(
    a: &[u16],
    rows: usize,
    k: usize,
    b: &[u16],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
) {
    let padded = a.len() / (2 * k);
    let blocks = k / DEPTH;
    let config = Config::new();
    // A partial row block's tile is stored here, then its rows copied.
    let mut spill = [0f32; ROWS * COLS];
    // SAFETY (every asm block below): the configuration is loaded first; every tile load reads a
    // tile of 1,024 contiguous bytes inside `a` (row block `< padded / 16`, block `< k / 32`) or
    // `b` (panel `< n / 32`), or 64 bytes of `bias` at `j..j+16` repeated (stride 0); every store
    // (in `store_sums`) writes inside `out` or `spill`.
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) config.0.as_ptr(), options(nostack, readonly, preserves_flags));
        for r0 in (0..padded).step_by(CHUNK_ROWS) {
            for j in (0..n).step_by(PANEL) {
                let w = b.as_ptr().add(j * k * 2);
                for r in (r0..(r0 + CHUNK_ROWS).min(padded)).step_by(2 * ROWS) {
                    match bias {
                        Some(bias) => {
                            load!(0, bias.as_ptr().add(j), 0usize);
                            load!(1, bias.as_ptr().add(j + COLS), 0usize);
                            load!(2, bias.as_ptr().add(j), 0usize);
                            load!(3, bias.as_ptr().add(j + COLS), 0usize);
                        }
                        None => asm!(
                            "tilezero tmm0",
                            "tilezero tmm1",
                            "tilezero tmm2",
                            "tilezero tmm3",
                            options(nostack, nomem, preserves_flags)
                        ),
                    }
                    let a0 = a.as_ptr().add(r * k * 2);
                    let a1 = a0.add(ROWS * k * 2);
                    for blk in 0..blocks {
                        let (x0, x1) = (a0.add(blk * 2 * TILE), a1.add(blk * 2 * TILE));
                        let (w0, w1) = (w.add(blk * 4 * TILE), w.add((blk * 4 + 2) * TILE));
                        load!(4, x0, 64usize);
                        load!(5, x1, 64usize);
                        load!(6, w0, 64usize);
                        load!(7, w1, 64usize);
                        dots!();
                        load!(4, x0.add(TILE), 64usize);
                        load!(5, x1.add(TILE), 64usize);
                        dots!();
                        load!(4, x0, 64usize);
                        load!(5, x1, 64usize);
                        load!(6, w0.add(TILE), 64usize);
                        load!(7, w1.add(TILE), 64usize);
                        dots!();
                    }
                    store_sums(out, rows, n, r, j, &mut spill);
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem, preserves_flags));
    }
}

/// The four accumulators (rows `r..r+32` by columns `j..j+32`) stored into `out`: a full row
/// block straight from its tiles, a partial one through `spill`, its rows below `rows` only.
///
/// # Safety
/// The tiles are configured as [`tiles`] does; `r + 32` does not pass `rows` padded to 32, and
/// `j + 32 ≤ n` with `out` holding `rows × n` values.
unsafe fn store_sums(
    out: &mut [MaybeUninit<f32>],
    rows: usize,
    n: usize,
    r: usize,
    j: usize,
    spill: &mut [f32; ROWS * COLS],
) {
    for (second, base) in [(false, r), (true, r + ROWS)] {
        let valid = rows.saturating_sub(base).min(ROWS);
        if valid == 0 {
            continue;
        }
        let full = valid == ROWS;
        for c in 0..2 {
            let at = base * n + j + c * COLS;
            let (p, stride): (*mut f32, usize) = if full {
                // SAFETY: rows `base..base+16` are below `rows`, so the 16 rows of 16 values
                // from `at`, `n` apart, are inside `out`.
                (unsafe { out.as_mut_ptr().add(at).cast() }, n * 4)
            } else {
                (spill.as_mut_ptr(), COLS * 4)
            };
            // SAFETY: each store writes 16 rows of 64 bytes, `stride` apart, from `p`: inside
            // `out` (above) or `spill`; the tiles are configured (the caller's).
            unsafe {
                match (second, c) {
                    (false, 0) => store!(0, p, stride),
                    (false, _) => store!(1, p, stride),
                    (true, 0) => store!(2, p, stride),
                    (true, _) => store!(3, p, stride),
                }
            }
            if !full {
                for row in 0..valid {
                    let at = at + row * n;
                    for (o, v) in out[at..at + COLS].iter_mut().zip(&spill[row * COLS..]) {
                        o.write(*v);
                    }
                }
            }
        }
    }
}
