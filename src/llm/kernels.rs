//! Our own quantised matmul: weights stay in their GGUF blocks (Q4_0, Q4_1, Q8_0: no padding, no
//! second copy), activations are quantised once per projection to 8 bits per block of 32 (as
//! llama.cpp's `q8_1`), and every block's dot product is an exact integer sum scaled into an `f32`
//! accumulator.
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
//! `kernels/x86.rs` behind the safe functions of this file.

#[cfg(target_arch = "x86_64")]
mod x86;

use super::LlmError;

/// Values per quantisation block, for every format here.
pub const BLOCK: usize = 32;

/// The instruction sets the kernels come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512Vnni,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni];

    /// The fastest set this CPU supports.
    pub fn detect() -> Self {
        [Isa::Avx512Vnni, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.supported())
            .unwrap_or(Isa::Scalar)
    }

    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
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

/// An `[n, k]` weight matrix in GGUF blocks, row after row.
pub struct QMatrix {
    format: Format,
    n: usize,
    k: usize,
    data: Vec<u8>,
}

fn f16(bytes: &[u8]) -> f32 {
    half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32()
}

impl QMatrix {
    /// Takes `n` rows of `k` weights in `format`'s GGUF blocks.
    pub fn new(format: Format, n: usize, k: usize, data: Vec<u8>) -> Result<Self, LlmError> {
        if !k.is_multiple_of(BLOCK) || data.len() != n * k / BLOCK * format.block_bytes() {
            return Err(LlmError::Load(format!(
                "a {format:?} matrix of {n}x{k} cannot hold {} bytes",
                data.len()
            )));
        }
        Ok(Self { format, n, k, data })
    }

    /// Quantises `[n, k]` values to Q8_0, as llama.cpp does (round to nearest, scale max/127).
    pub fn quantize_q8_0(values: &[f32], n: usize, k: usize) -> Result<Self, LlmError> {
        if values.len() != n * k || !k.is_multiple_of(BLOCK) {
            return Err(LlmError::Load(format!(
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

    /// Stacks matrices of the same format and width, rows of the first first.
    pub fn stack(parts: Vec<QMatrix>) -> Result<Self, LlmError> {
        let (format, k) = (parts[0].format, parts[0].k);
        if parts.iter().any(|p| p.format != format || p.k != k) {
            return Err(LlmError::Load("projections of mixed types".into()));
        }
        let n = parts.iter().map(|p| p.n).sum();
        let data = parts.into_iter().flat_map(|p| p.data).collect();
        Self::new(format, n, k, data)
    }

    fn row_bytes(&self) -> usize {
        self.k / BLOCK * self.format.block_bytes()
    }

    fn row(&self, j: usize) -> &[u8] {
        let w = self.row_bytes();
        &self.data[j * w..(j + 1) * w]
    }

    /// Writes row `j` as floats into `out` (`k` values): an embedding lookup.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let bb = self.format.block_bytes();
        for (block, out) in self
            .row(j)
            .chunks_exact(bb)
            .zip(out.chunks_exact_mut(BLOCK))
        {
            let d = f16(block);
            match self.format {
                Format::Q8_0 => {
                    for (o, q) in out.iter_mut().zip(&block[2..]) {
                        *o = d * (*q as i8) as f32;
                    }
                }
                Format::Q4_0 | Format::Q4_1 => {
                    let (m, qs) = match self.format {
                        Format::Q4_1 => (f16(&block[2..]), &block[4..]),
                        _ => (-8.0 * d, &block[2..]),
                    };
                    for (i, q) in qs.iter().enumerate() {
                        out[i] = d * (q & 0x0f) as f32 + m;
                        out[i + 16] = d * (q >> 4) as f32 + m;
                    }
                }
            }
        }
    }

    /// Bytes of weights, for logs and memory budgets.
    pub fn bytes(&self) -> usize {
        self.data.len()
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

impl QActs {
    /// Quantises `[rows, k]` values, each block on its own (llama.cpp's `quantize_row_q8_1`).
    pub fn quantize(x: &[f32], rows: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(BLOCK) && x.len() == rows * k);
        let blocks = x.len() / BLOCK;
        let mut acts = Self {
            rows,
            k,
            qs: vec![0; x.len()],
            d: Vec::with_capacity(blocks),
            s: Vec::with_capacity(blocks),
        };
        for (block, qs) in x.chunks_exact(BLOCK).zip(acts.qs.chunks_exact_mut(BLOCK)) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in qs.iter_mut().zip(block) {
                *q = (v * id).round() as i8;
                sum += *q as i32;
            }
            acts.d.push(d);
            acts.s.push(d * sum as f32);
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
    let rb = w.row_bytes();
    let rows = &w.data[cols.start * rb..cols.end * rb];
    match isa {
        Isa::Scalar => {
            for (c, row) in rows.chunks_exact(rb).enumerate() {
                for r in 0..x.rows {
                    out[r * width + c] = dot_scalar(w.format, row, x.row(r));
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => {
            let acts = x86::Acts {
                qs: &x.qs,
                d: &x.d,
                s: &x.s,
                rows: x.rows,
            };
            x86::matmul(
                isa == Isa::Avx512Vnni,
                w.format,
                rows,
                w.k / BLOCK,
                &acts,
                out,
                width,
            );
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only scalar kernels off x86"),
    }
}

/// `[rows, k] × [n, k]ᵀ → [rows, n]`.
pub fn matmul(isa: Isa, w: &QMatrix, x: &QActs) -> Vec<f32> {
    let mut out = vec![0f32; x.rows * w.n];
    matmul_cols(isa, w, x, 0..w.n, &mut out);
    out
}

/// The reference: one weight row against one activation row, block by block.
fn dot_scalar(format: Format, w: &[u8], (qs, d, s): (&[i8], &[f32], &[f32])) -> f32 {
    let bb = format.block_bytes();
    let (mut acc, mut offsets) = (0f32, 0f32);
    for (b, block) in w.chunks_exact(bb).enumerate() {
        let a = &qs[b * BLOCK..(b + 1) * BLOCK];
        let dw = f16(block);
        let isum: i32 = match format {
            Format::Q8_0 => block[2..]
                .iter()
                .zip(a)
                .map(|(w, a)| (*w as i8) as i32 * *a as i32)
                .sum(),
            Format::Q4_0 | Format::Q4_1 => {
                let (m, nibbles) = match format {
                    Format::Q4_1 => (f16(&block[2..]), &block[4..]),
                    _ => (-8.0 * dw, &block[2..]),
                };
                offsets += m * s[b];
                nibbles
                    .iter()
                    .enumerate()
                    .map(|(i, q)| {
                        (q & 0x0f) as i32 * a[i] as i32 + (q >> 4) as i32 * a[i + 16] as i32
                    })
                    .sum()
            }
        };
        acc += dw * d[b] * isum as f32;
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
        for format in [Format::Q4_0, Format::Q4_1, Format::Q8_0] {
            let (n, k, rows) = (37, 576, 7);
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
                        "{format:?} {isa:?}: {g} vs {e}"
                    );
                }
                if isa != Isa::Scalar {
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
        for format in [Format::Q4_1, Format::Q8_0] {
            let (n, k, rows) = (24, 1536, 9);
            let w = matrix(format, n, k, 3);
            let xs = values(rows * k, 4);
            let x = QActs::quantize(&xs, rows, k);
            for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
                let all = matmul(isa, &w, &x);
                for r in 0..rows {
                    let alone = QActs::quantize(&xs[r * k..(r + 1) * k], 1, k);
                    assert_eq!(matmul(isa, &w, &alone), all[r * n..(r + 1) * n]);
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
