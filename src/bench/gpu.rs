//! `swarmrun bench compress --device cuda` and `swarmrun bench train
//! --device cuda`: the GPU's side of the two benchmarks, each beside a
//! ceiling measured on the same GPU in the same run (a device-to-device
//! copy; cuBLAS's FP32 matmul).

use std::time::Instant;

use thiserror::Error;

use super::record::Tables;
use crate::compress::cuda::{CudaCodec, CudaError};
use crate::compress::Bits;
use crate::config::JobSpec;
use crate::data::{Corpus, DataError, Dataset, Split};
use crate::gpu::{CudaStage, Gpu, GpuError};
use crate::model::{AdamW, AdamWConfig, GptConfig, ModelError, StageModel};

#[derive(Debug, Error)]
pub enum BenchGpuError {
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] DataError),
}

/// The codec's kernels on a `rows x width` activation-like tensor already
/// on the GPU, in `f32` input GB/s, beside a device-to-device copy of the
/// same tensor (also input bytes, so the copy moves twice that).
pub fn compress(rows: usize, width: usize, tables: &mut Tables) -> Result<(), BenchGpuError> {
    let codec = CudaCodec::new(0)?;
    let x = super::compress::activations(rows, width);
    let bytes = (x.len() * 4) as f64;
    println!(
        "# swarmrun bench compress --device cuda: {rows} x {width} f32 ({:.0} MiB) on the GPU, \
         input GB/s, median of 5 rounds",
        bytes / (1 << 20) as f64
    );
    println!(
        "{:<8} {:>12} {:>12} {:>12} {:>14}",
        "codec", "encode GB/s", "decode GB/s", "copy GB/s", "encode / copy"
    );
    tables.start(
        format!("{rows} x {width} f32 on the GPU, input GB/s, median of 5 rounds"),
        &[
            "codec",
            "encode_gbps",
            "decode_gbps",
            "copy_gbps",
            "encode_per_copy",
        ],
    );
    for (name, bits) in [("int8", Bits::Int8), ("int4", Bits::Int4)] {
        let t = codec.time_resident(&x, (rows, width), bits, 20)?;
        tables.row(vec![
            name.into(),
            (bytes / t.encode_s / 1e9).into(),
            (bytes / t.decode_s / 1e9).into(),
            (bytes / t.copy_s / 1e9).into(),
            (t.copy_s / t.encode_s).into(),
        ]);
        let gbps = |s: f64| bytes / s / 1e9;
        println!(
            "{name:<8} {:>12.1} {:>12.1} {:>12.1} {:>13.2}x",
            gbps(t.encode_s),
            gbps(t.decode_s),
            gbps(t.copy_s),
            t.copy_s / t.encode_s
        );
    }
    Ok(())
}

/// The job's whole model trained on GPU 0 in this process: a step is one
/// window's microbatches, forward and backward on the GPU, the gradient
/// sum and AdamW on the host as a miner does, then the weights uploaded.
/// One row at the job's microbatch size and one at 16 times it (an H200
/// is far from busy with a few hundred tokens), each with the model's
/// FLOP/s as a share of the FP32 matmul rate measured first.
pub fn train(spec: &JobSpec, steps: u32, tables: &mut Tables) -> Result<(), BenchGpuError> {
    let gpu = Gpu::new(0)?;
    let peak = gpu.matmul_flops(8192, 10)?;
    let data = Dataset::new(&Corpus::embedded()?)?;
    // One stage holds the whole model: no boundary, so no bottleneck.
    let config = GptConfig::new(&spec.model, data.tokenizer().vocab_size())?;
    let per_window = spec.pipeline.microbatches_per_window;
    println!(
        "# swarmrun bench train --device cuda: {} ({} layers, {} wide, block {}), {per_window} \
         microbatches a step, {steps} timed steps after 2, on {}",
        spec.job.name,
        config.n_layer,
        config.n_embd,
        config.block_size,
        gpu.name()
    );
    println!(
        "# cuBLAS FP32 matmul (8192^3, pedantic: no TF32): {:.1} TFLOP/s",
        peak / 1e12
    );
    println!(
        "{:>10} {:>12} {:>14} {:>10} {:>8} {:>8} {:>10} {:>11} {:>10}",
        "microbatch",
        "tokens/s",
        "model TFLOP/s",
        "of matmul",
        "fwd ms",
        "bwd ms",
        "host step",
        "first loss",
        "last loss"
    );
    tables.start(
        format!(
            "{} on {}, {per_window} microbatches a step; cuBLAS FP32 matmul {:.1} TFLOP/s",
            spec.job.name,
            gpu.name(),
            peak / 1e12
        ),
        &[
            "microbatch",
            "tokens_per_s",
            "model_tflops",
            "of_matmul_pct",
            "forward_ms",
            "backward_ms",
            "host_step_pct",
            "first_loss",
            "last_loss",
        ],
    );
    let base = spec.pipeline.microbatch_size;
    for batch in [base, base * 16] {
        let row = train_row(
            &gpu,
            &config,
            &data,
            spec.job.seed,
            (batch, per_window),
            steps,
        )?;
        println!(
            "{batch:>10} {:>12.0} {:>14.3} {:>9.2}% {:>8.2} {:>8.2} {:>9.1}% {:>11.4} {:>10.4}",
            row.tokens_per_s,
            row.flops / 1e12,
            100.0 * row.flops / peak,
            1e3 * row.forward_s,
            1e3 * row.backward_s,
            100.0 * row.host_share,
            row.first_loss,
            row.last_loss
        );
        tables.row(vec![
            batch.into(),
            row.tokens_per_s.into(),
            (row.flops / 1e12).into(),
            (100.0 * row.flops / peak).into(),
            (1e3 * row.forward_s).into(),
            (1e3 * row.backward_s).into(),
            (100.0 * row.host_share).into(),
            row.first_loss.into(),
            row.last_loss.into(),
        ]);
    }
    Ok(())
}

struct Row {
    tokens_per_s: f64,
    flops: f64,
    /// Seconds a microbatch's forward pass takes (the loss downloaded), and
    /// its backward pass (the gradients downloaded and summed on the host).
    forward_s: f64,
    backward_s: f64,
    /// Share of the step spent in AdamW and the weights' upload.
    host_share: f64,
    first_loss: f32,
    last_loss: f32,
}

fn train_row(
    gpu: &std::sync::Arc<Gpu>,
    config: &GptConfig,
    data: &Dataset,
    seed: u64,
    (batch, per_window): (usize, usize),
    steps: u32,
) -> Result<Row, BenchGpuError> {
    let mut model = StageModel::new(config, &[config.n_layer], 0, seed)?;
    let mut opt = AdamW::new(AdamWConfig::default(), model.layout());
    let mut stage = CudaStage::new(gpu.clone(), &model)?;
    let t = config.block_size;
    let warmup = 2;
    let (mut losses, mut timed, mut host) = (Vec::new(), 0.0, 0.0);
    let (mut forward_s, mut backward_s) = (0.0, 0.0);
    for step in 0..warmup + steps as usize {
        let started = Instant::now();
        let mut sum = vec![0.0f32; model.numel()];
        let mut loss = 0.0f32;
        for m in 0..per_window {
            let id = (step * per_window + m) as u64;
            let b = data.batch(Split::Train, id, seed, batch, t)?;
            let forward_started = Instant::now();
            let pass = stage.forward(&b.inputs, batch, None, Some(&b.targets))?;
            loss += pass.output()[0];
            let backward_started = Instant::now();
            let grads = stage.gradients(pass, None)?;
            for (s, g) in sum.iter_mut().zip(&grads.params) {
                *s += g;
            }
            if step >= warmup {
                forward_s += (backward_started - forward_started).as_secs_f64();
                backward_s += backward_started.elapsed().as_secs_f64();
            }
        }
        let host_started = Instant::now();
        model.optimizer_step(&mut opt, &sum, 1.0 / per_window as f32)?;
        stage.set_params_flat(&model.params_flat()?)?;
        gpu.synchronize()?;
        losses.push(loss / per_window as f32);
        if step >= warmup {
            timed += started.elapsed().as_secs_f64();
            host += host_started.elapsed().as_secs_f64();
        }
    }
    let tokens = (steps as usize * per_window * batch * t) as f64;
    let tokens_per_s = tokens / timed;
    Ok(Row {
        tokens_per_s,
        flops: tokens_per_s * model.flops_per_token(),
        forward_s: forward_s / (steps as usize * per_window) as f64,
        backward_s: backward_s / (steps as usize * per_window) as f64,
        host_share: host / timed,
        first_loss: losses[0],
        last_loss: *losses.last().unwrap_or(&f32::NAN),
    })
}
