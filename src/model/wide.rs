//! The row kernels compiled once more for AVX-512 and for AVX2, and the
//! widest this CPU has picked at run time.
//!
//! Why: the binary targets every x86-64, whose vectors are 4 floats wide
//! (SSE2), and GELU, its gradient, the softmax and LayerNorm are loops of
//! plain arithmetic over rows of 64 to 512 floats that the compiler
//! vectorizes as wide as it is allowed to (gemm, our matmuls, picks its
//! code the same way). The bits do not change with the width: the
//! kernels add in a fixed order (the compiler never reorders float sums),
//! each element's arithmetic is the same IEEE operations, and `mul_add`
//! is a fused multiply-add rounded once on every path. So a validator on
//! a CPU without AVX-512 replays a miner's pass to the same bits.

use super::ops::{Real, RowKernel};

/// The instruction sets a row can run with, widest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Isa {
    Avx512,
    Avx2,
    /// Whatever the binary was built for.
    Baseline,
}

impl Isa {
    /// Whether this CPU runs code built for `self`.
    pub(super) fn here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
                Isa::Avx2 => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                }
                Isa::Baseline => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Baseline
        }
    }

    /// The widest this CPU runs (detection is cached by std).
    fn widest() -> Isa {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.here())
            .unwrap_or(Isa::Baseline)
    }
}

/// `f()` built for the widest instruction set this CPU has, for loops
/// elsewhere that the compiler vectorizes the same way (inline them into
/// `f` with `#[inline(always)]`: a call out of `f` runs as the baseline
/// build).
pub fn on_widest<R>(f: impl FnOnce() -> R) -> R {
    on(Isa::widest(), f)
}

/// `f()` built for `isa`, or for the baseline where this CPU lacks it.
fn on<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    match isa {
        // SAFETY: the CPU has the features these were compiled for
        // (`here`), which is all `target_feature` asks of a caller.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.here() => unsafe { call_avx512(f) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.here() => unsafe { call_avx2(f) },
        _ => f(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn call_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn call_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `k.row(...)` built for the widest instruction set this CPU has.
pub(super) fn row<K: RowKernel, T: Real>(k: &K, index: usize, a: &[T], b: &[T], out: &mut [T]) {
    row_on(Isa::widest(), k, index, a, b, out)
}

/// `k.row(...)` built for `isa`, or for the baseline where this CPU lacks
/// it.
pub(super) fn row_on<K: RowKernel, T: Real>(
    isa: Isa,
    k: &K,
    index: usize,
    a: &[T],
    b: &[T],
    out: &mut [T],
) {
    on(
        isa,
        #[inline(always)]
        || k.row(index, a, b, out),
    )
}
