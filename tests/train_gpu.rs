//! Training jobs on a site with `device = "cuda"`: GPU miners train the
//! model and GPU validators replay their passes bit for bit; without a
//! GPU (or without the `cuda` feature) such a job stops with an error that
//! names what is missing.

mod common;

use std::path::{Path, PathBuf};

use common::train::*;
use common::*;

/// A tiny job on one site whose miners and validator compute on `device`:
/// 2 stages of 1 miner each, and a validator replaying half the passes.
fn device_job(dir: &Path, name: &str, device: &str, windows: u64) -> PathBuf {
    coded_device_job(dir, name, device, windows, "")
}

/// [`device_job`] with `compression` as the `[pipeline.compression]` table.
fn coded_device_job(
    dir: &Path,
    name: &str,
    device: &str,
    windows: u64,
    compression: &str,
) -> PathBuf {
    let site = format!(
        "[[site]]\nname = \"gpus\"\nhosts = \"localhost\"\nranks_per_host = 4\ndevice = \"{device}\"\n"
    );
    let roles = "validators = 1\nreplay_rate = 0.5";
    sited_job(dir, name, (roles, &site, compression), windows)
}

/// A tiny 2-stage job in `dir/NAME.toml` with the given `[roles]` table,
/// `[[site]]` tables and `[pipeline.compression]` table, run for `windows`.
fn sited_job(
    dir: &Path,
    name: &str,
    (roles, sites, compression): (&str, &str, &str),
    windows: u64,
) -> PathBuf {
    let run_dir = dir.join(name);
    job_file(
        dir,
        &format!("{name}.toml"),
        &format!(
            "[job]\nname = \"g\"\ntask = \"train\"\nseed = 3\nrun_dir = {run_dir:?}\n\n\
             [model]\nn_layer = 4\nn_head = 2\nn_embd = 32\nblock_size = 16\n\n\
             [pipeline]\nstages = 2\nmicrobatch_size = 4\nmicrobatches_per_window = 6\n\n\
             [pipeline.compression]\n{compression}\n\n\
             [roles]\n{roles}\n\n{sites}\n\
             [network]\nrendezvous = \"tcp://127.0.0.1:0\"\n\n\
             [train]\nwindows = {windows}\nlr = 5e-3\nwarmup_windows = 2\neval_every = 5\neval_microbatches = 2\n"
        ),
    )
}

/// Checks that a run's loss went down (its last `n` windows sum to at
/// least `drop` less than its first `n`) and that no miner was flagged;
/// returns how many passes validators replayed.
fn trained_and_unflagged(what: &str, lines: &[String], (n, drop): (usize, f32)) -> u64 {
    let loss: Vec<f32> = lines
        .iter()
        .map(|l| field(l, "loss").parse().unwrap())
        .collect();
    println!("{what} losses: {loss:?}");
    let (head, tail) = (
        loss[..n].iter().sum::<f32>(),
        loss[loss.len() - n..].iter().sum::<f32>(),
    );
    assert!(tail < head - drop, "the loss did not go down: {loss:?}");
    for l in lines {
        assert_eq!(field(l, "caught"), "[]", "an honest miner was flagged: {l}");
    }
    lines
        .iter()
        .map(|l| field(l, "replayed").parse::<u64>().unwrap())
        .sum()
}

/// Whether this machine has a GPU the stage kernels run on.
fn has_gpu() -> bool {
    #[cfg(feature = "cuda")]
    {
        swarmrun::gpu::Gpu::new(0).is_ok()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

#[test]
fn gpu_miners_train_the_model_and_gpu_validators_replay_their_passes_exactly() {
    gpu_job_trains_and_replays("");
}

/// With a bottleneck and int8 frames, a GPU stage after the first takes
/// the frame's codes and dequantizes them inside its up-projection; the
/// validator's replay takes the same path and matches it bit for bit.
#[test]
fn gpu_miners_with_a_coded_bottleneck_train_and_replay_exactly() {
    gpu_job_trains_and_replays("bottleneck = 8\nquant = \"int8\"");
}

fn gpu_job_trains_and_replays(compression: &str) {
    if !has_gpu() {
        println!("skipped: no GPU");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let job = coded_device_job(dir.path(), "gpu", "cuda", 25, compression);
    let out = swarmrun().arg("launch").arg(&job).output().unwrap();
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "{text}\n{err}");
    assert_eq!(
        text.matches("stage passes on GPU").count(),
        3,
        "two miners and the validator on the GPU:\n{text}"
    );
    let lines = metrics_of(&job);
    assert_eq!(lines.len(), 25);
    let replayed = trained_and_unflagged("GPU job", &lines, (5, 0.5));
    assert!(replayed >= 25, "only {replayed} passes replayed");
    println!("{replayed} GPU passes replayed on the GPU, none flagged");
}

#[test]
fn a_cuda_site_without_a_gpu_stops_with_an_error_naming_what_is_missing() {
    if has_gpu() {
        println!("skipped: this machine has a GPU");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let job = device_job(dir.path(), "nogpu", "cuda", 2);
    let out = swarmrun().arg("launch").arg(&job).output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "a cuda job ran without a GPU");
    let named = if cfg!(feature = "cuda") {
        err.contains("no CUDA driver") || err.contains("no CUDA device")
    } else {
        err.contains("device = \"cuda\" needs swarmrun built with the `cuda` cargo feature")
    };
    assert!(named, "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// One stage served by a CPU miner and a GPU miner at once: their
/// gradients merge in the stage's all-reduce, and each one's passes are
/// replayed by the validator of its own kind of device.
#[test]
fn cpu_and_gpu_miners_serve_one_stage_and_each_is_replayed_on_its_own_device() {
    if !has_gpu() {
        println!("skipped: no GPU");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("mixed");
    // Ranks: 0 orchestrator and 1 validator on "gpu-validators"; 2
    // validator, 3 and 4 miners on "cpus"; 5 and 6 miners on "gpus".
    // Miners are dealt round-robin: each stage gets a CPU and a GPU miner.
    let sites = "[[site]]\nname = \"gpu-validators\"\nhosts = \"localhost\"\nranks_per_host = 2\ndevice = \"cuda\"\n\n\
                 [[site]]\nname = \"cpus\"\nhosts = \"localhost\"\nranks_per_host = 3\n\n\
                 [[site]]\nname = \"gpus\"\nhosts = \"localhost\"\nranks_per_host = 2\ndevice = \"cuda\"\n";
    let roles = "validators = 2\nreplay_rate = 0.5";
    let job = sited_job(dir.path(), "mixed", (roles, sites, ""), 20);
    let check = swarmrun().arg("check").arg(&job).output().unwrap();
    let plan = stdout(&check);
    assert!(!plan.contains("warning"), "{plan}");
    let out = swarmrun().arg("launch").arg(&job).output().unwrap();
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "{text}\n{err}");
    let lines = metrics_of(&job);
    // A CPU validator replaying a GPU miner's pass (or the reverse) would
    // find other bits and flag it: none flagged means each pass went to a
    // validator of its miner's device.
    let replayed = trained_and_unflagged("mixed CPU/GPU job", &lines, (4, 0.3));
    let ledger = std::fs::read_to_string(run_dir.join("ledger.jsonl")).unwrap();
    for miner in [3, 4, 5, 6] {
        assert!(
            ledger.contains(&format!("\"rank\":{miner},")),
            "miner {miner} missing from the ledger"
        );
    }
    assert!(replayed >= 20, "only {replayed} passes replayed");
}

/// A site whose fabric is NCCL: its stages' all-reduces go through NCCL
/// on the GPUs, and, sums of fixed-point values being exact in any order,
/// every loss has the bits of the same job over TCP. One miner per stage,
/// as one GPU allows (NCCL refuses two ranks on one GPU).
#[test]
fn an_nccl_site_of_gpus_trains_to_the_losses_of_a_tcp_site_bit_for_bit() {
    if !has_gpu() {
        println!("skipped: no GPU");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let job = |name: &str, fabric: &str| {
        let site = format!(
            "[[site]]\nname = \"gpus\"\nhosts = \"localhost\"\nranks_per_host = 4\n\
             device = \"cuda\"\nfabric = \"{fabric}\"\n"
        );
        sited_job(dir.path(), name, ("validators = 1", &site, ""), 10)
    };
    let (tcp, _) = run(&job("tcp", "tcp"));
    let (nccl, _) = run(&job("nccl", "nccl"));
    assert_eq!(losses(&tcp), losses(&nccl));
    println!("NCCL site losses: {:?}", losses(&nccl));
}
