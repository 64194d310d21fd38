//! The row kernels compiled once more for AVX-512 and for AVX2, and the
//! widest this CPU has picked at run time (see [`crate::isa`]).
//!
//! Why: GELU, its gradient, the softmax and LayerNorm are loops of plain
//! arithmetic over rows of 64 to 512 floats that the compiler vectorizes
//! as wide as it is allowed to (gemm, our matmuls, picks its code the
//! same way). The bits do not change with the width: the kernels add in
//! a fixed order (the compiler never reorders float sums), each element's
//! arithmetic is the same IEEE operations, and `mul_add` is a fused
//! multiply-add rounded once on every path. So a validator on a CPU
//! without AVX-512 replays a miner's pass to the same bits.

use super::ops::{Real, RowKernel};
use crate::isa::{on, Isa};

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
