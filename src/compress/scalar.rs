//! The per-element arithmetic of the codec: the contract that the CPU
//! reference (`quant.rs`) and the CUDA kernels (`kernels/quant.cu`) both
//! follow, operation for operation, so that a GPU and a CPU produce the
//! same codes bit for bit. Every step is one IEEE-754 operation with
//! round-to-nearest-even (or an exact one: floor, integer clamps), which
//! both sides compute identically; the kernel spells each one as an
//! intrinsic (`__fmul_rn`, `__fadd_rn`, `__fdiv_rn`) so that the CUDA
//! compiler may not fuse a multiply and an add into one FMA.

use half::f16;

/// `|x|` as bits: for non-negative floats the integer order of the bits is
/// the numeric order, and NaNs sort above infinity, so one integer max over
/// a row gives its absolute maximum and tells whether it holds a NaN or an
/// infinity, in a loop the compiler vectorizes on plain SSE2.
#[inline(always)]
pub(crate) fn abs_bits(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// Bits of `+inf`: an `abs_bits` at or above it is not a finite number.
pub(crate) const INF_BITS: u32 = 0x7f80_0000;

/// The f16 scale of a row whose absolute maximum is `absmax`: `absmax /
/// qmax` rounded *up* to f16, so that `absmax / scale <= qmax` and no code
/// is clamped by the scale's own rounding (the error bound stays `scale /
/// 2`), and a tiny non-zero row never gets a zero scale. Infinite when
/// `absmax / qmax` is past f16's range (65504).
/// CUDA: `__fdiv_rn` then `cvt.rp.f16.f32`.
pub(crate) fn scale_for(absmax: f32, qmax: i32) -> f16 {
    let exact = absmax / qmax as f32;
    let nearest = f16::from_f32(exact);
    if nearest.to_f32() >= exact {
        nearest
    } else {
        // Positive and finite here (`exact` is not NaN), so the next f16
        // up is the next bit pattern: f16's order is its bits' order.
        f16::from_bits(nearest.to_bits() + 1)
    }
}

/// What the quantizer multiplies by: `1 / scale`, or 0 for an all-zero
/// row (scale 0), whose codes are then all 0 without a division by zero.
#[inline(always)]
pub(crate) fn inverse(scale: f32) -> f32 {
    if scale > 0.0 {
        1.0 / scale
    } else {
        0.0
    }
}

/// `1.5 * 2^23`: adding it to an `|v| < 2^22` leaves `v` rounded to the
/// nearest integer, ties to even (the FPU's rounding mode), in the low
/// mantissa bits, in a way plain SSE2 vectorizes (it has no `roundps`).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `v` rounded to the nearest integer, ties to even, for `|v| < 2^22`
/// (codes are within `qmax * (1 + 2^-23)`). CUDA: `__float2int_rn`.
#[inline(always)]
pub(crate) fn round_even(v: f32) -> i32 {
    ((v + ROUND_MAGIC).to_bits() as i32) - (ROUND_MAGIC.to_bits() as i32)
}

/// The round-to-nearest code of `x` given `inv = inverse(scale)`. The
/// clamp comes before rounding, in floats (`minps`/`maxps` on plain SSE2,
/// which has no 32-bit integer min or max); since `|x * inv| <= qmax (1 +
/// 2^-23)`, it gives the code of rounding first and clamping after, as the
/// kernel does.
#[inline(always)]
pub(crate) fn code_nearest(x: f32, inv: f32, qmax: i32) -> i32 {
    let q = qmax as f32;
    round_even((x * inv).clamp(-q, q))
}

/// The stochastic code of `x`: `floor(x / scale + u)` with `u` uniform in
/// `[0, 1)` from `(seed, index)`, which rounds up with probability equal to
/// the fractional part, so the code is unbiased: `E[code * scale] = x`.
#[inline(always)]
pub(crate) fn code_stochastic(x: f32, inv: f32, qmax: i32, seed: u64, index: u64) -> i32 {
    ((x * inv + uniform(seed, index)).floor() as i32).clamp(-qmax, qmax)
}

/// SplitMix64's increment (the golden ratio in 64 bits).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// A uniform `f32` in `[0, 1)` (24 random bits, so exact) for element
/// `index` under `seed`: SplitMix64's output at position `index + 1` of the
/// stream started at `seed`. Counter-based, so any thread of any device
/// computes any element's draw with no shared state.
#[inline(always)]
pub(crate) fn uniform(seed: u64, index: u64) -> f32 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 * (1.0 / 16_777_216.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_even_matches_std_ties_to_even_across_the_code_range() {
        let mut v = -130.0f32;
        while v <= 130.0 {
            assert_eq!(round_even(v), v.round_ties_even() as i32, "{v}");
            v += 0.125 / 3.0;
        }
        for tie in [-2.5f32, -1.5, -0.5, 0.5, 1.5, 2.5, 126.5] {
            assert_eq!(round_even(tie), tie.round_ties_even() as i32, "{tie}");
        }
    }

    #[test]
    fn scale_is_never_below_absmax_over_qmax() {
        for absmax in [1e-9f32, 3e-5, 0.1, 1.0, 7.0, 123.456, 4e5] {
            for qmax in [7, 127] {
                let s = scale_for(absmax, qmax).to_f32();
                assert!(s >= absmax / qmax as f32, "{absmax} {qmax} {s}");
                assert!(s > 0.0);
            }
        }
        assert_eq!(scale_for(0.0, 127).to_f32(), 0.0);
        assert!(scale_for(1e6, 7).is_infinite());
    }

    #[test]
    fn uniform_draws_lie_in_the_unit_interval_and_average_one_half() {
        let n = 100_000;
        let sum: f64 = (0..n)
            .map(|i| {
                let u = uniform(42, i);
                assert!((0.0..1.0).contains(&u));
                u as f64
            })
            .sum();
        assert!((sum / n as f64 - 0.5).abs() < 0.01);
        assert_ne!(uniform(1, 0), uniform(2, 0));
    }
}
