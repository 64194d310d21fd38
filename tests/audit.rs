//! `swarmrun audit RUN_DIR` on ledgers written through the library: the
//! table's numbers, and tampering of every kind refused, naming the line.

mod common;

use std::path::Path;

use common::*;
use swarmrun::ledger::{self, Ledger, Tally};

fn tally(rank: usize, stage: usize, verified: u64, failed: u64) -> Tally {
    Tally {
        rank,
        stage,
        verified,
        failed,
    }
}

/// Three windows; rank 5 fails a check in window 11 and rank 3 moves from
/// stage 0 to stage 1 in window 12.
fn write_ledger(run_dir: &Path) {
    let mut l = Ledger::open(run_dir).unwrap();
    l.append(
        10,
        &[
            tally(2, 0, 9, 0),
            tally(3, 0, 3, 0),
            tally(4, 1, 6, 0),
            tally(5, 1, 6, 0),
        ],
    )
    .unwrap();
    l.append(
        11,
        &[
            tally(2, 0, 7, 0),
            tally(3, 0, 5, 0),
            tally(4, 1, 8, 0),
            tally(5, 1, 11, 2),
        ],
    )
    .unwrap();
    l.append(
        12,
        &[tally(2, 0, 4, 0), tally(3, 1, 7, 0), tally(4, 1, 9, 0)],
    )
    .unwrap();
    assert_eq!(l.excluded().keys().copied().collect::<Vec<_>>(), [5]);
}

fn audit(run_dir: &Path) -> std::process::Output {
    swarmrun().arg("audit").arg(run_dir).output().unwrap()
}

/// The table's rows: rank → the other columns.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

fn ledger_lines(run_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(ledger::path(run_dir))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(run_dir: &Path, lines: &[String]) {
    let text: String = lines.iter().flat_map(|l| [l.as_str(), "\n"]).collect();
    std::fs::write(ledger::path(run_dir), text).unwrap();
}

/// Asserts that audit fails, naming `line` of the ledger and `why`.
fn assert_refused(run_dir: &Path, line: usize, why: &str) {
    let out = audit(run_dir);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{}\n{err}", stdout(&out));
    assert!(
        err.contains(&format!("ledger.jsonl:{line}: ")) && err.contains(why),
        "expected line {line}, {why:?}: {err}"
    );
    assert!(stdout(&out).is_empty(), "no table for a bad ledger");
}

#[test]
fn audit_prints_each_miners_standing_from_the_verified_counts() {
    let dir = tempfile::tempdir().unwrap();
    write_ledger(dir.path());
    let out = audit(dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(
        table.contains("3 lines, windows 10 to 12, chain intact, head "),
        "{table}"
    );
    let head = ledger::read(dir.path()).unwrap().head;
    assert!(table.contains(&head), "{table}");
    // Window totals of credited passes: 18 (rank 5 forfeits window 10, as
    // every window of the run), 20 (rank 5 failed), 20.
    let share = |parts: &[f64]| format!("{:.6}", parts.iter().sum::<f64>() / 3.0);
    let expected = [
        // rank stages windows verified credited failed share excluded_after
        [
            "2",
            "0",
            "3",
            "20",
            "20",
            "0",
            &share(&[9.0 / 18.0, 7.0 / 20.0, 4.0 / 20.0]),
            "-",
        ],
        [
            "3",
            "0,1",
            "3",
            "15",
            "15",
            "0",
            &share(&[3.0 / 18.0, 5.0 / 20.0, 7.0 / 20.0]),
            "-",
        ],
        [
            "4",
            "1",
            "3",
            "23",
            "23",
            "0",
            &share(&[6.0 / 18.0, 8.0 / 20.0, 9.0 / 20.0]),
            "-",
        ],
        ["5", "1", "0", "17", "0", "2", "0.000000", "11"],
    ];
    assert_eq!(rows(&table), expected, "{table}");
    assert!(
        table.contains(
            "total: 4 miners, 1 excluded, 58 of 75 verified passes credited, shares sum to 1.000000"
        ),
        "{table}"
    );
}

#[test]
fn shares_add_up_to_one_per_window_and_equal_verified_over_total() {
    let dir = tempfile::tempdir().unwrap();
    write_ledger(dir.path());
    let chain = ledger::read(dir.path()).unwrap();
    assert_eq!(chain.records.len(), 3);
    for record in &chain.records {
        let earns = |m: &&ledger::MinerCredit| m.failed == 0 && !m.excluded;
        let total: u64 = record.miners.iter().filter(earns).map(|m| m.verified).sum();
        let sum: f64 = record.miners.iter().map(|m| m.share).sum();
        assert!((sum - 1.0).abs() < 1e-12, "window {}: {sum}", record.window);
        for m in &record.miners {
            let expected = if earns(&m) {
                m.verified as f64 / total as f64
            } else {
                0.0
            };
            assert_eq!(
                m.share, expected,
                "window {} rank {}",
                record.window, m.rank
            );
        }
    }
    // Rank 5 is listed after it was caught, excluded and unpaid.
    let last = &chain.records[2].miners;
    assert!(last
        .iter()
        .any(|m| m.rank == 5 && m.excluded && m.share == 0.0));
}

#[test]
fn audit_names_the_line_of_a_flipped_byte() {
    let dir = tempfile::tempdir().unwrap();
    write_ledger(dir.path());
    let original = std::fs::read(ledger::path(dir.path())).unwrap();
    let lines = ledger_lines(dir.path());
    // One digit of rank 4's count in window 11 (line 2): 8 becomes 9.
    let at = lines[0].len()
        + 1
        + lines[1].find(r#""rank":4,"stage":1,"verified":8"#).unwrap()
        + r#""rank":4,"stage":1,"verified":"#.len();
    let mut bytes = original.clone();
    assert_eq!(bytes[at], b'8');
    bytes[at] = b'9';
    std::fs::write(ledger::path(dir.path()), &bytes).unwrap();
    assert_refused(dir.path(), 2, "the line was edited");
    // A bit of the last line's hash.
    let mut bytes = original.clone();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x01;
    std::fs::write(ledger::path(dir.path()), &bytes).unwrap();
    assert_refused(dir.path(), 3, "edited");
    // A share raised by hand.
    let mut edited = lines.clone();
    edited[0] = edited[0].replacen("0.375", "0.475", 1);
    write_lines(dir.path(), &edited);
    assert_refused(dir.path(), 1, "edited");
    std::fs::write(ledger::path(dir.path()), &original).unwrap();
    assert!(audit(dir.path()).status.success());
}

#[test]
fn audit_refuses_a_deleted_or_moved_line() {
    let dir = tempfile::tempdir().unwrap();
    write_ledger(dir.path());
    let lines = ledger_lines(dir.path());
    let mut deleted = lines.clone();
    deleted.remove(1);
    write_lines(dir.path(), &deleted);
    assert_refused(dir.path(), 2, "deleted, inserted or moved");
    let mut first_deleted = lines.clone();
    first_deleted.remove(0);
    write_lines(dir.path(), &first_deleted);
    assert_refused(dir.path(), 1, "deleted, inserted or moved");
    let mut swapped = lines.clone();
    swapped.swap(0, 2);
    write_lines(dir.path(), &swapped);
    assert_refused(dir.path(), 1, "deleted, inserted or moved");
}

#[test]
fn audit_warns_of_a_torn_last_line_and_counts_the_lines_before_it() {
    let dir = tempfile::tempdir().unwrap();
    write_ledger(dir.path());
    let bytes = std::fs::read(ledger::path(dir.path())).unwrap();
    std::fs::write(ledger::path(dir.path()), &bytes[..bytes.len() - 1]).unwrap();
    let out = audit(dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("2 lines, windows 10 to 11"));
    assert!(
        stderr(&out).contains("ledger.jsonl:3 ends without a newline"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn audit_of_a_run_without_a_ledger_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = audit(dir.path());
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("reading the ledger") && err.contains("ledger.jsonl"),
        "{err}"
    );
}

/// The windows of [`write_ledger`] with rank 3's verified passes raised
/// in window 11: a forger's whole, consistent chain.
fn write_forged(run_dir: &Path, key: Option<ledger::SigningKey>) {
    let l = Ledger::create(run_dir).unwrap();
    let mut l = match key {
        Some(key) => l.signed_by(key).unwrap(),
        None => l,
    };
    l.append(10, &[tally(2, 0, 9, 0), tally(3, 0, 3, 0)])
        .unwrap();
    l.append(11, &[tally(2, 0, 7, 0), tally(3, 0, 50, 0)])
        .unwrap();
}

fn audit_with(run_dir: &Path, keys: &[String]) -> std::process::Output {
    let mut cmd = swarmrun();
    cmd.arg("audit").arg(run_dir);
    for k in keys {
        cmd.args(["--key", k]);
    }
    cmd.output().unwrap()
}

fn assert_forgery_refused(out: &std::process::Output, why: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{}\n{err}", stdout(out));
    assert!(err.contains(why), "expected {why:?}: {err}");
    assert!(stdout(out).is_empty(), "no table for a forged ledger");
}

/// A leader signs every line; a forger who recomputes the whole chain
/// cannot sign as the leader: unsigned lines, lines signed with a key the
/// run's book does not list, and signatures copied onto changed lines are
/// refused. A forger who also adds its key to the book passes only until
/// the leader's key is pinned with `--key`.
#[test]
fn a_forged_chain_with_recomputed_hashes_fails_the_leaders_signatures() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let leader = ledger::SigningKey::generate().unwrap();
    let leader_key = leader.public_hex();
    let mut l = Ledger::create(&run).unwrap().signed_by(leader).unwrap();
    l.append(10, &[tally(2, 0, 9, 0), tally(3, 0, 3, 0)])
        .unwrap();
    l.append(11, &[tally(2, 0, 7, 0), tally(3, 0, 5, 0)])
        .unwrap();
    drop(l);
    let genuine = ledger_lines(&run);
    let out = audit_with(&run, std::slice::from_ref(&leader_key));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&leader_key), "{}", stdout(&out));

    // Recomputed chain, unsigned.
    let scratch = dir.path().join("scratch");
    write_forged(&scratch, None);
    write_lines(&run, &ledger_lines(&scratch));
    assert_forgery_refused(&audit(&run), "line 1 is not signed");

    // Recomputed chain, signed with the forger's own key.
    write_forged(&scratch, Some(ledger::SigningKey::generate().unwrap()));
    write_lines(&run, &ledger_lines(&scratch));
    assert_forgery_refused(&audit(&run), "which the run's book of keys does not list");

    // The leader's signatures copied onto the changed lines.
    let forged: Vec<String> = ledger_lines(&scratch)
        .iter()
        .zip(&genuine)
        .map(|(f, g)| {
            let sig = |l: &str| l[l.find(",\"sig\":").unwrap()..].to_string();
            f.replace(&sig(f), &sig(g))
        })
        .collect();
    write_lines(&run, &forged);
    assert_forgery_refused(&audit(&run), "line 2's signature does not match its hash");

    // The forger's key added to the book: caught once the leader's key is
    // pinned.
    write_forged(&run, Some(ledger::SigningKey::generate().unwrap()));
    assert!(audit(&run).status.success());
    assert_forgery_refused(
        &audit_with(&run, &[leader_key]),
        "which is not among the keys given with --key",
    );
}

/// A countersignature is of a line as one leader signed it: left in the
/// run directory by an earlier run whose lines hash alike (same counts),
/// it counts for nothing under this run's leader.
#[test]
fn a_countersignature_counts_only_for_the_leader_whose_line_it_saw() {
    let dir = tempfile::tempdir().unwrap();
    let write = |run: &Path| {
        let key = ledger::SigningKey::generate().unwrap();
        let mut l = Ledger::create(run).unwrap().signed_by(key).unwrap();
        l.append(10, &[tally(2, 0, 9, 0), tally(3, 0, 3, 0)])
            .unwrap();
        l.last_line().to_string()
    };
    let (earlier, now) = (dir.path().join("earlier"), dir.path().join("now"));
    let line = write(&earlier);
    let validator = ledger::SigningKey::generate().unwrap();
    let mut countersigner = ledger::Countersigner::create(&earlier, validator).unwrap();
    countersigner.countersign(&line).unwrap();
    let counted = |run: &Path| {
        let chain = ledger::read(run).unwrap();
        ledger::check_signatures(&chain, run, &[], false)
            .unwrap()
            .countersigned
    };
    assert_eq!(counted(&earlier), [1]);

    write(&now);
    assert_eq!(
        ledger::read(&now).unwrap().records[0].hash,
        ledger::read(&earlier).unwrap().records[0].hash
    );
    std::fs::copy(
        countersigner.path(),
        now.join(countersigner.path().file_name().unwrap()),
    )
    .unwrap();
    assert_eq!(counted(&now), [0]);
}
