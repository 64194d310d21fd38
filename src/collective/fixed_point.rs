//! A sum of `f32` contributions whose bits depend only on the set of
//! contributions: not on how they are spread over ranks, nor on the order
//! or algorithm that adds them.
//!
//! Why: in SWARM training, which miner computes a microbatch is drawn at
//! random and weighted by measured speed, so the gradients a miner sums
//! change from run to run. Float addition is not associative, so a plain
//! all-reduce would give other bits every run: a resumed job could not
//! repeat an uninterrupted one, one stage could not be compared with two,
//! and a validator could not replay an optimizer step.
//!
//! How: every contribution is rounded to a multiple of `2^-e`, where `e`
//! is fixed per segment (one parameter tensor) from the largest magnitude
//! any rank holds in it, agreed by a max all-reduce; the multiples are
//! added as `i64` (exact, hence associative) and converted back once. The
//! rounding step is `2^-42` of the segment's largest value, 2^18 times
//! finer than `f32` resolves at that value, and up to
//! [`MAX_CONTRIBUTIONS`] contributions fit in 63 bits without overflow.

use std::ops::Range;

use super::{all_reduce, AllReduceAlgorithm, Call, CollectiveError, ReduceOp, TAGS_PER_CALL};
use crate::isa::on_widest;
use crate::transport::Transport;

/// Most contributions (over all ranks) one sum may have.
pub const MAX_CONTRIBUTIONS: usize = 1 << 20;
/// Bits of one rounded contribution; with 20 bits of count, 62 in all.
const VALUE_BITS: i32 = 42;

/// Sets `out` to the sum of every rank's `parts`, each as long as `out`,
/// identically on every rank of `call`. `segments` cut `out` into pieces
/// with a scale each (parameter tensors: a tiny tensor keeps its precision
/// beside a large one). Uses the tags `call.tag .. call.tag + 2 *
/// TAGS_PER_CALL`.
///
/// A NaN or infinity anywhere makes every rank return
/// [`CollectiveError::NonFinite`] with the first such segment.
pub fn all_reduce_fixed_point<T: Transport + ?Sized>(
    call: Call<'_, T>,
    parts: &[&[f32]],
    segments: &[Range<usize>],
    out: &mut [f32],
) -> Result<(), CollectiveError> {
    let sums_call = Call {
        tag: call.tag + TAGS_PER_CALL,
        ..call
    };
    let scale = FixedPoint::agree(call, parts, segments, out.len())?;
    let mut sums = scale.encode(parts);
    all_reduce(
        sums_call,
        &mut sums,
        ReduceOp::Sum,
        AllReduceAlgorithm::Auto,
    )?;
    scale.decode(&sums, out);
    Ok(())
}

/// The scale of each segment of a fixed-point sum, agreed by every rank:
/// the pieces of [`all_reduce_fixed_point`] for callers that sum the
/// integers their own way (a checked, redundant all-reduce) or keep their
/// contribution for an audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedPoint {
    segments: Vec<Range<usize>>,
    exponents: Vec<i32>,
}

impl FixedPoint {
    /// Agrees on each segment's scale from the largest magnitude any rank's
    /// `parts` hold in it (a max all-reduce under `call.tag`), and checks
    /// that the contributions fit in 63 bits. `len` is every part's length.
    pub fn agree<T: Transport + ?Sized>(
        call: Call<'_, T>,
        parts: &[&[f32]],
        segments: &[Range<usize>],
        len: usize,
    ) -> Result<FixedPoint, CollectiveError> {
        check_arguments(parts, segments, len)?;
        // Largest magnitude per segment, then the local count in the last slot.
        let mut maxes = vec![0.0f32; segments.len()];
        for part in parts {
            for (m, x) in maxes.iter_mut().zip(segment_maxes(part, segments)) {
                *m = m.max(x);
            }
        }
        maxes.push(parts.len() as f32);
        let size = call.transport.size();
        all_reduce(call, &mut maxes, ReduceOp::Max, AllReduceAlgorithm::Auto)?;
        let most_per_rank = maxes.pop().unwrap_or(0.0) as usize;
        if most_per_rank.saturating_mul(size) > MAX_CONTRIBUTIONS {
            return Err(CollectiveError::InvalidArgument(format!(
                "up to {most_per_rank} contributions on each of {size} ranks: more than {MAX_CONTRIBUTIONS}"
            )));
        }
        FixedPoint::from_maxes(segments, &maxes)
    }

    /// The scales for contributions whose largest magnitude in each segment
    /// is at most `maxes` (from [`segment_maxes`] of every contribution):
    /// what [`FixedPoint::agree`] computes, for a caller that gathered the
    /// maxes itself.
    pub fn from_maxes(
        segments: &[Range<usize>],
        maxes: &[f32],
    ) -> Result<FixedPoint, CollectiveError> {
        FixedPoint::with_exponents(segments, scales_for(maxes)?)
    }

    /// Scales stated by someone else ([`FixedPoint::exponents`]).
    pub fn with_exponents(
        segments: &[Range<usize>],
        exponents: Vec<i32>,
    ) -> Result<FixedPoint, CollectiveError> {
        if exponents.len() != segments.len() {
            return Err(CollectiveError::InvalidArgument(format!(
                "{} scales for {} segments",
                exponents.len(),
                segments.len()
            )));
        }
        Ok(FixedPoint {
            segments: segments.to_vec(),
            exponents,
        })
    }

    /// Each segment's scale: values are rounded to multiples of `2^-e`.
    pub fn exponents(&self) -> &[i32] {
        &self.exponents
    }

    /// This rank's contribution: the sum of its `parts`, each rounded to
    /// its segment's scale, as integers.
    ///
    /// Block by block, every part added into the block's sums while they
    /// are in cache: adding one part at a time over the whole buffer read
    /// and wrote the sums once per part (a miner's close sums four or
    /// more passes). Each sum takes the same additions in the same order.
    pub fn encode(&self, parts: &[&[f32]]) -> Vec<i64> {
        /// Sums per block: 64 KiB of them, with a block of each part beside.
        const BLOCK: usize = 8 << 10;
        let len = self.segments.last().map_or(0, |s| s.end);
        let mut sums = vec![0i64; len];
        for (b, block) in sums.chunks_mut(BLOCK).enumerate() {
            let range = b * BLOCK..b * BLOCK + block.len();
            for part in parts {
                self.add_rounded(&part[range.clone()], range.clone(), block);
            }
        }
        sums
    }

    /// Adds `values`, the elements `range` of one contribution, rounded to
    /// their segments' scales, to `acc` (as long as `range`): one piece of
    /// [`FixedPoint::encode`], for checking a piece of a contribution.
    pub fn add_rounded(&self, values: &[f32], range: Range<usize>, acc: &mut [i64]) {
        for (seg, &e) in self.segments.iter().zip(&self.exponents) {
            let (start, end) = (seg.start.max(range.start), seg.end.min(range.end));
            if start >= end {
                continue;
            }
            let local = start - range.start..end - range.start;
            add_scaled(&values[local.clone()], 2f64.powi(e), &mut acc[local]);
        }
    }

    /// `out` = the integer `sums` back at each segment's scale.
    pub fn decode(&self, sums: &[i64], out: &mut [f32]) {
        for (seg, &e) in self.segments.iter().zip(&self.exponents) {
            let unscale = 2f64.powi(-e);
            for (o, &s) in out[seg.clone()].iter_mut().zip(&sums[seg.clone()]) {
                *o = (s as f64 * unscale) as f32;
            }
        }
    }
}

/// `acc[i] += round(values[i] * scale)`, rounding half away from zero,
/// each rounded value held within `±2^51` ([`ROUNDED_LIMIT`]), wrapping:
/// a contribution beyond the stated maxes (a cheater's) must give a wrong
/// sum, not a panic. `scale` is a power of two.
///
/// Built for the widest vectors this CPU has ([`on_widest`]), because
/// the plain `(x * scale).round() as i64` cannot be vectorized at all:
/// `f64::round` has no x86 instruction (a libm call per element), and the
/// saturating `as i64` stayed one element at a time even in an AVX-512
/// build; encoding was 3% of a miner's CPU, half of it in `round`. Every
/// build runs the same operations, so they give the same bits
/// ([`round_half_away`], [`integer_of`]).
fn add_scaled(values: &[f32], scale: f64, acc: &mut [i64]) {
    on_widest(
        #[inline(always)]
        || add_scaled_plain(values, scale, acc),
    )
}

#[inline(always)]
fn add_scaled_plain(values: &[f32], scale: f64, acc: &mut [i64]) {
    for (a, &x) in acc.iter_mut().zip(values) {
        let rounded = round_half_away(f64::from(x) * scale);
        // Not `clamp`, which keeps a NaN (refused before any encoding):
        // `max` sends it to a bound, the same on every path.
        #[allow(clippy::manual_clamp)]
        let held = rounded.max(-ROUNDED_LIMIT).min(ROUNDED_LIMIT);
        *a = a.wrapping_add(integer_of(held));
    }
}

/// The largest magnitude a rounded element keeps: far above the `2^42`
/// that [`VALUE_BITS`] gives an honest one, and the most [`integer_of`]
/// converts.
const ROUNDED_LIMIT: f64 = (1u64 << 51) as f64;

/// The integer `r` (integral, at most [`ROUNDED_LIMIT`] in magnitude) as
/// an `i64`, in two vector operations: adding `1.5 * 2^52` leaves the sum
/// between `2^52` and `2^53`, where a double's mantissa counts units, so
/// its bits less the constant's are `r`.
#[inline(always)]
fn integer_of(r: f64) -> i64 {
    const SHIFT: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
    ((r + SHIFT).to_bits() as i64).wrapping_sub(SHIFT.to_bits() as i64)
}

/// `y.round()` for `y` an `f32` times a power of two, in operations that
/// vectorize: `trunc(y ± 0.5)`. Such a `y` has at most 24 significant
/// bits, which makes this the rounding everywhere: below a half, `|y| <=
/// 0.5 - 2^-25` and the sum stays below 1; from a half to `2^51` the sum
/// needs at most 53 bits, so it is exact; from `2^51` up `y` is an even
/// integer that the half (exact, a tie to even, or below half an ulp)
/// leaves as it was. Infinities and NaN stay what they were.
#[inline(always)]
fn round_half_away(y: f64) -> f64 {
    (y + 0.5f64.copysign(y)).trunc()
}

/// The largest magnitude of `part` in each of `segments`; infinity for a
/// segment holding a NaN or an infinity.
pub fn segment_maxes(part: &[f32], segments: &[Range<usize>]) -> Vec<f32> {
    // A float's magnitude orders as its bits without the sign do, and
    // every infinity and NaN sits above every finite value: one integer
    // maximum, which the compiler vectorizes (a float fold with a branch
    // for non-finite values ran at 2.2 ns an element).
    const EXPONENT_ALL_ONES: u32 = 0x7f80_0000;
    segments
        .iter()
        .map(|seg| {
            let widest = part[seg.clone()]
                .iter()
                .map(|x| x.to_bits() & 0x7fff_ffff)
                .fold(0, u32::max);
            if widest >= EXPONENT_ALL_ONES {
                f32::INFINITY
            } else {
                f32::from_bits(widest)
            }
        })
        .collect()
}

/// Each segment's scale ([`FixedPoint::exponents`]) for contributions
/// whose largest magnitudes are `maxes`; a non-finite max is an error
/// naming its segment.
pub fn scales_for(maxes: &[f32]) -> Result<Vec<i32>, CollectiveError> {
    if let Some(segment) = maxes.iter().position(|m| !m.is_finite()) {
        return Err(CollectiveError::NonFinite { segment });
    }
    Ok(maxes.iter().map(|&m| exponent(m)).collect())
}

/// `e` such that `max * 2^e < 2^VALUE_BITS`, as large as possible in
/// powers of two; 0 for an all-zero segment.
fn exponent(max: f32) -> i32 {
    if max == 0.0 {
        return 0;
    }
    // max = f * 2^k with f in [0.5, 1), so max < 2^k.
    let k = max.log2().floor() as i32 + 1;
    VALUE_BITS - k
}

fn check_arguments(
    parts: &[&[f32]],
    segments: &[Range<usize>],
    len: usize,
) -> Result<(), CollectiveError> {
    if let Some(p) = parts.iter().find(|p| p.len() != len) {
        return Err(CollectiveError::InvalidArgument(format!(
            "a contribution of {} elements to a sum of {len}",
            p.len()
        )));
    }
    let mut next = 0;
    for seg in segments {
        if seg.start != next || seg.end < seg.start {
            return Err(CollectiveError::InvalidArgument(format!(
                "segment {seg:?} does not continue at {next}"
            )));
        }
        next = seg.end;
    }
    if next != len {
        return Err(CollectiveError::InvalidArgument(format!(
            "segments cover {next} of {len} elements"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa::{on, Isa};
    use crate::transport::LocalTransport;

    /// `per_rank[r]` are rank r's contributions; returns rank 0's result
    /// after checking every rank got the same bits.
    fn run(per_rank: Vec<Vec<Vec<f32>>>, segments: Vec<Range<usize>>) -> Vec<f32> {
        let n = per_rank.len();
        let len = segments.last().map_or(0, |s| s.end);
        let results = LocalTransport::run(LocalTransport::world(n), |t| {
            let mine = &per_rank[t.rank()];
            let parts: Vec<&[f32]> = mine.iter().map(Vec::as_slice).collect();
            let mut out = vec![0.0; len];
            all_reduce_fixed_point(Call::new(&t, 100), &parts, &segments, &mut out).unwrap();
            out
        });
        for r in &results {
            assert_eq!(
                r.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                results[0].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
        results[0].clone()
    }

    fn contributions(count: usize, len: usize) -> Vec<Vec<f32>> {
        let mut rng = crate::data::rng::SplitMix64::new(7, 0);
        (0..count)
            .map(|_| {
                (0..len)
                    .map(|i| {
                        let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                        // Segments of very different magnitudes.
                        if i < len / 2 {
                            u * 3.0
                        } else {
                            u * 1e-5
                        }
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_segments_max_is_its_largest_magnitude_and_infinity_past_any_finite_value() {
        let part = [
            -0.0,
            1e-40,
            -3.5,
            2.0,
            f32::MIN_POSITIVE,
            -f32::MAX,
            7.0,
            f32::NEG_INFINITY,
            1.0,
            f32::NAN,
            -f32::NAN,
            0.0,
        ];
        let segments = [0..2, 0..5, 4..6, 6..8, 8..10, 10..11, 11..12, 3..3, 0..1];
        let expected = [
            1e-40,
            3.5,
            f32::MAX,
            f32::INFINITY,
            f32::INFINITY,
            f32::INFINITY,
            0.0,
            0.0,
            0.0,
        ];
        let got = segment_maxes(&part, &segments);
        assert_eq!(got, expected);
        // Zero's sign is gone: a max is a magnitude.
        assert_eq!(got[8].to_bits(), 0);
    }

    #[test]
    fn the_sum_has_the_same_bits_however_contributions_are_spread_over_ranks() {
        let all = contributions(8, 1000);
        let segments = vec![0..500, 500..1000];
        let one_rank = run(vec![all.clone()], segments.clone());
        let spread = run(
            vec![
                vec![all[5].clone(), all[0].clone()],
                vec![all[1].clone(), all[7].clone(), all[3].clone()],
                vec![all[2].clone()],
                vec![all[6].clone(), all[4].clone()],
            ],
            segments.clone(),
        );
        let reversed: Vec<Vec<f32>> = all.iter().rev().cloned().collect();
        let three = run(
            vec![reversed[..3].to_vec(), vec![], reversed[3..].to_vec()],
            segments,
        );
        assert_eq!(one_rank, spread);
        assert_eq!(one_rank, three);
    }

    #[test]
    fn a_contribution_of_many_passes_is_their_rounded_sum_element_by_element() {
        // Longer than a few of encode's blocks, with segment ends off
        // their edges.
        let len = 30_001;
        let parts = contributions(5, len);
        let parts: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
        let segments = vec![0..7_000, 7_000..20_123, 20_123..len];
        // Bounds of every contribution's magnitudes (at most 1.5): the
        // scales matter here only in being the same for both sums.
        let scale = FixedPoint::from_maxes(&segments, &[1.5; 3]).expect("finite maxes give scales");
        let mut expected = vec![0i64; len];
        for part in &parts {
            scale.add_rounded(part, 0..len, &mut expected);
        }
        assert_eq!(scale.encode(&parts), expected);
    }

    #[test]
    fn the_sum_is_within_the_stated_rounding_of_the_exact_sum() {
        let all = contributions(6, 1000);
        let segments = vec![0..500, 500..1000];
        let got = run(vec![all[..2].to_vec(), all[2..].to_vec()], segments.clone());
        for seg in segments {
            let max = all
                .iter()
                .flat_map(|p| p[seg.clone()].iter())
                .fold(0.0f64, |m, x| m.max(f64::from(x.abs())));
            for i in seg {
                let exact: f64 = all.iter().map(|p| f64::from(p[i])).sum();
                // Each contribution rounded by at most 2^-42 of the
                // largest value, then the sum rounded once to f32.
                let bound = 6.0 * max / 2f64.powi(42) + exact.abs() / 2f64.powi(23);
                assert!(
                    (f64::from(got[i]) - exact).abs() <= bound,
                    "element {i}: {} vs {exact}",
                    got[i]
                );
            }
        }
    }

    #[test]
    fn a_nan_anywhere_is_reported_by_every_rank() {
        let mut all = contributions(2, 10);
        all[1][7] = f32::NAN;
        let results = LocalTransport::run(LocalTransport::world(2), |t| {
            let parts = [all[t.rank()].as_slice()];
            let mut out = vec![0.0; 10];
            all_reduce_fixed_point(Call::new(&t, 100), &parts, &[0..4, 4..10], &mut out)
                .unwrap_err()
                .to_string()
        });
        assert!(
            results.iter().all(|e| e.contains("segment 1")),
            "{results:?}"
        );
    }

    #[test]
    fn scaled_rounding_is_rounding_half_away_from_zero_on_every_path() {
        // Every 65521st float (all signs and exponents), the ties and
        // their neighbours, the specials; at scales from 2^-150 to 2^150,
        // against the plain rounding, held within 2^51.
        let mut xs: Vec<f32> = (0..=u32::MAX).step_by(65521).map(f32::from_bits).collect();
        for t in [0.5f32, 1.5, 2.5, 3.5, 4_194_304.5, 8_388_607.5] {
            xs.extend([t, -t, t.next_up(), t.next_down(), -t.next_up()]);
        }
        xs.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
        xs.extend([f32::MAX, f32::MIN, f32::MIN_POSITIVE, f32::from_bits(1)]);
        for e in (-150..=150).step_by(3) {
            let scale = 2f64.powi(e);
            let start: Vec<i64> = (0..xs.len() as i64).map(|i| i * 977 - 5000).collect();
            let held = |x: f32| match (f64::from(x) * scale).round() {
                y if y.is_nan() => -(1i64 << 51),
                y => (y as i64).clamp(-(1 << 51), 1 << 51),
            };
            let want: Vec<i64> = xs
                .iter()
                .zip(&start)
                .map(|(&x, &a)| a.wrapping_add(held(x)))
                .collect();
            for isa in Isa::available() {
                let mut got = start.clone();
                on(
                    isa,
                    #[inline(always)]
                    || add_scaled_plain(&xs, scale, &mut got),
                );
                for (i, (w, g)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(w, g, "{} at 2^{e} with {isa:?}", xs[i]);
                }
            }
            let mut widest = start;
            add_scaled(&xs, scale, &mut widest);
            assert_eq!(widest, want, "at 2^{e}");
        }
    }

    #[test]
    fn segments_that_do_not_cover_the_buffer_are_refused() {
        let parts = [&[1.0f32, 2.0, 3.0][..]];
        let mut out = [0.0; 3];
        let t = LocalTransport::world(1).pop().unwrap();
        let err =
            all_reduce_fixed_point(Call::new(&t, 0), &parts, &[0..1, 1..2], &mut out).unwrap_err();
        assert!(err.to_string().contains("cover 2 of 3"), "{err}");
    }
}
