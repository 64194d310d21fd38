//! A stage's weights and optimizer state, handed to a miner placed on the
//! stage: a rank that joined the running job, or a miner moving to the
//! bottleneck.
//!
//! Every miner of the stage holds the same state (their digests are
//! compared after every step), so each sends only one stripe of it and
//! the newcomer fetches from all of them at once: n sources share the
//! upload, as Psyche's joiners fetch a model from several peers. The
//! newcomer checks what it assembled against the digests the stage
//! agreed on, which the orchestrator sends in the [`Placement`]; a wrong
//! stripe cannot slip in.
//!
//! The state travels as plain little-endian numbers (the optimizer's step,
//! then weights, first and second moments), the same bytes on every
//! source, so stripes from different sources fit together.

use std::ops::Range;

use super::protocol::{self, Placement, StageDigests};
use super::train::{Setup, TrainError};
use crate::config::JobSpec;
use crate::model::{AdamW, StageModel};
use crate::transport::Transport;

/// The state as it travels: step (u64), weights, m, v (f32), little-endian.
/// A miner also keeps it to go back to a window's start (see `Rewind`).
pub(super) fn state_bytes(model: &StageModel, opt: &AdamW) -> Result<Vec<u8>, TrainError> {
    let weights = model.params_flat()?;
    let (m, v) = opt.moments();
    let mut bytes = Vec::with_capacity(8 + 4 * (weights.len() + m.len() + v.len()));
    bytes.extend_from_slice(&opt.steps_taken().to_le_bytes());
    for x in weights.iter().chain(m).chain(v) {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    Ok(bytes)
}

/// The part of `len` bytes that source `k` of `n` sends.
fn stripe(len: usize, k: usize, n: usize) -> Range<usize> {
    len * k / n..len * (k + 1) / n
}

/// Sends this source's stripe of the stage's state to `p.rank`, placed
/// before `window` in `attempt`.
pub(super) fn send_stripe<T: Transport + ?Sized>(
    t: &T,
    (window, attempt): (u64, u32),
    p: &Placement,
    model: &StageModel,
    opt: &AdamW,
) -> Result<(), TrainError> {
    let Some(k) = p.sources.iter().position(|&s| s == t.rank()) else {
        return Ok(());
    };
    let bytes = state_bytes(model, opt)?;
    let part = &bytes[stripe(bytes.len(), k, p.sources.len())];
    t.send(p.rank, protocol::state_tag(window, attempt), part)?;
    Ok(())
}

/// Fetches stage `p.stage`'s state from its sources, one stripe each, and
/// returns it once its digests are the ones `p` states.
pub(super) fn receive_state<T: Transport + ?Sized>(
    t: &T,
    (window, attempt): (u64, u32),
    p: &Placement,
    setup: &Setup,
    spec: &JobSpec,
) -> Result<(StageModel, AdamW, StageDigests), TrainError> {
    let (mut model, mut opt) = setup.stage(spec, p.stage)?;
    let numel = model.numel();
    let len = 8 + 12 * numel;
    let mut bytes = Vec::with_capacity(len);
    for (k, &source) in p.sources.iter().enumerate() {
        let part = t.recv(source, protocol::state_tag(window, attempt))?;
        if part.len() != stripe(len, k, p.sources.len()).len() {
            return Err(TrainError::Protocol {
                rank: source,
                reason: format!(
                    "stripe {k} of stage {}'s state is {} bytes, not {}",
                    p.stage,
                    part.len(),
                    stripe(len, k, p.sources.len()).len()
                ),
            });
        }
        bytes.extend_from_slice(&part);
    }
    restore(&bytes, &mut model, &mut opt)?;
    let digests = digests(&model, &opt)?;
    let optimizer_ok = p.optimizer.as_ref().is_none_or(|o| *o == digests.optimizer);
    if digests.weights != p.weights || !optimizer_ok {
        return Err(TrainError::Protocol {
            rank: p.sources.first().copied().unwrap_or(0),
            reason: format!(
                "stage {}'s state from miners {:?} is not the one the stage agreed on",
                p.stage, p.sources
            ),
        });
    }
    Ok((model, opt, digests))
}

/// Loads [`state_bytes`] (of `model`'s stage, the length checked by the
/// caller) into `model` and `opt`.
pub(super) fn restore(
    bytes: &[u8],
    model: &mut StageModel,
    opt: &mut AdamW,
) -> Result<(), TrainError> {
    let numel = model.numel();
    let step = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let floats: Vec<f32> = bytes[8..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let (weights, moments) = floats.split_at(numel);
    let (m, v) = moments.split_at(numel);
    model.set_params_flat(weights)?;
    opt.restore(step, m, v)?;
    Ok(())
}

/// The digests a stage's miners compare.
pub(super) fn digests(model: &StageModel, opt: &AdamW) -> Result<StageDigests, TrainError> {
    Ok(StageDigests {
        weights: model.weights_digest()?.to_hex().to_string(),
        optimizer: opt.state_digest().to_hex().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_cover_the_state_once_whatever_the_sources() {
        for len in [0, 1, 7, 8 + 12 * 1000] {
            for n in 1..=5 {
                let parts: Vec<Range<usize>> = (0..n).map(|k| stripe(len, k, n)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[n - 1].end, len);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
            }
        }
    }
}
