//! Replaying a miner's work: what a miner hands a validator for it (its
//! stage's weights and the frames it received, one message per validator),
//! and the replay, which must give the miner's [`Receipt`](super::protocol::Receipt) bit for bit.
//!
//! A replay is exact because every pass is a pure function of the stage's
//! weights and the pass's inputs (see `crate::model`), and the codec is
//! deterministic: an honest miner's digests are the validator's, so no
//! tolerance is needed and an honest miner is never flagged. (On a GPU a
//! replay would need a stated tolerance instead; training runs on CPU.)

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::device::StageDevice;
use super::protocol::{AuditTask, CheckpointTask, CreditedPass};
use super::train::Setup;
use crate::collective::{segment_maxes, FixedPoint};
use crate::data::rng::{splitmix64, SplitMix64};
use crate::data::Split;
use crate::isa::on_widest;
use crate::model::{batch_tensors, digest_wide, AdamW, AdamWConfig, StageInput, StageModel};
use crate::pipeline::BoundaryCodec;

/// The frames one pass took in, kept by its miner until the window closes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frames {
    /// The activation frame received (not on stage 0).
    pub input: Option<Vec<u8>>,
    /// The gradient frame received (not on the last stage).
    pub grad_in: Option<Vec<u8>>,
}

/// A miner's material for one validator: its stage's weights (a stage file
/// as checkpoints write it, without optimizer state; empty where the
/// validator holds them, see `AuditTask::weights_held`) and the frames of
/// each pass to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub stage: usize,
    pub weights: Vec<u8>,
    pub passes: Vec<(u64, Frames)>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("{0} bytes is too short for a bundle")]
    Short(usize),
    #[error("bundle header: {0}")]
    Header(String),
    #[error("bundle sections add up to {stated} bytes, {got} came")]
    Length { stated: u64, got: u64 },
}

/// The bundle header: sizes of what follows it, in order.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Header {
    stage: usize,
    weights: u64,
    passes: Vec<(u64, Option<u64>, Option<u64>)>,
}

/// `[header length: u32 LE][header JSON][weights][frames, pass by pass]`.
pub fn encode(bundle: &Bundle) -> Vec<u8> {
    let len = |f: &Option<Vec<u8>>| f.as_ref().map(|b| b.len() as u64);
    let header = Header {
        stage: bundle.stage,
        weights: bundle.weights.len() as u64,
        passes: bundle
            .passes
            .iter()
            .map(|(id, f)| (*id, len(&f.input), len(&f.grad_in)))
            .collect(),
    };
    // A struct of numbers always serializes.
    let header = serde_json::to_vec(&header).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + header.len() + bundle.weights.len());
    out.extend((header.len() as u32).to_le_bytes());
    out.extend(header);
    out.extend(&bundle.weights);
    for (_, f) in &bundle.passes {
        for frame in [&f.input, &f.grad_in].into_iter().flatten() {
            out.extend(frame);
        }
    }
    out
}

/// The bundle in `bytes`, refusing a header that does not parse or sizes
/// that do not add up to what came (checked before any section is copied).
pub fn decode(bytes: &[u8]) -> Result<Bundle, BundleError> {
    let short = || BundleError::Short(bytes.len());
    let head_len = u32::from_le_bytes(
        bytes
            .get(..4)
            .ok_or_else(short)?
            .try_into()
            .map_err(|_| short())?,
    ) as usize;
    let head = bytes.get(4..4 + head_len).ok_or_else(short)?;
    let header: Header =
        serde_json::from_slice(head).map_err(|e| BundleError::Header(e.to_string()))?;
    let mut rest = &bytes[4 + head_len..];
    let stated = header
        .passes
        .iter()
        .flat_map(|(_, a, b)| [a.unwrap_or(0), b.unwrap_or(0)])
        .try_fold(header.weights, u64::checked_add);
    if stated != Some(rest.len() as u64) {
        return Err(BundleError::Length {
            stated: stated.unwrap_or(u64::MAX),
            got: rest.len() as u64,
        });
    }
    // Every size is within `rest` now, so the splits below cannot fail.
    let mut take = |n: u64| {
        let (a, b) = rest.split_at(n as usize);
        rest = b;
        a.to_vec()
    };
    let weights = take(header.weights);
    let passes = header
        .passes
        .iter()
        .map(|&(id, input, grad_in)| {
            let input = input.map(&mut take);
            let grad_in = grad_in.map(&mut take);
            (id, Frames { input, grad_in })
        })
        .collect();
    Ok(Bundle {
        stage: header.stage,
        weights,
        passes,
    })
}

/// BLAKE3 of `bytes`, hex: the digests receipts carry.
pub fn digest(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Floats per chunk of a pass's parameter gradients in its receipt's
/// digest ([`params_digest`]).
pub const GRAD_CHUNK: usize = 1024;

/// The digest of each [`GRAD_CHUNK`] floats of a pass's parameter
/// gradients, in order.
pub fn chunk_digests(params: &[f32]) -> Vec<blake3::Hash> {
    if cfg!(target_endian = "little") {
        let chunks: Vec<&[u8]> = params
            .chunks(GRAD_CHUNK)
            .map(bytemuck::cast_slice)
            .collect();
        return digest_wide::digests(&chunks);
    }
    params
        .chunks(GRAD_CHUNK)
        .map(crate::model::digest)
        .collect()
}

/// A receipt's `params`: BLAKE3, hex, of the chunks' digests in order, so
/// that one chunk can be checked against it with the other chunks'
/// digests alone.
pub fn params_digest(chunks: &[blake3::Hash]) -> String {
    let mut hasher = blake3::Hasher::new();
    for chunk in chunks {
        hasher.update(chunk.as_bytes());
    }
    hasher.finalize().to_hex().to_string()
}

/// A receipt's `maxes`: each parameter tensor's largest gradient
/// magnitude, as f32 bits.
pub fn gradient_maxes(model: &StageModel, params: &[f32]) -> Vec<u32> {
    let segments: Vec<_> = model.layout().iter().map(|p| p.range()).collect();
    segment_maxes(params, &segments)
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Entries of a pass's gradient sketch, at least: enough that the
/// cosine of two sketches is within about 0.06 of their gradients' (the
/// error of a count sketch falls as one over the root of its length),
/// few enough that a receipt stays a few kilobytes.
pub const SKETCH_LEN: usize = 256;

/// Entries of a sketch of `numel` gradients that each [`GRAD_CHUNK`]
/// sums into: every entry sums elements of one chunk only, so that the
/// contribution check, which holds one chunk of each pass, can recompute
/// that chunk's entries.
pub fn sketch_per_chunk(numel: usize) -> usize {
    SKETCH_LEN.div_ceil(numel.div_ceil(GRAD_CHUNK).max(1))
}

/// A pass's sketch as a miner states it when it reduces (f32 bits): a
/// count sketch of the pass's parameter gradients, each element added
/// with a sign and into an entry of its chunk that a hash of `seed` and
/// its index picks. Two sketches of one seed have an inner product that
/// estimates their gradients', so the orchestrator can see a pass whose
/// gradient points against its stage's (see `orchestrator::suspicion`)
/// without the gradients.
pub fn gradient_sketch(params: &[f32], seed: u64) -> Vec<u32> {
    let per_chunk = sketch_per_chunk(params.len());
    params
        .chunks(GRAD_CHUNK)
        .enumerate()
        .flat_map(|(q, chunk)| chunk_sketch(q, chunk, per_chunk, seed))
        .map(f32::to_bits)
        .collect()
}

/// The `per_chunk` sketch entries of chunk `q`, whose floats are `chunk`.
/// With `key` a hash of `seed`, element `i`'s sign is bit `i % 64` of a
/// hash of `key ^ i / 64`, and (where a chunk has more than one entry)
/// the elements of a block of 64 at one place mod 8 share an entry: for
/// place `j`, byte `j` of a hash of `key ^ i / 64` with its halves
/// swapped, taken to `per_chunk` (at most 256) by multiply-shift. A sign
/// is added by flipping the sign bit.
///
/// Why eight elements an entry draw: a block is then eight vectors added
/// up in registers and eight adds into entries, where an entry drawn per
/// element made every element an add of its own into memory (miners
/// sketch every pass, validators every probed chunk of every pass, and
/// that add was a fifth of a validator's time on `bench trust`'s job):
/// 0.3 ns an element instead of 1.4 on this Zen 4. What it costs: an
/// entry still sums about 1024 / `per_chunk` elements, but in draws of
/// eight, so the cosine of two sketches strays a little further from
/// their gradients' (root mean square 0.064 against 0.059 for dense
/// gradients of a 15-chunk stage at cosine 0.3, 0.065 against 0.056
/// where four rows in five of 32 are zero). A big stage has one entry a
/// chunk and draws no entries at all.
///
/// The seed comes with the `Close` order, after the receipts bound each
/// pass's gradients: with signs known beforehand, a cheater could shape a
/// wrong gradient so that its sketch looks right.
fn chunk_sketch(q: usize, chunk: &[f32], per_chunk: usize, seed: u64) -> Vec<f32> {
    let per_chunk = per_chunk.clamp(1, 256);
    let mut sums = vec![[0.0f64; 8]; per_chunk];
    on_widest(
        #[inline(always)]
        || sketch_into(q, chunk, per_chunk, seed, &mut sums),
    );
    sums.iter()
        .map(|[a, b, c, d, e, f, g, h]| (((a + b) + (c + d)) + ((e + f) + (g + h))) as f32)
        .collect()
}

/// Adds chunk `q`'s signed elements into their entries' eight partial
/// sums (one per place mod 8, added up in a fixed order at the end), in
/// an order that does not depend on the vector width, so that every CPU
/// states the same bits.
#[inline(always)]
fn sketch_into(q: usize, chunk: &[f32], per_chunk: usize, seed: u64, sums: &mut [[f64; 8]]) {
    let key = splitmix64(seed);
    let first = q * GRAD_CHUNK;
    let mut padded = [0.0f32; 64];
    for (b, block) in chunk.chunks(64).enumerate() {
        let at = ((first + 64 * b) / 64) as u64;
        let signs = splitmix64(key ^ at);
        // A short last block is padded with zeros, which add nothing.
        let block: &[f32; 64] = match block.try_into() {
            Ok(full) => full,
            Err(_) => {
                padded[..block.len()].copy_from_slice(block);
                &padded
            }
        };
        // The block's eight places, each summed over its eight elements
        // (the even and the odd groups apart, then together: two chains
        // of additions instead of one twice as long).
        let (mut even, mut odd) = ([0.0f64; 8], [0.0f64; 8]);
        for (k, groups) in block.chunks_exact(16).enumerate() {
            let bits = (signs >> (16 * k)) as u32;
            for j in 0..8 {
                let flip = |at: usize| ((bits >> at) & 1) << 31;
                even[j] += f64::from(f32::from_bits(groups[j].to_bits() ^ flip(j)));
                odd[j] += f64::from(f32::from_bits(groups[8 + j].to_bits() ^ flip(8 + j)));
            }
        }
        let places: [f64; 8] = std::array::from_fn(|j| even[j] + odd[j]);
        let picks = match per_chunk {
            1 => 0,
            _ => splitmix64(key.rotate_left(32) ^ at),
        };
        for (j, place) in places.into_iter().enumerate() {
            let entry = (((picks >> (8 * j)) & 0xff) * per_chunk as u64) >> 8;
            // Below `per_chunk` by the multiply-shift.
            if let Some(sum) = sums.get_mut(entry as usize) {
                sum[j] += place;
            }
        }
    }
}

/// The gradient chunks, ascending, in which contributions to the elements
/// `slice` are checked against their passes: `count` of the chunks the
/// slice touches (every one where it touches no more), drawn with `seed`
/// (a [`SliceTask`](super::protocol::SliceTask)'s `probe`, drawn after
/// the miners stated their contributions). Miner and validator draw the
/// same.
pub fn probed_chunks(seed: u64, slice: &Range<usize>, count: usize) -> Vec<usize> {
    if slice.is_empty() {
        return Vec::new();
    }
    let mut chunks: Vec<usize> =
        (slice.start / GRAD_CHUNK..slice.end.div_ceil(GRAD_CHUNK)).collect();
    let mut picked = SplitMix64::new(seed, 0).sample(count, &mut chunks).to_vec();
    picked.sort_unstable();
    picked
}

/// What shows a validator, for each pass's parameter gradients, their
/// [`chunk_digests`] and the sketch the miner stated of them in
/// `passes`, the chunks `probed` (ascending) against the pass's receipt
/// and that statement: the sketch (f32 bits), every chunk's digest, then
/// each probed chunk's floats, all little-endian.
pub fn gradient_proof<'p>(
    passes: impl Iterator<Item = (&'p [f32], &'p [blake3::Hash], &'p [u32])>,
    probed: &[usize],
) -> Vec<u8> {
    let mut proof = Vec::new();
    for (params, chunks, sketch) in passes {
        let floats: Vec<&[f32]> = probed
            .iter()
            .filter_map(|&q| params.chunks(GRAD_CHUNK).nth(q))
            .collect();
        let float_count: usize = floats.iter().map(|chunk| chunk.len()).sum();
        proof.reserve(4 * (sketch.len() + float_count) + chunks.len() * blake3::OUT_LEN);
        extend_le(&mut proof, sketch);
        for digest in chunks {
            proof.extend_from_slice(digest.as_bytes());
        }
        for chunk in floats {
            extend_le(&mut proof, chunk);
        }
    }
    proof
}

/// Words (`f32`s, `u32`s) appended to `out` little-endian: on a
/// little-endian CPU their bytes as they lie, not four bytes at a time (a
/// miner sends each probed chunk of every credited pass for every slice).
fn extend_le<T: bytemuck::Pod>(out: &mut Vec<u8>, values: &[T]) {
    let words: &[u32] = bytemuck::cast_slice(values);
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(words));
    } else {
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
}

/// What a window's contribution checks found true so far: each credited
/// pass's stated sketch and chunk digests, as a contributor's proof sent
/// them and as they matched the pass's statement. Every slice's proof of
/// a contributor repeats them (the sketch is a kilobyte a pass, the
/// digests 32 bytes a chunk), and hashing them again for every slice was
/// a tenth of a validator's time on `bench trust`'s job; a byte-for-byte
/// comparison with what was checked takes the hashes' place.
#[derive(Debug, Default)]
pub struct CheckedStatements(Mutex<HashMap<(usize, u64), Checked>>);

/// A pass's statement (sketch digest, params digest) and the bytes that
/// matched it.
type Checked = (String, String, Vec<u8>);

impl CheckedStatements {
    /// Whether contributor `rank`'s `bytes` for `pass` are those that
    /// matched its statement before.
    fn holds(&self, rank: usize, pass: &CreditedPass, bytes: &[u8]) -> bool {
        let known = self.0.lock().unwrap_or_else(|e| e.into_inner());
        known
            .get(&(rank, pass.id))
            .is_some_and(|(sketch, params, seen)| {
                *sketch == pass.sketch && *params == pass.params && seen == bytes
            })
    }

    fn insert(&self, rank: usize, pass: &CreditedPass, bytes: &[u8]) {
        let mut known = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let checked = (pass.sketch.clone(), pass.params.clone(), bytes.to_vec());
        known.insert((rank, pass.id), checked);
    }
}

/// Checks that `contribution` (a miner's integers for the slice `slice`
/// of its stage's all-reduce, little-endian) is, in each gradient chunk
/// of `probed` ([`probed_chunks`]), the fixed-point sum at `scales` of the
/// gradients of `passes` (its credited passes, as their receipts state
/// them), and that the sketches it stated for them (with `sketch_seed`)
/// are, in those chunks, those gradients'.
/// `proof` holds, pass by pass, the sketch it stated, every chunk's
/// digest and then the probed chunks' floats ([`gradient_proof`]).
/// `checked` holds what earlier checks of this window found true, and
/// the contributor's rank (see [`CheckedStatements`]).
pub fn check_contribution(
    (checked, rank): (&CheckedStatements, usize),
    segments: &[Range<usize>],
    (scales, sketch_seed): (&[i32], u64),
    passes: &[CreditedPass],
    probed: &[usize],
    slice: &Range<usize>,
    (contribution, proof): (&[u8], &[u8]),
) -> Result<(), String> {
    if slice.is_empty() {
        return Ok(());
    }
    let numel = segments.last().map_or(0, |s| s.end);
    let n_chunks = numel.div_ceil(GRAD_CHUNK);
    let chunk_range = |q: usize| q * GRAD_CHUNK..((q + 1) * GRAD_CHUNK).min(numel);
    if let Some(q) = probed.iter().find(|&&q| q >= n_chunks) {
        return Err(format!("chunk {q} probed of {n_chunks}"));
    }
    let floats: usize = probed.iter().map(|&q| chunk_range(q).len()).sum();
    let per_chunk = sketch_per_chunk(numel);
    let sketch_bytes = n_chunks * per_chunk * 4;
    let per_pass = sketch_bytes + n_chunks * blake3::OUT_LEN + floats * 4;
    if proof.len() != per_pass * passes.len() {
        return Err(format!(
            "sent {} bytes of gradients for {} passes, not {}",
            proof.len(),
            passes.len(),
            per_pass * passes.len()
        ));
    }
    let fixed = FixedPoint::with_exponents(segments, scales.to_vec()).map_err(|e| e.to_string())?;
    // Each probed chunk's part of the slice, and the passes' sum there.
    let parts: Vec<(usize, Range<usize>)> = probed
        .iter()
        .map(|&q| {
            let chunk = chunk_range(q);
            (q, chunk.start.max(slice.start)..chunk.end.min(slice.end))
        })
        .collect();
    let mut sums: Vec<Vec<i64>> = parts.iter().map(|(_, p)| vec![0; p.len()]).collect();
    // Every probed chunk of every pass, pass by pass, digested together
    // (4 KiB digests run wider in groups); the loop below takes them in
    // this order.
    let probed_bytes: Vec<&[u8]> = proof
        .chunks(per_pass.max(1))
        .flat_map(|bytes| {
            let floats = &bytes[sketch_bytes + n_chunks * blake3::OUT_LEN..];
            parts.iter().scan(floats, |rest, (q, _)| {
                let (chunk, after) = rest.split_at(chunk_range(*q).len() * 4);
                *rest = after;
                Some(chunk)
            })
        })
        .collect();
    let probed_digests = digest_wide::digests(&probed_bytes);
    let mut digested = probed_bytes.iter().zip(&probed_digests);
    for (pass, bytes) in passes.iter().zip(proof.chunks(per_pass.max(1))) {
        let id = pass.id;
        let statement = &bytes[..sketch_bytes + n_chunks * blake3::OUT_LEN];
        let (sketch, digests) = statement.split_at(sketch_bytes);
        if !checked.holds(rank, pass, statement) {
            // The bytes as sent: what `protocol::sketch_digest` covers.
            if digest(sketch) != pass.sketch {
                return Err(format!(
                    "microbatch {id}: the gradient sketch it sent is not the one it stated"
                ));
            }
            if blake3::hash(digests).to_hex().as_str() != pass.params {
                return Err(format!(
                    "microbatch {id}: the gradient chunk digests it sent are not its receipt's"
                ));
            }
            checked.insert(rank, pass, statement);
        }
        let this_pass = parts.iter().zip(&mut sums).zip(digested.by_ref());
        for (((q, part), sum), (bytes, got)) in this_pass {
            let chunk = chunk_range(*q);
            let own = &digests[q * blake3::OUT_LEN..(q + 1) * blake3::OUT_LEN];
            if got.as_bytes()[..] != *own {
                return Err(format!(
                    "microbatch {id}: the gradient chunk {q} it sent is not its receipt's"
                ));
            }
            let values: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap_or_default()))
                .collect();
            let sketched = chunk_sketch(*q, &values, per_chunk, sketch_seed)
                .into_iter()
                .map(|x| x.to_bits().to_le_bytes());
            let stated = sketch[q * per_chunk * 4..(q + 1) * per_chunk * 4].chunks_exact(4);
            if !sketched.eq(stated.map(|b| <[u8; 4]>::try_from(b).unwrap_or_default())) {
                return Err(format!(
                    "microbatch {id}: the gradient sketch it stated is not its gradients'"
                ));
            }
            let inside = part.start - chunk.start..part.end - chunk.start;
            fixed.add_rounded(&values[inside], part.clone(), sum);
        }
    }
    for ((_, part), sum) in parts.iter().zip(&sums) {
        let at = (part.start - slice.start) * 8..(part.end - slice.start) * 8;
        let stated = contribution.get(at).unwrap_or_default().chunks_exact(8);
        let matches = stated
            .map(|b| i64::from_le_bytes(b.try_into().unwrap_or_default()))
            .eq(sum.iter().copied());
        if !matches {
            return Err(
                "its contribution is not the fixed-point sum of its passes' gradients".into(),
            );
        }
    }
    Ok(())
}

/// The digest of f32s as little-endian bytes (parameter gradients, a loss).
pub fn digest_f32(values: &[f32]) -> String {
    crate::model::digest(values).to_hex().to_string()
}

/// A stage's model with `weights` (a stage file) loaded, and its optimizer
/// state into `opt` when given, refused unless the weights' digest is
/// `expected`, the digest every miner of the stage agreed on: a miner
/// cannot have its work replayed on weights of its own.
pub(super) fn load_weights(
    setup: &Setup,
    stage: usize,
    weights: &[u8],
    expected: &str,
    opt: Option<&mut AdamW>,
) -> Result<StageModel, String> {
    let mut model = StageModel::new(&setup.config, &setup.layers, stage, setup.seed)
        .map_err(|e| e.to_string())?;
    reload_weights(&mut model, weights, expected, opt)?;
    Ok(model)
}

/// [`load_weights`] into a model of the stage already built: building one
/// draws every parameter at random first, which on the quickstart's stage
/// took 13-22 ms against 1-2 ms for the load itself. On `Err` the model
/// may hold the refused weights: drop it.
pub(super) fn reload_weights(
    model: &mut StageModel,
    weights: &[u8],
    expected: &str,
    opt: Option<&mut AdamW>,
) -> Result<(), String> {
    model
        .load_safetensors_bytes(weights, Path::new("audit bundle"), opt)
        .map_err(|e| e.to_string())?;
    let got = model.weights_digest().map_err(|e| e.to_string())?.to_hex();
    if got.as_str() != expected {
        return Err(format!(
            "its stage {} weights have digest {got}, the stage's are {expected}",
            model.stage()
        ));
    }
    Ok(())
}

/// Replays the optimizer step of a checkpoint audit. `state` (the writer's
/// stage file before the step, optimizer state included) and `sum` (the
/// reduced gradients, f32 LE) must have the digests its stage agreed on,
/// as `task` states them; after the step, `file` (the checkpoint it wrote)
/// must hold the replay's weights and optimizer state. Returns the
/// replay's weights digest, or the first thing that did not check out.
pub(super) fn replay_step(
    setup: &Setup,
    adamw: AdamWConfig,
    task: &CheckpointTask,
    state: &[u8],
    sum: &[u8],
    file: &[u8],
) -> Result<String, String> {
    let layout = StageModel::new(&setup.config, &setup.layers, task.stage, setup.seed)
        .map_err(|e| e.to_string())?
        .layout()
        .to_vec();
    let mut opt = AdamW::new(adamw, &layout);
    let mut model = load_weights(setup, task.stage, state, &task.weights, Some(&mut opt))?;
    let before = opt.state_digest().to_hex();
    if task
        .optimizer
        .as_ref()
        .is_some_and(|o| before.as_str() != o)
    {
        return Err(format!(
            "its optimizer state before the step has digest {before}, the stage's is {}",
            task.optimizer.as_deref().unwrap_or_default()
        ));
    }
    if sum.len() != model.numel() * 4 {
        return Err(format!(
            "it sent {} bytes of reduced sum for {} parameters",
            sum.len(),
            model.numel()
        ));
    }
    let sum: Vec<f32> = sum
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap_or_default()))
        .collect();
    if digest_f32(&sum) != task.sum {
        return Err("it sent another reduced sum than its stage's".into());
    }
    let scale = 1.0 / setup.per_window as f32;
    model
        .optimizer_step(&mut opt, &sum, scale)
        .map_err(|e| e.to_string())?;
    let weights = model.weights_digest().map_err(|e| e.to_string())?.to_hex();
    let mut written_opt = AdamW::new(opt.config().clone(), &layout);
    load_weights(setup, task.stage, file, &weights, Some(&mut written_opt))
        .map_err(|e| format!("its checkpoint file is not the replayed step's: {e}"))?;
    if written_opt.state_digest() != opt.state_digest() {
        return Err(
            "its checkpoint file holds another optimizer state than the replayed step gives".into(),
        );
    }
    Ok(weights.to_string())
}

/// Replays `task`'s pass through `model` from `frames` and checks every
/// digest of its receipt, and the sketch its miner stated where the task
/// carries one; the error says the first that differs.
pub(super) fn replay(
    setup: &Setup,
    codec: &BoundaryCodec,
    (model, device): (&StageModel, &StageDevice),
    task: &AuditTask,
    frames: &Frames,
) -> Result<(), String> {
    let AuditTask {
        id,
        receipt,
        sketch,
        ..
    } = task;
    let id = *id;
    let check = |what: &str, got: Option<String>, stated: &Option<String>| match got == *stated {
        true => Ok(()),
        false => Err(format!("microbatch {id}: {what} differs from its receipt")),
    };
    let batch = setup
        .data
        .batch(
            Split::Train,
            id,
            setup.seed,
            setup.batch_size,
            setup.config.block_size,
        )
        .map_err(|e| e.to_string())?;
    let (tokens, targets) = batch_tensors(&batch).map_err(|e| e.to_string())?;
    let tensor = |bytes: &[u8]| {
        codec
            .decode_tensor(bytes, setup.batch_size)
            .map_err(|e| e.to_string())
    };
    let encoded = |x: &Tensor| codec.encode_tensor(x).map_err(|e| e.to_string());
    check(
        "the input frame",
        frames.input.as_deref().map(digest),
        &receipt.input,
    )?;
    let input = frames.input.as_deref().map(tensor).transpose()?;
    let input = match &input {
        None => StageInput::Tokens(&tokens),
        Some(x) => StageInput::Activations(x, &tokens),
    };
    let last = model.is_last();
    let codes = device
        .codes_of(codec, frames.input.as_deref())
        .map_err(|e| e.to_string())?;
    let pass = device
        .forward(model, input, last.then_some(&targets), codes.as_ref())
        .map_err(|e| e.to_string())?;
    let (output, grad_in) = if last {
        (digest_f32(&[pass.loss().map_err(|e| e.to_string())?]), None)
    } else {
        let bytes = encoded(&pass.output().map_err(|e| e.to_string())?)?;
        check(
            "the gradient frame",
            frames.grad_in.as_deref().map(digest),
            &receipt.grad_in,
        )?;
        let grad = frames.grad_in.as_deref().map(tensor).transpose()?;
        (digest(&bytes), grad)
    };
    check("the output", Some(output), &Some(receipt.output.clone()))?;
    let grads = device
        .gradients(model, pass, grad_in.as_ref())
        .map_err(|e| e.to_string())?;
    check(
        "the parameter gradient",
        Some(params_digest(&chunk_digests(&grads.params))),
        &Some(receipt.params.clone()),
    )?;
    if gradient_maxes(model, &grads.params) != receipt.maxes {
        return Err(format!(
            "microbatch {id}: the gradient maxes differ from the receipt's"
        ));
    }
    // A sketch stated wrong would make an honest pass a suspect at will,
    // and a suspect's replay takes the place of a drawn one.
    if sketch
        .as_ref()
        .is_some_and(|s| gradient_sketch(&grads.params, s.seed) != s.sketch)
    {
        return Err(format!(
            "microbatch {id}: the gradient sketch differs from the one it stated"
        ));
    }
    let grad_out = match &grads.input {
        None => None,
        Some(g) => Some(digest(&encoded(g)?)),
    };
    check("the input gradient", grad_out, &receipt.grad_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Close` order's sketch seed.
    const SEED: u64 = 0x5eed;

    #[test]
    fn a_contribution_is_checked_against_its_passes_in_every_probed_chunk() {
        let numel = 5 * GRAD_CHUNK + 100;
        let segments = vec![0..1000, 1000..numel];
        let mut rng = crate::data::rng::SplitMix64::new(5, 0);
        let passes: Vec<Vec<f32>> = (0..3)
            .map(|_| (0..numel).map(|_| rng.normal() as f32 * 1e-3).collect())
            .collect();
        let parts: Vec<&[f32]> = passes.iter().map(Vec::as_slice).collect();
        let mut maxes = vec![0.0f32; segments.len()];
        for p in &parts {
            for (m, x) in maxes.iter_mut().zip(segment_maxes(p, &segments)) {
                *m = m.max(x);
            }
        }
        let fixed = FixedPoint::from_maxes(&segments, &maxes).unwrap();
        let contribution = fixed.encode(&parts);
        let honest: Vec<Vec<u32>> = parts.iter().map(|p| gradient_sketch(p, SEED)).collect();
        // The second of two slices (elements 2610.. of 5220: chunks 2 to
        // 5, chunk 2 partly), probed in its first and third chunks.
        let slice = numel / 2..numel;
        let probed = [2, 4];
        let bytes = |c: &[i64]| -> Vec<u8> {
            c[slice.clone()]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect()
        };
        let chunks: Vec<Vec<blake3::Hash>> = parts.iter().map(|p| chunk_digests(p)).collect();
        // What the close states of the passes with `sketches`, and the
        // proof a miner that stated them sends.
        let stating = |sketches: &[Vec<u32>]| {
            let stated: Vec<CreditedPass> = parts
                .iter()
                .zip(sketches)
                .enumerate()
                .map(|(id, (p, sketch))| CreditedPass {
                    id: id as u64,
                    params: params_digest(&chunk_digests(p)),
                    sketch: crate::roles::protocol::sketch_digest(sketch),
                })
                .collect();
            let kept = parts.iter().zip(&chunks).zip(sketches);
            let proof = gradient_proof(
                kept.map(|((p, c), s)| (*p, c.as_slice(), s.as_slice())),
                &probed,
            );
            (stated, proof)
        };
        let check_stated = |stated: &[CreditedPass], contribution: &[u8], proof: &[u8]| {
            check_contribution(
                (&CheckedStatements::default(), 0),
                &segments,
                (fixed.exponents(), SEED),
                stated,
                &probed,
                &slice,
                (contribution, proof),
            )
        };
        let check_sketches = |sketches: &[Vec<u32>]| {
            let (stated, proof) = stating(sketches);
            check_stated(&stated, &bytes(&contribution), &proof)
        };
        let (stated, proof) = stating(&honest);
        let check = |contribution: &[u8], proof: &[u8]| check_stated(&stated, contribution, proof);
        assert_eq!(check(&bytes(&contribution), &proof), Ok(()));

        // A sketch of other gradients than the pass's (the honest one's,
        // for gradients it negated) in either probed chunk.
        for q in probed {
            let mut lying = honest.clone();
            lying[1][q * sketch_per_chunk(numel)] ^= 0x8000_0000;
            let err = check_sketches(&lying).unwrap_err();
            assert!(
                err.contains("microbatch 1: the gradient sketch it stated is not"),
                "{err}"
            );
        }
        // A sketch made with signs of its own choosing, not the close's.
        let mut own_signs = honest.clone();
        own_signs[2] = gradient_sketch(parts[2], SEED + 1);
        let err = check_sketches(&own_signs).unwrap_err();
        assert!(
            err.contains("microbatch 2: the gradient sketch it stated is not"),
            "{err}"
        );
        // Its lie elsewhere is left to the probes of other windows.
        let mut lying = honest.clone();
        lying[1][0] ^= 0x8000_0000;
        assert_eq!(check_sketches(&lying), Ok(()));
        // Showing the validator another sketch than it stated.
        let (_, showing) = stating(&lying);
        let err = check(&bytes(&contribution), &showing).unwrap_err();
        assert!(
            err.contains("microbatch 1: the gradient sketch it sent is not the one it stated"),
            "{err}"
        );
        // A window's later slices compare what an earlier one checked
        // instead of hashing it again, and still refuse other bytes: a
        // sketch other than the one checked, or the checked bytes held
        // against another statement.
        let checked = CheckedStatements::default();
        let with = |stated: &[CreditedPass], proof: &[u8]| {
            let exponents = (fixed.exponents(), SEED);
            let sent = (&bytes(&contribution)[..], proof);
            check_contribution(
                (&checked, 3),
                &segments,
                exponents,
                stated,
                &probed,
                &slice,
                sent,
            )
        };
        assert_eq!(with(&stated, &proof), Ok(()));
        assert_eq!(with(&stated, &proof), Ok(()));
        let err = with(&stated, &showing).unwrap_err();
        assert!(
            err.contains("microbatch 1: the gradient sketch it sent is not"),
            "{err}"
        );
        let (restated, _) = stating(&lying);
        let err = with(&restated, &proof).unwrap_err();
        assert!(
            err.contains("microbatch 1: the gradient sketch it sent is not"),
            "{err}"
        );

        let inflated: Vec<i64> = contribution.iter().map(|x| x * 8).collect();
        let err = check(&bytes(&inflated), &proof).unwrap_err();
        assert!(err.contains("not the fixed-point sum"), "{err}");
        // One element moved: caught in a probed chunk (the part of chunk 2
        // in the slice, or chunk 4), not in chunk 3 or 5.
        for (at, caught) in [
            (slice.start, true),
            (4 * GRAD_CHUNK + 9, true),
            (3 * GRAD_CHUNK, false),
            (numel - 1, false),
        ] {
            let mut nudged = contribution.clone();
            nudged[at] += 1 << 24;
            assert_eq!(
                check(&bytes(&nudged), &proof).is_err(),
                caught,
                "element {at}"
            );
        }

        let mut forged = proof.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let err = check(&bytes(&contribution), &forged).unwrap_err();
        assert!(
            err.contains("microbatch 2: the gradient chunk 4 it sent"),
            "{err}"
        );

        let err = check(&bytes(&contribution), &proof[1..]).unwrap_err();
        assert!(err.contains("bytes of gradients for 3 passes"), "{err}");
    }

    #[test]
    fn probes_draw_distinct_chunks_of_the_slice_and_all_of_a_small_one() {
        let slice = 3 * GRAD_CHUNK + 5..20 * GRAD_CHUNK + 1;
        let picked = probed_chunks(9, &slice, 8);
        assert_eq!(picked.len(), 8);
        assert!(picked.windows(2).all(|w| w[0] < w[1]), "{picked:?}");
        assert!(picked.iter().all(|q| (3..=20).contains(q)), "{picked:?}");
        assert_eq!(probed_chunks(9, &slice, 8), picked, "one seed, one draw");
        // Over seeds, every chunk the slice touches is drawn, the partial
        // ones at its ends included.
        let mut seen = [false; 21];
        for seed in 0..200 {
            for q in probed_chunks(seed, &slice, 8) {
                seen[q] = true;
            }
        }
        assert_eq!(seen.iter().filter(|s| **s).count(), 18);
        // A slice of fewer chunks than asked is probed whole.
        let small = GRAD_CHUNK - 1..3 * GRAD_CHUNK;
        assert_eq!(probed_chunks(1, &small, 8), [0, 1, 2]);
        assert!(probed_chunks(1, &(7..7), 8).is_empty());
    }

    #[test]
    fn a_sketch_sums_each_chunk_into_its_own_entries_and_negates_with_the_gradient() {
        let numel = 5 * GRAD_CHUNK + 3;
        let mut rng = crate::data::rng::SplitMix64::new(8, 0);
        let grads: Vec<f32> = (0..numel).map(|_| rng.normal() as f32).collect();
        let per_chunk = sketch_per_chunk(numel);
        assert_eq!(per_chunk, SKETCH_LEN.div_ceil(6));
        let sketch = gradient_sketch(&grads, SEED);
        assert_eq!(sketch.len(), 6 * per_chunk);
        assert_eq!(
            gradient_sketch(&grads, SEED),
            sketch,
            "one seed, one sketch"
        );
        // Another seed draws other signs and entries: every entry of the
        // full chunks changes (the last holds 3 elements, most entries 0).
        let reseeded = gradient_sketch(&grads, SEED + 1);
        let full = 5 * per_chunk;
        assert!(sketch[..full].iter().zip(&reseeded).all(|(a, b)| a != b));
        // Changing one element changes its own chunk's entries only.
        let mut moved = grads.clone();
        moved[2 * GRAD_CHUNK + 5] += 1.0;
        let other = gradient_sketch(&moved, SEED);
        let changed: Vec<usize> = (0..sketch.len())
            .filter(|&i| sketch[i] != other[i])
            .map(|i| i / per_chunk)
            .collect();
        assert_eq!(changed, [2]);
        let negated: Vec<f32> = grads.iter().map(|x| -x).collect();
        let flipped: Vec<u32> = gradient_sketch(&negated, SEED);
        let value = |bits: &u32| f32::from_bits(*bits);
        assert!(sketch
            .iter()
            .zip(&flipped)
            .all(|(a, b)| value(a) == -value(b)));
        // A big gradient's sketch is one entry a chunk, never fewer than
        // SKETCH_LEN in all.
        assert_eq!(sketch_per_chunk(400 * GRAD_CHUNK), 1);
        assert_eq!(sketch_per_chunk(10), SKETCH_LEN);
    }

    fn bundle() -> Bundle {
        Bundle {
            stage: 1,
            weights: vec![7; 100],
            passes: vec![
                (
                    4,
                    Frames {
                        input: Some(vec![1, 2, 3]),
                        grad_in: None,
                    },
                ),
                (
                    9,
                    Frames {
                        input: Some(vec![]),
                        grad_in: Some(vec![5; 10]),
                    },
                ),
            ],
        }
    }

    #[test]
    fn bundles_round_trip() {
        assert_eq!(decode(&encode(&bundle())).unwrap(), bundle());
    }

    #[test]
    fn truncated_padded_or_garbled_bundles_are_refused() {
        let bytes = encode(&bundle());
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Err(BundleError::Length { .. })
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode(&longer), Err(BundleError::Length { .. })));
        assert!(matches!(decode(&bytes[..3]), Err(BundleError::Short(3))));
        let mut garbled = bytes.clone();
        garbled[4] = b'x';
        assert!(matches!(decode(&garbled), Err(BundleError::Header(_))));
        let mut huge = bytes;
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&huge), Err(BundleError::Short(_))));
    }
}
