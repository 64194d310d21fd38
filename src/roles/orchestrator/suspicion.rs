//! Which passes' receipts stand out from their stage's, so that validators
//! replay those on top of the uniform draw.
//!
//! A uniform draw at `replay_rate` 0.05 finds a miner that cheats on one
//! pass in ten within three windows in only about 4 runs of 10; replaying
//! enough passes uniformly to reach 99% would cost validators half the
//! miners' compute. But every receipt states the largest gradient
//! magnitude of each parameter tensor, and the passes of one stage in one
//! window run on the same weights over microbatches of the same corpus:
//! their maxima agree to a factor of about 1.3 (a robust spread of 0.2-0.5
//! in log2 units, measured on `bench trust`'s model), and a cheat moves
//! them all. Random gradients,
//! skipped work (zeros), scaled gradients and a stale pass's copy stated
//! as new each leave a mark there, so replaying the few passes whose maxima
//! stand out catches those cheats in the window they happen, at the cost
//! of the replays alone.
//!
//! Maxima say nothing of signs: a negated gradient (a miner pushing the
//! model uphill) states the honest maxima. With its reduction, each miner
//! also states a count sketch of each pass's gradient
//! (`audit::gradient_sketch`, with a seed the `Close` order draws after
//! the receipts), whose inner products estimate the gradients'; one
//! microbatch's gradient points
//! with the sum of its stage's other passes in the window, and a negated
//! one against it. How far with depends on how much of a microbatch's
//! gradient is the stage's common direction and how much its own noise,
//! which grows as training converges: on `bench trust`'s model the
//! median cosine was 0.22 and 0.65 (first and second stage) over windows
//! 0-50, 0.08 and 0.24 over 50-200, 0.04 and 0.05 over 400-600, when a
//! negated pass is as likely as an honest one to look negated. The
//! direction is used only in a stage and window whose cosines say it
//! tells something, their median well above zero and above their spread
//! ([`telling`]); otherwise it would spend replays on honest passes and
//! catch little.
//!
//! A cheater that states plausible maxima and a plausible sketch for a
//! wrong gradient is not seen here; the sketch is bound to the gradient
//! by the contribution check (which recomputes the probed chunks' entries
//! of every credited pass), the maxima only by replays, and the uniform
//! draw, which stays, catches both.

use std::collections::{BTreeMap, BTreeSet};

/// How far a pass's log2 maxima must sit from its stage's medians, as the
/// root mean square over tensors of the distance in robust spreads, to be
/// replayed. Measured (honest passes; cheats on `bench trust`'s model):
/// honest passes of a `bench trust` run scored at most 2.0 (952 passes),
/// of the quickstart 3.6 (480), of a 6-microbatch, 3-miner test job 7.6
/// (1 of 720 above 6); random gradients 9.4 or more, gradients times 10
/// 10.2 or more. The root mean square rather than the largest distance:
/// one tensor's maximum (an embedding's, say) swings with the tokens a
/// microbatch holds, while a cheat moves every tensor.
pub const THRESHOLD: f64 = 6.0;

/// The spread below which a tensor's maxima count as agreeing exactly
/// (log2 units): a few passes, or a tensor whose gradient is always zero,
/// would otherwise make any difference infinitely suspicious.
const MIN_SPREAD: f64 = 0.25;

/// Scale from a median absolute deviation to a normal's standard deviation.
const MAD_TO_SIGMA: f64 = 1.4826;

/// How far each of one stage's passes stands out: `maxes[i]` is pass i's
/// stated maxima (f32 bits, as in a receipt), in the order the passes ran.
/// The score is the root mean square, over parameter tensors, of the
/// distance of its log2 maximum from the passes' median in robust spreads
/// (the median absolute deviation, scaled to a standard deviation); a pass that
/// states exactly the maxima of an earlier pass (a stale copy sent again)
/// or another number of maxima than most passes scores infinity.
pub fn scores(maxes: &[&[u32]]) -> Vec<f64> {
    let Some(width) = usual_width(maxes) else {
        return Vec::new();
    };
    let logs: Vec<Option<Vec<f64>>> = maxes
        .iter()
        .map(|m| (m.len() == width).then(|| m.iter().map(|&b| log2_max(b)).collect()))
        .collect();
    let columns: Vec<(f64, f64)> = (0..width)
        .map(|j| {
            let column: Vec<f64> = logs.iter().flatten().map(|l| l[j]).collect();
            let mid = median(column.clone());
            let spread = median(column.iter().map(|x| (x - mid).abs()).collect()) * MAD_TO_SIGMA;
            (mid, spread.max(MIN_SPREAD))
        })
        .collect();
    let mut seen: BTreeSet<&[u32]> = BTreeSet::new();
    maxes
        .iter()
        .zip(&logs)
        .map(|(stated, logs)| {
            let Some(logs) = logs else {
                return f64::INFINITY;
            };
            if !seen.insert(stated) {
                return f64::INFINITY;
            }
            let squares: f64 = logs
                .iter()
                .zip(&columns)
                .map(|(x, (mid, spread))| ((x - mid) / spread).powi(2))
                .sum();
            (squares / width.max(1) as f64).sqrt()
        })
        .collect()
}

/// How far below zero the cosine of a pass's sketch with the sum of its
/// stage's other passes' must be for it to be replayed (where the stage's
/// cosines say directions tell, [`telling`]). Measured with
/// honest runs' cosines, a negated pass taken as the negated cosine: on
/// `bench trust`'s model over windows 0-5, no honest pass below it and
/// 95% of negated ones (over 0-50: 3.3% and 57% on the first stage, 0%
/// and 98% on the second); on the quickstart over 300 windows, 1.4% and
/// 72%. At -0.05 the quickstart replayed twice as many honest passes
/// (0.21 a window against its 0.4 uniform ones) for 79%.
pub const DIRECTION_THRESHOLD: f64 = -0.15;

/// The median cosine of a stage's passes in a window below which their
/// directions tell too little to replay by. Measured on `bench trust`'s
/// model over windows 0-50, first stage: median 0.22, 12% of honest
/// passes below [`DIRECTION_THRESHOLD`], 78% of negated ones; over windows
/// 50-200, median 0.08: 27% and 55%.
pub const DIRECTION_MIN_MEDIAN: f64 = 0.1;

/// How many robust spreads (the median distance of the cosines above the
/// median from it, scaled to a standard deviation) the median cosine of a
/// stage's passes in a window must stand above zero for their directions
/// to tell. A negated pass
/// sits about as far below zero as honest ones sit above it, so where the
/// median is small beside the spread, honest passes reach the threshold
/// about as often as negated ones. Measured on `bench trust`'s model over
/// 1000 honest windows (256 passes each), a negated pass taken as the
/// negated cosine: with the median alone (at least
/// [`DIRECTION_MIN_MEDIAN`]), 2.74% of honest passes were replayed (4.95%
/// over windows 200-400, where the median was 0.08-0.11 against a spread of
/// about 0.2) for 17% of negated ones; with this too, 0.03% for 94% over
/// windows 0-3, 88% over 3-10, 59% over 10-50 and 39% over 50-100, and
/// none after window 200, where directions no longer tell. On the
/// quickstart (4 passes a stage) over 300 windows: 1.17% of honest
/// passes for 68% of negated ones with the median alone, 0.62% for 47%
/// with this (where [`DIRECTION_SPREAD_PASSES`] leaves the median alone).
pub const DIRECTION_MIN_SPREADS: f64 = 1.5;

/// The fewest passes in a stage and window whose cosines' spread is judged
/// ([`DIRECTION_MIN_SPREADS`]); with fewer, the median alone decides. A
/// spread from a handful of cosines is noise: in a test job of 6 passes a
/// stage, honest cosines of 0.17-0.44 beside a negated pass at -0.50
/// measured as untelling, and a miner negating half its passes went
/// uncaught for 6 windows in 1 run of 8. Few passes are few replays.
pub const DIRECTION_SPREAD_PASSES: usize = 16;

/// How far each of one stage's passes stands out, in units of the
/// threshold it is held to: the larger of its [`scores`] over
/// [`THRESHOLD`] and, where the directions tell (see [`telling`]), its
/// [`directions`] over [`DIRECTION_THRESHOLD`]. One or more is a suspect.
pub fn standing(maxes: &[&[u32]], sketches: &[&[u32]]) -> Vec<f64> {
    let by_maxima = scores(maxes);
    let by_direction = directions(sketches);
    let telling = telling(&by_direction);
    (0..maxes.len())
        .map(|i| {
            let m = by_maxima.get(i).map_or(0.0, |s| s / THRESHOLD);
            // A misshapen sketch stays a certain lie in any stage.
            let d = match by_direction.get(i) {
                Some(c) if telling || c.is_infinite() => c / DIRECTION_THRESHOLD,
                _ => 0.0,
            };
            m.max(d)
        })
        .collect()
}

/// The cosine of each pass's stated sketch (f32 bits, as miners state it)
/// with the sum of the other passes' sketches: 0 where either is zero (no
/// evidence either way), negative infinity for a sketch of another length
/// than most passes state or with an entry not finite (left out of the
/// others' sums: one pass must not blind the check for its stage; a
/// replay tells whether its gradient really was not finite).
pub fn directions(sketches: &[&[u32]]) -> Vec<f64> {
    let Some(width) = usual_width(sketches) else {
        return Vec::new();
    };
    let floats: Vec<Option<Vec<f64>>> = sketches
        .iter()
        .map(|s| {
            let f: Vec<f64> = s.iter().map(|&b| f64::from(f32::from_bits(b))).collect();
            (f.len() == width && f.iter().all(|x| x.is_finite())).then_some(f)
        })
        .collect();
    let mut total = vec![0.0f64; width];
    for f in floats.iter().flatten() {
        for (t, x) in total.iter_mut().zip(f) {
            *t += x;
        }
    }
    floats
        .iter()
        .map(|f| {
            let Some(own) = f else {
                return f64::NEG_INFINITY;
            };
            let (mut dot, mut own_sq, mut rest_sq) = (0.0, 0.0, 0.0);
            for (x, t) in own.iter().zip(&total) {
                let rest = t - x;
                dot += x * rest;
                own_sq += x * x;
                rest_sq += rest * rest;
            }
            let cosine = dot / (own_sq * rest_sq).sqrt();
            if cosine.is_finite() {
                cosine
            } else {
                0.0
            }
        })
        .collect()
}

/// Whether a stage's `cosines` (its passes' [`directions`]) tell a negated
/// pass from an honest one: their median is at least
/// [`DIRECTION_MIN_MEDIAN`] and, with [`DIRECTION_SPREAD_PASSES`] or more,
/// [`DIRECTION_MIN_SPREADS`] robust spreads.
/// The spread is taken from the cosines above the median alone: negated
/// passes sit below it, and in a stage of a few passes a cheater's
/// would otherwise widen the spread until its own stage looked untelling.
pub fn telling(cosines: &[f64]) -> bool {
    let finite: Vec<f64> = cosines.iter().copied().filter(|c| c.is_finite()).collect();
    let mid = median(finite.clone());
    if mid < DIRECTION_MIN_MEDIAN {
        return false;
    }
    if finite.len() < DIRECTION_SPREAD_PASSES {
        return true;
    }
    let above: Vec<f64> = finite
        .iter()
        .filter(|&&c| c >= mid)
        .map(|c| c - mid)
        .collect();
    mid >= DIRECTION_MIN_SPREADS * median(above) * MAD_TO_SIGMA
}

/// The length most passes' lists (maxima or sketches) have: a stage's
/// parameter tensors, or its sketch's entries.
fn usual_width(lists: &[&[u32]]) -> Option<usize> {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for m in lists {
        *counts.entry(m.len()).or_default() += 1;
    }
    counts.into_iter().max_by_key(|&(_, n)| n).map(|(w, _)| w)
}

/// log2 of a stated maximum, with zero and the NaN marker (infinity) held
/// to finite extremes so that they compare as far from any real maximum.
fn log2_max(bits: u32) -> f64 {
    let x = f64::from(f32::from_bits(bits));
    if x.is_nan() {
        return 128.0;
    }
    x.abs()
        .clamp(f64::from(f32::MIN_POSITIVE), 2f64.powi(128))
        .log2()
}

/// The median of `values` (0 for none), by selecting the middle instead
/// of sorting: the orchestrator takes one for every tensor's maxima and
/// every sketch's cosine of a stage, every window, and sorting them was
/// its second cost on `bench trust`'s job. The same order statistics as
/// a sort, so the same bits.
fn median(mut values: Vec<f64>) -> f64 {
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    let (below, &mut mid, _) = values.select_nth_unstable_by(n / 2, f64::total_cmp);
    if !n.is_multiple_of(2) {
        return mid;
    }
    // The other middle value is the largest of those below.
    let lower = below.iter().copied().max_by(f64::total_cmp).unwrap_or(mid);
    (lower + mid) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_median_is_the_middle_of_the_sorted_values_bit_for_bit() {
        let mut rng = crate::data::rng::SplitMix64::new(3, 0);
        for n in 0..40 {
            let mut values: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
            // Ties, signed zeros and a NaN among them.
            if n > 4 {
                values[1] = values[0];
                values[2] = 0.0;
                values[3] = -0.0;
                values[4] = f64::NAN;
            }
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let want = match n {
                0 => 0.0,
                n if n % 2 == 1 => sorted[n / 2],
                n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
            };
            assert_eq!(median(values).to_bits(), want.to_bits(), "{n} values");
        }
    }

    /// `n` honest-looking passes: maxima near 2^-3..2^-9 per tensor, each
    /// pass off by up to 10% and no two alike.
    fn honest(n: usize) -> Vec<Vec<u32>> {
        (0..n)
            .map(|i| {
                (0..8i32)
                    .map(|j| {
                        let phase = (i as f32 * 0.618_034 + j as f32 * 0.414).fract();
                        let wobble = 1.0 + 0.2 * (phase - 0.5);
                        (2f32.powi(-3 - j) * wobble).to_bits()
                    })
                    .collect()
            })
            .collect()
    }

    fn scored(passes: &[Vec<u32>]) -> Vec<f64> {
        let refs: Vec<&[u32]> = passes.iter().map(Vec::as_slice).collect();
        scores(&refs)
    }

    #[test]
    fn honest_passes_of_one_stage_stay_below_the_threshold() {
        for n in [2, 4, 32, 128] {
            let s = scored(&honest(n));
            assert!(s.iter().all(|&x| x < THRESHOLD), "{n} passes: {s:?}");
        }
    }

    #[test]
    fn random_zero_scaled_and_repeated_gradients_stand_out() {
        let mut passes = honest(32);
        // Random gradients of 1e-3 have maxima near 4e-3 in every tensor.
        passes[3] = vec![4e-3f32.to_bits(); 8];
        passes[9] = vec![0f32.to_bits(); 8];
        passes[17] = passes[16]
            .iter()
            .map(|&b| (f32::from_bits(b) * 10.0).to_bits())
            .collect();
        passes[25] = passes[20].clone();
        passes[30] = vec![f32::INFINITY.to_bits(); 8];
        passes[31] = passes[31][..5].to_vec();
        let s = scored(&passes);
        let flagged: Vec<usize> = (0..s.len()).filter(|&i| s[i] >= THRESHOLD).collect();
        assert_eq!(flagged, [3, 9, 17, 25, 30, 31], "{s:?}");
    }

    /// `n` honest-looking sketches of `width` entries: a direction the
    /// stage's gradient shares plus twice as much of each pass's own
    /// (cosines with the others' sum near 0.45).
    fn sketches(n: usize, width: usize) -> Vec<Vec<f32>> {
        sketches_sharing(n, width, 1.0)
    }

    /// `sketches` with `shared` of the common direction (0: noise alone).
    fn sketches_sharing(n: usize, width: usize, shared: f64) -> Vec<Vec<f32>> {
        let mut rng = crate::data::rng::SplitMix64::new(3, n as u64);
        let common: Vec<f64> = (0..width).map(|_| shared * rng.normal()).collect();
        (0..n)
            .map(|_| {
                common
                    .iter()
                    .map(|s| (s + 2.0 * rng.normal()) as f32 * 1e-3)
                    .collect()
            })
            .collect()
    }

    fn bits(sketches: &[Vec<f32>]) -> Vec<Vec<u32>> {
        sketches
            .iter()
            .map(|p| p.iter().map(|x| x.to_bits()).collect())
            .collect()
    }

    fn directed(passes: &[Vec<f32>]) -> Vec<f64> {
        let bits = bits(passes);
        let refs: Vec<&[u32]> = bits.iter().map(Vec::as_slice).collect();
        directions(&refs)
    }

    #[test]
    fn negated_gradients_point_against_their_stage_and_honest_ones_do_not() {
        for n in [8, 32, 128] {
            let mut passes = sketches(n, 256);
            let honest = directed(&passes);
            assert!(
                honest.iter().all(|&c| c > -DIRECTION_THRESHOLD),
                "{n} passes: {honest:?}"
            );
            for i in [1, 5] {
                passes[i] = passes[i].iter().map(|x| -x).collect();
            }
            let c = directed(&passes);
            let flagged: Vec<usize> = (0..n).filter(|&i| c[i] < DIRECTION_THRESHOLD).collect();
            assert_eq!(flagged, [1, 5], "{n} passes: {c:?}");
        }
    }

    #[test]
    fn a_zero_sketch_is_no_evidence_and_a_misshapen_one_a_certain_lie() {
        let mut passes = sketches(16, 64);
        passes[2] = vec![0.0; 64];
        passes[3][7] = f32::NAN;
        passes[4].truncate(60);
        let c = directed(&passes);
        assert_eq!(c[2], 0.0);
        assert_eq!(c[3], f64::NEG_INFINITY);
        assert_eq!(c[4], f64::NEG_INFINITY);
        // The others are still judged, on the finite sketches alone.
        let judged = (0..16).filter(|i| ![2, 3, 4].contains(i));
        assert!(
            judged.map(|i| c[i]).all(|x| x > -DIRECTION_THRESHOLD),
            "{c:?}"
        );
    }

    /// `standing` of 32 honest maxima, pass 6's scaled, and of `sketches`
    /// with pass 2's negated: the passes standing out.
    fn standing_out(mut sketches: Vec<Vec<f32>>) -> Vec<usize> {
        let maxes = honest(32);
        let mut maxes_refs: Vec<&[u32]> = maxes.iter().map(Vec::as_slice).collect();
        let scaled = vec![1.0f32.to_bits(); 8];
        maxes_refs[6] = &scaled;
        sketches[2] = sketches[2].iter().map(|x| -x).collect();
        let bits = bits(&sketches);
        let sketch_refs: Vec<&[u32]> = bits.iter().map(Vec::as_slice).collect();
        let s = standing(&maxes_refs, &sketch_refs);
        (0..32).filter(|&i| s[i] >= 1.0).collect()
    }

    #[test]
    fn a_pass_stands_out_by_its_maxima_or_its_direction() {
        assert_eq!(standing_out(sketches(32, 256)), [2, 6]);
    }

    #[test]
    fn directions_are_not_judged_where_a_stages_gradients_share_none() {
        // Noise alone: a negated pass looks like any other, and replaying
        // the passes that happen to point away would catch nothing.
        let noise = sketches_sharing(32, 16, 0.0);
        let pointing_away = directed(&noise)
            .iter()
            .filter(|&&c| c < DIRECTION_THRESHOLD)
            .count();
        assert!(pointing_away >= 2, "{pointing_away}");
        assert_eq!(standing_out(noise), [6]);
    }

    #[test]
    fn directions_are_not_judged_where_honest_ones_spread_past_their_median() {
        // Some common direction, but each pass's own noise spreads the
        // cosines about as far as their median: the median alone would
        // judge them, and replay honest passes that happen to point away.
        let passes = sketches_sharing(32, 16, 0.4);
        let c = directed(&passes);
        assert!(median(c.clone()) >= DIRECTION_MIN_MEDIAN, "{c:?}");
        assert!(c.iter().any(|&x| x < DIRECTION_THRESHOLD), "{c:?}");
        assert!(!telling(&c));
        assert_eq!(standing_out(passes), [6]);
        // With a few passes, their spread is noise, and the median decides.
        let mut spread_wide: Vec<f64> = (0..DIRECTION_SPREAD_PASSES - 1)
            .map(|i| -0.3 + 0.08 * i as f64)
            .collect();
        assert!(median(spread_wide.clone()) >= DIRECTION_MIN_MEDIAN);
        assert!(telling(&spread_wide));
        spread_wide.push(0.26);
        assert!(!telling(&spread_wide));
        assert!(telling(&directed(&sketches_sharing(32, 16, 1.0))));
    }

    #[test]
    fn a_tensor_whose_gradient_is_always_zero_flags_nobody() {
        let mut passes = honest(8);
        for p in &mut passes {
            p[2] = 0f32.to_bits();
        }
        assert!(scored(&passes).iter().all(|&x| x < THRESHOLD));
    }
}
