//! The second-core helper of lone embedding passes (`aitier::inference::second_core`), in a
//! process of its own so that no other test's pass runs beside these: a projection split between
//! the pass and the helper gives the same bits as the kernel alone, the helper does take work,
//! and it runs on another core than the pass.

use aitier::inference::second_core::{dense, helped, pass, splitting};
use aitier_kernels::DenseWeights;

fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0)
        .collect()
}

#[test]
fn a_split_projection_is_the_kernel_alone_bit_for_bit() {
    assert!(
        std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2,
        "the helper needs a second core"
    );
    // Every instruction set of this CPU's kernels: SSE2 broadcasts a pass's input once for all
    // the chunks a thread runs (the other threads' calls in between).
    use aitier_kernels::Isa;
    let isas = [Isa::Sse2, Isa::Avx2, Isa::Avx512Vnni];
    // (Collected first: a limit makes the wider sets unsupported.)
    let here: Vec<Isa> = isas.into_iter().filter(|isa| isa.supported()).collect();
    for isa in here {
        aitier_kernels::limit_isa(isa);
        assert_eq!(Isa::detect(), isa);
        eprintln!("{isa:?}");
        split_projections(isa);
    }
    aitier_kernels::limit_isa(Isa::Avx512Vnni);
    for isa in isas.into_iter().filter(|isa| !isa.supported()) {
        eprintln!("{isa:?}: not supported on this CPU, not run");
    }
    // The helper polls on another core than the pass's (on Linux): woken by the pass, the
    // scheduler could put it on the pass's own core, where its polling slowed the pass down.
    #[cfg(target_os = "linux")]
    {
        let kept_off = (0..50).any(|_| {
            pass(|| {
                // SAFETY: no preconditions.
                let core = unsafe { libc::sched_getcpu() } as usize;
                let cores =
                    aitier::inference::second_core::helper_cores().expect("the helper has started");
                assert!(!cores.is_empty());
                eprintln!("pass on core {core}, helper on {cores:?}");
                !cores.contains(&core)
            })
        });
        assert!(kept_off, "the helper was never kept off the pass's core");
    }
    // A pass beside another one does not split.
    pass(|| {
        assert!(splitting());
        pass(|| assert!(!splitting()));
        assert!(splitting());
    });
}

/// Projections split between the pass and the helper on `isa`, against the kernel alone.
fn split_projections(isa: aitier_kernels::Isa) {
    // Wide ones are split (a 384-wide model's q|k|v and feed-forward), narrow ones are not; in
    // chunks of whole panels, the last one narrower where the width is not a multiple of them
    // (1,000 columns in eight; 300 in two halves from `AMX_ROWS` rows).
    for (rows, k, n) in [
        (1, 384, 1152),
        (7, 384, 1536),
        (13, 1536, 384),
        (5, 384, 1000),
        (aitier_kernels::AMX_ROWS, 64, 300),
        (3, 64, 200),
    ] {
        let (x, w, bias) = (values(rows * k, 1), values(n * k, 2), values(n, 3));
        let half: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
        // Where the width allows, the same in panels (the encoders' large projections).
        let laid = aitier_kernels::panels(&half, n, k);
        assert_eq!(laid.is_some(), n % aitier_kernels::PANEL == 0);
        // f32 weights, f16 ones, and f16 panels.
        let kinds = [
            ("f32", Some(DenseWeights::F32(&w))),
            ("f16", Some(DenseWeights::F16(&half))),
            ("panels", laid.as_deref().map(DenseWeights::Panels)),
        ];
        // (Row-major weights take the portable loops on SSE2, whole or split alike.)
        let kinds = kinds
            .into_iter()
            .filter(|(kind, _)| isa != aitier_kernels::Isa::Sse2 || *kind == "panels");
        for (kind, w) in kinds.filter_map(|(kind, w)| Some((kind, w?))) {
            // Two inputs in turn, as a pass's projections take new ones: each thread's kept
            // broadcast (SSE2) must be of the input at hand.
            let x2 = values(rows * k, 4);
            let inputs = [&x, &x2];
            let alone = inputs.map(|x| {
                let mut alone = vec![0f32; rows * n];
                aitier_kernels::dense(isa, x, rows, w, Some(&bias), &mut alone);
                alone
            });
            let before = helped();
            pass(|| {
                assert!(splitting(), "a lone pass uses the helper");
                // Like a pass: many projections, while the helper wakes and spins; at least 300,
                // and for a wide one until the helper has taken some (within 2 s: a freshly
                // started or descheduled helper is simply not waited for).
                let started = std::time::Instant::now();
                let mut calls = 0;
                while calls < 300
                    || (n >= 256
                        && helped() == before
                        && started.elapsed() < std::time::Duration::from_secs(2))
                {
                    let split = dense(inputs[calls % 2], rows, w, &bias);
                    assert_eq!(split, alone[calls % 2], "{rows}x{k} by {n}, {kind}");
                    calls += 1;
                }
            });
            assert!(!splitting());
            let took = helped() - before;
            if n >= 256 {
                assert!(took > 0, "{rows}x{k} by {n}: the helper took none in 2 s");
            } else {
                assert_eq!(took, 0, "{rows}x{k} by {n} is too narrow to split");
            }
            eprintln!("{rows}x{k} by {n}, {kind}: {took} on the helper");
        }
    }
}
