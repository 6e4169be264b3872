//! The few-rows projection of the encoders on all-MiniLM-L6-v2's shapes, on one core: the best of
//! seven rounds of 300 calls per shape, and the sum for six layers (their weights then stay in
//! cache), row-major `f32` and `f16` panels (also in the chunks of columns a lone pass shares with
//! its second core, here on one thread); then a pass through six layers of their own (42 MB of
//! `f32` weights, more than a 32 MB L3 holds, as in a server), best and median of 50 passes, with
//! the weights in `f32`, `f16`, `f16` panels, and as Q8_0 on the chat engine's int8 matmul (for
//! comparison: the encoders do not quantise).
//!
//! With GAP_MS, each pass of its own weights follows that long an idle pause, as a lone request on
//! an idle server does (other work on the machine may have taken the caches meanwhile).
//!
//! With a fourth argument `panels`, only the `f16` panels run (the row-major loops of SSE2 and the
//! portable path take minutes).
//!
//!     cargo run --release -p aitier-kernels --example dense_bench -- [ROWS (13)] [avx2|sse2|scalar|avx512] [GAP_MS] [panels]
use aitier_kernels::{
    DenseInput, DenseWeights, Isa, PANEL, QActs, QMatrix, dense, dense_input, matmul_cols, panels,
};
use std::time::Instant;
fn main() {
    let rows: usize = std::env::args().nth(1).map_or(13, |s| s.parse().unwrap());
    let isa = match std::env::args().nth(2).as_deref() {
        Some("scalar") => Isa::Scalar,
        Some("sse2") => Isa::Sse2,
        Some("avx512") => Isa::Avx512Vnni,
        _ => Isa::Avx2,
    };
    assert!(isa.supported(), "{isa:?} is not supported on this CPU");
    let gap: f64 = std::env::args().nth(3).map_or(0.0, |s| s.parse().unwrap());
    let all = std::env::args().nth(4).as_deref() != Some("panels");
    let shapes = [(384usize, 1152usize), (384, 384), (384, 1536), (1536, 384)];
    let mut best = [f64::MAX; 4];
    let mut best_p = [f64::MAX; 4];
    let mut best_c = [f64::MAX; 4];
    for _round in 0..7 {
        for (s, &(k, n)) in shapes.iter().enumerate() {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 7 % 13) as f32) * 0.01)
                .collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32) * 0.01).collect();
            let b = vec![0.1f32; n];
            let mut out = vec![0f32; rows * n];
            if all {
                let t = Instant::now();
                for _ in 0..300 {
                    dense(isa, &x, rows, DenseWeights::F32(&w), Some(&b), &mut out);
                }
                let us = t.elapsed().as_secs_f64() * 1e6 / 300.0;
                best[s] = best[s].min(us);
            }
            let h: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
            let p = panels(&h, n, k).unwrap();
            let t = Instant::now();
            for _ in 0..300 {
                dense(isa, &x, rows, DenseWeights::Panels(&p), Some(&b), &mut out);
            }
            let us = t.elapsed().as_secs_f64() * 1e6 / 300.0;
            best_p[s] = best_p[s].min(us);
            // The same in the chunks of columns that a lone pass shares with its second core
            // (about 256K multiply-adds of whole panels, `src/inference/second_core.rs`), on this
            // one thread, one input for the projection's calls.
            let chunk = ((256 * 1024) / (rows * k * PANEL)).max(1) * PANEL;
            let mut part = vec![0f32; rows * chunk];
            let t = Instant::now();
            for _ in 0..300 {
                let input = DenseInput::new(&x, rows);
                for j0 in (0..n).step_by(chunk) {
                    let j1 = (j0 + chunk).min(n);
                    let w = DenseWeights::Panels(&p).rows(j0..j1, k);
                    dense_input(
                        isa,
                        input,
                        w,
                        Some(&b[j0..j1]),
                        &mut part[..rows * (j1 - j0)],
                    );
                }
            }
            let us = t.elapsed().as_secs_f64() * 1e6 / 300.0;
            best_c[s] = best_c[s].min(us);
        }
    }
    let per_layer: f64 = best.iter().sum();
    if all {
        println!(
            "{isa:?}, {rows} rows: qkv, attention out, intermediate, output {:?} us; \
         a layer {per_layer:.1} us, six layers {:.2} ms",
            best.iter()
                .map(|x| (x * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
            per_layer * 6.0 / 1000.0
        );
    }
    for (what, best) in [("", best_p), (" in a lone pass's chunks", best_c)] {
        println!(
            "{isa:?}, {rows} rows, f16 panels{what}: {:?} us; a layer {:.1} us, six layers {:.2} ms",
            best.iter()
                .map(|x| (x * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
            best.iter().sum::<f64>(),
            best.iter().sum::<f64>() * 6.0 / 1000.0
        );
    }
    let layers: Vec<Vec<(Vec<f32>, Vec<f32>)>> = (0..6)
        .map(|l| {
            shapes
                .iter()
                .map(|&(k, n)| {
                    let w = (0..n * k).map(|i| (((i + l) * 5 % 11) as f32) * 0.01);
                    (w.collect(), vec![0.1f32; n])
                })
                .collect()
        })
        .collect();
    let halves: Vec<Vec<Vec<half::f16>>> = layers
        .iter()
        .map(|layer| {
            layer
                .iter()
                .map(|(w, _)| w.iter().map(|&v| half::f16::from_f32(v)).collect())
                .collect()
        })
        .collect();
    let quants: Vec<Vec<QMatrix>> = layers
        .iter()
        .map(|layer| {
            layer
                .iter()
                .zip(&shapes)
                .map(|((w, _), &(k, n))| QMatrix::quantize_q8_0(w, n, k).unwrap())
                .collect()
        })
        .collect();
    let laid: Vec<Vec<Vec<half::f16>>> = halves
        .iter()
        .map(|layer| {
            layer
                .iter()
                .zip(&shapes)
                .map(|(h, &(k, n))| panels(h, n, k).unwrap())
                .collect()
        })
        .collect();
    let (mut passes8, mut passes_p) = (Vec::new(), Vec::new());
    // f32 and f16 weights alternately, so that a slow phase of the machine hits both alike.
    let (mut passes, mut passes16) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        if gap > 0.0 {
            std::thread::sleep(std::time::Duration::from_secs_f64(gap / 1e3));
        }
        let t = Instant::now();
        for layer in &quants {
            for (&(k, n), w) in shapes.iter().zip(layer) {
                let x = vec![0.01f32; rows * k];
                let acts = QActs::quantize(&x, rows, k);
                let mut out = vec![0f32; rows * n];
                matmul_cols(isa, w, &acts, 0..n, &mut out);
                std::hint::black_box(&out);
            }
        }
        passes8.push(t.elapsed().as_secs_f64() * 1e3);
        if gap > 0.0 {
            std::thread::sleep(std::time::Duration::from_secs_f64(gap / 1e3));
        }
        let t = Instant::now();
        for (layer, bl) in laid.iter().zip(&layers) {
            for ((&(k, n), w), (_, b)) in shapes.iter().zip(layer).zip(bl) {
                let x = vec![0.01f32; rows * k];
                let mut out = vec![0f32; rows * n];
                dense(isa, &x, rows, DenseWeights::Panels(w), Some(b), &mut out);
                std::hint::black_box(&out);
            }
        }
        passes_p.push(t.elapsed().as_secs_f64() * 1e3);
        for in_f16 in [true, false] {
            if !all {
                break;
            }
            if gap > 0.0 {
                std::thread::sleep(std::time::Duration::from_secs_f64(gap / 1e3));
            }
            let t = Instant::now();
            for (layer, half) in layers.iter().zip(&halves) {
                for ((&(k, n), (w, b)), h) in shapes.iter().zip(layer).zip(half) {
                    let x = vec![0.01f32; rows * k];
                    let mut out = vec![0f32; rows * n];
                    let w = if in_f16 {
                        DenseWeights::F16(h)
                    } else {
                        DenseWeights::F32(w)
                    };
                    dense(isa, &x, rows, w, Some(b), &mut out);
                    std::hint::black_box(&out);
                }
            }
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if in_f16 { &mut passes16 } else { &mut passes }.push(ms);
        }
    }
    for (name, mut passes) in [
        ("f32", passes),
        ("f16", passes16),
        ("q8_0", passes8),
        ("f16 panels", passes_p),
    ] {
        if passes.is_empty() {
            continue;
        }
        passes.sort_by(f64::total_cmp);
        println!(
            "{isa:?}, {rows} rows, six layers of their own, {name} weights, {gap} ms idle before each: \
             best {:.2} ms, median {:.2} ms",
            passes[0],
            passes[passes.len() / 2]
        );
    }
}
