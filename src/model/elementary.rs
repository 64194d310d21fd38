//! `exp` and `ln` for `f32` in plain arithmetic, so that loops calling
//! them vectorize and every CPU gives the same bits.
//!
//! Why not `f32::exp` and `f32::ln`: they are calls into libm, which no
//! compiler can vectorize across, and GELU (`tanh` through `exp`) and the
//! causal softmax made libm's `expf` and the scalar loops around it about
//! 12% of a miner's CPU time in the quickstart. And libm picks its code by
//! CPU features at run time (glibc has FMA builds of `expf` and `logf`),
//! so its last bit may differ between a miner's CPU and a validator's,
//! which the replay guarantee cannot have. Built from `+ - * /` and bit
//! moves only, these give the same bits on every x86-64 (or any IEEE) CPU
//! and at any vector width.
//!
//! The methods are Cephes' `expf` and `logf`. `exp`: `x = n ln 2 + r` with
//! `|r| <= ln 2 / 2` (`ln 2` split in two so `n ln 2` is exact), a
//! degree-7 polynomial for `e^r`, and `2^n` built in the exponent bits, in
//! two halves so that every `n` from subnormal results to overflow is
//! served by the same branch-free code. `ln`: `x = m 2^e` with `m` in
//! `[sqrt(1/2), sqrt(2))`, a degree-9 polynomial in `m - 1`, and `e ln 2`
//! added last in the same two halves. Errors: at most 2 units in the last
//! place (the tests sweep every 1/4096 of `exp`'s range and every 1021st
//! float for `ln`).

/// `1.5 * 2^23`: adding it rounds a float below `2^22` in size to an
/// integer, held in the low bits of the sum.
const ROUNDER: f32 = 12_582_912.0;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// `ln 2 = LN2_HI + LN2_LO`, `LN2_HI` with few enough bits that `n * LN2_HI`
/// is exact for every `n` used.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this `e^x` is 0 in `f32`, above the other `inf`: clamping to them
/// keeps `n` small enough for the exponent bits and changes no result.
const LOWEST: f32 = -104.0;
const HIGHEST: f32 = 89.0;

/// `e^x`, `x` a NaN giving NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    // `clamp` keeps a NaN (`max` and `min` would drop it).
    let x = x.clamp(LOWEST, HIGHEST);
    let rounded = x * LOG2_E + ROUNDER;
    let n = rounded - ROUNDER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * (r * r) + r + 1.0;
    // n sits in the low bits of `rounded`, offset by ROUNDER's bits.
    let n = (rounded.to_bits() as i32).wrapping_sub(ROUNDER.to_bits() as i32);
    let half = n >> 1;
    e_r * two_to(half) * two_to(n - half)
}

/// `2^k` for `-126 <= k <= 127`.
#[inline(always)]
fn two_to(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

/// `sqrt(1/2)`, where `ln`'s mantissa range starts.
const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// `ln x`: NaN for a NaN or `x < 0`, `-inf` for 0, `inf` for `inf`.
/// Not vectorized (the cross-entropy takes one a row), so it branches.
pub(crate) fn ln_f32(x: f32) -> f32 {
    if x.is_nan() || x < 0.0 {
        return f32::NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x == f32::INFINITY {
        return x;
    }
    // A subnormal is scaled by 2^23 into the normal range first.
    let (x, scaled) = match x < f32::MIN_POSITIVE {
        true => (x * 8_388_608.0, -23),
        false => (x, 0),
    };
    let bits = x.to_bits();
    // x = m 2^e with m in [1/2, 1), then moved into [sqrt(1/2), sqrt(2)).
    let mut e = (bits >> 23) as i32 - 126 + scaled;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let m = match m < SQRT_HALF {
        true => {
            e -= 1;
            m + m - 1.0
        }
        false => m - 1.0,
    };
    let z = m * m;
    let p = 7.037_683_6e-2;
    let p = p * m - 1.151_461e-1;
    let p = p * m + 1.167_699_9e-1;
    let p = p * m - 1.242_014_1e-1;
    let p = p * m + 1.424_932_3e-1;
    let p = p * m - 1.666_805_8e-1;
    let p = p * m + 2.000_071_5e-1;
    let p = p * m - 2.499_999_4e-1;
    let p = p * m + 3.333_333e-1;
    let e = e as f32;
    let y = p * m * z + e * LN2_LO - 0.5 * z;
    m + y + e * LN2_HI
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Units in the last place between `got` and the exact `want`.
    fn ulps(got: f32, want: f64) -> f64 {
        let spacing = f64::from(f32::EPSILON) * want.abs().max(f64::from(f32::MIN_POSITIVE));
        ((f64::from(got) - want) / spacing).abs()
    }

    #[test]
    fn exp_is_within_two_ulps_of_the_exact_value_across_the_normal_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.7 {
            let err = ulps(exp_f32(x), f64::from(x).exp());
            assert!(err <= 2.0, "exp({x}) = {} is {err} ulps off", exp_f32(x));
            worst = worst.max(err);
            x += 1.0 / 4096.0;
        }
        // Not a formula that happens to be close only at small arguments.
        assert!(worst > 0.0);
    }

    #[test]
    fn exp_overflows_underflows_and_propagates_nan_as_exp_does() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(1e30), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(-104.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        // Subnormal results are kept, not flushed (to within their spacing).
        let tiny = exp_f32(-100.0);
        assert!(tiny > 0.0 && tiny < f32::MIN_POSITIVE);
        assert!((f64::from(tiny) - (-100.0f64).exp()).abs() < 4.0 * 1.4e-45);
        // The largest finite result.
        let x = 88.72f32;
        assert!(exp_f32(x).is_finite() && ulps(exp_f32(x), f64::from(x).exp()) <= 2.0);
    }

    #[test]
    fn ln_is_within_two_ulps_of_the_exact_value_for_every_positive_float_sampled() {
        let mut worst = 0.0f64;
        // Every 1021st bit pattern from the smallest subnormal to the
        // largest finite float: every exponent, many mantissas.
        for bits in (1..0x7f80_0000u32)
            .step_by(1021)
            .chain([0x3f80_0001, 0x3f7f_ffff])
        {
            let x = f32::from_bits(bits);
            let want = f64::from(x).ln();
            let err = ulps(ln_f32(x), want);
            assert!(err <= 2.0, "ln({x:e}) = {:e} is {err} ulps off", ln_f32(x));
            worst = worst.max(err);
        }
        assert!(worst > 0.0);
        assert_eq!(ln_f32(1.0), 0.0);
    }

    #[test]
    fn ln_of_zero_negatives_infinity_and_nan_is_what_ln_gives() {
        assert_eq!(ln_f32(0.0), f32::NEG_INFINITY);
        assert_eq!(ln_f32(-0.0), f32::NEG_INFINITY);
        assert!(ln_f32(-1.0).is_nan());
        assert!(ln_f32(f32::NEG_INFINITY).is_nan());
        assert!(ln_f32(f32::NAN).is_nan());
        assert_eq!(ln_f32(f32::INFINITY), f32::INFINITY);
    }
}
