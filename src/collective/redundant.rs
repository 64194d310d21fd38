//! Redundant all-reduce, for swarms where a rank may lie about its share of
//! the work: every slice is reduced by `copies` ranks (its owner and the
//! next `copies - 1`), each copy's blake3 digest goes to everyone, and the
//! result is distributed only if all copies agree.
//!
//! Each holder receives the slice straight from every rank and adds the
//! contributions in rank order, so honest copies are bit-identical whoever
//! computes them. The price is `copies` times the reduce-scatter traffic.
//!
//! Once the copies agree, each owner hands its slice straight to every
//! rank, and every rank checks each slice it receives against the digest
//! its holders agreed on. Where every rank holds every slice (`copies` =
//! world size, as with two miners a stage and the default two copies),
//! each keeps its own copies instead: nothing is handed out, which saves
//! the hand-out's traffic and leaves a forger nothing to forge. In a
//! [`Signing`] call each owner first signs a statement of what it hands out
//! (one Ed25519 signature per call), so a rank handed a wrong slice holds
//! its owner's own signature of the wrong digest: a proof ([`WrongSlice`])
//! anyone with the owner's key can check, where "it sent me something
//! else" alone would be one rank's word against another's.

use serde::{Deserialize, Serialize};

use super::all_gather::exchange_small;
use super::element::{finish, Element, ReduceOp};
use super::frame::{guarded, step, Merge};
use super::partition::Partition;
use super::{Call, CollectiveError};
use crate::signing::{self, SigningKey};
use crate::transport::Transport;

/// Called with each slice a rank has reduced (slice index, values) before
/// it is digested: the hook for tests and for faults that corrupt a result.
pub type SliceTamper<'a, E> = dyn Fn(usize, &mut [E]) + Sync + 'a;

/// [`all_reduce`](super::all_reduce) of `buf` over an equal partition, with
/// each slice reduced by `copies` ranks (1 ≤ copies ≤ world size) and
/// checked. On [`CollectiveError::SliceMismatch`], which every rank reports
/// alike, `buf` holds no result.
pub fn all_reduce_redundant<T: Transport + ?Sized, E: Element>(
    c: Call<'_, T>,
    buf: &mut [E],
    op: ReduceOp,
    copies: usize,
    tamper: Option<&SliceTamper<'_, E>>,
) -> Result<(), CollectiveError> {
    match all_reduce_redundant_checked(c, buf, op, copies, tamper)?.mismatch {
        Some((slice, ranks)) => Err(CollectiveError::SliceMismatch { slice, ranks }),
        None => Ok(()),
    }
}

/// How the ranks of a signed call vouch for the slices they hand out.
#[derive(Clone, Copy)]
pub struct Signing<'a> {
    /// This rank's key.
    pub own: &'a SigningKey,
    /// Each rank's public key (hex), in the call's rank order, as the
    /// caller trusts them (a swarm's orchestrator hands them out): the
    /// keys a [`WrongSlice`] is checked against. `None` where unknown:
    /// that rank's statements prove nothing.
    pub keys: &'a [Option<String>],
}

/// What a rank does when it hands out its slice after the copies agreed.
pub struct Handing<'a, E> {
    /// Sign a statement of it, and check the others' against their keys.
    pub signing: Option<Signing<'a>>,
    /// Called with its slice (index, values) just before it is handed out:
    /// the hook for faults that forge it.
    pub tamper: Option<&'a SliceTamper<'a, E>>,
    /// Called with its slice after its statement is signed: a forgery the
    /// signature does not cover, for faults that deny what they did.
    pub deniable: Option<&'a SliceTamper<'a, E>>,
}

impl<E> Default for Handing<'_, E> {
    fn default() -> Self {
        Handing {
            signing: None,
            tamper: None,
            deniable: None,
        }
    }
}

/// Proof that the owner of `slice` handed out something other than the
/// copy its holders agreed on: its own signed statement of the digest of
/// what it handed out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrongSlice {
    /// The slice, whose owner is the call's rank of the same number.
    pub slice: usize,
    /// BLAKE3 (hex) of the values the owner says it handed out.
    pub digest: String,
    /// The owner's signature (hex) of that statement.
    pub signature: String,
}

/// What a signature of a handed-out slice covers besides the statement.
const HANDED_DOMAIN: &[u8] = b"swarmrun handed slice v1\n";

/// The statement an owner signs: in the call under `tag`, it handed out
/// `slice` with BLAKE3 `digest` (hex).
fn handed_statement(tag: u64, slice: usize, digest: &str) -> Vec<u8> {
    [
        &tag.to_le_bytes()[..],
        &(slice as u64).to_le_bytes(),
        digest.as_bytes(),
    ]
    .concat()
}

impl WrongSlice {
    /// Whether this proves its slice's owner, whose key is `key` (hex),
    /// handed out in the call under `tag` a slice other than the copy
    /// `agreed` (BLAKE3 hex) its holders stated.
    pub fn proves(&self, key: &str, tag: u64, agreed: &str) -> bool {
        self.digest != agreed
            && signing::verify(
                key,
                &self.signature,
                HANDED_DOMAIN,
                &handed_statement(tag, self.slice, &self.digest),
            )
    }
}

/// What one rank knows after [`all_reduce_redundant_checked`]: enough for
/// an auditor to tell, by recomputing a slice from the contributions, which
/// holders reduced it wrong, including holders that agreed on a wrong copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceCopies {
    /// Each slice this rank reduced, ascending, and its copy's blake3 (of
    /// the elements' native bytes).
    pub held: Vec<(usize, blake3::Hash)>,
    /// The first slice whose copies differ, with the holders against the
    /// majority (all of them when there is none), as outer ranks. `None`:
    /// the copies agreed and the buffer holds the result.
    pub mismatch: Option<(usize, Vec<usize>)>,
    /// In a signed call whose copies agreed: the slices handed to this
    /// rank that are not the agreed copies, each with its owner's proof.
    /// When any, `buf` holds no result.
    pub wrong: Vec<WrongSlice>,
}

impl SliceCopies {
    /// Whether `buf` holds the result: the copies agreed and every slice
    /// handed out was the agreed one.
    pub fn holds_result(&self) -> bool {
        self.mismatch.is_none() && self.wrong.is_empty()
    }
}

/// [`all_reduce_redundant`] that reports a mismatch, with this rank's copy
/// digests, instead of failing on it: the caller decides who is believed.
/// On a mismatch `buf` is left as it was given (this rank's contribution).
pub fn all_reduce_redundant_checked<T: Transport + ?Sized, E: Element>(
    c: Call<'_, T>,
    buf: &mut [E],
    op: ReduceOp,
    copies: usize,
    tamper: Option<&SliceTamper<'_, E>>,
) -> Result<SliceCopies, CollectiveError> {
    all_reduce_redundant_moved(
        c,
        buf,
        (op, copies),
        tamper,
        Handing::default(),
        &mut OverTransport,
    )
}

/// How the slices of a redundant all-reduce move: over the call's
/// transport ([`OverTransport`]), or through another fabric (NCCL between
/// GPUs, `crate::gpu::nccl`). Digests, their comparison and the blame go
/// over the call's transport either way, so a mover only carries values.
pub trait SliceMover<E: Element> {
    /// Each slice in `held` (ascending) reduced over every rank's
    /// `data[part.range(j)]` with `op`, `how` being `(part, copies, op)`,
    /// the same bits on every holder; every
    /// rank of the call takes part for every slice, held or not.
    fn reduce_held<T: Transport + ?Sized>(
        &mut self,
        c: &Call<'_, T>,
        data: &[E],
        how: (&Partition, usize, ReduceOp),
        held: &[usize],
    ) -> Result<Vec<Vec<E>>, CollectiveError>;

    /// Every rank's slice `buf[part.range(rank)]` to every rank, straight
    /// from its owner (so that a wrong slice has one rank to answer for it).
    fn all_gather<T: Transport + ?Sized>(
        &mut self,
        c: &Call<'_, T>,
        buf: &mut [E],
        part: &Partition,
    ) -> Result<(), CollectiveError>;
}

/// Slices over the call's transport: each holder receives its slices
/// straight from every rank and adds them in rank order; each owner sends
/// its reduced slice straight to every rank.
pub struct OverTransport;

impl<E: Element> SliceMover<E> for OverTransport {
    fn reduce_held<T: Transport + ?Sized>(
        &mut self,
        c: &Call<'_, T>,
        data: &[E],
        (part, copies, op): (&Partition, usize, ReduceOp),
        held: &[usize],
    ) -> Result<Vec<Vec<E>>, CollectiveError> {
        std::thread::scope(|s| {
            let sender = s.spawn(|| send_slices(c, data, part, copies));
            let reduced: Result<Vec<Vec<E>>, _> = held
                .iter()
                .map(|&j| reduce_in_rank_order(c, data, part, j, op))
                .collect();
            let sent = sender
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            sent.and(reduced)
        })
    }

    fn all_gather<T: Transport + ?Sized>(
        &mut self,
        c: &Call<'_, T>,
        buf: &mut [E],
        part: &Partition,
    ) -> Result<(), CollectiveError> {
        let (rank, n) = (c.rank(), c.size());
        let own = buf[part.range(rank)].to_vec();
        std::thread::scope(|s| {
            // In round k every rank sends to the k-th rank after it and
            // receives from the k-th before it: pairs meet, nobody queues.
            let sender = s
                .spawn(|| (1..n).try_for_each(|k| step(c, Some(((rank + k) % n, &own[..])), None)));
            let received = (1..n).try_for_each(|k| {
                let from = (rank + n - k) % n;
                step(
                    c,
                    None,
                    Some((from, &mut buf[part.range(from)], Merge::Copy)),
                )
            });
            let sent = sender
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            received.and(sent)
        })
    }
}

/// [`all_reduce_redundant_checked`] with the slices moved by `mover`, and
/// the agreed slices handed out as `handing` says.
///
/// A slice handed to this rank that is not the agreed copy ends the call
/// with [`CollectiveError::UnprovedSlice`] naming its owner, unless its
/// owner's signed statement proves it: it is then in [`SliceCopies::wrong`].
pub fn all_reduce_redundant_moved<T: Transport + ?Sized, E: Element, M: SliceMover<E>>(
    c: Call<'_, T>,
    buf: &mut [E],
    (op, copies): (ReduceOp, usize),
    tamper: Option<&SliceTamper<'_, E>>,
    handing: Handing<'_, E>,
    mover: &mut M,
) -> Result<SliceCopies, CollectiveError> {
    let (rank, n) = (c.rank(), c.size());
    guarded(&c, || {
        if copies == 0 || copies > n {
            return Err(CollectiveError::InvalidArgument(format!(
                "{copies} copies of each slice in a world of {n}"
            )));
        }
        let part = Partition::equal(buf.len(), n);
        let held = held_slices(rank, n, copies);
        let mut reduced = mover.reduce_held(&c, buf, (&part, copies, op), &held)?;
        let mut digests = Vec::with_capacity(blake3::OUT_LEN * held.len());
        let mut copy_digests = Vec::with_capacity(held.len());
        for (&j, slice) in held.iter().zip(&mut reduced) {
            finish(slice, op, n);
            if let Some(tamper) = tamper {
                tamper(j, slice);
            }
            let digest = blake3::hash(bytemuck::cast_slice(slice));
            digests.extend_from_slice(digest.as_bytes());
            copy_digests.push((j, digest));
        }
        let table = exchange_small(&c, &digests)?;
        let mismatch = first_mismatch(&table, n, copies)
            .map(|(slice, ranks)| (slice, ranks.into_iter().map(|r| c.outer(r)).collect()));
        let mut wrong = Vec::new();
        if mismatch.is_none() && copies == n {
            // Every rank reduced every slice and every copy agrees: each
            // keeps its own, and nobody's hand-out needs trusting.
            for (&j, slice) in held.iter().zip(&reduced) {
                buf[part.range(j)].copy_from_slice(slice);
            }
        } else if mismatch.is_none() {
            let own = held.iter().position(|&j| j == rank).unwrap_or_default();
            buf[part.range(rank)].copy_from_slice(&reduced[own]);
            if let Some(tamper) = handing.tamper {
                tamper(rank, &mut buf[part.range(rank)]);
            }
            let statements = match &handing.signing {
                Some(signing) => Some(state_handed(&c, &buf[part.range(rank)], signing)?),
                None => None,
            };
            if let Some(deny) = handing.deniable {
                deny(rank, &mut buf[part.range(rank)]);
            }
            mover.all_gather(&c, buf, &part)?;
            let agreed = |j: usize| agreed_copy(&table, j, n, copies);
            wrong = check_handed(&c, buf, &part, agreed, statements.as_deref(), &handing)?;
        }
        Ok(SliceCopies {
            held: copy_digests,
            mismatch,
            wrong,
        })
    })
}

/// Signs the statement of the slice this rank hands out and exchanges it
/// for every rank's: each rank's (digest hex, signature hex).
fn state_handed<T: Transport + ?Sized, E: Element>(
    c: &Call<'_, T>,
    handed: &[E],
    signing: &Signing<'_>,
) -> Result<Vec<(String, String)>, CollectiveError> {
    let digest = blake3::hash(bytemuck::cast_slice(handed))
        .to_hex()
        .to_string();
    let signature = signing
        .own
        .sign(HANDED_DOMAIN, &handed_statement(c.tag, c.rank(), &digest));
    let mine = [digest.as_bytes(), signature.as_bytes()].concat();
    exchange_small(c, &mine)?
        .into_iter()
        .enumerate()
        .map(|(from, said)| {
            let at = blake3::OUT_LEN * 2;
            match (said.get(..at), said.get(at..)) {
                (Some(d), Some(s)) => Ok((
                    String::from_utf8_lossy(d).into_owned(),
                    String::from_utf8_lossy(s).into_owned(),
                )),
                _ => Err(CollectiveError::Protocol {
                    rank: c.outer(from),
                    reason: "short statement of its slice".into(),
                }),
            }
        })
        .collect()
}

/// Checks every slice handed to this rank against the copy its holders
/// agreed on (`agreed(j)`); returns the wrong ones its owners' signed
/// statements prove, and fails on a wrong one nothing proves.
fn check_handed<T: Transport + ?Sized, E: Element>(
    c: &Call<'_, T>,
    buf: &[E],
    part: &Partition,
    agreed: impl Fn(usize) -> blake3::Hash,
    statements: Option<&[(String, String)]>,
    handing: &Handing<'_, E>,
) -> Result<Vec<WrongSlice>, CollectiveError> {
    let mut wrong = Vec::new();
    for j in (0..c.size()).filter(|&j| j != c.rank()) {
        let expected = agreed(j).to_hex().to_string();
        let proof = statements
            .and_then(|st| st.get(j))
            .map(|(d, s)| WrongSlice {
                slice: j,
                digest: d.clone(),
                signature: s.clone(),
            });
        let key = handing
            .signing
            .and_then(|s| s.keys.get(j).cloned().flatten());
        match (proof, key) {
            (Some(proof), Some(key)) if proof.proves(&key, c.tag, &expected) => wrong.push(proof),
            _ => {
                let got = blake3::hash(bytemuck::cast_slice(&buf[part.range(j)]));
                if got != agreed(j) {
                    return Err(CollectiveError::UnprovedSlice {
                        rank: c.outer(j),
                        slice: j,
                    });
                }
            }
        }
    }
    Ok(wrong)
}

/// The copy digest slice `j`'s holders agreed on (its owner's, as every
/// holder's is the same when there is no mismatch).
fn agreed_copy(table: &[Vec<u8>], j: usize, n: usize, copies: usize) -> blake3::Hash {
    let at = held_slices(j, n, copies)
        .iter()
        .position(|&s| s == j)
        .unwrap_or_default();
    let bytes: [u8; blake3::OUT_LEN] = table[j][at * blake3::OUT_LEN..(at + 1) * blake3::OUT_LEN]
        .try_into()
        .unwrap_or([0; blake3::OUT_LEN]);
    blake3::Hash::from(bytes)
}

/// Ranks that reduce slice `j` of an [`all_reduce_redundant`] among `n`
/// ranks with `copies` copies: its owner `j` first, then the next ranks
/// around.
pub fn slice_holders(j: usize, n: usize, copies: usize) -> Vec<usize> {
    holders(j, n, copies).collect()
}

/// Ranks that reduce slice `j`: its owner first.
fn holders(j: usize, n: usize, copies: usize) -> impl Iterator<Item = usize> {
    (0..copies).map(move |k| (j + k) % n)
}

/// Slices `rank` reduces, ascending: the order in which every sender sends
/// them and so the order in which they arrive.
fn held_slices(rank: usize, n: usize, copies: usize) -> Vec<usize> {
    let mut held: Vec<usize> = (0..copies).map(|k| (rank + n - k) % n).collect();
    held.sort_unstable();
    held
}

fn send_slices<T: Transport + ?Sized, E: Element>(
    c: &Call<'_, T>,
    data: &[E],
    part: &Partition,
    copies: usize,
) -> Result<(), CollectiveError> {
    let (rank, n) = (c.rank(), c.size());
    for j in 0..n {
        for holder in holders(j, n, copies).filter(|&h| h != rank) {
            step(c, Some((holder, &data[part.range(j)])), None)?;
        }
    }
    Ok(())
}

/// Slice `j` summed as `((x0 + x1) + x2) + ...`, the same on every holder.
fn reduce_in_rank_order<T: Transport + ?Sized, E: Element>(
    c: &Call<'_, T>,
    data: &[E],
    part: &Partition,
    j: usize,
    op: ReduceOp,
) -> Result<Vec<E>, CollectiveError> {
    let mut acc = vec![E::zeroed(); part.range(j).len()];
    for k in 0..c.size() {
        let merge = if k == 0 {
            Merge::Copy
        } else {
            Merge::Reduce(op)
        };
        if k == c.rank() {
            let len = acc.len();
            merge.apply(&mut acc, 0..len, bytemuck::cast_slice(&data[part.range(j)]));
        } else {
            step(c, None, Some((k, &mut acc[..], merge)))?;
        }
    }
    Ok(acc)
}

/// The first slice whose copies differ, with the holders that disagree with
/// the majority digest, or all its holders if no digest has a majority.
/// `table[r]` holds rank r's digests in [`held_slices`] order.
fn first_mismatch(table: &[Vec<u8>], n: usize, copies: usize) -> Option<(usize, Vec<usize>)> {
    (0..n).find_map(|j| {
        let votes: Vec<(usize, &[u8])> = holders(j, n, copies)
            .map(|h| {
                let at = held_slices(h, n, copies)
                    .iter()
                    .position(|&s| s == j)
                    .unwrap_or_default();
                (
                    h,
                    &table[h][at * blake3::OUT_LEN..(at + 1) * blake3::OUT_LEN],
                )
            })
            .collect();
        let count = |d: &[u8]| votes.iter().filter(|(_, e)| *e == d).count();
        let majority = votes
            .iter()
            .map(|(_, d)| *d)
            .find(|d| 2 * count(d) > copies);
        let mut dissent: Vec<usize> = votes
            .iter()
            .filter(|(_, d)| Some(*d) != majority)
            .map(|(h, _)| *h)
            .collect();
        dissent.sort_unstable();
        (!dissent.is_empty()).then_some((j, dissent))
    })
}
