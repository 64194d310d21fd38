//! One stage at a time: gradients against finite differences, causality,
//! gradient accumulation, checkpoints, and the errors of misuse.

use candle_core::{DType, Device, Tensor};
use swarmrun::config::ModelSpec;
use swarmrun::data::rng::SplitMix64;
use swarmrun::model::{digest, AdamW, AdamWConfig, GptConfig, ModelError, StageInput, StageModel};

const SEED: u64 = 7;

fn tiny(n_layer: usize) -> GptConfig {
    GptConfig {
        vocab_size: 10,
        n_layer,
        n_head: 2,
        n_embd: 8,
        block_size: 6,
        bottleneck: None,
    }
}

fn normal(len: usize, id: u64) -> Vec<f64> {
    let mut rng = SplitMix64::new(99, id);
    (0..len).map(|_| rng.normal()).collect()
}

/// `(2, 5, width)` activations.
fn acts(values: Vec<f64>, width: usize, dtype: DType) -> Tensor {
    Tensor::from_vec(values, (2, 5, width), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn tokens(id: u64) -> Tensor {
    let mut rng = SplitMix64::new(5, id);
    let ids: Vec<u32> = (0..10).map(|_| rng.below(10) as u32).collect();
    Tensor::from_vec(ids, (2, 5), &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Checks `analytic[i]` against central differences of `f` in parameter
/// `i`, for three entries of every parameter tensor. Parameters are `f32`,
/// so the step is taken in `f32` and divided by the step actually made.
fn check_param_grads(stage: &mut StageModel, analytic: &[f32], f: impl Fn(&StageModel) -> f64) {
    let params = stage.params_flat().unwrap();
    let layout = stage.layout().to_vec();
    for (k, p) in layout.iter().enumerate() {
        let mut rng = SplitMix64::new(3, k as u64);
        for _ in 0..3 {
            let i = p.offset + rng.below(p.numel() as u64) as usize;
            let h = 1e-4 * params[i].abs().max(1.0);
            let mut probe = params.clone();
            probe[i] = params[i] + h;
            stage.set_params_flat(&probe).unwrap();
            let up = f(stage);
            probe[i] = params[i] - h;
            stage.set_params_flat(&probe).unwrap();
            let down = f(stage);
            let step = f64::from(params[i] + h) - f64::from(params[i] - h);
            let numeric = (up - down) / step;
            let g = f64::from(analytic[i]);
            assert!(
                (numeric - g).abs() <= 1e-5 * g.abs().max(1e-2),
                "{}[{}]: autograd {g}, finite difference {numeric}",
                p.name,
                i - p.offset
            );
        }
    }
    stage.set_params_flat(&params).unwrap();
}

/// Checks the input and parameter gradients of the middle stage of three
/// (one block, and the bottleneck's two halves if `config` has one)
/// against central differences.
fn check_middle_stage_gradients(config: &GptConfig) {
    let mut stage = StageModel::with_dtype(config, &[1, 1, 1], 1, SEED, DType::F64).unwrap();
    let width = config.boundary_width();
    let n = 10 * width;
    let x = normal(n, 0);
    let r = acts(normal(n, 1), width, DType::F64);
    let f = |stage: &StageModel, x: &[f64]| {
        let x = acts(x.to_vec(), width, DType::F64);
        let pass = stage
            .forward(StageInput::Activations(&x, &tokens(0)), None)
            .unwrap();
        scalar(&(pass.output() * &r).unwrap().sum_all().unwrap())
    };
    let pass = stage
        .forward(
            StageInput::Activations(&acts(x.clone(), width, DType::F64), &tokens(0)),
            None,
        )
        .unwrap();
    let grad_x = stage.backward(pass, Some(&r)).unwrap().unwrap();
    let grad_x: Vec<f64> = grad_x.flatten_all().unwrap().to_vec1().unwrap();

    let eps = 1e-6;
    for i in (0..n).step_by(7) {
        let (mut up, mut down) = (x.clone(), x.clone());
        up[i] += eps;
        down[i] -= eps;
        let numeric = (f(&stage, &up) - f(&stage, &down)) / (2.0 * eps);
        assert!(
            (numeric - grad_x[i]).abs() <= 1e-7 * grad_x[i].abs().max(1.0),
            "input[{i}]: autograd {}, finite difference {numeric}",
            grad_x[i]
        );
    }
    let grads = stage.grads_flat();
    check_param_grads(&mut stage, &grads, |s| f(s, &x));
}

#[test]
fn block_gradients_match_finite_differences_in_f64() {
    check_middle_stage_gradients(&tiny(3));
}

#[test]
fn bottleneck_gradients_match_finite_differences_in_f64() {
    let config = GptConfig {
        bottleneck: Some(3),
        ..tiny(3)
    };
    let stage = StageModel::new(&config, &[1, 1, 1], 1, SEED).unwrap();
    let names: Vec<&str> = stage.layout().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names[..3],
        [
            "boundary.0.up.weight",
            "boundary.0.wte.weight",
            "boundary.0.wpe.weight"
        ]
    );
    assert_eq!(
        names[names.len() - 2..],
        ["boundary.1.ln.weight", "boundary.1.down.weight"]
    );
    check_middle_stage_gradients(&config);
}

#[test]
fn only_the_bottleneck_code_crosses_a_boundary() {
    let config = GptConfig {
        bottleneck: Some(3),
        ..tiny(2)
    };
    let s0 = StageModel::new(&config, &[1, 1], 0, SEED).unwrap();
    let s1 = StageModel::new(&config, &[1, 1], 1, SEED).unwrap();
    let code = s0.forward(StageInput::Tokens(&tokens(0)), None).unwrap();
    assert_eq!(code.output().dims(), &[2, 5, 3]);
    let pass = s1
        .forward(
            StageInput::Activations(code.output(), &tokens(0)),
            Some(&tokens(1)),
        )
        .unwrap();
    assert!(pass.loss().unwrap().is_finite());
    // The whole residual stream is refused: the receiver expects the code.
    let stream = acts(normal(80, 2), 8, DType::F32);
    let err = s1
        .forward(
            StageInput::Activations(&stream, &tokens(0)),
            Some(&tokens(1)),
        )
        .unwrap_err();
    assert!(err.to_string().contains("(B, T <= 6, 3)"), "{err}");
}

#[test]
fn whole_model_loss_gradients_match_finite_differences_in_f64() {
    let mut stage = StageModel::with_dtype(&tiny(1), &[1], 0, SEED, DType::F64).unwrap();
    let (ids, targets) = (tokens(0), tokens(1));
    let loss = |s: &StageModel| {
        let pass = s.forward(StageInput::Tokens(&ids), Some(&targets)).unwrap();
        scalar(pass.output())
    };
    let pass = stage
        .forward(StageInput::Tokens(&ids), Some(&targets))
        .unwrap();
    stage.backward(pass, None).unwrap();
    let grads = stage.grads_flat();
    check_param_grads(&mut stage, &grads, loss);
}

#[test]
fn attention_is_causal() {
    let stage = StageModel::new(&tiny(3), &[1, 1, 1], 1, SEED).unwrap();
    let x = normal(80, 0);
    let mut later = x.clone();
    later[8 * 3 + 2] += 1.0; // sequence 0, position 3
    let out = |x: Vec<f64>| {
        let x = acts(x, 8, DType::F32);
        let pass = stage
            .forward(StageInput::Activations(&x, &tokens(0)), None)
            .unwrap();
        pass.output().to_vec3::<f32>().unwrap()
    };
    let (a, b) = (out(x), out(later));
    assert_eq!(a[0][..3], b[0][..3]);
    assert_ne!(a[0][3], b[0][3]);
    assert_eq!(a[1], b[1]);
}

#[test]
fn gradients_add_up_over_microbatches_until_zeroed() {
    let mut stage = StageModel::new(&tiny(1), &[1], 0, SEED).unwrap();
    let (ids, targets) = (tokens(0), tokens(1));
    let backward = |stage: &mut StageModel| {
        let pass = stage
            .forward(StageInput::Tokens(&ids), Some(&targets))
            .unwrap();
        stage.backward(pass, None).unwrap();
    };
    backward(&mut stage);
    let once = stage.grads_flat();
    backward(&mut stage);
    assert_eq!(stage.microbatches(), 2);
    let twice: Vec<f32> = once.iter().map(|g| g + g).collect();
    assert_eq!(stage.grads_flat(), twice);
    stage.zero_grads();
    assert_eq!(stage.microbatches(), 0);
    assert!(stage.grads_flat().iter().all(|&g| g == 0.0));
}

#[test]
fn miners_applying_the_same_gradients_agree_on_the_weights_digest() {
    let layers = [1, 1];
    let mut a = StageModel::new(&tiny(2), &layers, 1, SEED).unwrap();
    let mut b = StageModel::new(&tiny(2), &layers, 1, SEED).unwrap();
    let before = a.weights_digest().unwrap();
    assert_eq!(before, digest(&a.params_flat().unwrap()));
    let grads: Vec<f32> = normal(a.numel(), 4).iter().map(|&g| g as f32).collect();
    for stage in [&mut a, &mut b] {
        let mut opt = AdamW::new(AdamWConfig::default(), stage.layout());
        stage.optimizer_step(&mut opt, &grads, 0.5).unwrap();
    }
    assert_eq!(a.weights_digest().unwrap(), b.weights_digest().unwrap());
    assert_ne!(a.weights_digest().unwrap(), before);
}

/// The step updates the weights where candle keeps them; a miner on an
/// older build, or a validator replaying the step from a checkpoint's flat
/// buffers, steps a flat copy: both must land on the same bits.
#[test]
fn a_step_in_place_lands_on_the_bits_of_a_step_on_the_flat_weights() {
    let layers = [1, 1];
    let mut stage = StageModel::new(&tiny(2), &layers, 1, SEED).unwrap();
    let mut flat = stage.params_flat().unwrap();
    let config = AdamWConfig {
        warmup_steps: 1,
        ..AdamWConfig::default()
    };
    let (mut in_place, mut on_flat) = (
        AdamW::new(config.clone(), stage.layout()),
        AdamW::new(config, stage.layout()),
    );
    for step in 0..3 {
        let grads: Vec<f32> = normal(stage.numel(), 10 + step)
            .iter()
            .map(|&g| g as f32)
            .collect();
        stage.optimizer_step(&mut in_place, &grads, 0.25).unwrap();
        on_flat.step(&mut flat, &grads, 0.25).unwrap();
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&stage.params_flat().unwrap()), bits(&flat));
    assert_eq!(stage.weights_digest().unwrap(), digest(&flat));
    assert_eq!(in_place.state_digest(), on_flat.state_digest());
    assert_eq!(in_place.steps_taken(), 3);
}

#[test]
fn checkpoint_round_trips_and_refuses_other_stages_and_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stage1.safetensors");
    let layers = [1, 1];
    let saved = StageModel::new(&tiny(2), &layers, 1, SEED).unwrap();
    saved.save_safetensors(&path).unwrap();

    let mut other_seed = StageModel::new(&tiny(2), &layers, 1, SEED + 1).unwrap();
    assert_ne!(
        other_seed.weights_digest().unwrap(),
        saved.weights_digest().unwrap()
    );
    other_seed.load_safetensors(&path).unwrap();
    assert_eq!(
        other_seed.params_flat().unwrap(),
        saved.params_flat().unwrap()
    );

    let mut stage0 = StageModel::new(&tiny(2), &layers, 0, SEED).unwrap();
    let err = stage0.load_safetensors(&path).unwrap_err();
    assert!(matches!(err, ModelError::Checkpoint { .. }), "{err}");

    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40; // the top of the last weight's exponent
    std::fs::write(&path, &bytes).unwrap();
    let err = other_seed.load_safetensors(&path).unwrap_err();
    assert!(err.to_string().contains("digest"), "{err}");

    let err = other_seed
        .load_safetensors(&dir.path().join("missing"))
        .unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }), "{err}");
}

#[test]
fn misuse_is_a_typed_error() {
    let spec = ModelSpec {
        dropout: 0.1,
        ..ModelSpec::default()
    };
    assert!(matches!(
        GptConfig::new(&spec, 65),
        Err(ModelError::Dropout(_))
    ));
    let cfg = tiny(2);
    assert!(matches!(
        StageModel::new(&cfg, &[1, 2], 0, SEED),
        Err(ModelError::LayerSplit { .. })
    ));
    assert!(matches!(
        StageModel::new(&cfg, &[1, 1], 2, SEED),
        Err(ModelError::NoSuchStage { .. })
    ));
    assert!(matches!(
        StageModel::with_dtype(&cfg, &[1, 1], 0, SEED, DType::BF16),
        Err(ModelError::DType(DType::BF16))
    ));

    let mut first = StageModel::new(&cfg, &[1, 1], 0, SEED).unwrap();
    let mut last = StageModel::new(&cfg, &[1, 1], 1, SEED).unwrap();
    let (ids, x) = (tokens(0), acts(normal(80, 0), 8, DType::F32));
    assert!(matches!(
        first.forward(StageInput::Activations(&x, &ids), None),
        Err(ModelError::WrongInput { stage: 0, .. })
    ));
    assert!(matches!(
        last.forward(StageInput::Activations(&x, &ids), None),
        Err(ModelError::Targets { needed: true, .. })
    ));
    assert!(matches!(
        first.forward(StageInput::Tokens(&ids), Some(&ids)),
        Err(ModelError::Targets { needed: false, .. })
    ));
    let wide = Tensor::zeros((2, 5, 9), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        last.forward(StageInput::Activations(&wide, &ids), Some(&ids)),
        Err(ModelError::Shape { .. })
    ));

    let pass = first.forward(StageInput::Tokens(&ids), None).unwrap();
    assert!(matches!(pass.loss(), Err(ModelError::NotLastStage)));
    assert!(matches!(
        first.backward(pass, None),
        Err(ModelError::GradOutput { needed: true, .. })
    ));
    let pass = last
        .forward(StageInput::Activations(&x, &ids), Some(&ids))
        .unwrap();
    assert!(matches!(
        last.backward(pass, Some(&x)),
        Err(ModelError::GradOutput { needed: false, .. })
    ));
    assert!(matches!(
        last.set_params_flat(&[0.0; 3]),
        Err(ModelError::FlatLength { got: 3, .. })
    ));
}

#[test]
fn matmul_params_leave_out_both_embeddings_and_keep_the_lm_head() {
    let config = GptConfig {
        vocab_size: 10,
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        block_size: 4,
        bottleneck: None,
    };
    let whole = StageModel::new(&config, &[2], 0, 1).unwrap();
    // Per block: 2 LayerNorm gains (8 each), c_attn 8x24, c_proj 8x8,
    // c_fc 8x32, mlp c_proj 32x8; then ln_f (8) and the LM head 8x10.
    let block = 2 * 8 + 8 * 24 + 8 * 8 + 8 * 32 + 32 * 8;
    assert_eq!(whole.matmul_params(), 2 * block + 8 + 8 * 10);
    // The embeddings, wte 10x8 and wpe 4x8, are all that is left out.
    assert_eq!(whole.numel() - whole.matmul_params(), 10 * 8 + 4 * 8);
    // nanoGPT's estimate: 6 per matmul parameter, 12 x n_layer x n_embd x
    // block_size for attention.
    let flops = 6.0 * whole.matmul_params() as f64 + (12 * 2 * 8 * 4) as f64;
    assert_eq!(whole.flops_per_token(), flops);
}

/// A receiver's own embeddings of the tokens are looked up, not
/// multiplied, and the stages of a cut model add up to the whole (less
/// what the bottleneck adds).
#[test]
fn stage_flops_count_their_own_blocks_and_add_up_to_the_whole_model() {
    let config = tiny(3);
    let whole = StageModel::new(&config, &[3], 0, SEED).unwrap();
    let cut: Vec<StageModel> = (0..2)
        .map(|s| StageModel::new(&config, &[1, 2], s, SEED).unwrap())
        .collect();
    let sum: f64 = cut.iter().map(StageModel::flops_per_token).sum();
    assert_eq!(sum, whole.flops_per_token());

    let narrow = GptConfig {
        bottleneck: Some(2),
        ..tiny(3)
    };
    let receiver = StageModel::new(&narrow, &[1, 2], 1, SEED).unwrap();
    let up = receiver
        .layout()
        .iter()
        .filter(|p| p.name.ends_with("wte.weight") || p.name.ends_with("wpe.weight"))
        .count();
    assert_eq!(up, 2, "the receiver has embeddings of its own");
    assert_eq!(
        receiver.numel() - receiver.matmul_params(),
        10 * 8 + 6 * 8,
        "and they are all that is left out"
    );
}
