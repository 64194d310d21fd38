//! Checkpoints of a two-stage model: exact round trips, what `latest`
//! trusts, damage, pruning, and `swarmrun sample` on a checkpoint.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use swarmrun::checkpoint::{CheckpointError, Checkpoints, Manifest};
use swarmrun::config;
use swarmrun::data::rng::SplitMix64;
use swarmrun::data::{Corpus, Tokenizer};
use swarmrun::model::{AdamW, AdamWConfig, GptConfig, StageModel};
use swarmrun::pipeline::Router;

const JOB: &str = "[job]\nname = \"ckpt\"\nseed = 5\ntask = \"train\"\n\n\
    [model]\nn_layer = 2\nn_head = 2\nn_embd = 16\nblock_size = 16\n\n\
    [pipeline]\nstages = 2\n\n\
    [[site]]\nname = \"local\"\nhosts = \"localhost\"\nranks_per_host = 3\n";

/// The job's two stages, each with an AdamW that has taken two steps on
/// made-up gradients, so the moments and step count are not their zeros.
fn trained_stages(seed: u64) -> Vec<(StageModel, AdamW)> {
    let spec = config::parse(JOB, Path::new("job.toml")).unwrap();
    let vocab = Tokenizer::from_text(Corpus::embedded().unwrap().text()).vocab_size();
    let config = GptConfig::new(&spec.model, vocab).unwrap();
    let layers = spec.stage_layers();
    (0..layers.len())
        .map(|stage| {
            let mut model = StageModel::new(&config, &layers, stage, seed).unwrap();
            let mut opt = AdamW::new(AdamWConfig::default(), model.layout());
            for step in 0..2 {
                let grads = fake_grads(model.numel(), stage as u64 * 10 + step);
                model.optimizer_step(&mut opt, &grads, 0.5).unwrap();
            }
            (model, opt)
        })
        .collect()
}

fn fake_grads(n: usize, id: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(11, id);
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// Writes every stage into `window` and commits it, as the miners and the
/// orchestrator of a run would.
fn checkpoint(
    checkpoints: &Checkpoints,
    window: u64,
    stages: &[(StageModel, AdamW)],
    keep: usize,
) -> Manifest {
    let entries = stages
        .iter()
        .map(|(model, opt)| checkpoints.write_stage(window, model, opt).unwrap())
        .collect();
    let manifest = Manifest {
        window,
        step: stages[0].1.steps_taken(),
        job: JOB.to_string(),
        seed: 5,
        stages: entries,
        router: Router::new(2, &[(1, 0), (2, 1)], 5).state(),
    };
    checkpoints.commit(&manifest, keep).unwrap();
    manifest
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn stages_round_trip_bit_exactly_with_their_optimizer_state_and_step_on_identically() {
    let run = tempfile::tempdir().unwrap();
    let checkpoints = Checkpoints::new(run.path());
    let mut saved = trained_stages(5);
    let manifest = checkpoint(&checkpoints, 12, &saved, 3);
    assert_eq!(checkpoints.latest().unwrap(), Some(manifest.clone()));

    for (stage, (model, opt)) in saved.iter_mut().enumerate() {
        let (mut fresh, mut fresh_opt) = trained_stages(6).remove(stage);
        assert_ne!(fresh.params_flat().unwrap(), model.params_flat().unwrap());
        checkpoints
            .load_stage(&manifest, &mut fresh, &mut fresh_opt)
            .unwrap();
        assert_eq!(fresh.params_flat().unwrap(), model.params_flat().unwrap());
        assert_eq!(fresh_opt.moments(), opt.moments());
        assert_eq!(fresh_opt.steps_taken(), 2);

        let grads = fake_grads(model.numel(), 99);
        model.optimizer_step(opt, &grads, 0.5).unwrap();
        fresh.optimizer_step(&mut fresh_opt, &grads, 0.5).unwrap();
        assert_eq!(fresh.params_flat().unwrap(), model.params_flat().unwrap());
    }
}

#[test]
fn latest_ignores_partial_directories_and_directories_without_a_readable_manifest() {
    let run = tempfile::tempdir().unwrap();
    let checkpoints = Checkpoints::new(run.path());
    assert_eq!(
        checkpoints.latest().unwrap(),
        None,
        "no checkpoints dir yet"
    );
    let stages = trained_stages(5);
    checkpoint(&checkpoints, 3, &stages, 5);
    // A window whose stages were written but never committed.
    checkpoints
        .write_stage(5, &stages[0].0, &stages[0].1)
        .unwrap();
    // Committed-looking directories: one without a manifest, one whose
    // manifest is torn.
    fs::create_dir(checkpoints.dir(7)).unwrap();
    fs::create_dir(checkpoints.dir(8)).unwrap();
    fs::write(checkpoints.dir(8).join("manifest.json"), "{\"window\": 8, ").unwrap();

    assert_eq!(checkpoints.latest().unwrap().unwrap().window, 3);
    let err = checkpoints.manifest(8).unwrap_err().to_string();
    assert!(
        err.contains("window-00000008/manifest.json") && err.contains("unparsable"),
        "{err}"
    );
}

/// A checkpoint written by a newer swarmrun, whose manifest says a format
/// this one does not know, is refused naming both formats, and `latest`
/// does not resume from the older checkpoint behind it instead. Manifests
/// from before the format field read as format 1.
#[test]
fn a_manifest_in_a_newer_format_is_refused_and_latest_does_not_pass_over_it() {
    let run = tempfile::tempdir().unwrap();
    let checkpoints = Checkpoints::new(run.path());
    let stages = trained_stages(5);
    checkpoint(&checkpoints, 3, &stages, 5);
    checkpoint(&checkpoints, 5, &stages, 5);
    let path = checkpoints.dir(5).join("manifest.json");
    let mut value: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(value["format"], 1, "the format is written down");

    value["format"] = serde_json::json!(2);
    fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
    let err = checkpoints.latest().unwrap_err();
    assert!(
        matches!(err, CheckpointError::NewerFormat { format: 2, .. }),
        "{err:?}"
    );
    let err = err.to_string();
    assert!(
        err.contains(
            "window-00000005/manifest.json: format 2, newer than the 1 this swarmrun reads"
        ),
        "{err}"
    );

    value["format"] = serde_json::json!(0);
    fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
    let err = checkpoints.manifest(5).unwrap_err().to_string();
    assert!(err.contains("format 0"), "{err}");

    value.as_object_mut().unwrap().remove("format");
    fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
    assert_eq!(checkpoints.latest().unwrap().unwrap().window, 5);
}

#[test]
fn an_edited_byte_in_a_stage_file_is_refused_naming_the_file() {
    let run = tempfile::tempdir().unwrap();
    let checkpoints = Checkpoints::new(run.path());
    let manifest = checkpoint(&checkpoints, 1, &trained_stages(5), 1);
    let path = checkpoints.dir(1).join("stage-1.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    fs::write(&path, &bytes).unwrap();

    let (mut model, mut opt) = trained_stages(6).remove(1);
    let err = checkpoints
        .load_stage(&manifest, &mut model, &mut opt)
        .unwrap_err();
    assert!(matches!(err, CheckpointError::Digest { .. }), "{err}");
    assert!(err.to_string().contains("stage-1.safetensors"), "{err}");
    // The other stage is intact.
    let (mut model, mut opt) = trained_stages(6).remove(0);
    checkpoints
        .load_stage(&manifest, &mut model, &mut opt)
        .unwrap();
}

#[test]
fn commit_keeps_the_newest_checkpoints_and_drops_older_and_abandoned_ones() {
    let run = tempfile::tempdir().unwrap();
    let checkpoints = Checkpoints::new(run.path());
    let stages = trained_stages(5);
    checkpoint(&checkpoints, 10, &stages, 2);
    // Window 20 lost a miner: its stage 0 was written, never committed.
    checkpoints
        .write_stage(20, &stages[0].0, &stages[0].1)
        .unwrap();
    for window in [30, 40, 50] {
        checkpoint(&checkpoints, window, &stages, 2);
    }
    assert_eq!(
        names(&run.path().join("checkpoints")),
        ["window-00000040", "window-00000050"]
    );
    assert_eq!(
        names(&checkpoints.dir(50)),
        [
            "manifest.json",
            "stage-0.safetensors",
            "stage-1.safetensors"
        ]
    );
}

/// `swarmrun sample --tokens N ...` on `run`, which must succeed; returns
/// the generated text without the final newline.
fn sample(run: &Path, tokens: usize, seed: u64) -> String {
    let out = swarmrun()
        .arg("sample")
        .arg(run)
        .args(["--tokens", &tokens.to_string(), "--seed", &seed.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("window 4"), "{}", stderr(&out));
    stdout(&out)
        .strip_suffix('\n')
        .expect("a final newline")
        .to_string()
}

#[test]
fn sample_prints_the_requested_characters_from_the_vocabulary_the_same_for_a_seed() {
    let run = tempfile::tempdir().unwrap();
    checkpoint(&Checkpoints::new(run.path()), 4, &trained_stages(5), 2);
    let text = sample(run.path(), 40, 3);
    assert_eq!(text.chars().count(), 40, "{text:?}");
    let vocab = Tokenizer::from_text(Corpus::embedded().unwrap().text());
    assert!(text.chars().all(|c| vocab.chars().contains(&c)), "{text:?}");
    assert_eq!(sample(run.path(), 40, 3), text);
    assert_ne!(sample(run.path(), 40, 4), text);
}

#[test]
fn sample_without_a_run_dir_or_a_checkpoint_fails_saying_so() {
    let run = tempfile::tempdir().unwrap();
    let missing = run.path().join("nope");
    let out = swarmrun().arg("sample").arg(&missing).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));

    let out = swarmrun().arg("sample").arg(run.path()).output().unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no checkpoint in"),
        "{}",
        stderr(&out)
    );
}

/// A manifest is read only through `Manifest::parse`, which refuses one
/// that would make a resume read outside its checkpoint directory or
/// route with a state that does not fit it.
#[test]
fn a_manifest_naming_a_file_outside_its_directory_or_a_foreign_routing_state_is_refused() {
    use swarmrun::checkpoint::Manifest;
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/manifest");
    let good = std::fs::read(corpus.join("two_stages.json")).unwrap();
    let path = std::path::Path::new("manifest.json");
    let manifest = Manifest::parse(&good, path).unwrap();
    assert_eq!(manifest.stages.len(), 2);

    let escaping = std::fs::read(corpus.join("escaping_file.json")).unwrap();
    let err = Manifest::parse(&escaping, path).unwrap_err().to_string();
    assert!(
        err.contains("\"../stage-1.safetensors\" is not a plain file name"),
        "{err}"
    );

    let mut value: serde_json::Value = serde_json::from_slice(&good).unwrap();
    value["router"]["stages"] = serde_json::json!(1_000_000_000_000u64);
    let err = Manifest::parse(&serde_json::to_vec(&value).unwrap(), path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("its routing state has 1000000000000 stages, its entries 2"),
        "{err}"
    );
}

/// A window run again (a standby took over after the lost orchestrator had
/// committed its checkpoint) commits the same state: the checkpoint
/// stands. Another state for a committed window is refused.
#[test]
fn a_window_committed_again_with_the_same_state_keeps_its_checkpoint_and_other_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = Checkpoints::new(dir.path());
    let stages = trained_stages(1);
    let first = checkpoint(&checkpoints, 3, &stages, 2);
    let again = checkpoint(&checkpoints, 3, &stages, 2);
    // The first stands (its files, byte for byte, may differ from the
    // second's: only the state must be the same).
    assert_eq!(checkpoints.latest().unwrap(), Some(first));
    assert_eq!(names(&dir.path().join("checkpoints")), ["window-00000003"]);

    let other = trained_stages(2);
    let entries = other
        .iter()
        .map(|(model, opt)| checkpoints.write_stage(3, model, opt).unwrap())
        .collect();
    let manifest = Manifest {
        stages: entries,
        ..again
    };
    assert!(matches!(
        checkpoints.commit(&manifest, 2),
        Err(CheckpointError::Exists { .. })
    ));
}
