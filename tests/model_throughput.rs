//! Training speed of nanoGPT's small CPU shakespeare-char model (4 layers,
//! 4 heads, 128 wide, block 64, batch 12) in one process. Ignored by
//! default: run it in release mode,
//!
//! ```text
//! CANDLE_NUM_THREADS=1 cargo test --release --test model_throughput -- --ignored --nocapture
//! ```
//!
//! `SWARMRUN_BENCH_STEPS` (default 100) sets the number of timed steps;
//! with 2000 it also shows where validation loss ends (nanoGPT: about 1.88).
//! `SWARMRUN_BENCH_MICROBATCHES` (default 1) splits each step's 12
//! sequences into that many microbatches, which run concurrently.
//!
//! On the 2-core development VM (best of runs; the VM is shared), with
//! `CANDLE_NUM_THREADS=1`: two microbatches 16.4k tokens/s (47 ms a step;
//! validation loss 1.887 after 2000 steps), one microbatch 10.5-11k, one
//! microbatch on one thread (`RAYON_NUM_THREADS=1`) 9.3k. Without
//! `CANDLE_NUM_THREADS=1`: 8k with one microbatch, 6.6k with two.

use std::time::Instant;

use swarmrun::config::ModelSpec;
use swarmrun::data::{Corpus, Dataset, Split};
use swarmrun::model::{AdamWConfig, GptConfig, LocalPipeline};

#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn tokens_per_second_of_the_small_shakespeare_model() {
    let env = |name, default| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let steps = env("SWARMRUN_BENCH_STEPS", 100);
    let microbatches = env("SWARMRUN_BENCH_MICROBATCHES", 1);
    let data = Dataset::new(&Corpus::embedded().unwrap()).unwrap();
    let spec = ModelSpec::default(); // 4 layers, 4 heads, 128 wide, block 64
    let (batch_size, block) = (12, spec.block_size);
    let cfg = GptConfig::new(&spec, data.tokenizer().vocab_size()).unwrap();
    let adamw = AdamWConfig {
        warmup_steps: 100,
        decay_steps: steps.max(101),
        ..AdamWConfig::default()
    };
    let mut model = LocalPipeline::new(&cfg, &[spec.n_layer], 1337, &adamw).unwrap();
    let val_loss = |m: &LocalPipeline| {
        let losses: Vec<f32> = (0..20)
            .map(|id| {
                let b = data.batch(Split::Val, id, 1, batch_size, block).unwrap();
                m.loss(&b).unwrap()
            })
            .collect();
        losses.iter().sum::<f32>() / losses.len() as f32
    };
    // The step's 12 sequences, as `microbatches` microbatches.
    let batches = |step: u64| -> Vec<_> {
        (0..microbatches)
            .map(|m| {
                let id = step * microbatches + m;
                let rows = batch_size / microbatches as usize;
                data.batch(Split::Train, id, 1337, rows, block).unwrap()
            })
            .collect()
    };
    model.train_step(&batches(0)).unwrap(); // warm up allocator and threads
    let start = Instant::now();
    let mut last = 0.0;
    for step in 1..=steps {
        last = model.train_step(&batches(step)).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let tokens = (steps as usize * batch_size * block) as f64;
    println!(
        "{steps} steps of {batch_size}x{block} tokens ({microbatches} microbatches) in {secs:.2} s: \
         {:.0} tokens/s, {:.1} ms/step, threads {}, last train loss {last:.4}, val loss {:.4}",
        tokens / secs,
        secs * 1e3 / steps as f64,
        candle_core::utils::get_num_threads(),
        val_loss(&model),
    );
}
