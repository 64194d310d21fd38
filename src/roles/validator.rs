//! A validator: follows the orders, and on `Audit` replays the passes
//! given to it from what their miners send, reporting one verdict each.

use std::collections::BTreeMap;
use std::time::Instant;

use super::audit::{self, Bundle};
use super::protocol::{self, AuditTask, Order, Report, Verdict};
use super::train::{crash_if_planned, recv_order, send_report, Setup, TrainError};
use crate::config::JobSpec;
use crate::pipeline::BoundaryCodec;
use crate::transport::{Transport, TransportError};

pub fn validate<T: Transport + ?Sized>(t: &T, spec: &JobSpec) -> Result<(), TrainError> {
    let setup = Setup::new(spec)?;
    let codec = setup.codec(spec);
    loop {
        match recv_order(t)? {
            Order::Stop => return Ok(()),
            Order::Run {
                window, attempt: 0, ..
            } => crash_if_planned(spec, t.rank(), window),
            Order::Audit {
                window,
                attempt,
                tasks,
                weights,
            } => {
                let mut by_miner: BTreeMap<usize, Vec<AuditTask>> = BTreeMap::new();
                for task in tasks.into_iter().filter(|a| a.validator == t.rank()) {
                    by_miner.entry(task.miner).or_default().push(task);
                }
                for (miner, tasks) in by_miner {
                    let mut started = Instant::now();
                    let verdicts = match t.recv(miner, protocol::audit_tag(window, attempt)) {
                        Ok(bytes) => {
                            // The replay's cost, not the wait for the miner.
                            started = Instant::now();
                            judge(&setup, &codec, &bytes, &tasks, &weights)
                        }
                        Err(TransportError::PeerLost { .. }) => {
                            vec![Verdict::Unavailable; tasks.len()]
                        }
                        Err(TransportError::Timeout { .. }) => {
                            let silent = Verdict::Failed("sent nothing to replay".into());
                            vec![silent; tasks.len()]
                        }
                        Err(e) => return Err(e.into()),
                    };
                    let replay_s = started.elapsed().as_secs_f64() / tasks.len() as f64;
                    for (task, verdict) in tasks.into_iter().zip(verdicts) {
                        let report = Report::Audited {
                            window,
                            attempt,
                            task,
                            verdict,
                            replay_s,
                        };
                        send_report(t, &report)?;
                    }
                }
            }
            // Every other order is for miners.
            _ => {}
        }
    }
}

/// One verdict per task, from the bundle its miner sent.
fn judge(
    setup: &Setup,
    codec: &BoundaryCodec,
    bytes: &[u8],
    tasks: &[AuditTask],
    weights: &[String],
) -> Vec<Verdict> {
    let all = |reason: String| vec![Verdict::Failed(reason); tasks.len()];
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
    let model = match audit::load_weights(setup, stage, &bundle.weights, expected) {
        Ok(m) => m,
        Err(reason) => return all(reason),
    };
    tasks
        .iter()
        .map(|task| {
            let Some((_, frames)) = bundle.passes.iter().find(|(id, _)| *id == task.id) else {
                return Verdict::Failed(format!("microbatch {}: no frames sent", task.id));
            };
            match audit::replay(setup, codec, &model, task.id, frames, &task.receipt) {
                Ok(()) => Verdict::Passed,
                Err(reason) => Verdict::Failed(reason),
            }
        })
        .collect()
}
