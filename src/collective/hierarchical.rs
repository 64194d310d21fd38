//! Hierarchical all-reduce for worlds made of sites (a cluster, a lab box):
//! all-reduce inside each site over its fast fabric, all-reduce among the
//! site leaders (each site's lowest rank) over the slow links, broadcast
//! inside each site. Only one rank per site sends the buffer between
//! sites, instead of every rank.
//!
//! The result equals the flat [`all_reduce`]'s exactly for integers and for
//! `Max`; float sums are added in a different order (site by site) and may
//! differ from the flat result in the last bits, while still being
//! identical on every rank.

use super::all_reduce::{all_reduce, AllReduceAlgorithm};
use super::broadcast::broadcast;
use super::element::{finish, Element, ReduceOp};
use super::frame::{abort, guarded};
use super::group::Group;
use super::{Call, CollectiveError};
use crate::transport::Transport;

/// Reduces `buf` over all ranks with `op`, in place; `sites[r]` is the site
/// of rank `r`, the same table on every rank. Uses tags `tag` (inside
/// sites) and `tag + 1` (between leaders).
pub fn hierarchical_all_reduce<T: Transport + ?Sized, E: Element>(
    c: Call<'_, T>,
    buf: &mut [E],
    op: ReduceOp,
    sites: &[usize],
) -> Result<(), CollectiveError> {
    let (rank, size) = (c.rank(), c.size());
    let (site, leaders) = guarded(&c, || {
        if sites.len() != size {
            return Err(CollectiveError::InvalidArgument(format!(
                "{} site ids for {size} ranks",
                sites.len()
            )));
        }
        let site = Group::new(c.transport, (0..size).filter(|&r| sites[r] == sites[rank]))?;
        let is_leader = site.parent_rank(0) == rank;
        let leaders = is_leader
            .then(|| {
                Group::new(
                    c.transport,
                    (0..size).filter(|&r| !sites[..r].contains(&sites[r])),
                )
            })
            .transpose()?;
        Ok((site, leaders))
    })?;
    let in_site = c.within(&site, c.tag);
    let between = leaders.as_ref().map(|l| c.within(l, c.tag.wrapping_add(1)));
    // Avg divides once, by the whole world, after the last sum.
    let partial = if op == ReduceOp::Avg {
        ReduceOp::Sum
    } else {
        op
    };
    let result = (|| {
        all_reduce(in_site, buf, partial, AllReduceAlgorithm::Auto)?;
        if let Some(between) = between {
            all_reduce(between, buf, partial, AllReduceAlgorithm::Auto)?;
        }
        broadcast(in_site, buf, 0)
    })();
    // The phase that failed told its own group; tell the other one too.
    if let Err(e) = &result {
        abort(&in_site, e);
        if let Some(between) = &between {
            abort(between, e);
        }
    }
    result?;
    finish(buf, op, size);
    Ok(())
}
