//! The chat engine's numeric core: our own quantised matmul, and attention over a KV cache
//! ([`attention`]); and the encoders' few-rows `f32` projection ([`dense`]).
//!
//! The matmul: weights stay in their GGUF blocks (Q4_0, Q4_1, Q8_0: no second copy, only
//! regrouped by eight rows at load), activations are quantised once per projection to 8 bits per
//! block of 32 (as llama.cpp's `q8_1`), and every block's dot product is an exact integer sum
//! scaled into an `f32` accumulator, block after block.
//!
//! Determinism is the point as much as speed: an output element is computed by the same sequence
//! of operations whatever the number of rows in the call, the other rows, or how the columns are
//! split between threads. A token's logits therefore do not depend on whether it was prefilled
//! with the rest of its prompt, after a cached prefix, or next to other sequences.
//!
//! The instruction set is picked at run time ([`Isa::detect`]): AVX-512 VNNI (`vpdpbusd`), AVX2
//! (`vpmaddubsw` + `vpmaddwd`), or portable scalar code. Both x86 paths form the same exact
//! integer block sums and the same float operations on them, so they give bit-identical results;
//! the scalar path sums in another order and agrees within rounding. The unsafe SIMD code lives in
//! `x86.rs` (and the encoders' AMX tiles in `amx.rs`) behind the safe functions of this file.

#[cfg(target_arch = "x86_64")]
mod amx;
pub mod attention;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::atomic::{AtomicU8, Ordering};

use attention::{Heads, Queries};

/// Rows from which [`dense`] multiplies [`DenseWeights::Panels`] on AMX tiles, where the CPU has
/// them (with [`Isa::Avx512Vnni`]). Below, the FMA kernel is as fast: it streams 2 bytes a weight,
/// where the tiles' packing reads those and writes and reads 4 more (`dense_bench`, six layers of
/// their own, Intel Xeon: even at 104 rows, AMX 1.25-1.3× faster at 208).
pub const AMX_ROWS: usize = 160;

/// Whether this CPU (and OS) runs the AMX kernel that [`dense`] uses for panels of many rows.
pub fn amx_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    return allowed(Isa::Avx512Vnni) && amx::supported();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A matrix whose shape or bytes do not fit together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(pub String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

/// Values per quantisation block, for every format here.
pub const BLOCK: usize = 32;

/// Weight rows the x86 kernels run at once (a vector's `f32` lanes), and [`QMatrix`] groups.
pub const LANES: usize = 8;

/// The instruction sets the kernels come in, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Isa {
    Scalar,
    /// x86-64's baseline, which every x86-64 CPU has: for CPUs without AVX2, FMA or F16C (Intel
    /// before Haswell, Atom-class Celerons and Pentiums, VMs whose CPU model hides AVX). The
    /// matmul (`pmaddwd`) and the encoders' panels run on SSE2 vectors, with a multiply and an
    /// add where the others fuse them (a software `fmaf` per product took the portable panels
    /// 0.8 s for a 10-word sentence): within rounding of the other paths, not the same bits.
    /// Attention runs the portable loops.
    Sse2,
    Avx2,
    Avx512Vnni,
}

/// The widest set [`limit_isa`] allows (as `Isa as u8`).
static MAX_ISA: AtomicU8 = AtomicU8::new(Isa::Avx512Vnni as u8);

/// Keeps every kernel within `max` from now on, whatever wider sets the CPU has: [`Isa::detect`],
/// [`Isa::supported`] and the kernels that pick their own path (attention, AMX) answer within it.
/// For measuring a narrower path on a wider CPU, or for staying off AVX-512 where it costs the
/// core its clock. Call it before any model loads.
pub fn limit_isa(max: Isa) {
    MAX_ISA.store(max as u8, Ordering::Relaxed);
}

/// Whether [`limit_isa`] allows `isa`.
fn allowed(isa: Isa) -> bool {
    isa as u8 <= MAX_ISA.load(Ordering::Relaxed)
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Sse2, Isa::Avx2, Isa::Avx512Vnni];

    /// The fastest set this CPU supports (within [`limit_isa`]).
    pub fn detect() -> Self {
        [Isa::Avx512Vnni, Isa::Avx2, Isa::Sse2]
            .into_iter()
            .find(|isa| isa.supported())
            .unwrap_or(Isa::Scalar)
    }

    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Sse2 => allowed(Isa::Sse2),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::avx2_supported(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => x86::avx512_vnni_supported(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// A weight format with a kernel. Anything else is converted to Q8_0 at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl Format {
    /// Bytes per block of 32 weights, as in GGUF.
    pub fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }
}

/// An `[n, k]` weight matrix, repacked at load from its GGUF blocks (the same bytes, only
/// apart) for the kernels, which run eight rows of it at a time: rows in groups of [`LANES`]
/// (the last one zero-padded), and per group and block, the eight rows' quant bytes one after the
/// other, their eight f16 scales (and the 4-bit formats' offsets) together, so that a group
/// streams from memory in one pass and a block's scales are one load.
pub struct QMatrix {
    format: Format,
    n: usize,
    k: usize,
    /// 16 bytes a block for 4-bit formats (low nibbles weights 0–15, high ones 16–31, as GGUF),
    /// 32 signed bytes for Q8_0: row `j`'s block `b` is the `j % 8`th of group `j / 8`'s block
    /// `b`.
    qs: Vec<u8>,
    /// f16 bits, in the same order: row `j`'s scale of block `b` at `(j / 8 * kb + b) * 8 + j % 8`.
    d: Vec<u16>,
    /// The same for the offsets (Q4_1's `m`, Q4_0's `−8d`); empty for Q8_0.
    m: Vec<u16>,
}

fn f16(bytes: &[u8]) -> f32 {
    half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32()
}

fn f32_of(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

impl Format {
    /// Quant bytes of one block in [`QMatrix`]'s layout.
    fn quant_bytes(self) -> usize {
        match self {
            Format::Q8_0 => 32,
            Format::Q4_0 | Format::Q4_1 => 16,
        }
    }
}

impl QMatrix {
    /// Takes `n` rows of `k` weights in `format`'s GGUF blocks.
    pub fn new(format: Format, n: usize, k: usize, data: Vec<u8>) -> Result<Self, ShapeError> {
        if !k.is_multiple_of(BLOCK) || data.len() != n * k / BLOCK * format.block_bytes() {
            return Err(ShapeError(format!(
                "a {format:?} matrix of {n}x{k} cannot hold {} bytes",
                data.len()
            )));
        }
        let (kb, qb) = (k / BLOCK, format.quant_bytes());
        let mut m = Self::zeroed(format, n, k);
        for (i, block) in data.chunks_exact(format.block_bytes()).enumerate() {
            let at = m.at(i / kb, i % kb);
            m.d[at] = u16::from_le_bytes([block[0], block[1]]);
            let quants = match format {
                Format::Q8_0 => &block[2..],
                Format::Q4_1 => {
                    m.m[at] = u16::from_le_bytes([block[2], block[3]]);
                    &block[4..]
                }
                Format::Q4_0 => {
                    // −8d is exact in f16 (a power-of-two multiple).
                    m.m[at] = half::f16::from_f32(-8.0 * f16(block)).to_bits();
                    &block[2..]
                }
            };
            m.qs[at * qb..(at + 1) * qb].copy_from_slice(quants);
        }
        Ok(m)
    }

    /// An `[n, k]` matrix of zeros in this layout, its last group padded to [`LANES`] rows.
    fn zeroed(format: Format, n: usize, k: usize) -> Self {
        let blocks = n.next_multiple_of(LANES) * (k / BLOCK);
        Self {
            format,
            n,
            k,
            qs: vec![0; blocks * format.quant_bytes()],
            d: vec![0; blocks],
            m: if format == Format::Q8_0 {
                Vec::new()
            } else {
                vec![0; blocks]
            },
        }
    }

    /// Where row `j`'s block `b` is, in blocks.
    fn at(&self, j: usize, b: usize) -> usize {
        (j / LANES * self.blocks() + b) * LANES + j % LANES
    }

    /// Quantises `[n, k]` values to Q8_0, as llama.cpp does (round to nearest, scale max/127).
    pub fn quantize_q8_0(values: &[f32], n: usize, k: usize) -> Result<Self, ShapeError> {
        if values.len() != n * k || !k.is_multiple_of(BLOCK) {
            return Err(ShapeError(format!(
                "{} values for a {n}x{k} matrix",
                values.len()
            )));
        }
        let mut data = Vec::with_capacity(n * k / BLOCK * 34);
        for block in values.chunks_exact(BLOCK) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            data.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
            data.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
        }
        Self::new(Format::Q8_0, n, k, data)
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.k
    }

    fn blocks(&self) -> usize {
        self.k / BLOCK
    }

    /// Stacks matrices of the same format and width, rows of the first first.
    pub fn stack(parts: Vec<QMatrix>) -> Result<Self, ShapeError> {
        let (format, k) = (parts[0].format, parts[0].k);
        if parts.iter().any(|p| p.format != format || p.k != k) {
            return Err(ShapeError("projections of mixed types".into()));
        }
        let n: usize = parts.iter().map(|p| p.n).sum();
        let (kb, qb) = (k / BLOCK, format.quant_bytes());
        let mut out = Self::zeroed(format, n, k);
        let mut j = 0;
        for p in &parts {
            for pj in 0..p.n {
                for b in 0..kb {
                    let (to, from) = (out.at(j, b), p.at(pj, b));
                    out.qs[to * qb..(to + 1) * qb].copy_from_slice(p.quants(pj, b));
                    out.d[to] = p.d[from];
                    if let Some(m) = p.m.get(from) {
                        out.m[to] = *m;
                    }
                }
                j += 1;
            }
        }
        Ok(out)
    }

    /// Row `j`'s quant bytes of block `b`.
    fn quants(&self, j: usize, b: usize) -> &[u8] {
        let (at, qb) = (self.at(j, b), self.format.quant_bytes());
        &self.qs[at * qb..(at + 1) * qb]
    }

    /// Row `j`'s scale and offset (zero for Q8_0) of block `b`.
    fn scales(&self, j: usize, b: usize) -> (f32, f32) {
        let at = self.at(j, b);
        (
            f32_of(self.d[at]),
            self.m.get(at).map_or(0.0, |m| f32_of(*m)),
        )
    }

    /// Writes row `j` as floats into `out` (`k` values): an embedding lookup. Panics on a row
    /// out of range or an `out` of another length.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        assert!(
            j < self.n && out.len() == self.k,
            "row {j} of {}x{}",
            self.n,
            self.k
        );
        for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
            let quants = self.quants(j, b);
            let (scale, offset) = self.scales(j, b);
            match self.format {
                Format::Q8_0 => {
                    for (o, q) in out.iter_mut().zip(quants) {
                        *o = scale * (*q as i8) as f32;
                    }
                }
                Format::Q4_0 | Format::Q4_1 => {
                    for (i, q) in quants.iter().enumerate() {
                        out[i] = scale * (q & 0x0f) as f32 + offset;
                        out[i + 16] = scale * (q >> 4) as f32 + offset;
                    }
                }
            }
        }
    }

    /// Bytes of weights, for logs and memory budgets.
    pub fn bytes(&self) -> usize {
        self.qs.len() + 2 * (self.d.len() + self.m.len())
    }
}

/// `rows` activation rows quantised to 8 bits per block of 32: values `qs`, one scale `d` per
/// block, and `s = d × Σ qs` per block (what the 4-bit formats' offsets multiply).
pub struct QActs {
    rows: usize,
    k: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

/// `y.round()` (halves away from zero, as llama.cpp's `roundf`) for |y| ≤ 127, without a call
/// to libm: the integer part by truncation, then one step away from zero when the rest is half
/// or more (exact: both subtractions are exact in `f32`).
#[inline(always)]
fn round_half_away(y: f32) -> i32 {
    let t = y as i32;
    let rest = y - t as f32;
    t + (rest >= 0.5) as i32 - (rest <= -0.5) as i32
}

impl QActs {
    /// Quantises `[rows, k]` values, each block on its own (llama.cpp's `quantize_row_q8_1`).
    pub fn quantize(x: &[f32], rows: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(BLOCK) && x.len() == rows * k);
        let kb = k / BLOCK;
        let mut acts = Self {
            rows,
            k,
            qs: vec![0; x.len()],
            d: vec![0.0; rows * kb],
            s: vec![0.0; rows * kb],
        };
        for (i, (block, qs)) in x
            .chunks_exact(BLOCK)
            .zip(acts.qs.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in qs.iter_mut().zip(block) {
                *q = round_half_away(v * id) as i8;
                sum += *q as i32;
            }
            acts.d[i] = d;
            acts.s[i] = d * sum as f32;
        }
        acts
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Row `r`'s values, scales and scaled sums.
    fn row(&self, r: usize) -> (&[i8], &[f32], &[f32]) {
        let kb = self.k / BLOCK;
        (
            &self.qs[r * self.k..(r + 1) * self.k],
            &self.d[r * kb..(r + 1) * kb],
            &self.s[r * kb..(r + 1) * kb],
        )
    }
}

/// Attention of one input's new tokens (see [`attention::attend_tokens`]) on the loops of `isa`:
/// the portable ones for [`Isa::Scalar`] (or a CPU without the set); on x86 the AVX2 ones, which
/// give the same bits with or without AVX-512's registers.
pub fn attend_tokens(
    isa: Isa,
    heads: Heads,
    queries: &Queries<'_>,
    keys: &[half::f16],
    values: &[half::f16],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => x86::attend_tokens(
            isa == Isa::Avx512Vnni,
            heads,
            queries,
            keys,
            values,
            scores,
            out,
        ),
        _ => attention::attend_tokens(heads, queries, keys, values, scores, out),
    }
}

/// `silu(g) × u` of each row of `gu` (`[rows, 2 × ffn]`: the gate's `ffn` values, then the up
/// projection's) into `out` (`[rows, ffn]`): the llama feed-forward's activation. AVX2 + FMA
/// where the CPU has them, else portable loops with the same operations and the same bits
/// ([`attention::exp`]). Panics on mismatched lengths.
pub fn silu_mul(gu: &[f32], ffn: usize, out: &mut [f32]) {
    assert!(ffn > 0 && gu.len() == 2 * out.len() && out.len().is_multiple_of(ffn));
    #[cfg(target_arch = "x86_64")]
    if x86::silu_mul(gu, ffn, out) {
        return;
    }
    for (row, o) in gu.chunks_exact(2 * ffn).zip(out.chunks_exact_mut(ffn)) {
        let (g, u) = row.split_at(ffn);
        for i in 0..ffn {
            o[i] = silu_times(g[i], u[i]);
        }
    }
}

/// `silu(g) × u` of one value, in the operations the AVX2 lanes do.
#[inline(always)]
fn silu_times(g: f32, u: f32) -> f32 {
    g / (1.0 + attention::exp(-g)) * u
}

/// `out[r][j] = Σ w[j] · x[r]` for the columns `cols` of `w`: `out` holds `rows × cols.len()`
/// values, row-major. Panics on an unsupported `isa` or mismatched shapes (callers check both).
pub fn matmul_cols(
    isa: Isa,
    w: &QMatrix,
    x: &QActs,
    cols: std::ops::Range<usize>,
    out: &mut [f32],
) {
    assert!(isa.supported(), "{isa:?} is not supported on this CPU");
    assert_eq!(w.k, x.k);
    assert!(cols.end <= w.n && out.len() == x.rows * cols.len());
    let width = cols.len();
    match isa {
        Isa::Scalar => {
            for (c, j) in cols.enumerate() {
                for r in 0..x.rows {
                    out[r * width + c] = dot_scalar(w, j, x.row(r));
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Sse2 | Isa::Avx2 | Isa::Avx512Vnni if !cols.start.is_multiple_of(LANES) => {
            // The kernels start at a group: run from the group's start and keep the columns
            // asked for (each column's value is the same whichever lane it has).
            let from = cols.start / LANES * LANES;
            let wide = cols.end - from;
            let mut all = vec![0f32; x.rows * wide];
            matmul_cols(isa, w, x, from..cols.end, &mut all);
            for r in 0..x.rows {
                out[r * width..(r + 1) * width]
                    .copy_from_slice(&all[r * wide + cols.start - from..(r + 1) * wide]);
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Sse2 | Isa::Avx2 | Isa::Avx512Vnni => {
            let weights = x86::Weights {
                format: w.format,
                qs: &w.qs,
                d: &w.d,
                m: &w.m,
                group: cols.start / LANES,
                cols: width,
                blocks: w.blocks(),
            };
            let acts = x86::Acts {
                qs: &x.qs,
                d: &x.d,
                s: &x.s,
                rows: x.rows,
            };
            x86::matmul(isa, &weights, &acts, out, width);
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only scalar kernels off x86"),
    }
}

/// The weights of a [`dense`] projection: `n × k` row-major, `f32` or `f16` widened to `f32` as
/// they are loaded (half the bytes to stream from memory, the same arithmetic after); or `f16` in
/// column panels ([`panels`]), which the x86 kernels read without a horizontal sum.
#[derive(Debug, Clone, Copy)]
pub enum DenseWeights<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    /// `[n / PANEL, k, PANEL]`: per panel of [`PANEL`] columns and per input `i`, the panel's
    /// columns' weights side by side (one 64-byte line).
    Panels(&'a [half::f16]),
}

/// Columns of one panel of [`DenseWeights::Panels`].
pub const PANEL: usize = 32;

/// Row-major `[n, k]` weights laid out as [`DenseWeights::Panels`]; `None` unless `n` is a
/// multiple of [`PANEL`].
pub fn panels(w: &[half::f16], n: usize, k: usize) -> Option<Vec<half::f16>> {
    if n == 0 || !n.is_multiple_of(PANEL) || w.len() != n * k {
        return None;
    }
    let mut out = Vec::with_capacity(w.len());
    for p in 0..n / PANEL {
        for i in 0..k {
            out.extend((0..PANEL).map(|c| w[(p * PANEL + c) * k + i]));
        }
    }
    Some(out)
}

impl<'a> DenseWeights<'a> {
    pub fn len(self) -> usize {
        match self {
            DenseWeights::F32(w) => w.len(),
            DenseWeights::F16(w) | DenseWeights::Panels(w) => w.len(),
        }
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// Elements `range`.
    pub fn range(self, range: std::ops::Range<usize>) -> Self {
        match self {
            DenseWeights::F32(w) => DenseWeights::F32(&w[range]),
            DenseWeights::F16(w) => DenseWeights::F16(&w[range]),
            DenseWeights::Panels(w) => DenseWeights::Panels(&w[range]),
        }
    }

    /// Rows (output columns) `range`, each `k` long; for panels, whole panels only (panics
    /// otherwise).
    pub fn rows(self, range: std::ops::Range<usize>, k: usize) -> Self {
        if let DenseWeights::Panels(_) = self {
            assert!(
                range.start.is_multiple_of(PANEL) && range.end.is_multiple_of(PANEL),
                "panels split at {range:?}"
            );
        }
        self.range(range.start * k..range.end * k)
    }

    /// The weight of output `j` for input `i`.
    fn get(self, j: usize, i: usize, k: usize) -> f32 {
        match self {
            DenseWeights::F32(w) => w[j * k + i],
            DenseWeights::F16(w) => w[j * k + i].to_f32(),
            DenseWeights::Panels(w) => w[(j / PANEL * k + i) * PANEL + j % PANEL].to_f32(),
        }
    }
}

/// The input of a projection that runs as several [`dense_input`] calls, each on a slice of the
/// columns (as when two threads share one): SSE2 broadcasts its values once per thread for all of
/// them when they fit its scratch (64K values: 170 rows of 384, 42 of 1,536), where [`dense`] does
/// it on every call. `x` is `rows × k`, row-major.
#[derive(Clone, Copy, Debug)]
pub struct DenseInput<'a> {
    x: &'a [f32],
    rows: usize,
    /// Unique to this input (and its copies), which borrow `x` unchanged: a thread's broadcast
    /// tagged with it holds this input. 0 for an input of one call.
    id: u64,
}

impl<'a> DenseInput<'a> {
    /// `x` as `rows` rows, for several calls.
    pub fn new(x: &'a [f32], rows: usize) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        DenseInput { x, rows, id }
    }

    /// `x` as `rows` rows, for one call.
    fn once(x: &'a [f32], rows: usize) -> Self {
        DenseInput { x, rows, id: 0 }
    }

    pub fn x(&self) -> &'a [f32] {
        self.x
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// [`dense`] on an input made for several calls.
pub fn dense_input(
    isa: Isa,
    input: DenseInput,
    w: DenseWeights,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (x, rows) = (input.x, input.rows);
    assert!(isa.supported(), "{isa:?} is not supported on this CPU");
    assert!(rows > 0 && x.len().is_multiple_of(rows));
    let k = x.len() / rows;
    assert!(k > 0 && w.len().is_multiple_of(k));
    let n = w.len() / k;
    assert!(out.len() == rows * n && bias.is_none_or(|b| b.len() == n));
    assert!(!matches!(w, DenseWeights::Panels(_)) || n.is_multiple_of(PANEL));
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Sse2 if matches!(w, DenseWeights::Panels(_)) => x86::dense(isa, input, w, bias, out),
        Isa::Scalar | Isa::Sse2 => {
            for r in 0..rows {
                let xr = &x[r * k..(r + 1) * k];
                for j in 0..n {
                    out[r * n + j] = match w {
                        // The x86 kernels' order: one fused multiply-add per input, in order.
                        DenseWeights::Panels(_) => {
                            (0..k).fold(0f32, |acc, i| xr[i].mul_add(w.get(j, i, k), acc))
                        }
                        _ => (0..k).map(|i| xr[i] * w.get(j, i, k)).sum::<f32>(),
                    };
                }
            }
            add_bias(out, bias);
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => x86::dense(isa, input, w, bias, out),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only scalar kernels off x86"),
    }
}

/// A projection of few rows: `out[r * n + j] = bias[j] + x[r] · w[j]`, with `x` as `rows × k`
/// `f32` and `w` as `n × k` ([`DenseWeights`]), row-major. For the encoders' short inputs (a sentence is
/// 10-30 tokens), where a general matmul spends longer packing the weights into its own layout
/// than multiplying: here each weight row is read once, straight from where it lies, against all
/// the rows. AVX-512F or AVX2 + FMA when the CPU has them, SSE2 for panels on a CPU without
/// them, else portable loops. On row-major weights the paths sum in different orders and agree
/// within rounding; on [`panels`] the fused paths (AVX-512, AVX2, portable) sum each output with
/// one fused multiply-add per input, in order, so they give the same bits, except from
/// [`AMX_ROWS`] rows on a CPU with AMX: there AVX-512 hands them to AMX tiles, which agree within
/// about 1e-5 (and give a row the same bits in any such call). SSE2 sums in the same order but
/// rounds each product before adding it: within rounding, and a row the same bits in any call.
/// Panics on mismatched lengths.
pub fn dense(
    isa: Isa,
    x: &[f32],
    rows: usize,
    w: DenseWeights,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    dense_input(isa, DenseInput::once(x, rows), w, bias, out)
}

/// `bias` added to each of `out`'s rows, after the sums.
fn add_bias(out: &mut [f32], bias: Option<&[f32]>) {
    if let Some(bias) = bias {
        for row in out.chunks_exact_mut(bias.len()) {
            for (o, b) in row.iter_mut().zip(bias) {
                *o += b;
            }
        }
    }
}

/// [`dense`] into a new `rows × n` vector. On panels with the x86 kernels it is not zeroed first,
/// since they store every value once, the bias with it: at 32 sentences per pass the zeroing of
/// the projections' outputs, and adding the bias after, took 4-5% of the pass (`perf`, Intel Xeon).
pub fn dense_new(
    isa: Isa,
    x: &[f32],
    rows: usize,
    w: DenseWeights,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if let (Isa::Sse2 | Isa::Avx2 | Isa::Avx512Vnni, DenseWeights::Panels(w)) = (isa, w) {
        assert!(isa.supported(), "{isa:?} is not supported on this CPU");
        return x86::panels_new(isa, DenseInput::once(x, rows), w, bias);
    }
    assert!(rows > 0 && x.len().is_multiple_of(rows) && !x.is_empty());
    let mut out = vec![0f32; rows * (w.len() / (x.len() / rows))];
    dense(isa, x, rows, w, bias, &mut out);
    out
}

/// `[rows, k] × [n, k]ᵀ → [rows, n]`.
pub fn matmul(isa: Isa, w: &QMatrix, x: &QActs) -> Vec<f32> {
    let mut out = vec![0f32; x.rows * w.n];
    matmul_cols(isa, w, x, 0..w.n, &mut out);
    out
}

/// The reference: one weight row against one activation row, block by block.
fn dot_scalar(w: &QMatrix, j: usize, (qs, d, s): (&[i8], &[f32], &[f32])) -> f32 {
    let (mut acc, mut offsets) = (0f32, 0f32);
    for b in 0..w.blocks() {
        let quants = w.quants(j, b);
        let a = &qs[b * BLOCK..(b + 1) * BLOCK];
        let (scale, offset) = w.scales(j, b);
        let isum: i32 = match w.format {
            Format::Q8_0 => quants
                .iter()
                .zip(a)
                .map(|(w, a)| (*w as i8) as i32 * *a as i32)
                .sum(),
            Format::Q4_0 | Format::Q4_1 => {
                offsets += offset * s[b];
                quants
                    .iter()
                    .enumerate()
                    .map(|(i, q)| {
                        (q & 0x0f) as i32 * a[i] as i32 + (q >> 4) as i32 * a[i + 16] as i32
                    })
                    .sum()
            }
        };
        acc += scale * d[b] * isum as f32;
    }
    acc + offsets
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1), with a few large outliers as real
    /// activations have.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0;
                if i % 97 == 0 { v * 20.0 } else { v }
            })
            .collect()
    }

    /// Random blocks of `format` (valid scales, every nibble and byte value possible).
    fn matrix(format: Format, n: usize, k: usize, seed: u64) -> QMatrix {
        let bytes = values(n * k / BLOCK * format.block_bytes(), seed);
        let mut data = Vec::new();
        for (b, chunk) in bytes.chunks_exact(format.block_bytes()).enumerate() {
            let scale = 0.01 + 0.001 * (b % 7) as f32;
            data.extend_from_slice(&half::f16::from_f32(scale).to_le_bytes());
            let mut rest = 2;
            if format == Format::Q4_1 {
                data.extend_from_slice(&half::f16::from_f32(-0.05 * chunk[0]).to_le_bytes());
                rest = 4;
            }
            data.extend(chunk[rest..].iter().map(|v| ((v * 127.9) as i8) as u8));
        }
        QMatrix::new(format, n, k, data).unwrap()
    }

    /// The exact product in f64 of the dequantised weights and quantised activations.
    fn exact(w: &QMatrix, x: &QActs) -> Vec<f64> {
        let mut out = Vec::new();
        let mut row = vec![0f32; w.k];
        for r in 0..x.rows {
            let (qs, d, _) = x.row(r);
            for j in 0..w.n {
                w.dequantize_row(j, &mut row);
                out.push(
                    row.iter()
                        .enumerate()
                        .map(|(i, v)| *v as f64 * qs[i] as f64 * d[i / BLOCK] as f64)
                        .sum(),
                );
            }
        }
        out
    }

    #[test]
    fn every_supported_path_matches_the_exact_product_and_x86_paths_agree_bit_for_bit() {
        // 2 rows take the few-rows loops; 7 and 30 rows (17 blocks: an odd count) the panel,
        // four rows at a time and then three or two; 258 rows a whole tile of 256, then two
        // rows on the few-rows loops. 37 columns: four groups of eight and one of five.
        for (format, k, rows) in [Format::Q4_0, Format::Q4_1, Format::Q8_0]
            .into_iter()
            .flat_map(|f| [(f, 576, 2), (f, 576, 7), (f, 544, 30), (f, 64, 258)])
        {
            let n = 37;
            let w = matrix(format, n, k, 1);
            let x = QActs::quantize(&values(rows * k, 2), rows, k);
            let want = exact(&w, &x);
            let mut x86: Option<Vec<f32>> = None;
            for isa in Isa::ALL {
                if !isa.supported() {
                    eprintln!("{format:?}: the {isa:?} kernels were not run (this CPU lacks them)");
                    continue;
                }
                let got = matmul(isa, &w, &x);
                for (g, e) in got.iter().zip(&want) {
                    let tol = 1e-4 * (1.0 + e.abs());
                    assert!(
                        (*g as f64 - e).abs() < tol,
                        "{format:?} {isa:?} k {k} rows {rows}: {g} vs {e}"
                    );
                }
                // SSE2 rounds each product before adding it: within rounding only.
                if matches!(isa, Isa::Avx2 | Isa::Avx512Vnni) {
                    match &x86 {
                        Some(first) => assert_eq!(first, &got, "{format:?}: x86 paths differ"),
                        None => x86 = Some(got),
                    }
                }
                eprintln!("{format:?}: the {isa:?} kernels match");
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_in_a_batch_and_in_any_column_split() {
        for (format, k, rows) in [
            (Format::Q4_1, 1536, 9),
            (Format::Q8_0, 1536, 9),
            (Format::Q4_0, 544, 31),
            (Format::Q4_1, 544, 31),
        ] {
            let n = 29; // three groups of eight columns and one of five
            let w = matrix(format, n, k, 3);
            let xs = values(rows * k, 4);
            let x = QActs::quantize(&xs, rows, k);
            for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
                let all = matmul(isa, &w, &x);
                // Alone, and two or three at a time, as decode steps run them.
                for take in 1..=3 {
                    for r in (0..rows - take).step_by(take) {
                        let few = QActs::quantize(&xs[r * k..(r + take) * k], take, k);
                        assert_eq!(
                            matmul(isa, &w, &few),
                            all[r * n..(r + take) * n],
                            "{format:?} {isa:?}: rows {r}..{}",
                            r + take
                        );
                    }
                }
                let mut split = vec![0f32; rows * 10];
                matmul_cols(isa, &w, &x, 5..15, &mut split);
                for r in 0..rows {
                    assert_eq!(split[r * 10..(r + 1) * 10], all[r * n + 5..r * n + 15]);
                }
            }
        }
    }

    #[test]
    fn attention_gives_a_token_the_same_bits_in_a_prompt_alone_or_by_head_on_every_path() {
        // Groups of 3 query heads per key head (SmolLM2), 4 (three, then one) and 2.
        for (n_head, n_kv_head) in [(9, 3), (8, 2), (4, 2)] {
            check_attention(n_head, n_kv_head);
        }
    }

    fn check_attention(n_head: usize, n_kv_head: usize) {
        let heads = Heads {
            n_head,
            n_kv_head,
            head_dim: 64,
        };
        let (q_dim, kv_dim) = (n_head * 64, n_kv_head * 64);
        let width = q_dim + 2 * kv_dim;
        let (start, count) = (6, 11);
        let qkv = values(count * width, 7);
        let half =
            |v: Vec<f32>| -> Vec<half::f16> { v.into_iter().map(half::f16::from_f32).collect() };
        let keys = half(values((start + count) * kv_dim, 8));
        let vals = half(values((start + count) * kv_dim, 9));
        let mut scores = Vec::new();
        let mut run = |isa, start, count, qkv, kv_heads: std::ops::Range<usize>| {
            let mut out = vec![0f32; count * kv_heads.len() * q_dim / n_kv_head];
            let queries = Queries {
                qkv,
                width,
                start,
                count,
                kv_heads,
            };
            attend_tokens(isa, heads, &queries, &keys, &vals, &mut scores, &mut out);
            out
        };
        let portable = run(Isa::Scalar, start, count, &qkv, 0..n_kv_head);
        let mut x86: Option<Vec<f32>> = None;
        for isa in Isa::ALL {
            if !isa.supported() {
                eprintln!("attention {isa:?}: not supported on this CPU, not run");
                continue;
            }
            let together = run(isa, start, count, &qkv, 0..n_kv_head);
            let head_dims = q_dim / n_kv_head;
            for j in 0..count {
                let row = &qkv[j * width..(j + 1) * width];
                let alone = run(isa, start + j, 1, row, 0..n_kv_head);
                assert_eq!(
                    alone,
                    together[j * q_dim..(j + 1) * q_dim],
                    "{isa:?}, {n_head}/{n_kv_head} heads: token {j}"
                );
                // Each key/value head on its own, as a decode step splits them between threads.
                for g in 0..n_kv_head {
                    assert_eq!(
                        run(isa, start + j, 1, row, g..g + 1),
                        alone[g * head_dims..(g + 1) * head_dims],
                        "{isa:?}, {n_head}/{n_kv_head} heads: token {j}, key/value head {g} alone"
                    );
                }
            }
            for (a, b) in together.iter().zip(&portable) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{isa:?}, {n_head}/{n_kv_head} heads: {a} vs {b}"
                );
            }
            if matches!(isa, Isa::Avx2 | Isa::Avx512Vnni) {
                match &x86 {
                    Some(first) => assert_eq!(first, &together, "x86 attention paths differ"),
                    None => x86 = Some(together),
                }
            }
        }
    }

    #[test]
    fn every_supported_dense_path_matches_the_exact_product() {
        // k = 40 leaves a tail after the vectors of either width; 1-6, 9 and 13 rows cover every
        // block of rows, 2-7 weight rows every block of weight rows and the ones left.
        for (rows, k, n) in [
            (1, 384, 7),
            (6, 40, 5),
            (5, 1536, 3),
            (3, 8, 2),
            (9, 40, 6),
            (13, 384, 4),
        ] {
            let x = values(rows * k, 3);
            let w32 = values(n * k, 4);
            // The same weights in f16, and their exact values (to compare with).
            let w16: Vec<half::f16> = w32.iter().map(|&v| half::f16::from_f32(v)).collect();
            let widened: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            let bias = values(n, 5);
            for isa in Isa::ALL {
                if !isa.supported() {
                    eprintln!("dense {isa:?}: not supported on this CPU, not run");
                    continue;
                }
                for (w, exact_w) in [
                    (DenseWeights::F32(&w32), &w32),
                    (DenseWeights::F16(&w16), &widened),
                ] {
                    let mut out = vec![0f32; rows * n];
                    dense(isa, &x, rows, w, Some(&bias), &mut out);
                    for r in 0..rows {
                        for j in 0..n {
                            let exact: f64 = bias[j] as f64
                                + (0..k)
                                    .map(|i| x[r * k + i] as f64 * exact_w[j * k + i] as f64)
                                    .sum::<f64>();
                            let got = out[r * n + j] as f64;
                            let bound = 1e-5 * (1.0 + exact.abs()) * (k as f64).sqrt();
                            assert!(
                                (got - exact).abs() <= bound,
                                "{isa:?} {} rows {rows} k {k}: {got} vs {exact}",
                                if matches!(w, DenseWeights::F16(_)) {
                                    "f16"
                                } else {
                                    "f32"
                                }
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn amx_tiles_match_the_exact_product_and_give_a_row_the_same_bits_in_any_call() {
        // Weights in f16, as the encoders keep them; three panels, so that the second core's
        // split at a panel's edge is tried too.
        let (k, n) = (96, 3 * PANEL);
        let w16: Vec<half::f16> = values(n * k, 11)
            .iter()
            .map(|&v| half::f16::from_f32(v))
            .collect();
        let laid = panels(&w16, n, k).unwrap();
        let bias = values(n, 12);
        let x = values(400 * k, 13);
        if !amx_supported() {
            eprintln!("dense panels on AMX tiles: not supported on this CPU, not run");
            return;
        }
        let isa = Isa::Avx512Vnni;
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        // 400 rows: past chunks of 128 rows, and a partial row block at the end.
        let all = dense_new(isa, &x, 400, DenseWeights::Panels(&laid), Some(&bias));
        for r in 0..400 {
            for j in 0..n {
                let terms = (0..k).map(|i| x[r * k + i] as f64 * w16[j * k + i].to_f64());
                let exact = bias[j] as f64 + terms.clone().sum::<f64>();
                let size = (bias[j] as f64).abs() + terms.map(f64::abs).sum::<f64>();
                let got = all[r * n + j] as f64;
                assert!(
                    (got - exact).abs() <= 3e-5 * size,
                    "({r}, {j}): {got} against {exact}"
                );
            }
        }
        // The same rows in calls of other sizes and offsets, from AMX_ROWS: the same bits.
        let some = [
            (0, AMX_ROWS),
            (0, AMX_ROWS + 1),
            (7, 177),
            (100, 300),
            (236, 164),
        ];
        for (from, rows) in some {
            let part = &x[from * k..(from + rows) * k];
            let got = dense_new(isa, part, rows, DenseWeights::Panels(&laid), Some(&bias));
            assert_eq!(
                bits(&got),
                bits(&all[from * n..(from + rows) * n]),
                "{rows} rows from {from}"
            );
            // Into a slice, the same.
            let mut into = vec![0f32; rows * n];
            dense(
                isa,
                part,
                rows,
                DenseWeights::Panels(&laid),
                Some(&bias),
                &mut into,
            );
            assert_eq!(bits(&into), bits(&got), "dense, {rows} rows from {from}");
            // The columns past the first panel alone, as the second core runs them.
            let upper = DenseWeights::Panels(&laid).rows(PANEL..n, k);
            let high = dense_new(isa, part, rows, upper, Some(&bias[PANEL..]));
            for r in 0..rows {
                assert_eq!(
                    bits(&high[r * (n - PANEL)..(r + 1) * (n - PANEL)]),
                    bits(&got[r * n + PANEL..(r + 1) * n]),
                    "upper panels, {rows} rows from {from}"
                );
            }
        }
        // Without a bias: the sums alone.
        let rows = AMX_ROWS + 10;
        let plain = dense_new(isa, &x[..rows * k], rows, DenseWeights::Panels(&laid), None);
        for (p, (a, b)) in plain.iter().zip(all.iter().zip(bias.iter().cycle())) {
            assert!((p + b - a).abs() <= 1e-5 * (1.0 + a.abs()));
        }
    }

    #[test]
    fn panels_give_the_same_bits_on_every_path_and_the_exact_product() {
        // 1-30 rows cover every block of rows of the x86 paths (and two blocks of uneven sizes);
        // three panels, so that a split at a panel's edge is tried too. SSE2, which rounds each
        // product before adding it, is held to the exact product and to its own bits in any call.
        // SSE2 takes 64 inputs at a time (72 and 133 leave a tail) and broadcasts them four at a
        // time (45 and 133 leave a tail); with 4,100, it takes 15 rows at a time (the inputs it
        // broadcasts): one chunk, two, and two and a bit.
        for k in [72, 45, 133, 4100] {
            let n = 3 * PANEL;
            let w32 = values(n * k, 7);
            let w16: Vec<half::f16> = w32.iter().map(|&v| half::f16::from_f32(v)).collect();
            let laid = panels(&w16, n, k).unwrap();
            assert!(panels(&w16[..(n - 1) * k], n - 1, k).is_none());
            let bias = values(n, 8);
            let rows_tried: Vec<usize> = if k > 100 {
                vec![1, 15, 16, 30, 31]
            } else {
                (1..=30).collect()
            };
            for rows in rows_tried {
                let x = values(rows * k, rows as u64);
                let mut scalar = vec![0f32; rows * n];
                dense(
                    Isa::Scalar,
                    &x,
                    rows,
                    DenseWeights::Panels(&laid),
                    Some(&bias),
                    &mut scalar,
                );
                let exact: Vec<f64> = (0..rows * n)
                    .map(|at| {
                        let (r, j) = (at / n, at % n);
                        bias[j] as f64
                            + (0..k)
                                .map(|i| x[r * k + i] as f64 * w16[j * k + i].to_f32() as f64)
                                .sum::<f64>()
                    })
                    .collect();
                let near = |got: &[f32], isa: Isa| {
                    for (g, e) in got.iter().zip(&exact) {
                        let bound = 1e-5 * (1.0 + e.abs()) * (k as f64).sqrt();
                        assert!(
                            (*g as f64 - e).abs() <= bound,
                            "{isa:?}, {rows} rows: {g} vs {e}"
                        );
                    }
                };
                near(&scalar, Isa::Scalar);
                for isa in [Isa::Sse2, Isa::Avx2, Isa::Avx512Vnni] {
                    if !isa.supported() {
                        if rows == 1 {
                            eprintln!("dense panels {isa:?}: not supported on this CPU, not run");
                        }
                        continue;
                    }
                    let mut out = vec![0f32; rows * n];
                    dense(
                        isa,
                        &x,
                        rows,
                        DenseWeights::Panels(&laid),
                        Some(&bias),
                        &mut out,
                    );
                    if isa == Isa::Sse2 {
                        near(&out, isa);
                    } else {
                        assert_eq!(
                            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            scalar.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            "{isa:?}, {rows} rows"
                        );
                    }
                    // Each row alone (another block of rows), the same bits.
                    for r in [0, rows / 2, rows - 1] {
                        let xr = &x[r * k..(r + 1) * k];
                        let alone = dense_new(isa, xr, 1, DenseWeights::Panels(&laid), Some(&bias));
                        assert_eq!(
                            alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            out[r * n..(r + 1) * n]
                                .iter()
                                .map(|v| v.to_bits())
                                .collect::<Vec<_>>(),
                            "{isa:?}, row {r} of {rows} alone"
                        );
                    }
                    // Into a new vector (not zeroed: every value stored by the kernel), the same.
                    let new = dense_new(isa, &x, rows, DenseWeights::Panels(&laid), Some(&bias));
                    assert_eq!(
                        new.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "dense_new, {isa:?}, {rows} rows"
                    );
                    // One input for a call per panel, as the second core's chunks run (on SSE2
                    // broadcast once for the calls in a row): panel 2, a call on other values of
                    // the same shape made for several calls, panels 1 and 0, a call on the other
                    // values made for one, panel 2 again. The same bits, for both inputs.
                    let input = DenseInput::new(&x, rows);
                    let other = values(rows * k, 99);
                    let other_input = DenseInput::new(&other, rows);
                    let first = DenseWeights::Panels(&laid).rows(0..PANEL, k);
                    let other_out = dense_new(isa, &other, rows, first, None);
                    let mut by_panel = vec![0f32; rows * n];
                    let mut part = vec![0f32; rows * PANEL];
                    for step in 0..6 {
                        let p = match step {
                            1 => {
                                dense_input(isa, other_input, first, None, &mut part);
                                assert!(part == other_out, "{isa:?}, {rows} rows, other values");
                                continue;
                            }
                            4 => {
                                dense(isa, &other, rows, first, None, &mut part);
                                assert!(part == other_out, "{isa:?}, {rows} rows, other, once");
                                continue;
                            }
                            0 | 5 => 2,
                            2 => 1,
                            _ => 0,
                        };
                        let cols = p * PANEL..(p + 1) * PANEL;
                        let w = DenseWeights::Panels(&laid).rows(cols.clone(), k);
                        dense_input(isa, input, w, Some(&bias[cols]), &mut part);
                        for r in 0..rows {
                            let at = &mut by_panel[r * n + p * PANEL..][..PANEL];
                            if step == 5 {
                                assert!(
                                    at == &part[r * PANEL..][..PANEL],
                                    "{isa:?}, panel 2 again"
                                );
                            }
                            at.copy_from_slice(&part[r * PANEL..][..PANEL]);
                        }
                    }
                    assert_eq!(
                        by_panel.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{isa:?}, {rows} rows, a call per panel"
                    );
                    // The upper panel alone gives its columns' bits, as the second core runs it.
                    let upper = DenseWeights::Panels(&laid).rows(PANEL..n, k);
                    let mut half = vec![0f32; rows * (n - PANEL)];
                    dense(isa, &x, rows, upper, Some(&bias[PANEL..]), &mut half);
                    for r in 0..rows {
                        assert_eq!(
                            half[r * (n - PANEL)..(r + 1) * (n - PANEL)],
                            out[r * n + PANEL..(r + 1) * n]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn sse2_panels_widen_every_f16_exactly() {
        if !Isa::Sse2.supported() {
            eprintln!("dense panels Sse2: not supported on this CPU, not run");
            return;
        }
        // One input of 1.0: each output is 0 + its weight. Every f16, subnormals, infinities and
        // NaNs too, 32 to a panel from 0x0010 on, so that two panels hold finite values beside
        // infinities (which send a panel to the exact widening after the fast one).
        let all: Vec<half::f16> = (0..=u16::MAX)
            .map(|b| half::f16::from_bits(b.wrapping_add(16)))
            .collect();
        for w in all.chunks(PANEL) {
            let laid = panels(w, PANEL, 1).unwrap();
            let out = dense_new(Isa::Sse2, &[1.0], 1, DenseWeights::Panels(&laid), None);
            for (got, w) in out.iter().zip(w) {
                let want = 0.0 + w.to_f32();
                assert!(
                    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                    "{:#06x}: {got} vs {want}",
                    w.to_bits()
                );
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value() {
        let mut worst = 0f64;
        for i in 0..200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let exact = (x as f64).exp();
            let got = attention::exp(x) as f64;
            worst = worst.max(((got - exact) / exact).abs());
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        // Beyond the range, the value at its end; never infinite or NaN.
        assert_eq!(attention::exp(-1000.0), attention::exp(-87.0));
        assert!(attention::exp(1000.0).is_finite());
        assert_eq!(attention::exp(0.0), 1.0);
    }

    #[test]
    fn silu_is_the_same_bits_on_every_path() {
        let ffn = 43; // five lanes of eight and a tail
        let gu: Vec<f32> = values(3 * 2 * ffn, 9).iter().map(|v| v * 12.0).collect();
        let mut fast = vec![0f32; 3 * ffn];
        silu_mul(&gu, ffn, &mut fast);
        for (r, row) in gu.chunks_exact(2 * ffn).enumerate() {
            let (g, u) = row.split_at(ffn);
            for i in 0..ffn {
                let portable = silu_times(g[i], u[i]);
                assert_eq!(
                    fast[r * ffn + i].to_bits(),
                    portable.to_bits(),
                    "row {r}, {i}"
                );
                let exact = g[i] as f64 / (1.0 + (-g[i] as f64).exp()) * u[i] as f64;
                assert!((portable as f64 - exact).abs() <= 1e-6 * (1.0 + exact.abs()));
            }
        }
    }

    #[test]
    fn activations_round_halves_away_from_zero_as_roundf() {
        for i in -127_000..=127_000 {
            let y = i as f32 / 1000.0;
            for y in [y, y + 0.0005, f32::from_bits(y.to_bits() + 1)] {
                if y.abs() <= 127.0 {
                    assert_eq!(round_half_away(y), y.round() as i32, "{y}");
                }
            }
        }
    }

    #[test]
    fn q8_0_quantisation_round_trips_within_half_a_step() {
        let v = values(4 * 64, 5);
        let m = QMatrix::quantize_q8_0(&v, 4, 64).unwrap();
        let mut row = vec![0f32; 64];
        for j in 0..4 {
            m.dequantize_row(j, &mut row);
            for (b, block) in v[j * 64..(j + 1) * 64].chunks(BLOCK).enumerate() {
                let step = block.iter().fold(0f32, |a, x| a.max(x.abs())) / 127.0;
                for (i, x) in block.iter().enumerate() {
                    assert!((row[b * BLOCK + i] - x).abs() <= step * 0.5 + x.abs() * 1e-3 + 1e-6);
                }
            }
        }
    }
}
