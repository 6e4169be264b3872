//! The few-rows kernel on panels against candle's matmul, one thread, all-MiniLM-L6-v2's shapes:
//! where the encoders should switch from one to the other.
//!
//!     cargo bench --bench dense_rows --no-run   # then run the binary it names, with
//!     RAYON_NUM_THREADS=1 (candle's matmul on one thread, as an encoder worker runs it)
use aitier_kernels::{DenseWeights, Isa, dense, panels};
use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let shapes = [(384usize, 1152usize), (384, 384), (384, 1536), (1536, 384)];
    let isa = Isa::detect();
    for rows in [13usize, 32, 64, 96, 128, 192, 256, 416] {
        let (mut ours, mut theirs) = (f64::MAX, f64::MAX);
        for _ in 0..5 {
            let (mut a, mut b) = (0.0, 0.0);
            for &(k, n) in &shapes {
                let x: Vec<f32> = (0..rows * k)
                    .map(|i| ((i * 7 % 13) as f32) * 0.01)
                    .collect();
                let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32) * 0.01).collect();
                let bias = vec![0.1f32; n];
                let h: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
                let p = panels(&h, n, k).unwrap();
                let mut out = vec![0f32; rows * n];
                let t = Instant::now();
                dense(
                    isa,
                    &x,
                    rows,
                    DenseWeights::Panels(&p),
                    Some(&bias),
                    &mut out,
                );
                a += t.elapsed().as_secs_f64();
                let xt = Tensor::from_vec(x, (rows, k), &Device::Cpu)?;
                let wt = Tensor::from_vec(w, (n, k), &Device::Cpu)?;
                let bt = Tensor::from_vec(bias, n, &Device::Cpu)?;
                let t = Instant::now();
                let y = xt.matmul(&wt.t()?)?.broadcast_add(&bt)?;
                std::hint::black_box(y);
                b += t.elapsed().as_secs_f64();
            }
            ours = ours.min(a);
            theirs = theirs.min(b);
        }
        println!(
            "{rows} rows, a layer's projections: panels {:.3} ms, candle {:.3} ms",
            ours * 1e3,
            theirs * 1e3
        );
    }
    Ok(())
}
