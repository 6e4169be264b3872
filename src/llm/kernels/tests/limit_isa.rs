//! `limit_isa` in a process of its own: it holds for every kernel from the call on.

use aitier_kernels::{Isa, amx_supported, limit_isa};

#[test]
fn a_limit_keeps_detection_and_every_kernel_within_it() {
    let widest = Isa::detect();
    // tests/all runs this under emulated CPUs and says which set each must pick.
    if let Ok(want) = std::env::var("AITIER_EXPECT_ISA") {
        assert_eq!(format!("{widest:?}"), want, "the set picked on this CPU");
    }
    limit_isa(Isa::Avx2);
    assert!(!Isa::Avx512Vnni.supported());
    assert!(!amx_supported());
    match widest {
        Isa::Scalar | Isa::Sse2 => assert_eq!(Isa::detect(), widest, "no AVX2 here: not run"),
        _ => assert_eq!(Isa::detect(), Isa::Avx2),
    }
    limit_isa(Isa::Sse2);
    assert!(!Isa::Avx2.supported());
    match cfg!(target_arch = "x86_64") {
        true => assert_eq!(Isa::detect(), Isa::Sse2),
        false => assert_eq!(Isa::detect(), Isa::Scalar),
    }
    limit_isa(Isa::Scalar);
    assert_eq!(Isa::detect(), Isa::Scalar);
    assert!(!Isa::Sse2.supported() && !Isa::Avx2.supported());
    limit_isa(Isa::Avx512Vnni);
    assert_eq!(Isa::detect(), widest);
}
