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
//! A cheater that states plausible maxima for a wrong gradient is not seen
//! here; the uniform draw, which stays, is what catches it.

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

/// The number of maxima most passes state: a stage's parameter tensors.
fn usual_width(maxes: &[&[u32]]) -> Option<usize> {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for m in maxes {
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

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_tensor_whose_gradient_is_always_zero_flags_nobody() {
        let mut passes = honest(8);
        for p in &mut passes {
            p[2] = 0f32.to_bits();
        }
        assert!(scored(&passes).iter().all(|&x| x < THRESHOLD));
    }
}
