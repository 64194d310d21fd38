//! Element types and reduction kernels.
//!
//! Elements go on the wire as their in-memory bytes (`bytemuck` casts, no
//! per-element encoding), which is little-endian on every host this crate
//! builds for: big-endian targets are refused at compile time rather than
//! silently exchanging byte-swapped gradients.

#[cfg(target_endian = "big")]
compile_error!("swarmrun collectives send elements as native bytes and assume little-endian hosts");

use half::{bf16, f16};

/// How the values of one slot from all ranks are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Floats add in IEEE order fixed by the algorithm; integers wrap on overflow
    /// (input comes from the network, so it must not panic).
    Sum,
    /// `Sum`, then one division by the world size at the end. For `i32` this is
    /// integer division, rounding toward zero.
    Avg,
    /// Largest value; for floats a NaN loses to any number (`f32::max`).
    Max,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
}

/// A value collectives can move and reduce.
///
/// Sealed, because the frame format relies on every element being an even
/// number of bytes (see `frame.rs`) and because each type's arithmetic is a
/// decision: half floats accumulate a pair in `f32` (convert, combine,
/// convert back), so one reduction step rounds once, not twice.
pub trait Element: bytemuck::Pod + Send + Sync + sealed::Sealed {
    fn sum(self, other: Self) -> Self;
    fn max(self, other: Self) -> Self;
    /// Divides by the world size for [`ReduceOp::Avg`].
    fn div_count(self, count: usize) -> Self;
}

impl Element for f32 {
    fn sum(self, other: Self) -> Self {
        self + other
    }
    fn max(self, other: Self) -> Self {
        f32::max(self, other)
    }
    fn div_count(self, count: usize) -> Self {
        self / count as f32
    }
}

impl Element for i32 {
    fn sum(self, other: Self) -> Self {
        self.wrapping_add(other)
    }
    fn max(self, other: Self) -> Self {
        Ord::max(self, other)
    }
    fn div_count(self, count: usize) -> Self {
        // A world of more than i32::MAX ranks leaves every average at 0.
        i32::try_from(count).map_or(0, |c| self.wrapping_div(c))
    }
}

/// The integer sums of [`super::all_reduce_fixed_point`]: exact and
/// associative, so their result does not depend on the order of reduction.
impl Element for i64 {
    fn sum(self, other: Self) -> Self {
        self.wrapping_add(other)
    }
    fn max(self, other: Self) -> Self {
        Ord::max(self, other)
    }
    fn div_count(self, count: usize) -> Self {
        i64::try_from(count).map_or(0, |c| self.wrapping_div(c))
    }
}

/// bf16 and f16 share their arithmetic: through f32, rounded once per step.
macro_rules! half_element {
    ($t:ty) => {
        impl Element for $t {
            fn sum(self, other: Self) -> Self {
                <$t>::from_f32(self.to_f32() + other.to_f32())
            }
            fn max(self, other: Self) -> Self {
                <$t>::from_f32(self.to_f32().max(other.to_f32()))
            }
            fn div_count(self, count: usize) -> Self {
                <$t>::from_f32(self.to_f32() / count as f32)
            }
        }
    };
}
half_element!(bf16);
half_element!(f16);

/// `dst[i] = op(dst[i], src[i])`, or with a `base` `op(base[i], src[i])`,
/// where `src` holds the little-endian bytes of `dst.len()` elements
/// exactly as received (not necessarily aligned).
///
/// On the calling thread, with the widest vectors this CPU has, and never
/// split across rayon's pool: one core adds a received chunk at memory
/// speed, faster than any link delivers it, and the ranks of a host are
/// its parallelism (the pool's threads compete with the ranks' own).
/// Splitting 1 MiB chunks four ways over the pool bought nothing
/// measurable on a 64 MiB all-reduce over TCP on 4 ranks and 2 cores.
pub(crate) fn reduce_bytes<E: Element>(
    dst: &mut [E],
    base: Option<&[E]>,
    src: &[u8],
    op: ReduceOp,
) {
    debug_assert_eq!(std::mem::size_of_val(dst), src.len());
    crate::isa::on_widest(|| match op {
        ReduceOp::Sum | ReduceOp::Avg => combine(dst, base, src, E::sum),
        ReduceOp::Max => combine(dst, base, src, E::max),
    })
}

/// `dst[i] = f(base[i] or dst[i], src[i])` in one pass: a `base` read
/// where it lies instead of copied in first (that copy was 3.5% of the CPU
/// of a 64 MiB all-reduce over TCP on 4 ranks).
#[inline(always)]
fn combine<E: Element>(dst: &mut [E], base: Option<&[E]>, src: &[u8], f: impl Fn(E, E) -> E) {
    let src = src
        .chunks_exact(std::mem::size_of::<E>())
        .map(bytemuck::pod_read_unaligned::<E>);
    match base {
        Some(base) => dst
            .iter_mut()
            .zip(base)
            .zip(src)
            .for_each(|((d, &b), s)| *d = f(b, s)),
        None => dst.iter_mut().zip(src).for_each(|(d, s)| *d = f(*d, s)),
    }
}

/// Copies received bytes into typed elements.
pub(crate) fn copy_bytes<E: Element>(dst: &mut [E], src: &[u8]) {
    bytemuck::cast_slice_mut::<E, u8>(dst).copy_from_slice(src);
}

/// Finishes a reduced slice: `Avg` divides by `count` here, once per
/// element, after every rank's value has been added.
pub(crate) fn finish<E: Element>(slice: &mut [E], op: ReduceOp, count: usize) {
    if op == ReduceOp::Avg {
        slice.iter_mut().for_each(|x| *x = x.div_count(count));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats_add_through_f32_with_one_rounding() {
        let (a, b) = (f16::from_f32(2048.0), f16::from_f32(3.0));
        assert_eq!(a.sum(b), f16::from_f32(2051.0));
        assert_eq!(bf16::from_f32(1.5).sum(bf16::from_f32(2.25)).to_f32(), 3.75);
    }

    #[test]
    fn integer_sum_wraps_instead_of_panicking() {
        assert_eq!(i32::MAX.sum(1), i32::MIN);
    }

    #[test]
    fn integer_average_rounds_toward_zero() {
        assert_eq!((-7).div_count(2), -3);
        assert_eq!(7.div_count(2), 3);
    }

    #[test]
    fn reduce_reads_unaligned_bytes() {
        let src: Vec<u8> = [0u8]
            .into_iter()
            .chain(bytemuck::cast_slice(&[1.0f32, 2.0, 3.0]).iter().copied())
            .collect();
        let mut dst = [10.0f32, 20.0, 30.0];
        reduce_bytes(&mut dst, None, &src[1..], ReduceOp::Sum);
        assert_eq!(dst, [11.0, 22.0, 33.0]);
        reduce_bytes(&mut dst, None, &src[1..], ReduceOp::Max);
        assert_eq!(dst, [11.0, 22.0, 33.0]);
    }

    #[test]
    fn vectorized_reductions_give_the_element_by_element_result_to_the_last_element() {
        // Odd, so every vector width leaves a tail.
        let n = 3 * 65536 + 7;
        let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.37).collect();
        let b: Vec<f32> = (0..n).map(|i| (n - i) as f32 * 1.13).collect();
        let mut reduced = a.clone();
        reduce_bytes(&mut reduced, None, bytemuck::cast_slice(&b), ReduceOp::Sum);
        let serial: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_eq!(reduced, serial);
        let halves: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut reduced = halves.clone();
        reduce_bytes(
            &mut reduced,
            None,
            bytemuck::cast_slice(&halves),
            ReduceOp::Max,
        );
        assert_eq!(reduced, halves);
        // Onto a base in another buffer: whatever `dst` held is replaced.
        let mut onto = vec![f32::NAN; n];
        reduce_bytes(&mut onto, Some(&a), bytemuck::cast_slice(&b), ReduceOp::Sum);
        assert_eq!(onto, serial);
    }
}
