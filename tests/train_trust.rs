//! Validators end to end: miners that cheat are caught by replays of
//! their passes and leave the job, honest miners never are, and checking
//! changes no bit of training.

mod common;

use common::train::*;
use common::{stderr, swarmrun};
use swarmrun::ledger;

/// A tiny training job (see `train_job`) whose validator replays `rate`
/// of the passes, with `cheats` as `[[faults.cheat]]`, and `seed`.
fn checked_job(
    dir: &std::path::Path,
    name: &str,
    seed: u64,
    rate: f64,
    cheats: &[(usize, &str)],
) -> std::path::PathBuf {
    let mut extra = String::new();
    for (rank, kind) in cheats {
        extra += &format!("\n[[faults.cheat]]\nrank = {rank}\nkind = \"{kind}\"\n");
    }
    let job = train_job(dir, name, 2, 6, &extra);
    let replaying = format!("validators = 1\nreplay_rate = {rate}\n");
    edit(&job, "validators = 1\n", &replaying);
    edit(&job, "seed = 3\n", &format!("seed = {seed}\n"));
    job
}

fn caught(line: &str) -> &str {
    field(line, "caught")
}

/// The window whose line names `rank` caught; none is a failure.
fn window_catching(lines: &[String], rank: usize, err: &str) -> usize {
    lines
        .iter()
        .position(|l| caught(l) == format!("[{rank}]"))
        .unwrap_or_else(|| panic!("never caught: {lines:?}\n{err}"))
}

/// Rewrites `job` with `from` replaced by `to`.
fn edit(job: &std::path::Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(job).unwrap().replace(from, to);
    std::fs::write(job, text).unwrap();
}

#[test]
fn every_kind_of_cheat_is_caught_in_its_first_window_and_the_job_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    // Ranks 2 and 3 serve stage 0, ranks 4 and 5 stage 1.
    for (rank, kind) in [
        (2, "random_grad"),
        (5, "skip_compute"),
        (4, "replay_stale"),
        (3, "scale_update"),
        (2, "scale_contribution"),
    ] {
        let (lines, err) = run(&checked_job(dir.path(), kind, 3, 1.0, &[(rank, kind)]));
        assert_eq!(
            caught(&lines[0]),
            format!("[{rank}]"),
            "{kind}: {}\n{err}",
            lines[0]
        );
        assert!(
            err.contains(&format!("lost miner {rank} of stage")) && err.contains("excluded"),
            "{kind}: {err}"
        );
        for l in &lines[1..] {
            assert_eq!(caught(l), "[]", "{kind}: {l}");
        }
        // The ledger: no credit for the cheater in the window it was caught,
        // excluded after; the others share each window's reward by passes.
        let records = ledger::read(&dir.path().join(kind)).unwrap().records;
        assert_eq!(records.len(), 6, "{kind}");
        for record in &records {
            let cheater = record.miners.iter().find(|m| m.rank == rank).unwrap();
            assert_eq!(cheater.share, 0.0, "{kind}: {record:?}");
            assert_eq!(cheater.failed > 0, record.window == 0, "{kind}: {record:?}");
            assert_eq!(cheater.excluded, record.window > 0, "{kind}: {record:?}");
            let total: u64 = record
                .miners
                .iter()
                .filter(|m| m.rank != rank)
                .map(|m| m.verified)
                .sum();
            // 6 microbatches through 2 stages.
            assert_eq!(total, 12, "{kind}: {record:?}");
            for m in record.miners.iter().filter(|m| m.rank != rank) {
                assert_eq!(
                    m.share,
                    m.verified as f64 / total as f64,
                    "{kind}: {record:?}"
                );
            }
        }
        let audit = swarmrun()
            .arg("audit")
            .arg(dir.path().join(kind))
            .output()
            .unwrap();
        assert!(audit.status.success(), "{kind}: {}", stderr(&audit));
    }
}

#[test]
fn a_contribution_nudged_anywhere_is_caught_in_that_window_where_every_chunk_is_probed() {
    let dir = tempfile::tempdir().unwrap();
    // No replays: only the contribution check can see it. Each stage has
    // about 27 gradient chunks in 2 slices, so 16 a slice probe them all.
    let job = checked_job(dir.path(), "nudge", 3, 0.0, &[(3, "nudge_contribution")]);
    edit(
        &job,
        "validators = 1\n",
        "validators = 1\ncontribution_chunks = 16\n",
    );
    let (lines, err) = run(&job);
    assert_eq!(caught(&lines[0]), "[3]", "{}\n{err}", lines[0]);
    assert!(
        err.contains("not the fixed-point sum of its passes' gradients"),
        "{err}"
    );
    for l in &lines[1..] {
        assert_eq!(caught(l), "[]", "{l}");
    }
}

#[test]
fn colluders_agreeing_on_a_wrong_slice_are_caught_by_recomputation_and_the_honest_holder_is_not() {
    let dir = tempfile::tempdir().unwrap();
    // 6 miners: ranks 2, 4, 6 serve stage 0. With 2 copies the colluders
    // 2 and 4 alone reduce slice 0, so their copies agree; with 3 copies
    // every slice has them and rank 6 as holders, and they outvote it.
    for copies in [2, 3] {
        let name = format!("collude{copies}");
        let extra = "\n[[faults.cheat]]\nrank = 2\nkind = \"collude\"\n\
                     \n[[faults.cheat]]\nrank = 4\nkind = \"collude\"\n";
        let job = sized_train_job(dir.path(), &name, 2, 8, 3, extra);
        let text = std::fs::read_to_string(&job).unwrap().replace(
            "validators = 1\n",
            &format!("validators = 1\nreplay_rate = 0\nslice_copies = {copies}\n"),
        );
        std::fs::write(&job, text).unwrap();
        let (lines, err) = run(&job);
        assert!(
            lines[0].contains("\"caught\":[2, 4]"),
            "{copies}: {}\n{err}",
            lines[0]
        );
        assert!(
            err.contains("its copy is not the sum of the contributions; excluded"),
            "{copies}: {err}"
        );
        assert!(!err.contains("lost miner 6"), "{copies}: {err}");
        for l in &lines[1..] {
            assert_eq!(caught(l), "[]", "{copies}: {l}");
        }
        let records = ledger::read(&dir.path().join(&name)).unwrap().records;
        for record in &records {
            for m in record.miners.iter().filter(|m| m.rank == 2 || m.rank == 4) {
                assert_eq!(m.share, 0.0, "{copies}: {record:?}");
                assert_eq!(m.excluded, record.window > 0, "{copies}: {record:?}");
            }
        }
    }
}

#[test]
fn a_forged_checkpoint_is_caught_by_the_validators_replay_of_the_step_and_never_committed() {
    let dir = tempfile::tempdir().unwrap();
    // Ranks 2 and 4 serve stage 0; rank 2, the lowest, writes its file.
    let extra = "checkpoint_every = 1\nkeep_checkpoints = 10\n\
                 \n[[faults.cheat]]\nrank = 2\nkind = \"forge_checkpoint\"\n";
    let job = train_job(dir.path(), "forge", 2, 3, extra);
    let (lines, err) = run(&job);
    assert!(lines[0].contains("\"caught\":[2]"), "{}\n{err}", lines[0]);
    assert!(
        err.contains(
            "checkpoint of stage 0: its checkpoint file holds another optimizer state than \
             the replayed step gives; excluded"
        ),
        "{err}"
    );
    assert!(err.contains("no checkpoint for window 0"), "{err}");
    let checkpoints = dir.path().join("forge").join("checkpoints");
    let mut committed: Vec<String> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('.') && !name.contains("partial"))
        .collect();
    committed.sort();
    assert_eq!(committed, ["window-00000001", "window-00000002"], "{err}");
    for l in &lines[1..] {
        assert_eq!(caught(l), "[]", "{l}");
    }
    let records = ledger::read(&dir.path().join("forge")).unwrap().records;
    let forger = |w: usize| {
        records[w]
            .miners
            .iter()
            .find(|m| m.rank == 2)
            .unwrap()
            .clone()
    };
    assert_eq!((forger(0).share, forger(0).failed), (0.0, 1));
    assert!(forger(1).excluded);
}

#[test]
fn honest_miners_are_never_flagged_and_checking_changes_no_bit() {
    let dir = tempfile::tempdir().unwrap();
    for seed in [1, 2, 3] {
        let seeded = |name: &str, rate| {
            let job = checked_job(dir.path(), &format!("{name}{seed}"), seed, rate, &[]);
            if rate == 0.0 {
                // Nothing replayed at all: no suspects either.
                edit(
                    &job,
                    "validators = 1\n",
                    "validators = 1\nsuspect_replays = 0\n",
                );
            }
            run(&job).0
        };
        let audited = seeded("audited", 1.0);
        let records = ledger::read(&dir.path().join(format!("audited{seed}")))
            .unwrap()
            .records;
        for record in &records {
            assert!(record.miners.iter().all(|m| m.failed == 0 && !m.excluded));
            let sum: f64 = record.miners.iter().map(|m| m.share).sum();
            assert!((sum - 1.0).abs() < 1e-12, "{record:?}");
        }
        let unchecked = seeded("unchecked", 0.0);
        for (a, u) in audited.iter().zip(&unchecked) {
            assert_eq!(caught(a), "[]", "seed {seed}: {a}");
            // At rate 1 each pass trained is replayed, once.
            assert_eq!(
                field(a, "replayed"),
                field(a, "trained"),
                "seed {seed}: {a}"
            );
            assert_ne!(field(a, "replayed"), "0", "seed {seed}: {a}");
            assert_eq!(field(u, "replayed"), "0", "seed {seed}: {u}");
            assert_eq!(field(a, "loss"), field(u, "loss"), "seed {seed}");
        }
    }
}

/// A run's ledger is signed by its orchestrator and countersigned by its
/// validator, line by line, while it trains. Afterwards nobody can
/// rewrite it alone: a whole new chain with recomputed hashes, signed by a
/// new leader key added to the run's book (what an orchestrator rewriting
/// its own ledger after the run could do), has no validator's
/// countersignature, and `swarmrun audit --countersigned` refuses it.
#[test]
fn a_ledger_rewritten_after_the_run_lacks_the_validators_countersignatures() {
    let dir = tempfile::tempdir().unwrap();
    let job = checked_job(dir.path(), "signed", 1, 0.05, &[]);
    run(&job);
    let run_dir = dir.path().join("signed");
    let audit = |args: &[&str]| {
        let mut cmd = swarmrun();
        cmd.arg("audit").arg(&run_dir).args(args);
        cmd.output().unwrap()
    };
    let out = audit(&["--countersigned"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(
        text.contains("countersigned by 1 to 1 validators per line"),
        "{text}"
    );

    let genuine = ledger::read(&run_dir).unwrap();
    let key = ledger::SigningKey::generate().unwrap();
    let mut forged = ledger::Ledger::create(&run_dir)
        .unwrap()
        .signed_by(key)
        .unwrap();
    for record in &genuine.records {
        let mut tallies: Vec<ledger::Tally> = record
            .miners
            .iter()
            .map(|m| ledger::Tally {
                rank: m.rank,
                stage: m.stage,
                verified: m.verified,
                failed: m.failed,
            })
            .collect();
        // The forger pays itself (the first miner) a little more.
        tallies[0].verified += 1;
        forged.append(record.window, &tallies).unwrap();
    }
    drop(forged);
    // Chain and leader signatures hold...
    assert!(audit(&[]).status.success());
    // ...but no validator saw these lines.
    let out = audit(&["--countersigned"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("line 1 is countersigned by no validator"),
        "{}",
        stderr(&out)
    );
}

/// A miner honest for its first three windows, then cheating on every
/// pass (`from_window = 3`): the ledger credits its honest windows as
/// they are written, it is caught in the first window it cheats in (or
/// the next, if it was routed no pass there), and settlement takes back
/// every window of the run, so building a clean record first buys a late
/// cheater nothing.
#[test]
fn a_miner_honest_at_first_is_caught_once_it_cheats_and_loses_every_window() {
    let dir = tempfile::tempdir().unwrap();
    let job = checked_job(dir.path(), "late", 3, 1.0, &[(2, "random_grad")]);
    edit(
        &job,
        "kind = \"random_grad\"\n",
        "kind = \"random_grad\"\nfrom_window = 3\n",
    );
    let (lines, err) = run(&job);
    let caught_in = window_catching(&lines, 2, &err);
    assert!((3..=4).contains(&caught_in), "caught in window {caught_in}");
    for l in &lines[..caught_in] {
        assert_eq!(caught(l), "[]", "{l}");
    }
    let records = ledger::read(&dir.path().join("late")).unwrap().records;
    let cheater = |w: usize| records[w].miners.iter().find(|m| m.rank == 2).unwrap();
    assert!(cheater(0).share > 0.0 && cheater(0).failed == 0);
    assert!(cheater(caught_in).failed > 0);
    // Settled: the catch takes back every window, the honest ones too.
    let settled = ledger::settled(&records);
    for (w, record) in settled.iter().enumerate() {
        let paid = record.miners.iter().find(|m| m.rank == 2).unwrap().share;
        assert_eq!(paid, 0.0, "window {w}");
    }
}

#[test]
fn a_miner_cheating_on_some_passes_is_caught_by_what_it_states_of_them_without_random_replays() {
    // No uniform draw (replay_rate 0): only passes whose gradient maxima
    // (stated in the receipt; skipped work: zeros) or gradient sketch
    // (stated at the close, with its seed; negated gradients, whose maxima
    // are the honest ones; or honest passes with negated sketches, stated
    // to thin later draws) stand out from their stage's are replayed. 3
    // miners a stage, so rank 2's passes are a third of stage 0's. Which
    // microbatches it serves follows the routing, which follows timing.
    // 12 windows: a negated sketch stands out only where its stage's
    // directions tell (`suspicion::telling`), about half the time in a
    // stage this small, so 6 windows (some 6 negated passes) let a
    // flip_sketch miner through about once in 100 runs under load; 12
    // (some 12) about once in 10,000.
    let dir = tempfile::tempdir().unwrap();
    for kind in ["skip_compute", "flip_grad", "flip_sketch"] {
        let cheat = format!("\n[[faults.cheat]]\nrank = 2\nkind = \"{kind}\"\nprobability = 0.5\n");
        let job = sized_train_job(dir.path(), kind, 2, 8, 12, &cheat);
        // For flip_sketch, no slice recomputed either: the contribution
        // check would see the sketch's probed entries are not the
        // gradients', and the replay is the check under test.
        let slices = match kind {
            "flip_sketch" => "slice_audit_rate = 0.0\n",
            _ => "",
        };
        edit(
            &job,
            "validators = 1\n",
            &format!("validators = 1\nreplay_rate = 0.0\n{slices}"),
        );
        let (lines, err) = run(&job);
        let caught_in = window_catching(&lines, 2, &err);
        for (w, l) in lines.iter().enumerate().filter(|&(w, _)| w != caught_in) {
            assert_eq!(caught(l), "[]", "{kind}: window {w}: {l}");
        }
        if kind == "flip_sketch" {
            let said = "the gradient sketch differs from the one it stated";
            assert!(err.contains(said), "{err}");
        }
    }
}

/// `windows` windows with rank 2 a forger of `kind`, among 6 miners: ranks
/// 2, 4, 6 serve stage 0, so each slice has 2 of the 3 as holders and the
/// third is handed it. Every window must train.
fn forger_run(kind: &str, windows: u64) -> (Vec<String>, String) {
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("\n[[faults.cheat]]\nrank = 2\nkind = \"{kind}\"\n");
    let (lines, err) = run(&sized_train_job(dir.path(), kind, 2, 8, windows, &extra));
    assert_eq!(lines.len() as u64, windows, "every window trained:\n{err}");
    (lines, err)
}

#[test]
fn a_miner_handing_out_a_wrong_slice_is_named_by_its_own_signature_and_excluded() {
    // Rank 2 hands its own slice out doubled, signing what it handed out.
    let (lines, err) = forger_run("forge_gather", 3);
    assert_eq!(caught(&lines[0]), "[2]", "{}\n{err}", lines[0]);
    // Named by its own signed statement, not by a replay.
    assert!(
        err.contains("other than the copy it agreed on, and signed that it did"),
        "{err}"
    );
    for l in &lines[1..] {
        assert_eq!(caught(l), "[]", "{l}");
    }
}

#[test]
fn with_two_miners_a_stage_there_is_no_hand_out_to_forge() {
    // Each of the two holds every slice of its stage's all-reduce, so
    // neither is handed anything: the forger's doubled slice goes nowhere,
    // and the run is the honest run, bit for bit.
    let dir = tempfile::tempdir().unwrap();
    let cheat = "\n[[faults.cheat]]\nrank = 3\nkind = \"forge_gather\"\n";
    let (forged, err) = run(&train_job(dir.path(), "forged", 2, 3, cheat));
    let (honest, _) = run(&train_job(dir.path(), "honest", 2, 3, ""));
    assert_eq!(forged.len(), 3, "{err}");
    for (f, h) in forged.iter().zip(&honest) {
        assert_eq!(caught(f), "[]", "{f}");
        assert_eq!(field(f, "loss"), field(h, "loss"), "{f}\n{h}");
    }
}

#[test]
fn a_forger_that_signs_the_agreed_slice_but_hands_out_another_leaves_with_the_miner_disputing_it() {
    // Rank 2 hands out its slice doubled after signing the agreed one,
    // every window.
    let (lines, err) = forger_run("forge_gather_deniably", 4);
    assert!(
        err.contains("handed it a slice of the all-reduce other than the copy agreed on")
            && err.contains("no signature settles it; both leave"),
        "{err}"
    );
    // The forger leaves, with one of the two it handed the slice to: one
    // of them lies and nothing shows which, so neither is blamed.
    let left = |rank: usize| err.contains(&format!("lost miner {rank} of stage 0"));
    assert!(left(2), "{err}");
    assert!(left(4) != left(6), "one disputer leaves: {err}");
    for l in &lines {
        assert_eq!(caught(l), "[]", "{l}");
    }
}
