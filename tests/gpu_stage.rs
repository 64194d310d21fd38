//! A stage's passes on the GPU (`swarmrun::gpu`): the same numbers as the
//! CPU model up to float rounding, and the same bits when replayed on the
//! same GPU. Without a GPU (CI) each test says so and passes; on a machine
//! with a GPU, a GPU that cannot run the kernels fails the test.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use swarmrun::compress::cuda::CudaError;
use swarmrun::compress::{quantize, Bits, Rounding};
use swarmrun::config::ModelSpec;
use swarmrun::data::{Corpus, Dataset, Split};
use swarmrun::gpu::{CudaStage, Gpu, GpuError, StageData};
use swarmrun::model::{batch_tensors, GptConfig, StageInput, StageModel};

fn gpu() -> Option<Arc<Gpu>> {
    match Gpu::new(0) {
        Ok(gpu) => Some(gpu),
        Err(GpuError::Cuda(CudaError::NoDriver)) => {
            println!("skipped: no GPU (no libcuda)");
            None
        }
        Err(GpuError::Cuda(CudaError::NoDevice(e))) => {
            println!("skipped: no GPU ({e})");
            None
        }
        Err(e) => panic!("a GPU seems present but the stage cannot run on it: {e}"),
    }
}

/// Deterministic values in [-scale, scale).
fn noise(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// `||a - b|| / ||b||`.
fn rel_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        assert!(x.is_finite(), "a GPU value is not finite");
        diff += (f64::from(x) - f64::from(y)).powi(2);
        norm += f64::from(y).powi(2);
    }
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

struct Case {
    name: &'static str,
    spec: ModelSpec,
    layers: Vec<usize>,
    bottleneck: Option<usize>,
    /// Frames quantized to these bits: the GPU gets the codes.
    quant: Option<Bits>,
    batch: usize,
}

fn cases() -> Vec<Case> {
    let small = ModelSpec {
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        block_size: 8,
        dropout: 0.0,
    };
    let quickstart = ModelSpec {
        n_layer: 4,
        n_head: 4,
        n_embd: 128,
        block_size: 64,
        dropout: 0.0,
    };
    vec![
        Case {
            name: "small, whole",
            spec: small.clone(),
            layers: vec![2],
            bottleneck: None,
            quant: None,
            batch: 3,
        },
        Case {
            name: "small, 2 stages",
            spec: small.clone(),
            layers: vec![1, 1],
            bottleneck: None,
            quant: None,
            batch: 3,
        },
        Case {
            name: "small, 2 stages, bottleneck 8",
            spec: small,
            layers: vec![1, 1],
            bottleneck: Some(8),
            quant: None,
            batch: 3,
        },
        Case {
            name: "quickstart, 2 stages, bottleneck 16",
            spec: quickstart.clone(),
            layers: vec![2, 2],
            bottleneck: Some(16),
            quant: None,
            batch: 12,
        },
        Case {
            name: "quickstart, bottleneck 16, int8 codes",
            spec: quickstart.clone(),
            layers: vec![2, 2],
            bottleneck: Some(16),
            quant: Some(Bits::Int8),
            batch: 12,
        },
        Case {
            name: "quickstart, 2 stages, int4 codes",
            spec: quickstart,
            layers: vec![2, 2],
            bottleneck: None,
            quant: Some(Bits::Int4),
            batch: 12,
        },
    ]
}

/// One stage's pass on both devices: the output, the parameter gradients
/// and the input gradient.
struct Both {
    cpu: [Vec<f32>; 3],
    gpu: [Vec<f32>; 3],
}

fn run_stage(gpu: &Arc<Gpu>, case: &Case, stage: usize, replays: usize) -> Vec<Both> {
    let data = Dataset::new(&Corpus::embedded().unwrap()).unwrap();
    let config = GptConfig {
        bottleneck: case.bottleneck,
        ..GptConfig::new(&case.spec, data.tokenizer().vocab_size()).unwrap()
    };
    let t = config.block_size;
    let model = StageModel::new(&config, &case.layers, stage, 1337).unwrap();
    let batch = data.batch(Split::Train, 7, 1337, case.batch, t).unwrap();
    let (ids, targets) = batch_tensors(&batch).unwrap();
    let n = case.batch * t;
    let width = config.boundary_width();
    let raw = noise(n * width, 11 + stage as u64, 1.0);
    // With a codec, the CPU model gets the frame's values and the GPU its
    // codes.
    let coded = case
        .quant
        .map(|bits| quantize(&raw, n, width, bits, Rounding::Nearest).unwrap());
    let input = coded.as_ref().map_or(raw, |q| q.dequantize());
    let input_t =
        candle_core::Tensor::from_slice(&input, (case.batch, t, width), &candle_core::Device::Cpu)
            .unwrap();
    let last = stage + 1 == case.layers.len();
    let out_width = if config.bottleneck.is_some() {
        width
    } else {
        config.n_embd
    };
    let grad_out = noise(n * out_width, 23 + stage as u64, 1e-3);
    let grad_out_t = candle_core::Tensor::from_slice(
        &grad_out,
        (case.batch, t, out_width),
        &candle_core::Device::Cpu,
    )
    .unwrap();

    let cpu_pass = model
        .forward(
            match stage {
                0 => StageInput::Tokens(&ids),
                _ => StageInput::Activations(&input_t, &ids),
            },
            last.then_some(&targets),
        )
        .unwrap();
    let cpu_out = cpu_pass
        .output()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let cpu_grads = model
        .gradients(cpu_pass, (!last).then_some(&grad_out_t))
        .unwrap();
    let cpu_input = match cpu_grads.input {
        Some(g) => g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        None => Vec::new(),
    };
    let cpu = [cpu_out, cpu_grads.params, cpu_input];

    (0..replays)
        .map(|_| {
            let stage_gpu = CudaStage::new(gpu.clone(), &model).unwrap();
            let pass = stage_gpu
                .forward(
                    &batch.inputs,
                    case.batch,
                    (stage > 0).then_some(match &coded {
                        Some(q) => StageData::Codes(q),
                        None => StageData::Values(&input),
                    }),
                    last.then_some(batch.targets.as_slice()),
                )
                .unwrap();
            let out = pass.output().to_vec();
            let grads = stage_gpu
                .gradients(pass, (!last).then_some(grad_out.as_slice()))
                .unwrap();
            Both {
                cpu: cpu.clone(),
                gpu: [out, grads.params, grads.input.unwrap_or_default()],
            }
        })
        .collect()
}

#[test]
fn gpu_passes_match_the_cpu_model_within_float_rounding() {
    let Some(gpu) = gpu() else { return };
    println!("GPU: {}", gpu.name());
    println!(
        "{:<38} {:>5} {:>12} {:>12} {:>12}",
        "case", "stage", "output", "param grads", "input grad"
    );
    for case in cases() {
        for stage in 0..case.layers.len() {
            let both = run_stage(&gpu, &case, stage, 1).pop().unwrap();
            let errs: Vec<f64> = (0..3)
                .map(|i| match both.cpu[i].is_empty() {
                    true => 0.0,
                    false => rel_error(&both.gpu[i], &both.cpu[i]),
                })
                .collect();
            println!(
                "{:<38} {:>5} {:>12.3e} {:>12.3e} {:>12.3e}",
                case.name, stage, errs[0], errs[1], errs[2]
            );
            assert_eq!(
                both.gpu[2].len(),
                both.cpu[2].len(),
                "{}: input gradient",
                case.name
            );
            for (what, err) in ["output", "parameter gradients", "input gradient"]
                .iter()
                .zip(&errs)
            {
                assert!(
                    *err < 1e-4,
                    "{}, stage {stage}: the GPU's {what} differ from the CPU's by {err:.3e}",
                    case.name
                );
            }
        }
    }
}

#[test]
fn a_gpu_pass_replayed_on_the_same_gpu_gives_the_same_bits() {
    let Some(gpu) = gpu() else { return };
    for case in cases() {
        for stage in 0..case.layers.len() {
            let runs = run_stage(&gpu, &case, stage, 2);
            for i in 0..3 {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&runs[0].gpu[i]),
                    bits(&runs[1].gpu[i]),
                    "{}, stage {stage}: replay {i} differs",
                    case.name
                );
            }
        }
    }
    println!("every pass replayed bit for bit on {}", gpu.name());
}

#[test]
fn token_ids_past_the_vocabulary_are_refused_before_reaching_the_gpu() {
    let Some(gpu) = gpu() else { return };
    let spec = ModelSpec {
        n_layer: 1,
        n_head: 1,
        n_embd: 8,
        block_size: 4,
        dropout: 0.0,
    };
    let config = GptConfig::new(&spec, 10).unwrap();
    let model = StageModel::new(&config, &[1], 0, 1).unwrap();
    let stage = CudaStage::new(gpu, &model).unwrap();
    let err = stage
        .forward(&[1, 2, 10, 3], 1, None, Some(&[1, 2, 3, 4]))
        .err()
        .unwrap();
    assert!(
        matches!(err, GpuError::Token { id: 10, vocab: 10 }),
        "{err}"
    );
}
