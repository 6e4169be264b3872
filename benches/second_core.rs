//! A lone pass's projections on two cores (`aitier::inference::second_core`): six layers of
//! all-MiniLM-L6-v2's shapes, each layer with weights of its own as `f16` panels (21 MB, as the
//! encoder streams them), each projection shared with the helper as a lone embedding pass does it;
//! then the same passes on this thread alone. Best and median of 100 passes each, alternated, for
//! each instruction set this CPU has (or `--isa`) and each row count.
//!
//! ```text
//! cargo bench --bench second_core --no-run   # then run the binary it names:
//! second_core-<hash> [--isa sse2|avx2|avx512] [--rows 13,40]
//! ```
use std::time::Instant;

use aitier::inference::second_core;
use aitier_kernels::{DenseWeights, Isa};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    // `cargo test --all-targets` runs each benchmark once with no arguments: a short run then.
    let passes = if args.len() == 1 { 2 } else { 100 };
    let rows: Vec<usize> = value("--rows").map_or(vec![13, 40], |r| {
        r.split(',').map(|v| v.parse().expect("--rows")).collect()
    });
    let isas: Vec<Isa> = match value("--isa").as_deref() {
        Some("sse2") => vec![Isa::Sse2],
        Some("avx2") => vec![Isa::Avx2],
        Some("avx512") => vec![Isa::Avx512Vnni],
        Some(other) => panic!("--isa {other}: sse2, avx2 or avx512"),
        None => [Isa::Sse2, Isa::Avx2, Isa::Avx512Vnni]
            .into_iter()
            .filter(|isa| isa.supported())
            .collect(),
    };
    let shapes = [(384usize, 1152usize), (384, 384), (384, 1536), (1536, 384)];
    let layers: Vec<Vec<(Vec<half::f16>, Vec<f32>)>> = (0..6)
        .map(|l| {
            shapes
                .iter()
                .map(|&(k, n)| {
                    let w: Vec<half::f16> = (0..n * k)
                        .map(|i| half::f16::from_f32((((i + l) * 5 % 11) as f32) * 0.01))
                        .collect();
                    (aitier_kernels::panels(&w, n, k).unwrap(), vec![0.1f32; n])
                })
                .collect()
        })
        .collect();
    println!(
        "machine: {}, {} cores",
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_else(|| "?".into()),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for isa in isas {
        // (A limit can be raised again: each set in turn, narrowest first.)
        aitier_kernels::limit_isa(isa);
        assert!(isa.supported(), "{isa:?} is not supported on this CPU");
        for &rows in &rows {
            let run = |split: bool| {
                let t = Instant::now();
                let layer = || {
                    for layer in &layers {
                        for (&(k, _), (w, bias)) in shapes.iter().zip(layer) {
                            let x = vec![0.01f32; rows * k];
                            let w = DenseWeights::Panels(w);
                            let out = match split {
                                true => second_core::dense(&x, rows, w, bias),
                                false => aitier_kernels::dense_new(isa, &x, rows, w, Some(bias)),
                            };
                            std::hint::black_box(out);
                        }
                    }
                };
                match split {
                    true => second_core::pass(layer),
                    false => layer(),
                }
                t.elapsed().as_secs_f64() * 1e3
            };
            let helped = second_core::helped();
            let (mut two, mut one) = (Vec::new(), Vec::new());
            for _ in 0..passes {
                two.push(run(true));
                one.push(run(false));
            }
            let shown = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                format!("best {:.2} median {:.2} ms", v[0], v[v.len() / 2])
            };
            println!(
                "{isa:?}, {rows} rows, six layers of their own: two cores {}; one core {}; the helper took part in {} of {} projections",
                shown(two),
                shown(one),
                second_core::helped() - helped,
                passes * 6 * shapes.len()
            );
        }
    }
}
