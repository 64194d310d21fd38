//! Who owns which slice of a buffer in reduce-scatter and all-gather.

use std::ops::Range;

use super::CollectiveError;

/// A buffer of `len()` elements cut into `parts()` consecutive slices; part
/// `i` belongs to rank `i`. Every rank of a call must use the same partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// `parts() + 1` ascending offsets from 0 to `len()`.
    offsets: Vec<usize>,
}

impl Partition {
    /// `parts` slices whose lengths differ by at most one, the longer ones
    /// first.
    ///
    /// # Panics
    /// If `parts` is 0: a world has at least one rank.
    pub fn equal(len: usize, parts: usize) -> Self {
        assert!(parts > 0, "a partition needs at least one part");
        let (base, extra) = (len / parts, len % parts);
        Partition {
            offsets: (0..=parts).map(|i| i * base + i.min(extra)).collect(),
        }
    }

    /// Slices proportional to `weights` (Hivemind's load balancing: a rank
    /// measured at half the throughput gets half the slice). Lengths are
    /// apportioned by largest remainder, ties to the lower rank, so they sum
    /// to `len`, each is within one of its exact share, and equal weights
    /// give exactly [`Partition::equal`].
    pub fn weighted(len: usize, weights: &[f64]) -> Result<Self, CollectiveError> {
        let invalid = |why: &str| Err(CollectiveError::InvalidArgument(format!("weights: {why}")));
        if weights.is_empty() {
            return invalid("none given");
        }
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return invalid("each must be finite and not negative");
        }
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            return invalid("at least one must be positive");
        }
        let quotas: Vec<f64> = weights.iter().map(|w| len as f64 * w / total).collect();
        // `as` saturates, and the clamp keeps rounding noise from overshooting.
        let mut lens: Vec<usize> = quotas
            .iter()
            .map(|q| (q.floor() as usize).min(len))
            .collect();
        let mut by_remainder: Vec<usize> = (0..weights.len()).collect();
        by_remainder.sort_by(|&a, &b| {
            let (ra, rb) = (quotas[a] - quotas[a].floor(), quotas[b] - quotas[b].floor());
            rb.total_cmp(&ra).then(a.cmp(&b))
        });
        let short = len.saturating_sub(lens.iter().sum());
        for &i in by_remainder.iter().cycle().take(short) {
            lens[i] += 1;
        }
        Ok(Self::from_lens(&lens))
    }

    /// Slices of the given lengths, in order.
    pub fn from_lens(lens: &[usize]) -> Self {
        let offsets = std::iter::once(0)
            .chain(lens.iter().scan(0usize, |end, l| {
                *end = end.saturating_add(*l);
                Some(*end)
            }))
            .collect();
        Partition { offsets }
    }

    /// Number of slices.
    pub fn parts(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Total length covered.
    pub fn len(&self) -> usize {
        self.offsets[self.parts()]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element range of part `i`.
    pub fn range(&self, i: usize) -> Range<usize> {
        self.offsets[i]..self.offsets[i + 1]
    }

    /// Range spanning parts `parts.start..parts.end` (consecutive slices are contiguous).
    pub(crate) fn span(&self, parts: Range<usize>) -> Range<usize> {
        self.offsets[parts.start]..self.offsets[parts.end]
    }

    /// Checks that this partition fits a call on `size` ranks over `len` elements.
    pub(crate) fn check(&self, size: usize, len: usize) -> Result<(), CollectiveError> {
        if self.parts() != size || self.len() != len {
            return Err(CollectiveError::InvalidArgument(format!(
                "partition of {} elements into {} parts used for {len} elements on {size} ranks",
                self.len(),
                self.parts()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lens(p: &Partition) -> Vec<usize> {
        (0..p.parts()).map(|i| p.range(i).len()).collect()
    }

    #[test]
    fn equal_split_gives_the_remainder_to_the_first_ranks() {
        assert_eq!(lens(&Partition::equal(10, 4)), [3, 3, 2, 2]);
        assert_eq!(lens(&Partition::equal(2, 4)), [1, 1, 0, 0]);
    }

    #[test]
    fn equal_weights_split_equally_even_when_they_do_not_add_up_exactly() {
        for len in [0, 1, 7, 10, 1009] {
            for n in 1..=9 {
                let w = Partition::weighted(len, &vec![0.1; n]).unwrap();
                assert_eq!(w, Partition::equal(len, n), "len {len}, n {n}");
            }
        }
    }

    #[test]
    fn weighted_lengths_are_proportional_and_sum_to_len() {
        let p = Partition::weighted(1000, &[1.0, 3.0, 0.0, 4.0]).unwrap();
        assert_eq!(lens(&p), [125, 375, 0, 500]);
        let p = Partition::weighted(10, &[1.0, 1.0, 1.0]).unwrap();
        assert_eq!(lens(&p), [4, 3, 3]);
        let p = Partition::weighted(101, &[0.5, 0.25, 0.25]).unwrap();
        assert_eq!(lens(&p), [51, 25, 25]);
        assert_eq!(p.len(), 101);
    }

    #[test]
    fn unusable_weights_are_refused() {
        for w in [
            &[][..],
            &[0.0, 0.0],
            &[1.0, -1.0],
            &[f64::NAN],
            &[f64::INFINITY],
        ] {
            assert!(matches!(
                Partition::weighted(5, w),
                Err(CollectiveError::InvalidArgument(_))
            ));
        }
    }
}
