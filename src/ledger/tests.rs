use super::*;

fn tally(rank: usize, stage: usize, verified: u64, failed: u64) -> Tally {
    Tally {
        rank,
        stage,
        verified,
        failed,
    }
}

/// A ledger of four windows over miners 1..=4, rank 4 caught in window 1.
fn sample(run_dir: &Path) -> Ledger {
    let mut ledger = Ledger::open(run_dir).unwrap();
    let windows = [
        vec![
            tally(1, 0, 6, 0),
            tally(2, 0, 2, 0),
            tally(3, 1, 4, 0),
            tally(4, 1, 4, 0),
        ],
        vec![
            tally(1, 0, 5, 0),
            tally(2, 0, 3, 0),
            tally(3, 1, 8, 0),
            tally(4, 1, 7, 1),
        ],
        vec![tally(1, 0, 7, 0), tally(2, 0, 1, 0), tally(3, 1, 8, 0)],
        vec![
            tally(3, 1, 5, 0),
            tally(1, 0, 5, 0),
            tally(2, 0, 0, 0),
            tally(4, 1, 2, 0),
        ],
    ];
    for (w, t) in windows.iter().enumerate() {
        ledger.append(w as u64, t).unwrap();
    }
    ledger
}

fn line_problem(e: LedgerError) -> (usize, LineProblem) {
    match e {
        LedgerError::Line { line, problem, .. } => (line, problem),
        other => panic!("expected a line's problem, got {other}"),
    }
}

fn read_err(run_dir: &Path) -> (usize, LineProblem) {
    line_problem(read(run_dir).unwrap_err())
}

fn lines(run_dir: &Path) -> Vec<String> {
    fs::read_to_string(path(run_dir))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(run_dir: &Path, lines: &[String]) {
    let text: String = lines.iter().flat_map(|l| [l.as_str(), "\n"]).collect();
    fs::write(path(run_dir), text).unwrap();
}

/// Recomputes every `prev` and `hash` after an edit, as a forger who
/// knows the format would.
fn rechain(run_dir: &Path, edit: impl FnOnce(&mut Vec<Line>)) {
    let mut parsed: Vec<Line> = lines(run_dir)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    edit(&mut parsed);
    let mut head = GENESIS.to_string();
    let text: Vec<String> = parsed
        .into_iter()
        .map(|mut l| {
            l.prev = head.clone();
            l.hash = Body {
                seq: l.seq,
                window: l.window,
                miners: &l.miners,
            }
            .hash(&l.prev);
            head = l.hash.clone();
            serde_json::to_string(&l).unwrap()
        })
        .collect();
    write_lines(run_dir, &text);
}

#[test]
fn appended_windows_read_back_with_shares_of_verified_over_total() {
    let dir = tempfile::tempdir().unwrap();
    sample(dir.path());
    let chain = read(dir.path()).unwrap();
    assert_eq!(chain.records.len(), 4);
    assert_eq!(chain.torn_line, None);
    let shares = |i: usize| -> Vec<(usize, f64)> {
        chain.records[i]
            .miners
            .iter()
            .map(|m| (m.rank, m.share))
            .collect()
    };
    assert_eq!(
        shares(0),
        [(1, 6.0 / 16.0), (2, 2.0 / 16.0), (3, 0.25), (4, 0.25)]
    );
    // Rank 4 failed a check: no credit, and its passes count for no one.
    assert_eq!(
        shares(1),
        [(1, 5.0 / 16.0), (2, 3.0 / 16.0), (3, 0.5), (4, 0.0)]
    );
    for (i, record) in chain.records.iter().enumerate() {
        let sum: f64 = record.miners.iter().map(|m| m.share).sum();
        assert!((sum - 1.0).abs() < 1e-12, "{record:?}");
        assert_eq!(record.seq, i as u64 + 1);
    }
    let first = &lines(dir.path())[0];
    assert!(
        first.starts_with(r#"{"seq":1,"window":0,"miners":[{"rank":1,"stage":0,"verified":6,"failed":0,"excluded":false,"share":0.375},"#),
        "{first}"
    );
    assert!(first.contains(&format!(r#""prev":"{GENESIS}","hash":""#)));
    let last: Line = serde_json::from_str(&lines(dir.path())[3]).unwrap();
    assert_eq!(chain.head, last.hash);
}

#[test]
fn a_miner_that_fails_a_check_is_excluded_from_every_later_window() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = sample(dir.path());
    assert_eq!(ledger.excluded(), &BTreeMap::from([(4, 1)]));
    let chain = read(dir.path()).unwrap();
    let rank4 = |i: usize| {
        chain.records[i]
            .miners
            .iter()
            .find(|m| m.rank == 4)
            .cloned()
    };
    // Window 2 left rank 4 out: the ledger lists it anyway, excluded.
    let w2 = rank4(2).unwrap();
    assert!(w2.excluded && w2.share == 0.0 && w2.stage == 1 && w2.verified == 0);
    // Window 3 reported passes for it: recorded, but paid nothing.
    let w3 = rank4(3).unwrap();
    assert!(w3.excluded && w3.share == 0.0 && w3.verified == 2);
    let w3_shares: Vec<f64> = chain.records[3].miners.iter().map(|m| m.share).collect();
    assert_eq!(w3_shares, [0.5, 0.0, 0.5, 0.0]);
}

#[test]
fn open_continues_the_chain_of_an_existing_ledger() {
    let dir = tempfile::tempdir().unwrap();
    drop(sample(dir.path()));
    let mut ledger = Ledger::open(dir.path()).unwrap();
    assert_eq!(ledger.excluded(), &BTreeMap::from([(4, 1)]));
    let record = ledger.append(7, &[tally(1, 0, 1, 0)]).unwrap();
    assert_eq!(record.seq, 5);
    assert_eq!(record.miners.len(), 2, "rank 4 stays excluded");
    let chain = read(dir.path()).unwrap();
    assert_eq!(chain.records.len(), 5);
    assert_eq!(chain.records[4], record);
}

#[test]
fn append_refuses_an_old_window_and_a_rank_counted_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = sample(dir.path());
    assert!(matches!(
        ledger.append(3, &[tally(1, 0, 1, 0)]),
        Err(LedgerError::WindowNotAfter { window: 3, last: 3 })
    ));
    assert!(matches!(
        ledger.append(4, &[tally(2, 0, 1, 0), tally(2, 1, 1, 0)]),
        Err(LedgerError::DuplicateRank { window: 4, rank: 2 })
    ));
    assert_eq!(read(dir.path()).unwrap().records.len(), 4);
}

#[test]
fn an_empty_window_pays_no_one_and_a_new_ledger_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = Ledger::open(&dir.path().join("run")).unwrap();
    assert!(read(&dir.path().join("run")).unwrap().records.is_empty());
    let record = ledger.append(0, &[tally(1, 0, 0, 0)]).unwrap();
    assert_eq!(record.miners[0].share, 0.0);
}

#[test]
fn open_cuts_a_torn_last_line_and_read_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    drop(sample(dir.path()));
    let full = fs::read(path(dir.path())).unwrap();
    let three = full.len() - lines(dir.path())[3].len() - 1;
    fs::write(path(dir.path()), &full[..full.len() - 20]).unwrap();
    let chain = read(dir.path()).unwrap();
    assert_eq!((chain.records.len(), chain.torn_line), (3, Some(4)));
    let mut ledger = Ledger::open(dir.path()).unwrap();
    assert_eq!(fs::read(path(dir.path())).unwrap(), &full[..three]);
    // Window 3's record was lost, and with it nothing else.
    ledger.append(3, &[tally(1, 0, 1, 0)]).unwrap();
    let chain = read(dir.path()).unwrap();
    assert_eq!((chain.records.len(), chain.torn_line), (4, None));
}

#[test]
fn open_refuses_a_corrupt_complete_line_and_leaves_the_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    drop(sample(dir.path()));
    let mut l = lines(dir.path());
    l[1] = l[1].replace(r#""verified":3"#, r#""verified":4"#);
    write_lines(dir.path(), &l);
    let before = fs::read(path(dir.path())).unwrap();
    let err = Ledger::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("ledger.jsonl:2: "), "{err}");
    assert_eq!(line_problem(err), (2, LineProblem::Edited));
    assert_eq!(fs::read(path(dir.path())).unwrap(), before);
}

#[test]
fn every_kind_of_edit_names_the_first_wrong_line() {
    let dir = tempfile::tempdir().unwrap();
    drop(sample(dir.path()));
    let original = lines(dir.path());
    let edit = |f: &dyn Fn(&mut Vec<String>)| {
        let mut l = original.clone();
        f(&mut l);
        write_lines(dir.path(), &l);
        read_err(dir.path())
    };
    let number = edit(&|l| l[2] = l[2].replacen(r#""verified":7"#, r#""verified":9"#, 1));
    assert_eq!(number, (3, LineProblem::Edited));
    let share = edit(&|l| l[0] = l[0].replacen("0.375", "0.5", 1));
    assert_eq!(share, (1, LineProblem::Edited));
    let spacing = edit(&|l| l[1] = l[1].replacen(",", ", ", 1));
    assert_eq!(spacing, (2, LineProblem::NotCanonical));
    let deleted = edit(&|l| {
        l.remove(1);
    });
    assert_eq!(
        deleted,
        (
            2,
            LineProblem::Seq {
                expected: 2,
                found: 3
            }
        )
    );
    let swapped = edit(&|l| l.swap(1, 2));
    assert_eq!(swapped.0, 2);
    let repeated = edit(&|l| l.insert(2, l[1].clone()));
    assert_eq!(repeated.0, 3);
    let first_deleted = edit(&|l| {
        l.remove(0);
    });
    assert_eq!(first_deleted.0, 1);
    let garbage = edit(&|l| l.insert(3, "not json".to_string()));
    assert!(matches!(garbage, (4, LineProblem::Unparsable(_))));
    let empty = edit(&|l| l.insert(0, String::new()));
    assert!(matches!(empty, (1, LineProblem::Unparsable(_))));
    let extra = edit(&|l| l[0] = l[0].replacen(r#"{"seq""#, r#"{"bonus":1,"seq""#, 1));
    assert!(matches!(extra, (1, LineProblem::Unparsable(_))));
}

#[test]
fn a_rechained_forgery_is_caught_by_the_rules_it_breaks() {
    let dir = tempfile::tempdir().unwrap();
    drop(sample(dir.path()));
    let original = fs::read(path(dir.path())).unwrap();
    let forge = |f: &dyn Fn(&mut Vec<Line>)| {
        fs::write(path(dir.path()), &original).unwrap();
        rechain(dir.path(), f);
        read_err(dir.path())
    };
    // Raising a count with the hashes redone still breaks the shares.
    let raised = forge(&|l| l[0].miners[1].verified = 10);
    assert!(matches!(raised, (1, LineProblem::Share { rank: 1, .. })));
    let pardoned = forge(&|l| l[2].miners[3].excluded = false);
    assert_eq!(
        pardoned,
        (
            3,
            LineProblem::Excluded {
                rank: 4,
                stored: false,
                expected: true
            }
        )
    );
    let dropped = forge(&|l| {
        l[2].miners.pop();
    });
    assert_eq!(
        dropped,
        (
            3,
            LineProblem::MissingExcluded {
                rank: 4,
                caught_in: 1
            }
        )
    );
    let reordered = forge(&|l| l[3].window = 1);
    assert_eq!(
        reordered,
        (
            4,
            LineProblem::WindowOrder {
                window: 1,
                previous: 2
            }
        )
    );
    let unsorted = forge(&|l| l[0].miners.swap(0, 1));
    assert_eq!(unsorted, (1, LineProblem::RankOrder));
    let renumbered = forge(&|l| l[1].seq = 7);
    assert!(matches!(renumbered, (2, LineProblem::Seq { .. })));
    // The same forgery with the shares recomputed too passes: the chain
    // has no secret, as the module documentation says.
    fs::write(path(dir.path()), &original).unwrap();
    rechain(dir.path(), |l| {
        l[0].miners[1].verified = 10;
        let mut state = State::new();
        for line in l.iter_mut() {
            let tallies: Vec<Tally> = line
                .miners
                .iter()
                .map(|m| tally(m.rank, m.stage, m.verified, m.failed))
                .collect();
            line.miners = state.credits(&tallies);
            state.advance(line.window, &line.miners, String::new());
        }
    });
    assert_eq!(read(dir.path()).unwrap().records[0].miners[1].verified, 10);
}

#[test]
fn random_byte_edits_are_refused_or_cut_as_a_torn_line_and_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    drop(sample(dir.path()));
    let original = fs::read(path(dir.path())).unwrap();
    let good = verify(&original, Path::new("l")).unwrap().0.records;
    // xorshift64*: the same edits on every run.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for trial in 0..3000 {
        let mut bytes = original.clone();
        let at = (next() % bytes.len() as u64) as usize;
        let byte = (next() % 256) as u8;
        let what = match trial % 3 {
            0 if bytes[at] != byte => {
                bytes[at] = byte;
                "replaced"
            }
            0 => continue,
            1 => {
                bytes.remove(at);
                "deleted"
            }
            _ => {
                bytes.insert(at + usize::from(next() % 2 == 0), byte);
                "inserted"
            }
        };
        match verify(&bytes, Path::new("l")) {
            Err(_) => {}
            Ok((chain, _, _)) => {
                assert!(
                    chain.torn_line.is_some() && good.starts_with(&chain.records),
                    "{what} byte {byte:#04x} at {at} passed: {}",
                    String::from_utf8_lossy(&bytes)
                );
            }
        }
    }
}

#[test]
fn resuming_cuts_the_windows_after_the_checkpoint_and_a_fresh_start_empties_it() {
    let dir = tempfile::tempdir().unwrap();
    drop(sample(dir.path()));
    let windows = |dir: &Path| -> Vec<u64> {
        read(dir)
            .unwrap()
            .records
            .iter()
            .map(|r| r.window)
            .collect()
    };
    let mut ledger = Ledger::resume(dir.path(), 1).unwrap();
    assert_eq!(windows(dir.path()), [0, 1]);
    // Window 2 is run again; rank 4, caught in window 1, stays excluded.
    let record = ledger.append(2, &[tally(1, 0, 3, 0)]).unwrap();
    assert!(record.miners.iter().any(|m| m.rank == 4 && m.excluded));
    assert_eq!(windows(dir.path()), [0, 1, 2]);
    drop(ledger);
    drop(Ledger::create(dir.path()).unwrap());
    assert!(windows(dir.path()).is_empty());
}

#[test]
fn a_miner_caught_forfeits_the_credit_of_every_window_of_the_run_and_the_others_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = Ledger::open(dir.path()).unwrap();
    for window in 0..6 {
        let failed = u64::from(window == 4);
        ledger
            .append(
                window,
                &[tally(1, 0, 3, 0), tally(2, 0, 1, failed), tally(3, 1, 2, 0)],
            )
            .unwrap();
    }
    let records = read(dir.path()).unwrap().records;
    // As written, rank 2 earned its share in the windows before the catch.
    assert_eq!(records[0].miners[1].share, 1.0 / 6.0);
    let settled = settled(&records);
    let share_of = |w: usize, rank: usize| {
        settled[w]
            .miners
            .iter()
            .find(|m| m.rank == rank)
            .unwrap()
            .share
    };
    for w in 0..6 {
        assert_eq!(
            (share_of(w, 1), share_of(w, 2), share_of(w, 3)),
            (0.6, 0.0, 0.4),
            "window {w}"
        );
    }
}
