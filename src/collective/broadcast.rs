//! Broadcast down a binomial tree rooted at `root`: log2(n) rounds, and
//! each chunk is forwarded as soon as it arrives, so a large buffer flows
//! down the tree as a pipeline instead of waiting at every level.

use super::element::Element;
use super::frame::{chunks, guarded, step, Merge};
use super::{Call, CollectiveError};
use crate::transport::Transport;

/// Copies `root`'s `buf` into every rank's `buf` (same length everywhere).
pub fn broadcast<T: Transport + ?Sized, E: Element>(
    c: Call<'_, T>,
    buf: &mut [E],
    root: usize,
) -> Result<(), CollectiveError> {
    let size = c.size();
    guarded(&c, || {
        if root >= size {
            return Err(CollectiveError::InvalidArgument(format!(
                "root {root} in a world of {size}"
            )));
        }
        // Ranks relative to the root: v's parent is v without its lowest set
        // bit, its children v + m for each power of two m below that bit.
        let v = (c.rank() + size - root) % size;
        let real = |v: usize| (v + root) % size;
        let parent = (v != 0).then(|| real(v & (v - 1)));
        let top = if v == 0 {
            size.next_power_of_two()
        } else {
            v & v.wrapping_neg()
        };
        // Biggest subtree first: it has the longest way down.
        let children: Vec<usize> = std::iter::successors(Some(top / 2), |m| Some(m / 2))
            .take_while(|&m| m > 0)
            .filter(|m| v + m < size)
            .map(|m| real(v + m))
            .collect();
        for r in chunks::<E>(buf.len()) {
            if let Some(parent) = parent {
                step(&c, None, Some((parent, &mut buf[r.clone()], Merge::Copy)))?;
            }
            for &child in &children {
                step(&c, Some((child, &buf[r.clone()])), None)?;
            }
        }
        Ok(())
    })
}
