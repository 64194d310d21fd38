//! `swarmrun bench train` end to end on a tiny job: the matmul figures, the
//! one-process row, the pipeline row (a real 6-rank launch) and their ratio,
//! and what it says without the PyTorch reference.

mod common;

use common::*;

/// The numbers in `line` after its text label (`%` and `x` stripped).
fn numbers(line: &str) -> Vec<f64> {
    line.split_whitespace()
        .filter_map(|w| w.trim_end_matches(['%', 'x']).parse().ok())
        .collect()
}

fn row<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no row {label:?}:\n{text}"))
}

/// Two rounds: the line of every round's figures, and a table that is the
/// median round's (for two, the one with the lower ratio).
#[test]
fn bench_train_prints_both_setups_with_positive_finite_figures() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        dir.path(),
        "tiny.toml",
        "[job]\nname = \"tiny\"\ntask = \"train\"\nseed = 3\n\n\
         [model]\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 16\n\n\
         [pipeline]\nstages = 2\nmicrobatch_size = 4\nmicrobatches_per_window = 4\n\n\
         [roles]\nvalidators = 1\n\n\
         [[site]]\nname = \"local\"\nhosts = \"localhost\"\nranks_per_host = 6\n\n\
         [network]\nrendezvous = \"tcp://127.0.0.1:0\"\n\n\
         [train]\nwindows = 3\neval_every = 1\n",
    );
    // No PyTorch here (an interpreter that is not there): the bench says
    // so and measures the rest.
    let out = swarmrun()
        .args(["bench", "train", "--windows", "3", "--rounds", "2", "--job"])
        .arg(&job)
        .env("SWARMRUN_PYTHON", dir.path().join("no-python"))
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(
        text.contains("# PyTorch reference: none measured (cannot run "),
        "{text}"
    );
    assert!(!text.contains("PyTorch 2 threads"), "{text}");
    let positive = |v: &[f64]| v.iter().all(|x| x.is_finite() && *x > 0.0);

    let machine = numbers(row(&text, "# machine:"));
    assert!(machine.len() >= 3 && positive(&machine), "{text}");
    // 3 squares and the model's 5 forward products, each with both rates.
    let matmuls: Vec<Vec<f64>> = text
        .lines()
        .filter(|l| l.starts_with("#   ") && !l.contains("matmul f32"))
        .map(numbers)
        .collect();
    assert_eq!(matmuls.len(), 8, "{text}");
    assert!(
        matmuls.iter().all(|m| m.len() == 5 && positive(m)),
        "{text}"
    );

    let one = numbers(row(&text, "one process"));
    assert_eq!(one.len(), 4, "ranks, tokens/s, GFLOP/s, % of peak: {text}");
    assert_eq!(one[0], 1.0, "{text}");
    assert!(positive(&one), "{text}");
    let pipeline = numbers(row(&text, "2 stages x 2 miners"));
    // The label "2 stages x 2 miners" holds two of the numbers.
    assert_eq!(pipeline.len(), 6, "{text}");
    assert_eq!(pipeline[2], 6.0, "all six ranks: {text}");
    assert!(positive(&pipeline), "{text}");
    let ratio = numbers(row(&text, "pipeline / one process"));
    assert_eq!(ratio.len(), 1, "{text}");
    assert!(positive(&ratio), "{text}");
    let rounds: Vec<&str> = row(&text, "# rounds, pipeline / one process tokens/s:")
        .split(": ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap_or_default()
        .split(", ")
        .collect();
    assert_eq!(rounds.len(), 2, "{text}");
    let ratios: Vec<f64> = rounds.iter().map(|r| numbers(r)[2]).collect();
    let (lower, tokens) = (ratios[0].min(ratios[1]), numbers(rounds[0]));
    assert!(tokens.len() == 3 && positive(&tokens), "{text}");
    assert_eq!(format!("{lower:.2}"), format!("{:.2}", ratio[0]), "{text}");

    // CPU per 1k tokens: one process, the pipeline, its miners, validators
    // and orchestrator, every rank's line read. (Differences of CPU
    // between two runs: their signs are the host's business.)
    let cpu = row(&text, "#  CPU ms per 1k tokens:");
    assert!(cpu.ends_with("(6 of 6 ranks said)"), "{text}");
    let figures: Vec<f64> = cpu
        .split([' ', ',', ';', ':', '('])
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(figures.len(), 7, "five figures and 6 of 6: {cpu}");
    assert!(figures.iter().all(|x| x.is_finite()), "{cpu}");
    assert!(figures[0] >= 0.0, "one process's own CPU: {cpu}");
}

#[test]
fn bench_train_refuses_a_job_that_does_not_train_with_exit_status_2() {
    let out = swarmrun()
        .args(["bench", "train", "--job"])
        .arg(repo_file("configs/hello.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("task = \"train\""),
        "{}",
        stderr(&out)
    );
}
