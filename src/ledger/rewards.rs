//! Who earned what: the share rule, which the ledger applies when it writes
//! a window and again when it verifies one, and each miner's standing over
//! a whole ledger, as `swarmrun audit` prints it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use super::{Chain, MinerCredit, WindowRecord};

/// Sets each miner's share of one window: its verified passes over the
/// window's total, where a miner that failed a check or is excluded gets 0
/// and adds nothing to the total. A window without credited passes pays
/// no one.
pub(super) fn assign_shares(miners: &mut [MinerCredit]) {
    let total: u128 = miners
        .iter()
        .filter(|m| m.earns())
        .map(|m| u128::from(m.verified))
        .sum();
    for m in miners {
        m.share = if m.earns() && total > 0 {
            m.verified as f64 / total as f64
        } else {
            0.0
        };
    }
}

/// `records` as paid: a miner that failed a check in any window earns
/// nothing in any window of the run, and its shares go to the others.
///
/// Why the whole run: a replay is exact, so a failed check proves the miner
/// sent work it did not do; validators replay a sample, so any earlier
/// window may hold cheating nobody drew. Taking back only the windows near
/// the catch paid a cheater for its early windows (`swarmrun bench trust`'s
/// late cheater: 1.8% of the run's reward against its truth of nothing),
/// and a cheater that is honest at first to earn a clean record would keep
/// it. The cost: no share is final until the run ends, and a miner whose
/// hardware computes wrong loses the run, as its wrong gradients would
/// have cost the model. Each line of the ledger holds the window's shares
/// as known when it was written.
pub fn settled(records: &[WindowRecord]) -> Vec<WindowRecord> {
    let caught: BTreeSet<usize> = records
        .iter()
        .flat_map(|record| record.miners.iter())
        .filter(|m| m.failed > 0)
        .map(|m| m.rank)
        .collect();
    records
        .iter()
        .map(|record| {
            let mut record = record.clone();
            for m in &mut record.miners {
                if caught.contains(&m.rank) {
                    // Paid as if excluded: no share, and none of the total.
                    m.excluded = true;
                }
            }
            assign_shares(&mut record.miners);
            record
        })
        .collect()
}

/// One miner over a whole ledger.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Standing {
    pub rank: usize,
    /// The stages it served, ascending.
    pub stages: Vec<usize>,
    /// Windows in which it earned a share above 0.
    pub windows: u64,
    /// Verified passes, in all windows.
    pub verified: u64,
    /// Verified passes that earned credit (none from a window in which it
    /// failed a check, the windows it forfeited, or one it was excluded
    /// from).
    pub credited: u64,
    /// Checks failed.
    pub failed: u64,
    /// Its part of the whole ledger's reward: the sum of its window shares
    /// over the number of windows.
    pub share: f64,
    /// The window in which it first failed a check; it is excluded from
    /// every later one.
    pub excluded_after: Option<u64>,
}

/// Each miner's standing over `records` as paid ([`settled`]), ranks
/// ascending.
pub(super) fn standings(records: &[WindowRecord]) -> Vec<Standing> {
    let mut by_rank: BTreeMap<usize, (Standing, BTreeSet<usize>, f64)> = BTreeMap::new();
    for (written, record) in records.iter().zip(settled(records)) {
        for (served, m) in written.miners.iter().zip(&record.miners) {
            let (s, stages, share_sum) = by_rank.entry(m.rank).or_insert_with(|| {
                let standing = Standing {
                    rank: m.rank,
                    stages: Vec::new(),
                    windows: 0,
                    verified: 0,
                    credited: 0,
                    failed: 0,
                    share: 0.0,
                    excluded_after: None,
                };
                (standing, BTreeSet::new(), 0.0)
            });
            if !served.excluded {
                stages.insert(m.stage);
            }
            s.verified = s.verified.saturating_add(m.verified);
            s.failed = s.failed.saturating_add(m.failed);
            if m.earns() {
                s.credited = s.credited.saturating_add(m.verified);
            }
            if m.share > 0.0 {
                s.windows += 1;
            }
            *share_sum += m.share;
            if m.failed > 0 && s.excluded_after.is_none() {
                s.excluded_after = Some(record.window);
            }
        }
    }
    let windows = records.len() as f64;
    by_rank
        .into_values()
        .map(|(mut s, stages, share_sum)| {
            s.stages = stages.into_iter().collect();
            s.share = share_sum / windows;
            s
        })
        .collect()
}

/// What `swarmrun audit` prints for a verified ledger: a heading, one row
/// per miner, and a total. Columns are separated by spaces and hold no
/// spaces themselves.
pub fn audit_table(chain: &Chain) -> String {
    let mut out = String::new();
    let records = &chain.records;
    let span = match (records.first(), records.last()) {
        (Some(first), Some(last)) => format!(", windows {} to {}", first.window, last.window),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "ledger {}: {} lines{span}, chain intact, head {}",
        chain.path.display(),
        records.len(),
        chain.head
    );
    let rows = standings(records);
    let _ = writeln!(
        out,
        "{:>6}  {:<8}  {:>7}  {:>9}  {:>9}  {:>6}  {:>8}  excluded_after",
        "rank", "stages", "windows", "verified", "credited", "failed", "share"
    );
    for s in &rows {
        let stages: Vec<String> = s.stages.iter().map(usize::to_string).collect();
        let stages = if stages.is_empty() {
            "-".to_string()
        } else {
            stages.join(",")
        };
        let excluded = s
            .excluded_after
            .map_or_else(|| "-".to_string(), |w| w.to_string());
        let _ = writeln!(
            out,
            "{:>6}  {:<8}  {:>7}  {:>9}  {:>9}  {:>6}  {:>8.6}  {excluded}",
            s.rank, stages, s.windows, s.verified, s.credited, s.failed, s.share
        );
    }
    let verified = rows.iter().fold(0u64, |a, s| a.saturating_add(s.verified));
    let credited = rows.iter().fold(0u64, |a, s| a.saturating_add(s.credited));
    let share: f64 = rows.iter().map(|s| s.share).sum();
    let excluded = rows.iter().filter(|s| s.excluded_after.is_some()).count();
    let _ = writeln!(
        out,
        "total: {} miners, {excluded} excluded, {credited} of {verified} verified passes credited, shares sum to {share:.6}",
        rows.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credit(rank: usize, verified: u64, failed: u64, excluded: bool) -> MinerCredit {
        MinerCredit {
            rank,
            stage: rank % 2,
            verified,
            failed,
            excluded,
            share: f64::NAN,
        }
    }

    #[test]
    fn shares_are_verified_over_the_total_of_those_who_earn() {
        let mut miners = vec![
            credit(1, 3, 0, false),
            credit(2, 1, 0, false),
            credit(3, 50, 1, false),
            credit(4, 9, 0, true),
        ];
        assign_shares(&mut miners);
        let shares: Vec<f64> = miners.iter().map(|m| m.share).collect();
        assert_eq!(shares, [0.75, 0.25, 0.0, 0.0]);
    }

    #[test]
    fn a_window_without_credited_passes_pays_no_one() {
        let mut miners = vec![credit(1, 0, 0, false), credit(2, 7, 2, false)];
        assign_shares(&mut miners);
        assert!(miners.iter().all(|m| m.share == 0.0));
    }

    #[test]
    fn standings_sum_windows_and_average_the_settled_shares_over_all_windows() {
        let record = |window, miners: Vec<MinerCredit>| {
            let mut miners = miners;
            assign_shares(&mut miners);
            WindowRecord {
                seq: window + 1,
                window,
                miners,
                hash: String::new(),
                signature: None,
            }
        };
        let records = vec![
            record(0, vec![credit(1, 2, 0, false), credit(2, 2, 0, false)]),
            record(1, vec![credit(1, 4, 0, false), credit(2, 6, 1, false)]),
            record(2, vec![credit(1, 5, 0, false), credit(2, 0, 0, true)]),
        ];
        let s = standings(&records);
        assert_eq!(s.len(), 2);
        // Rank 2's window 0, credited as written, is forfeited as paid.
        assert_eq!(records[0].miners[1].share, 0.5);
        assert_eq!(
            (s[0].windows, s[0].verified, s[0].credited, s[0].failed),
            (3, 11, 11, 0)
        );
        assert_eq!(s[0].share, 1.0);
        assert_eq!(s[0].excluded_after, None);
        assert_eq!(
            (s[1].windows, s[1].verified, s[1].credited, s[1].failed),
            (0, 8, 0, 1)
        );
        assert_eq!(s[1].share, 0.0);
        assert_eq!(s[1].excluded_after, Some(1));
        assert_eq!(s[1].stages, [0]);
    }
}
