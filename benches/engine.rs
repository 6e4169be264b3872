//! The chat engine's forward pass without HTTP, on the real SmolLM2 GGUF: one decode step for 1
//! and 4 sequences (a 64-token context each) and for 1 sequence of 512 tokens, and the prefill
//! of a ≈1,000-token prompt, on every kernel path this CPU supports. Prints the CPU model and
//! milliseconds per call (median of runs).
//!
//! ```text
//! cargo bench --bench engine        # needs models/fetch
//! ```

use std::time::Instant;

use aitier::llm::{Input, Isa, KvCache, Llama};
use candle_core::quantized::gguf_file::Content;

const GGUF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn cpu() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// A cache holding `len` tokens of a made-up context.
fn context(model: &Llama, len: usize) -> KvCache {
    let mut cache = model.new_cache();
    let tokens: Vec<u32> = (0..len as u32).map(|i| 1000 + i * 7).collect();
    model
        .forward(&mut [Input {
            cache: &mut cache,
            tokens: &tokens,
        }])
        .unwrap();
    cache
}

fn main() {
    // `cargo test --all-targets` runs benchmarks once as tests: nothing to measure then.
    if std::env::args()
        .any(|a| a == "--bench")
        .then_some(())
        .is_none()
    {
        eprintln!("benches/engine: run with cargo bench --bench engine");
        return;
    }
    assert!(
        std::path::Path::new(GGUF).is_file(),
        "{GGUF}: run models/fetch"
    );
    println!("CPU: {}", cpu());
    // `AITIER_BENCH_ISA=Avx2` measures one path only.
    let only = std::env::var("AITIER_BENCH_ISA").ok();
    for isa in Isa::ALL {
        if only.as_ref().is_some_and(|o| *o != format!("{isa:?}")) {
            continue;
        }
        if !isa.supported() {
            println!("{isa:?}: not supported here, not run");
            continue;
        }
        let mut reader = std::fs::File::open(GGUF).unwrap();
        let content = Content::read(&mut reader).unwrap();
        let mut model = Llama::from_gguf(&content, &mut reader, isa).unwrap();
        let threads: usize = std::env::var("AITIER_CHAT_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(1);
        model.set_threads(threads);
        println!("{isa:?}: {threads} thread(s) (AITIER_CHAT_THREADS)");
        // A long context shows what a step pays for the tokens before it (attention).
        for (batch, len) in [(1usize, 64usize), (4, 64), (1, 512)] {
            let mut caches: Vec<KvCache> = (0..batch).map(|_| context(&model, len)).collect();
            let mut times = Vec::new();
            for step in 0..40 {
                let tokens: Vec<u32> = (0..batch as u32).map(|i| 2000 + i + step).collect();
                let mut inputs: Vec<Input> = caches
                    .iter_mut()
                    .zip(&tokens)
                    .map(|(cache, t)| Input {
                        cache,
                        tokens: std::slice::from_ref(t),
                    })
                    .collect();
                let started = Instant::now();
                model.forward(&mut inputs).unwrap();
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
            let ms = median(times);
            println!(
                "{isa:?}: decode step, {batch} sequence(s) of {len} tokens: {ms:.2} ms ({:.0} tok/s)",
                batch as f64 * 1e3 / ms
            );
        }
        if isa == Isa::Scalar {
            // The portable path is a fallback and a reference: minutes for a long prompt.
            continue;
        }
        let prompt: Vec<u32> = (0..1000u32).map(|i| 1000 + (i * 31) % 40000).collect();
        let mut times = Vec::new();
        for _ in 0..3 {
            let mut cache = model.new_cache();
            let started = Instant::now();
            for chunk in prompt.chunks(256) {
                model
                    .forward(&mut [Input {
                        cache: &mut cache,
                        tokens: chunk,
                    }])
                    .unwrap();
            }
            times.push(started.elapsed().as_secs_f64());
        }
        let s = median(times);
        println!(
            "{isa:?}: prefill of 1,000 tokens (256 per pass): {s:.2} s ({:.0} tok/s)",
            1000.0 / s
        );
    }
}
