//! A validator: follows the orders, and on `Audit` replays the passes
//! given to it from what their miners send, reporting one verdict each; on
//! `Recompute` sums all-reduce slices from the miners' contributions and
//! judges the copies the slices' holders stated.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Instant;

use rayon::prelude::*;

use super::audit::{self, Bundle};
use super::device::StageDevice;
use super::leader::{Leader, Waited};
use super::liveness;
use super::protocol::{
    self, slice_digest, AuditTask, CheckpointTask, Order, Report, SliceTask, Verdict,
};
use super::train::{adamw_config, inject_planned_fault, Setup, TrainError};
use crate::collective::Partition;
use crate::config::JobSpec;
use crate::ledger::{Countersigner, LedgerError, SigningKey};
use crate::model::StageModel;
use crate::pipeline::BoundaryCodec;
use crate::transport::Transport;

/// Follows the leader's orders until told to stop, replaying passes on
/// `device` (a GPU miner's passes are routed to validators on a GPU).
pub fn validate<T: Transport + ?Sized>(
    t: &T,
    spec: &JobSpec,
    device: StageDevice,
) -> Result<(), TrainError> {
    liveness::following_leader(t, spec, |leader| follow_orders(leader, spec, device))
}

fn follow_orders<T: Transport + ?Sized>(
    leader: &Leader<'_, T>,
    spec: &JobSpec,
    mut device: StageDevice,
) -> Result<(), TrainError> {
    let t = leader.transport();
    let setup = Setup::new(spec)?;
    let codec = setup.codec(spec);
    let key = SigningKey::generate()?;
    tracing::info!("ledger: countersigning with key {}", key.public_hex());
    let run_dir = spec.job.run_dir();
    let mut countersigner =
        Countersigner::create(&run_dir, key).map_err(|source| LedgerError::Io {
            path: run_dir.clone(),
            source,
        })?;
    // Parameters of each stage, once known.
    let mut layouts: BTreeMap<usize, Vec<Range<usize>>> = BTreeMap::new();
    let mut loaded = LoadedWeights::default();
    let checks = check_pool();
    // An order that came while this validator waited on a miner.
    let mut next: Option<Order> = None;
    loop {
        let order = match next.take() {
            Some(order) => {
                // Replays put off for another attempt are moot now.
                let moving_on = order.attempt();
                leader.forget_put_off(|o| {
                    matches!(o, Order::Audit { .. }) && o.attempt() != moving_on
                });
                order
            }
            None => leader.order()?,
        };
        next = match order {
            Order::Stop => return Ok(()),
            Order::Countersign { window, line } => {
                // A line it will not sign stays without its signature,
                // which `swarmrun audit` shows; the run goes on.
                if let Err(e) = countersigner.countersign(&line) {
                    tracing::warn!("validator: window {window}'s ledger line: {e}");
                }
                None
            }
            Order::Run {
                window, attempt: 0, ..
            } => {
                inject_planned_fault(spec, t.rank(), window);
                None
            }
            Order::Audit {
                window,
                attempt,
                tasks,
                weights,
            } => {
                let mine = tasks.into_iter().filter(|a| a.validator == t.rank());
                let mut by_miner: BTreeMap<usize, Vec<AuditTask>> = BTreeMap::new();
                for task in mine {
                    by_miner.entry(task.miner).or_default().push(task);
                }
                let replay = |(miner, tasks)| {
                    replay_passes(
                        leader,
                        (&setup, &codec, &mut device, &mut loaded),
                        (window, attempt, &checks),
                        miner,
                        tasks,
                        &weights,
                    )
                };
                each_reported(leader, by_miner, replay)?
            }
            Order::Step {
                window,
                attempt,
                audits,
                ..
            } => {
                let mine = audits.into_iter().filter(|a| a.validator == t.rank());
                let audit = |task| audit_checkpoint(leader, spec, &setup, (window, attempt), task);
                each_reported(leader, mine, audit)?
            }
            Order::Recompute {
                window,
                attempt,
                tasks,
            } => {
                // Every slice's data first (the miners mostly sent it
                // beside the all-reduce), then the slices judged side by
                // side on the check pool: the miners wait for the step.
                let (mut received, mut superseded) = (Vec::new(), None);
                for task in tasks.into_iter().filter(|a| a.validator == t.rank()) {
                    let segments = stage_segments(&setup, &mut layouts, task.stage)?.to_vec();
                    match receive_slice(leader, window, attempt, &task) {
                        Ok(got) => received.push((task, got, segments)),
                        Err(Halt::Superseded(order)) => {
                            superseded = Some(*order);
                            break;
                        }
                        Err(Halt::Failed(e)) => return Err(e),
                    }
                }
                // Each slice's span inside this rank's, on whichever
                // thread judges it.
                let rank_span = tracing::Span::current();
                let chunks = spec.roles.contribution_chunks;
                let checked = audit::CheckedStatements::default();
                let judged: Vec<_> = checks.install(|| {
                    received
                        .par_iter()
                        .map(|(task, got, segments)| {
                            let probes = (&segments[..], chunks, &checked);
                            let judge = || judge_slice((window, attempt), task, probes, got);
                            rank_span.in_scope(judge)
                        })
                        .collect()
                });
                for ((task, _, _), (verdicts, replay_s)) in received.into_iter().zip(judged) {
                    leader.report(&Report::Recomputed {
                        window,
                        attempt,
                        task: Box::new(task),
                        verdicts,
                        replay_s,
                    })?;
                }
                superseded
            }
            // Every other order is for miners.
            _ => None,
        };
    }
}

/// Why a check did not finish.
enum Halt {
    Failed(TrainError),
    /// The orchestrator moved on while the check waited on a miner (a
    /// lost or evicted miner, a new attempt): the order it gave, which the
    /// validator follows instead of finishing a moot check.
    Superseded(Box<Order>),
}

impl<E: Into<TrainError>> From<E> for Halt {
    fn from(e: E) -> Halt {
        Halt::Failed(e.into())
    }
}

/// Runs `check` on each item and sends its reports, until one is
/// superseded; returns the order that superseded it.
fn each_reported<T: Transport + ?Sized, I, R: IntoIterator<Item = Report>>(
    leader: &Leader<'_, T>,
    items: impl IntoIterator<Item = I>,
    mut check: impl FnMut(I) -> Result<R, Halt>,
) -> Result<Option<Order>, TrainError> {
    for item in items {
        match check(item) {
            Ok(reports) => {
                for report in reports {
                    leader.report(&report)?;
                }
            }
            Err(Halt::Superseded(order)) => return Ok(Some(*order)),
            Err(Halt::Failed(e)) => return Err(e),
        }
    }
    Ok(None)
}

/// `from`'s next message on `tag`, or the verdict its absence earns
/// (`what` it failed to send for), for a check of `attempt` (window,
/// attempt). More replays of the same attempt, which the orchestrator
/// draws as microbatches finish, and ledger lines to countersign are put
/// off until the check is done; any other order supersedes it.
fn receive<T: Transport + ?Sized>(
    leader: &Leader<'_, T>,
    (from, tag): (usize, u64),
    attempt: (u64, u32),
    what: &str,
) -> Result<Result<Vec<u8>, Verdict>, Halt> {
    let deadline = Instant::now() + leader.transport().default_timeout();
    loop {
        return match leader.wait_or_order(from, tag, deadline, || Ok(()))? {
            Waited::Got(bytes) => Ok(Ok(bytes)),
            Waited::Lost => Ok(Err(Verdict::Unavailable)),
            Waited::TimedOut => Ok(Err(Verdict::Failed(format!("sent nothing to {what}")))),
            Waited::Order(order) => {
                let later = match &order {
                    Order::Audit { .. } => order.attempt() == Some(attempt),
                    Order::Countersign { .. } => true,
                    _ => false,
                };
                if later {
                    leader.put_off(order);
                    continue;
                }
                Err(Halt::Superseded(Box::new(order)))
            }
        };
    }
}

/// Replays the passes `tasks` of `miner` from the bundle it sends; one
/// report each.
#[tracing::instrument(name = "audit", skip_all, fields(window = window, attempt = attempt, miner = miner, passes = tasks.len()))]
fn replay_passes<T: Transport + ?Sized>(
    leader: &Leader<'_, T>,
    (setup, codec, device, loaded): (&Setup, &BoundaryCodec, &mut StageDevice, &mut LoadedWeights),
    (window, attempt, pool): (u64, u32, &CheckPool),
    miner: usize,
    tasks: Vec<AuditTask>,
    weights: &[String],
) -> Result<Vec<Report>, Halt> {
    let waited = Instant::now();
    let bundle = receive(
        leader,
        (miner, protocol::audit_tag(window, attempt)),
        (window, attempt),
        "replay",
    )?;
    // The replay's cost, not the wait for the miner.
    let started = if bundle.is_ok() {
        Instant::now()
    } else {
        waited
    };
    let verdicts = match bundle {
        Ok(bytes) => pool
            .run(device, |device| {
                judge((setup, codec, device, loaded), &bytes, &tasks, weights)
            })
            .map_err(Halt::Failed)?,
        Err(verdict) => vec![verdict; tasks.len()],
    };
    let replay_s = started.elapsed().as_secs_f64() / tasks.len() as f64;
    let reports = tasks
        .into_iter()
        .zip(verdicts)
        .map(|(task, verdict)| Report::Audited {
            window,
            attempt,
            task: Box::new(task),
            verdict,
            replay_s,
        });
    Ok(reports.collect())
}

/// Where a validator's checks compute (CPU replays, slice recomputes): a
/// pool as wide as the host, when one can be had. A validator is handed
/// one compute thread like every rank sharing a host, but its checks are
/// what the miners wait for at a window's close, with nothing of their own
/// to compute (a replay gives the same bits on any number of threads:
/// `model::matmul`).
struct CheckPool(Option<rayon::ThreadPool>);

fn check_pool() -> CheckPool {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        return CheckPool(None);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cores)
        .thread_name(|i| format!("swarmrun-check-{i}"))
        .build();
    match pool {
        Ok(pool) => CheckPool(Some(pool)),
        Err(e) => {
            tracing::warn!("validator: no check threads ({e}); checking on one");
            CheckPool(None)
        }
    }
}

impl CheckPool {
    /// `f` on the pool's threads, when there is a pool, inside the
    /// caller's span (what it logs stays this rank's).
    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.0 {
            Some(pool) => {
                let span = tracing::Span::current();
                pool.install(|| span.in_scope(f))
            }
            None => f(),
        }
    }

    /// `replay` on `device`: on the pool's threads when it is the CPU (a
    /// GPU is driven from the thread that opened it).
    fn run<R: Send>(
        &self,
        device: &mut StageDevice,
        replay: impl FnOnce(&mut StageDevice) -> R + Send,
    ) -> R {
        match device.is_cpu() {
            true => self.install(|| replay(&mut StageDevice::cpu())),
            false => replay(device),
        }
    }
}

/// The model each stage's passes were last replayed on, by the digest of
/// its weights. Every bundle of a stage in a window carries the same
/// agreed weights, so they are loaded once per stage and window instead of
/// once per miner: on `bench trust`'s model a load (building the stage,
/// reading the file, hashing) took 0.47 ms against 0.32 ms for a replay;
/// and a new window's weights go into the stage's model held.
#[derive(Default)]
struct LoadedWeights(BTreeMap<usize, (String, StageModel)>);

impl LoadedWeights {
    /// Stage `stage`'s model, if it holds the weights of digest `expected`.
    fn held(&self, stage: usize, expected: &str) -> Option<&StageModel> {
        self.0
            .get(&stage)
            .filter(|(held, _)| held == expected)
            .map(|(_, model)| model)
    }

    /// Stage `stage`'s model with the weights of digest `expected`: the one
    /// held if it has them, else loaded from `weights` (a miner's stage
    /// file), which must have that digest, into the stage's model held
    /// when there is one (a new window's weights).
    fn model(
        &mut self,
        setup: &Setup,
        stage: usize,
        weights: &[u8],
        expected: &str,
    ) -> Result<&StageModel, String> {
        match self.0.entry(stage) {
            Entry::Vacant(entry) => {
                let model = audit::load_weights(setup, stage, weights, expected, None)?;
                Ok(&entry.insert((expected.to_string(), model)).1)
            }
            Entry::Occupied(mut entry) => {
                let (held, model) = entry.get_mut();
                if held != expected {
                    if let Err(refused) = audit::reload_weights(model, weights, expected, None) {
                        // It may hold the refused weights now.
                        entry.remove();
                        return Err(refused);
                    }
                    *held = expected.to_string();
                }
                Ok(&entry.into_mut().1)
            }
        }
    }
}

/// One verdict per task, from the bundle its miner sent.
/// Fails only when this validator's own device does; a bad bundle fails
/// its tasks.
fn judge(
    (setup, codec, device, loaded): (&Setup, &BoundaryCodec, &mut StageDevice, &mut LoadedWeights),
    bytes: &[u8],
    tasks: &[AuditTask],
    weights: &[String],
) -> Result<Vec<Verdict>, TrainError> {
    let all = |reason: String| Ok(vec![Verdict::Failed(reason); tasks.len()]);
    let bundle: Bundle = match audit::decode(bytes) {
        Ok(b) => b,
        Err(e) => return all(format!("its audit bundle is malformed: {e}")),
    };
    let stage = tasks.first().map_or(bundle.stage, |t| t.stage);
    if bundle.stage != stage {
        return all(format!(
            "it sent stage {} weights for stage {stage} passes",
            bundle.stage
        ));
    }
    let Some(expected) = weights.get(stage) else {
        return all(format!("no weights digest for stage {stage}"));
    };
    let model = if !bundle.weights.is_empty() {
        match loaded.model(setup, stage, &bundle.weights, expected) {
            Ok(m) => m,
            Err(reason) => return all(reason),
        }
    } else if tasks.iter().any(|t| !t.weights_held) {
        return all("its audit bundle left out the stage's weights".into());
    } else {
        match loaded.held(stage, expected) {
            Some(m) => m,
            // The bundle that had them never came: nobody is to blame.
            None => return Ok(vec![Verdict::Unavailable; tasks.len()]),
        }
    };
    device.prepare(model)?;
    let verdicts = tasks
        .iter()
        .map(|task| {
            let Some((_, frames)) = bundle.passes.iter().find(|(id, _)| *id == task.id) else {
                return Verdict::Failed(format!("microbatch {}: no frames sent", task.id));
            };
            match audit::replay(setup, codec, (model, device), task, frames) {
                Ok(()) => Verdict::Passed,
                Err(reason) => Verdict::Failed(reason),
            }
        })
        .collect();
    Ok(verdicts)
}

/// Receives from `task`'s writer its state before the step, the reduced
/// sum and the checkpoint file it wrote, and replays the step
/// ([`audit::replay_step`]).
#[tracing::instrument(name = "checkpoint_audit", skip_all, fields(window = window, attempt = attempt, writer = task.writer))]
fn audit_checkpoint<T: Transport + ?Sized>(
    leader: &Leader<'_, T>,
    spec: &JobSpec,
    setup: &Setup,
    (window, attempt): (u64, u32),
    task: CheckpointTask,
) -> Result<[Report; 1], Halt> {
    // The state before the step, the reduced sum, the file written.
    let mut got = Vec::with_capacity(3);
    let mut missing = None;
    while got.len() < 3 && missing.is_none() {
        match receive(
            leader,
            (task.writer, protocol::checkpoint_tag(window, attempt)),
            (window, attempt),
            "audit",
        )? {
            Ok(bytes) => got.push(bytes),
            Err(verdict) => missing = Some(verdict),
        }
    }
    let started = Instant::now();
    let (file, weights, verdict) = match (&got[..], missing) {
        ([state, sum, written], None) => {
            let file = Some(blake3::hash(written).to_hex().to_string());
            match audit::replay_step(setup, adamw_config(spec), &task, state, sum, written) {
                Ok(w) => (file, Some(w), Verdict::Passed),
                Err(reason) => (file, None, Verdict::Failed(reason)),
            }
        }
        (_, missing) => (None, None, missing.unwrap_or(Verdict::Unavailable)),
    };
    Ok([Report::CheckpointAudited {
        window,
        task,
        file,
        weights,
        verdict,
        replay_s: started.elapsed().as_secs_f64(),
    }])
}

/// The parameter layout of `stage` (each tensor's range in the flat
/// buffer), built once per stage.
fn stage_segments<'c>(
    setup: &Setup,
    cache: &'c mut BTreeMap<usize, Vec<Range<usize>>>,
    stage: usize,
) -> Result<&'c [Range<usize>], TrainError> {
    Ok(match cache.entry(stage) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => {
            let model = StageModel::new(&setup.config, &setup.layers, stage, setup.seed)?;
            e.insert(model.layout().iter().map(|p| p.range()).collect())
        }
    })
}

/// A contributor's contribution and proof, or the verdict their absence
/// earns.
type Contributed = Result<(Vec<u8>, Vec<u8>), Verdict>;

/// What the miners sent for one slice task: each contributor's
/// contribution and proof (or the verdict its absence earns), and between
/// sites each leader's partial.
struct SliceData {
    contributions: Vec<Contributed>,
    partials: Vec<Result<Vec<u8>, Verdict>>,
}

/// Receives what `task`'s miners send for it.
fn receive_slice<T: Transport + ?Sized>(
    leader: &Leader<'_, T>,
    window: u64,
    attempt: u32,
    task: &SliceTask,
) -> Result<SliceData, Halt> {
    let between_sites = !task.sites.is_empty();
    let tag = if between_sites {
        protocol::across_tag(window, attempt, task.slice, false)
    } else {
        protocol::slice_tag(window, attempt, task.slice)
    };
    let got = |rank: usize, tag: u64| receive(leader, (rank, tag), (window, attempt), "recompute");
    let mut received = Vec::with_capacity(task.contributors.len());
    for (rank, _) in &task.contributors {
        let contribution = got(*rank, tag)?;
        let proof = match (&contribution, &task.passes) {
            (Ok(_), Some(_)) => got(*rank, tag)?,
            _ => Ok(Vec::new()),
        };
        received.push(contribution.and_then(|c| proof.map(|p| (c, p))));
    }
    let partial_tag = protocol::across_tag(window, attempt, task.slice, true);
    let mut partials = Vec::with_capacity(task.sites.len());
    for site in &task.sites {
        partials.push(got(site.leader, partial_tag)?);
    }
    Ok(SliceData {
        contributions: received,
        partials,
    })
}

/// Sums slice `task.slice` of a stage's all-reduce from every miner's
/// contribution and judges every miner involved: a contributor by what it
/// sent (checked against the digest it stated where the sum is not every
/// holder's copy, and by whether its contribution is the fixed-point sum
/// of its passes' gradients in `chunks` probed chunks, with what the
/// window's other slices found true in `checked`), a holder by
/// whether its copy is the sum. Holders go unjudged when the sum cannot
/// be made (a contributor lost, silent, or sending other numbers than it
/// stated). Also returns the seconds the checking took.
#[tracing::instrument(name = "slice_recompute", skip_all, fields(window = window, attempt = attempt))]
fn judge_slice(
    (window, attempt): (u64, u32),
    task: &SliceTask,
    (segments, chunks, checked): (&[Range<usize>], usize, &audit::CheckedStatements),
    data: &SliceData,
) -> (Vec<(usize, Verdict)>, f64) {
    let between_sites = !task.sites.is_empty();
    let started = Instant::now();
    let numel = segments.last().map_or(0, |s| s.end);
    // One slice per contributor, or between sites one per site.
    let n = if between_sites {
        task.sites.len()
    } else {
        task.contributors.len()
    };
    let range = if task.slice < n {
        Partition::equal(numel, n).range(task.slice)
    } else {
        0..0
    };
    let len = range.len();
    // Each contribution's bytes where it has the slice's length: the
    // integers as they travel, summed straight from them.
    let sized: Vec<Option<&[u8]>> = data
        .contributions
        .iter()
        .map(|got| match got {
            Ok((bytes, _)) if bytes.len() == len * 8 => Some(&bytes[..]),
            _ => None,
        })
        .collect();
    // A slice of one all-reduce whose contributions sum to the copy every
    // holder stated: the contributions' own digests can only tell whether
    // some sent the validator other numbers than they reduced with, which
    // would have to cancel out in the sum (so the update is the honest
    // one) and are checked against their passes as sent. Only where the
    // sum is not the copies is each digest needed, to say who lied.
    let summed = match sized.iter().copied().collect::<Option<Vec<_>>>() {
        Some(all) if !between_sites && !task.holders.is_empty() => Some(sum(all.into_iter(), len)),
        _ => None,
    };
    let agreed = summed
        .as_ref()
        .map(|s| slice_digest(s))
        .filter(|d| task.holders.iter().all(|(_, copy)| copy == d));
    let probed = task.probed(&range, chunks);
    let mut values: Vec<Option<&[u8]>> = Vec::with_capacity(data.contributions.len());
    let mut verdicts = Vec::new();
    let received = task.contributors.iter().zip(&data.contributions);
    for (i, ((rank, stated), got)) in received.enumerate() {
        let verdict = match got {
            Ok((bytes, _)) if bytes.len() != len * 8 => Verdict::Failed(format!(
                "sent {} bytes of contribution for a slice of {len} integers",
                bytes.len()
            )),
            // The integers travel little-endian: what the digest covers.
            Ok((bytes, _)) if agreed.is_none() && audit::digest(bytes) != *stated => {
                Verdict::Failed("sent another contribution than it stated".into())
            }
            Ok((bytes, proof)) => {
                values.push(sized.get(i).copied().flatten());
                // Between sites no task carries passes.
                let passes = task.passes.as_ref().and_then(|p| p.get(i));
                let check = passes.map_or(Ok(()), |passes| {
                    audit::check_contribution(
                        (checked, *rank),
                        segments,
                        (&task.scales, task.sketch_seed),
                        passes,
                        &probed,
                        &range,
                        (bytes, proof),
                    )
                });
                verdicts.push((
                    *rank,
                    match check {
                        Ok(()) => Verdict::Passed,
                        Err(reason) => Verdict::Failed(reason),
                    },
                ));
                continue;
            }
            Err(verdict) => verdict.clone(),
        };
        values.push(None);
        verdicts.push((*rank, verdict));
    }
    let whole: Option<Vec<&[u8]>> = values.iter().copied().collect();
    // The sum of what the holders were given: the contributions, or
    // between sites the leaders' partials, each checked against its
    // members'.
    let given: Option<Vec<i64>> = match (whole, between_sites) {
        _ if agreed.is_some() => None,
        (None, _) => None,
        // Every contribution checked out, so they are the ones summed above.
        (Some(whole), false) => Some(summed.unwrap_or_else(|| sum(whole.into_iter(), len))),
        (Some(whole), true) => {
            let mut given = Vec::with_capacity(task.sites.len());
            for (site, partial) in task.sites.iter().zip(&data.partials) {
                let members = site.members.iter().filter_map(|&i| whole.get(i).copied());
                let verdict = match partial {
                    Ok(bytes) if audit::digest(bytes) != site.partial => {
                        Verdict::Failed("sent another site partial sum than it stated".into())
                    }
                    Ok(bytes) if integers(bytes) != sum(members, len) => Verdict::Failed(
                        "its site's partial sum is not the sum of its members' contributions"
                            .into(),
                    ),
                    Ok(bytes) => {
                        given.push(&bytes[..]);
                        Verdict::Passed
                    }
                    Err(verdict) => verdict.clone(),
                };
                verdicts.push((site.leader, verdict));
            }
            (given.len() == task.sites.len()).then(|| sum(given.into_iter(), len))
        }
    };
    let digest = agreed.or_else(|| given.map(|given| slice_digest(&given)));
    for (rank, copy) in &task.holders {
        let verdict = match &digest {
            None => Verdict::Unavailable,
            Some(digest) if copy == digest => Verdict::Passed,
            Some(_) => Verdict::Failed("its copy is not the sum of the contributions".into()),
        };
        verdicts.push((*rank, verdict));
    }
    (verdicts, started.elapsed().as_secs_f64())
}

/// Little-endian integers, as contributions travel.
fn integers(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|x| i64::from_le_bytes(x.try_into().unwrap_or_default()))
        .collect()
}

/// The wrapping sum of `parts`, each `len` little-endian integers as they
/// travel: read in place, not copied into integers first.
fn sum<'v>(parts: impl Iterator<Item = &'v [u8]>, len: usize) -> Vec<i64> {
    let mut acc = vec![0i64; len];
    for part in parts {
        for (a, x) in acc.iter_mut().zip(part.chunks_exact(8)) {
            *a = a.wrapping_add(i64::from_le_bytes(x.try_into().unwrap_or_default()));
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::roles::protocol::Receipt;

    /// Slice 0 of a 2-miner all-reduce of 10 integers (ranks 4 and 5),
    /// with no passes to check: the miners stated `stated`, sent `sent`,
    /// and the holders stated `copies`.
    fn judged(
        stated: [&[i64]; 2],
        sent: [&[i64]; 2],
        copies: [&[i64]; 2],
    ) -> Vec<(usize, Verdict)> {
        let bytes = |v: &[i64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let task = SliceTask {
            stage: 0,
            slice: 0,
            validator: 1,
            contributors: vec![(4, slice_digest(stated[0])), (5, slice_digest(stated[1]))],
            holders: vec![(4, slice_digest(copies[0])), (5, slice_digest(copies[1]))],
            scales: vec![0],
            sketch_seed: 0,
            passes: None,
            probe: 0,
            sites: Vec::new(),
        };
        let data = SliceData {
            contributions: sent.iter().map(|s| Ok((bytes(s), Vec::new()))).collect(),
            partials: Vec::new(),
        };
        // One segment of 10 elements.
        let segments = vec![0..10; 1];
        let checked = audit::CheckedStatements::default();
        judge_slice((0, 0), &task, (&segments, 2, &checked), &data).0
    }

    #[test]
    fn a_slice_is_judged_by_its_sum_and_a_contribution_by_its_digest_only_when_the_sum_is_off() {
        let (a, b): (Vec<i64>, Vec<i64>) = ((0..5).collect(), (10..15).collect());
        let total: Vec<i64> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        let passed = |v: &[(usize, Verdict)]| v.iter().all(|(_, x)| *x == Verdict::Passed);
        let honest = judged([&a, &b], [&a, &b], [&total, &total]);
        assert_eq!(honest.len(), 4, "{honest:?}");
        assert!(passed(&honest), "{honest:?}");
        // Sending other numbers than it stated: the sum is off, so each
        // digest is checked, and the holders cannot be judged.
        let mut other = b.clone();
        other[2] += 1;
        let lied = judged([&a, &b], [&a, &other], [&total, &total]);
        assert_eq!(lied[0], (4, Verdict::Passed));
        assert_eq!(
            lied[1],
            (
                5,
                Verdict::Failed("sent another contribution than it stated".into())
            )
        );
        assert!(
            lied[2..].iter().all(|(_, v)| *v == Verdict::Unavailable),
            "{lied:?}"
        );
        // Two that sent other numbers than they reduced with, cancelling
        // out: the update was the honest sum, and that is what is judged.
        let (mut up, mut down) = (a.clone(), b.clone());
        up[1] += 7;
        down[1] -= 7;
        assert!(passed(&judged([&up, &down], [&a, &b], [&total, &total])));
        // A holder whose copy is not the sum.
        let mut wrong = total.clone();
        wrong[0] *= 2;
        let copied = judged([&a, &b], [&a, &b], [&total, &wrong]);
        assert_eq!(copied[2], (4, Verdict::Passed));
        assert_eq!(
            copied[3],
            (
                5,
                Verdict::Failed("its copy is not the sum of the contributions".into())
            )
        );
    }

    /// A 2-stage job of a tiny model, and its set-up.
    fn unit_job() -> (JobSpec, Setup) {
        let text = "[job]\nname = \"unit\"\ntask = \"train\"\nseed = 3\n\n\
                    [model]\nn_layer = 2\nn_head = 2\nn_embd = 16\nblock_size = 8\n\n\
                    [pipeline]\nstages = 2\nmicrobatch_size = 2\nmicrobatches_per_window = 2\n\n\
                    [roles]\nvalidators = 1\n\n\
                    [[site]]\nname = \"local\"\nhosts = \"localhost\"\nranks_per_host = 4\n\n\
                    [network]\nrendezvous = \"tcp://127.0.0.1:0\"\n";
        let spec = crate::config::parse(text, Path::new("unit.toml")).unwrap();
        let setup = Setup::new(&spec).unwrap();
        (spec, setup)
    }

    #[test]
    fn a_bundle_without_weights_is_judged_on_those_held_and_blames_no_one_when_none_are() {
        let (spec, setup) = unit_job();
        let codec = setup.codec(&spec);
        let mut device = StageDevice::cpu();
        let model = StageModel::new(&setup.config, &setup.layers, 1, setup.seed).unwrap();
        let file = model.to_safetensors(None, Path::new("stage-1")).unwrap();
        let digests = [
            "stage 0's".to_string(),
            model.weights_digest().unwrap().to_hex().to_string(),
        ];
        let task = |weights_held| AuditTask {
            id: 7,
            stage: 1,
            miner: 2,
            validator: 1,
            receipt: Receipt {
                input: Some("a frame's".into()),
                output: "a loss".into(),
                grad_in: None,
                grad_out: Some("a gradient's".into()),
                params: "the gradients'".into(),
                maxes: Vec::new(),
            },
            sketch: None,
            weights_held,
        };
        // No frames in any bundle: a bundle judged on weights gets that.
        let bundle = |weights: &[u8]| {
            audit::encode(&Bundle {
                stage: 1,
                weights: weights.to_vec(),
                passes: Vec::new(),
            })
        };
        let judged = Verdict::Failed("microbatch 7: no frames sent".into());
        let mut loaded = LoadedWeights::default();
        let mut judge_one = |bytes: &[u8], weights_held| {
            let parts = (&setup, &codec, &mut device, &mut loaded);
            judge(parts, bytes, &[task(weights_held)], &digests).unwrap()
        };

        // The order said its validator held them, but the bundle that had
        // them never came.
        assert_eq!(judge_one(&bundle(&[]), true), [Verdict::Unavailable]);
        // A miner may not leave out weights its validator was not sent.
        assert_eq!(
            judge_one(&bundle(&[]), false),
            [Verdict::Failed(
                "its audit bundle left out the stage's weights".into()
            )]
        );
        // Sent once, they are held for the bundles that leave them out.
        // (A bundle that has them anyway is judged on them.)
        for (weights, held) in [(&file[..], false), (&[], true), (&file, true)] {
            assert_eq!(
                judge_one(&bundle(weights), held),
                std::slice::from_ref(&judged)
            );
        }
    }

    #[test]
    fn a_stages_weights_are_loaded_once_per_digest_and_checked_when_loaded() {
        let (_, setup) = unit_job();
        let model = StageModel::new(&setup.config, &setup.layers, 1, setup.seed).unwrap();
        let file = model.to_safetensors(None, Path::new("stage-1")).unwrap();
        let digest = model.weights_digest().unwrap().to_hex().to_string();

        let mut loaded = LoadedWeights::default();
        assert!(loaded.model(&setup, 1, &file, &digest).is_ok());
        // Held: another miner's bundle of the same weights is not read.
        assert!(loaded.model(&setup, 1, &[], &digest).is_ok());
        // A new window's weights go into the model held, and must have
        // their digest.
        let next = StageModel::new(&setup.config, &setup.layers, 1, setup.seed + 1).unwrap();
        let next_file = next.to_safetensors(None, Path::new("stage-1")).unwrap();
        let next_digest = next.weights_digest().unwrap().to_hex().to_string();
        assert_ne!(next_digest, digest);
        let held = loaded.model(&setup, 1, &next_file, &next_digest).unwrap();
        assert_eq!(
            held.weights_digest().unwrap().to_hex().as_str(),
            next_digest
        );
        // Weights of another digest are loaded and must have it; refused,
        // they leave nothing held (the model may hold them), so the
        // digest it had before is not taken as held either.
        let err = loaded.model(&setup, 1, &file, "0000").unwrap_err();
        assert!(err.contains("weights have digest"), "{err}");
        assert!(loaded.model(&setup, 1, &[], &next_digest).is_err());
        assert!(loaded.model(&setup, 1, &file, &digest).is_ok());
        // Nor is anything held for a stage not loaded yet.
        assert!(loaded.model(&setup, 0, &[], &digest).is_err());
    }
}
