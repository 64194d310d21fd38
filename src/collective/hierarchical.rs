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
use super::redundant::{all_reduce_redundant_checked, SliceCopies, SliceTamper};

/// Called by a site's leader with its site's partial result before it
/// goes to the other leaders: the hook for faults that forge it.
pub type PartialTamper<'a, E> = dyn Fn(&mut [E]) + Sync + 'a;

/// Hooks that change what a rank computes, for tests and faults.
#[derive(Default, Clone, Copy)]
pub struct Tampers<'a, E> {
    /// Applied to the slices this rank reduces inside its site.
    pub slices: Option<&'a SliceTamper<'a, E>>,
    /// Applied by a leader to its site's partial result.
    pub partial: Option<&'a PartialTamper<'a, E>>,
}
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
    let (site, leaders) = guarded(&c, || site_groups(&c, sites))?;
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
    finish(buf, op, c.size());
    Ok(())
}

/// What one rank knows after [`hierarchical_all_reduce_redundant_checked`].
#[derive(Debug, Clone, PartialEq)]
pub struct SitesCopies<E> {
    /// Its part in its site's redundant all-reduce (its site's members in
    /// ascending rank are that call's ranks).
    pub site: SliceCopies,
    /// For a site's leader: the site's partial result it contributed among
    /// the leaders, and its part in their redundant all-reduce (the leaders
    /// in ascending rank are that call's ranks).
    pub leader: Option<(Vec<E>, SliceCopies)>,
    /// Whether every copy of both levels, in every site, agreed: only then
    /// does `buf` hold the result.
    pub agreed: bool,
}

/// [`all_reduce_redundant_checked`] in two levels, for ranks spread over
/// sites (`sites[r]` is the site of rank `r`, the same table everywhere):
/// inside each site over its fabric, then among one leader per site (its
/// lowest rank) with the site's partial result, then a broadcast of the
/// result inside each site. Each level reduces every slice `copies` times
/// (at most the level's size) and compares the copies, so each can be
/// audited like a flat one; only the leaders send across sites. For
/// integers the result has the bits of the flat call's. Uses tags `tag`
/// to `tag + 2`.
pub fn hierarchical_all_reduce_redundant_checked<T: Transport + ?Sized, E: Element>(
    c: Call<'_, T>,
    buf: &mut [E],
    op: ReduceOp,
    copies: usize,
    sites: &[usize],
    tampers: Tampers<'_, E>,
) -> Result<SitesCopies<E>, CollectiveError> {
    let (site, leaders) = guarded(&c, || site_groups(&c, sites))?;
    let in_site = c.within(&site, c.tag);
    let between = leaders.as_ref().map(|l| c.within(l, c.tag.wrapping_add(1)));
    let told = c.within(&site, c.tag.wrapping_add(2));
    let result = (|| {
        let site_copies = all_reduce_redundant_checked(
            in_site,
            buf,
            op,
            copies.min(in_site.size()),
            tampers.slices,
        )?;
        // 1 where a copy disagreed: the leaders take the largest, so that
        // every site learns of a mismatch in any.
        let mut disagreed = [i64::from(site_copies.mismatch.is_some())];
        // A leader goes on whatever its site found, so that no other site
        // waits for it.
        let leader = match between {
            Some(between) => {
                if let Some(forge) = tampers.partial {
                    forge(buf);
                }
                let partial = buf.to_vec();
                let among = all_reduce_redundant_checked(
                    between,
                    buf,
                    op,
                    copies.min(between.size()),
                    None,
                )?;
                disagreed[0] |= i64::from(among.mismatch.is_some());
                all_reduce(
                    between,
                    &mut disagreed,
                    ReduceOp::Max,
                    AllReduceAlgorithm::Auto,
                )?;
                Some((partial, among))
            }
            None => None,
        };
        broadcast(told, &mut disagreed, 0)?;
        broadcast(told, buf, 0)?;
        Ok(SitesCopies {
            site: site_copies,
            leader,
            agreed: disagreed[0] == 0,
        })
    })();
    if let Err(e) = &result {
        abort(&in_site, e);
        if let Some(between) = &between {
            abort(between, e);
        }
    }
    result
}

/// The calling rank's site, and for a site's leader (its lowest rank) the
/// group of all leaders, in ascending rank. `sites[r]` is rank `r`'s site.
fn site_groups<'t, T: Transport + ?Sized>(
    c: &Call<'t, T>,
    sites: &[usize],
) -> Result<(Group<'t, T>, Option<Group<'t, T>>), CollectiveError> {
    let (rank, size) = (c.rank(), c.size());
    if sites.len() != size {
        return Err(CollectiveError::InvalidArgument(format!(
            "{} site ids for {size} ranks",
            sites.len()
        )));
    }
    let site = Group::new(c.transport, (0..size).filter(|&r| sites[r] == sites[rank]))?;
    let leaders = (site.parent_rank(0) == rank)
        .then(|| {
            Group::new(
                c.transport,
                (0..size).filter(|&r| !sites[..r].contains(&sites[r])),
            )
        })
        .transpose()?;
    Ok((site, leaders))
}
