//! The int8 matmul on SmolLM2-135M's four Q4_1 projections (qkv, attention out, gate and up,
//! down), on one core: the best of five rounds per shape, and the sum for its 30 layers.
//!
//!     cargo run --release -p aitier-kernels --example matmul_bench -- [ROWS (256)] [avx2|sse2|scalar|avx512]
use aitier_kernels::{BLOCK, Format, Isa, QActs, QMatrix, matmul_cols};
use std::time::Instant;

/// Q4_1 blocks of made-up weights: an f16 scale and offset, then 16 bytes of nibbles.
fn q4_1(n: usize, k: usize) -> QMatrix {
    let mut data = Vec::with_capacity(n * k / BLOCK * 20);
    for b in 0..n * k / BLOCK {
        let d = half::f16::from_f32(0.01 + (b % 7) as f32 * 0.001);
        let m = half::f16::from_f32(-0.08 + (b % 5) as f32 * 0.001);
        data.extend_from_slice(&d.to_bits().to_le_bytes());
        data.extend_from_slice(&m.to_bits().to_le_bytes());
        data.extend((0..16).map(|i| ((b * 31 + i * 17) % 256) as u8));
    }
    QMatrix::new(Format::Q4_1, n, k, data).unwrap()
}

fn main() {
    let rows: usize = std::env::args().nth(1).map_or(256, |s| s.parse().unwrap());
    let isa = match std::env::args().nth(2).as_deref() {
        Some("scalar") => Isa::Scalar,
        Some("sse2") => Isa::Sse2,
        Some("avx512") => Isa::Avx512Vnni,
        _ => Isa::Avx2,
    };
    assert!(isa.supported(), "{isa:?} is not supported on this CPU");
    let shapes = [(576usize, 960usize), (576, 576), (576, 3072), (1536, 576)];
    let mut best = [f64::MAX; 4];
    let inputs: Vec<(QMatrix, QActs)> = shapes
        .iter()
        .map(|&(k, n)| {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                .collect();
            (q4_1(n, k), QActs::quantize(&x, rows, k))
        })
        .collect();
    for _round in 0..5 {
        for (s, (w, x)) in inputs.iter().enumerate() {
            let mut out = vec![0f32; rows * w.rows()];
            let t = Instant::now();
            matmul_cols(isa, w, x, 0..w.rows(), &mut out);
            best[s] = best[s].min(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let layer: f64 = best.iter().sum();
    let macs: f64 = shapes.iter().map(|&(k, n)| (k * n * rows) as f64).sum();
    println!(
        "{isa:?}, {rows} rows: qkv, attention out, gate+up, down {:?} ms; 30 layers {:.0} ms \
         ({:.1} GMAC/s)",
        best.iter()
            .map(|x| (x * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        layer * 30.0,
        macs / layer / 1e6
    );
}
