//! Training through pipeline stages in one process: split parity,
//! determinism across runs and thread counts, and learning.

use std::process::Command;
use std::sync::OnceLock;

use swarmrun::config::ModelSpec;
use swarmrun::data::{Batch, Corpus, Dataset, Split};
use swarmrun::model::{AdamWConfig, GptConfig, LocalPipeline};

const SEED: u64 = 1337;

fn shakespeare() -> &'static Dataset {
    static DATA: OnceLock<Dataset> = OnceLock::new();
    DATA.get_or_init(|| Dataset::new(&Corpus::embedded().unwrap()).unwrap())
}

fn config(n_layer: usize, n_head: usize, n_embd: usize, block_size: usize) -> GptConfig {
    let spec = ModelSpec {
        n_layer,
        n_head,
        n_embd,
        block_size,
        dropout: 0.0,
    };
    GptConfig::new(&spec, shakespeare().tokenizer().vocab_size()).unwrap()
}

fn train_batches(step: u64, microbatches: u64, batch_size: usize, block: usize) -> Vec<Batch> {
    (0..microbatches)
        .map(|m| {
            let id = step * microbatches + m;
            shakespeare()
                .batch(Split::Train, id, SEED, batch_size, block)
                .unwrap()
        })
        .collect()
}

/// Losses of `steps` AdamW steps of two microbatches each.
fn train(config: &GptConfig, layers: &[usize], steps: u64, batch_size: usize) -> Vec<f32> {
    let adamw = AdamWConfig {
        lr: 1e-2,
        warmup_steps: 5,
        decay_steps: steps,
        ..AdamWConfig::default()
    };
    let mut model = LocalPipeline::new(config, layers, SEED, &adamw).unwrap();
    (0..steps)
        .map(|step| {
            let batches = train_batches(step, 2, batch_size, config.block_size);
            model.train_step(&batches).unwrap()
        })
        .collect()
}

fn bits(losses: &[f32]) -> Vec<u32> {
    losses.iter().map(|l| l.to_bits()).collect()
}

#[test]
fn one_two_and_four_stages_start_equal_and_train_to_bit_identical_losses() {
    let cfg = config(4, 2, 32, 16);
    let splits: [&[usize]; 3] = [&[4], &[2, 2], &[1, 1, 1, 1]];
    let adamw = AdamWConfig::default();
    let initial: Vec<Vec<f32>> = splits
        .iter()
        .map(|layers| {
            LocalPipeline::new(&cfg, layers, SEED, &adamw)
                .unwrap()
                .params_flat()
                .unwrap()
        })
        .collect();
    assert!(initial.iter().all(|p| *p == initial[0]));

    let losses: Vec<Vec<f32>> = splits.iter().map(|l| train(&cfg, l, 20, 4)).collect();
    assert!(losses[0][19] < losses[0][0] - 0.5, "{:?}", losses[0]);
    for (layers, l) in splits.iter().zip(&losses) {
        assert_eq!(
            bits(l),
            bits(&losses[0]),
            "split {layers:?}: {l:?} vs {:?}",
            losses[0]
        );
    }
}

#[test]
fn two_runs_with_one_seed_give_bit_identical_losses_and_weights() {
    let cfg = config(2, 2, 32, 16);
    let adamw = AdamWConfig::default();
    let run = || {
        let mut model = LocalPipeline::new(&cfg, &[1, 1], SEED, &adamw).unwrap();
        let losses: Vec<f32> = (0..5)
            .map(|s| model.train_step(&train_batches(s, 2, 4, 16)).unwrap())
            .collect();
        let digests: Vec<_> = model
            .stages()
            .iter()
            .map(|s| s.weights_digest().unwrap())
            .collect();
        (bits(&losses), digests)
    };
    assert_eq!(run(), run());
    let other = LocalPipeline::new(&cfg, &[1, 1], SEED + 1, &adamw).unwrap();
    let first = LocalPipeline::new(&cfg, &[1, 1], SEED, &adamw).unwrap();
    assert_ne!(other.params_flat().unwrap(), first.params_flat().unwrap());
}

/// Set in the child processes of the thread-count test.
const CHILD_ENV: &str = "SWARMRUN_MODEL_THREADS_CHILD";

#[test]
fn one_and_two_threads_give_bit_identical_losses() {
    // Wide enough that gemm splits matmuls across threads (its threshold
    // is m*n*k > 48*48*256).
    let cfg = config(2, 2, 64, 32);
    if std::env::var_os(CHILD_ENV).is_some() {
        println!("losses {:?}", bits(&train(&cfg, &[1, 1], 3, 8)));
        return;
    }
    // candle reads RAYON_NUM_THREADS at every matmul, so each thread count
    // runs in its own process rather than racing other tests on the
    // environment.
    let run = |threads: &str| {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "one_and_two_threads_give_bit_identical_losses",
                "--exact",
                "--nocapture",
            ])
            .env(CHILD_ENV, "1")
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let line = stdout.lines().find(|l| l.starts_with("losses ")).unwrap();
        line.to_string()
    };
    assert_eq!(run("1"), run("2"));
}

#[test]
fn loss_goes_down_on_the_embedded_corpus() {
    let cfg = config(2, 2, 32, 32);
    let adamw = AdamWConfig {
        lr: 5e-3,
        warmup_steps: 5,
        decay_steps: 50,
        ..AdamWConfig::default()
    };
    let mut model = LocalPipeline::new(&cfg, &[1, 1], SEED, &adamw).unwrap();
    let val: Vec<Batch> = (0..4)
        .map(|id| shakespeare().batch(Split::Val, id, SEED, 8, 32).unwrap())
        .collect();
    let val_loss = |m: &LocalPipeline| val.iter().map(|b| m.loss(b).unwrap()).sum::<f32>() / 4.0;
    let before = val_loss(&model);
    // Uniform guessing over 65 characters.
    assert!((before - 65f32.ln()).abs() < 0.1, "{before}");
    for step in 0..50 {
        model.train_step(&train_batches(step, 2, 8, 32)).unwrap();
    }
    let after = val_loss(&model);
    // A model that only counts characters plateaus near 3.3.
    assert!(after < 3.0, "validation loss {before} -> {after}");
}
