//! Loops built once more for AVX-512 and for AVX2, and the widest this
//! CPU has picked at run time.
//!
//! Why: the binary targets every x86-64, whose vectors are 4 floats wide
//! (SSE2), and most of our own hot loops (the model's row kernels,
//! gradient sketches, fixed-point encoding) are plain arithmetic that the
//! compiler vectorizes as wide as it is allowed to. Code that must give
//! the same bits on every CPU keeps its operations and their order the
//! same at every width; only the width changes.

/// The instruction sets code can be built for here, widest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    /// Whatever the binary was built for.
    Baseline,
}

impl Isa {
    /// Whether this CPU runs code built for `self`.
    pub fn here(self) -> bool {
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

    /// Every instruction set this CPU runs, widest first, the baseline
    /// last (detection is cached by std).
    pub fn available() -> impl Iterator<Item = Isa> {
        [Isa::Avx512, Isa::Avx2, Isa::Baseline]
            .into_iter()
            .filter(|isa| isa.here())
    }

    /// The widest this CPU runs.
    pub fn widest() -> Isa {
        Isa::available().next().unwrap_or(Isa::Baseline)
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
pub fn on<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
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
