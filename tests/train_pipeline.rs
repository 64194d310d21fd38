//! The training job end to end: an orchestrator, two stages of two miners
//! and a validator as real processes over TCP; every window's gradients are
//! all-reduced per stage and the miners' weight digests must agree, or the
//! job fails.

mod common;

use common::*;

fn losses(text: &str) -> Vec<f32> {
    text.lines()
        .filter_map(|l| {
            l.split("loss ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn two_stages_of_two_miners_train_and_the_loss_goes_down() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let job = job_file(
        dir.path(),
        "train.toml",
        &format!(
            "[job]\nname = \"t\"\ntask = \"train\"\nseed = 3\nrun_dir = {run_dir:?}\n\n\
         [model]\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 16\n\n\
         [pipeline]\nstages = 2\nmicrobatch_size = 4\nmicrobatches_per_window = 4\n\n\
         [roles]\nvalidators = 1\n\n\
         [[site]]\nname = \"local\"\nhosts = \"localhost\"\nranks_per_host = 6\n\n\
         [network]\nrendezvous = \"tcp://127.0.0.1:0\"\n\n\
         [train]\nwindows = 25\nlr = 5e-3\nwarmup_windows = 2\neval_every = 5\neval_microbatches = 2\n"
        ),
    );
    let out = swarmrun().arg("launch").arg(&job).output().unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    let losses = losses(&text);
    assert_eq!(losses.len(), 25, "one report per window:\n{text}");
    assert!(losses.iter().all(|l| l.is_finite()));
    // Untrained, a 65-symbol model scores about ln 65 = 4.17.
    assert!((losses[0] - 65f32.ln()).abs() < 0.3, "{losses:?}");
    let (head, tail) = (
        losses[..5].iter().sum::<f32>(),
        losses[20..].iter().sum::<f32>(),
    );
    assert!(tail < head - 0.5, "the loss did not go down: {losses:?}");

    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<&str> = metrics.lines().collect();
    assert_eq!(lines.len(), 25, "{metrics}");
    assert!(
        lines[0].starts_with("{\"window\":0,\"step\":1,"),
        "{}",
        lines[0]
    );
    // Validation every 5 windows: windows 4, 9, ..., 24.
    let evaluated: Vec<usize> = (0..25)
        .filter(|&w| !lines[w].contains("\"val_loss\":null"))
        .collect();
    assert_eq!(evaluated, vec![4, 9, 14, 19, 24], "{metrics}");
}
