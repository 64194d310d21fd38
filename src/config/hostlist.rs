//! Slurm hostlist expressions: `node[01-04,07],login1` -> one name per host.
//!
//! Job files name hosts the way `sbatch`, `scontrol show hostnames` and
//! `SLURM_JOB_NODELIST` do, so a site block can be pasted from a Slurm
//! allocation. Only expansion is provided; nothing in swarmrun prints
//! hostlists back in compressed form.

use thiserror::Error;

/// The most hosts one expression may expand to. A typo such as
/// `n[0-9999999]` must fail fast instead of allocating millions of names.
pub const MAX_HOSTS: usize = 65536;

/// Why a hostlist expression was rejected. Offsets are byte offsets into the
/// expression, so a caller can point at the character.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HostlistError {
    #[error("empty hostlist")]
    Empty,
    #[error("empty host name at offset {offset}")]
    EmptyItem { offset: usize },
    #[error("unbalanced brackets: `{bracket}` at offset {offset} has no partner")]
    Unbalanced { bracket: char, offset: usize },
    #[error("nested brackets at offset {offset}")]
    Nested { offset: usize },
    #[error("reversed range `{start}-{end}`")]
    Reversed { start: String, end: String },
    #[error("`{text}` in brackets is not a number or a range like `1-4`")]
    NotNumeric { text: String },
    #[error("invalid character {ch:?} at offset {offset}")]
    InvalidChar { ch: char, offset: usize },
    #[error("hostlist expands to more than {MAX_HOSTS} hosts")]
    TooMany,
}

/// Expands a Slurm hostlist into host names, in the order written.
///
/// Top-level commas separate items; each item may hold several bracket groups
/// of comma-separated numbers and ranges, and expands to their cartesian
/// product (`a[1-2]b[3-4]` -> `a1b3 a1b4 a2b3 a2b4`). A range keeps the width
/// of its start, so `n[008-010]` gives `n008 n009 n010` while `n[8-10]` gives
/// `n8 n9 n10`.
pub fn expand(s: &str) -> Result<Vec<String>, HostlistError> {
    if s.is_empty() {
        return Err(HostlistError::Empty);
    }
    let mut hosts = Vec::new();
    for (offset, item) in split_items(s)? {
        expand_item(item, offset, &mut hosts)?;
    }
    Ok(hosts)
}

/// Splits at commas outside brackets, checking bracket balance and nesting on
/// the way so that item expansion can assume well-formed groups.
fn split_items(s: &str) -> Result<Vec<(usize, &str)>, HostlistError> {
    let mut items = Vec::new();
    let mut open: Option<usize> = None;
    let mut start = 0;
    for (i, ch) in s.char_indices() {
        match ch {
            '[' if open.is_some() => return Err(HostlistError::Nested { offset: i }),
            '[' => open = Some(i),
            ']' if open.is_none() => {
                return Err(HostlistError::Unbalanced {
                    bracket: ']',
                    offset: i,
                })
            }
            ']' => open = None,
            ',' if open.is_none() => {
                items.push((start, &s[start..i]));
                start = i + 1;
            }
            c if c.is_whitespace() || c.is_control() => {
                return Err(HostlistError::InvalidChar { ch: c, offset: i })
            }
            _ => {}
        }
    }
    if let Some(offset) = open {
        return Err(HostlistError::Unbalanced {
            bracket: '[',
            offset,
        });
    }
    items.push((start, &s[start..]));
    match items.iter().find(|(_, item)| item.is_empty()) {
        Some(&(offset, _)) => Err(HostlistError::EmptyItem { offset }),
        None => Ok(items),
    }
}

/// Appends the cartesian product of one item's literal parts and bracket
/// groups to `hosts`, refusing to grow `hosts` past [`MAX_HOSTS`].
fn expand_item(item: &str, offset: usize, hosts: &mut Vec<String>) -> Result<(), HostlistError> {
    let room = MAX_HOSTS - hosts.len();
    let mut names = vec![String::new()];
    // Every piece after the first `[` is `GROUP]LITERAL`; split_items has
    // already checked balance, so a missing `]` here cannot happen.
    for (i, piece) in item.split('[').enumerate() {
        let literal = if i == 0 {
            piece
        } else {
            let (group, literal) = piece.split_once(']').ok_or(HostlistError::Unbalanced {
                bracket: '[',
                offset,
            })?;
            let numbers = expand_group(group, room)?;
            if names.len().saturating_mul(numbers.len()) > room {
                return Err(HostlistError::TooMany);
            }
            names = names
                .iter()
                .flat_map(|name| numbers.iter().map(move |n| format!("{name}{n}")))
                .collect();
            literal
        };
        for name in &mut names {
            name.push_str(literal);
        }
    }
    if names.len() > room {
        return Err(HostlistError::TooMany);
    }
    hosts.extend(names);
    Ok(())
}

/// Expands the inside of one bracket group (`01-04,07`) to its numbers as
/// text, keeping each range's zero padding; at most `budget` numbers.
fn expand_group(group: &str, budget: usize) -> Result<Vec<String>, HostlistError> {
    let mut out = Vec::new();
    for part in group.split(',') {
        let not_numeric = || HostlistError::NotNumeric {
            text: part.to_string(),
        };
        let (start, end) = part.split_once('-').unwrap_or((part, part));
        let lo = parse_number(start).ok_or_else(not_numeric)?;
        let hi = parse_number(end).ok_or_else(not_numeric)?;
        if hi < lo {
            return Err(HostlistError::Reversed {
                start: start.to_string(),
                end: end.to_string(),
            });
        }
        if hi - lo >= (budget - out.len()) as u64 {
            return Err(HostlistError::TooMany);
        }
        let width = start.len();
        out.extend((lo..=hi).map(|n| format!("{n:0width$}")));
    }
    Ok(out)
}

/// Parses a run of ASCII digits; `None` for anything else, including an
/// empty string and numbers too large for `u64`.
fn parse_number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Vec<String> {
        expand(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn plain_names_are_kept_in_order() {
        assert_eq!(ok("b,a,c"), ["b", "a", "c"]);
        assert_eq!(ok("localhost"), ["localhost"]);
    }

    #[test]
    fn ranges_and_singles_in_one_group_keep_zero_padding() {
        assert_eq!(
            ok("node[01-04,07]"),
            ["node01", "node02", "node03", "node04", "node07"]
        );
    }

    #[test]
    fn range_width_comes_from_its_start() {
        assert_eq!(ok("n[8-10]"), ["n8", "n9", "n10"]);
        assert_eq!(ok("n[008-010]"), ["n008", "n009", "n010"]);
    }

    #[test]
    fn several_groups_expand_to_the_cartesian_product() {
        assert_eq!(ok("a[1-2]b[3-4]"), ["a1b3", "a1b4", "a2b3", "a2b4"]);
    }

    #[test]
    fn top_level_commas_separate_items_but_bracket_commas_do_not() {
        assert_eq!(
            ok("gpu[1,3],cpu[0-1].lab"),
            ["gpu1", "gpu3", "cpu0.lab", "cpu1.lab"]
        );
    }

    #[test]
    fn empty_string_is_rejected() {
        assert_eq!(expand(""), Err(HostlistError::Empty));
    }

    #[test]
    fn empty_item_between_commas_is_rejected() {
        assert_eq!(expand("a,,b"), Err(HostlistError::EmptyItem { offset: 2 }));
        assert_eq!(expand("a,"), Err(HostlistError::EmptyItem { offset: 2 }));
    }

    #[test]
    fn unclosed_bracket_is_rejected() {
        assert_eq!(
            expand("node[01-04"),
            Err(HostlistError::Unbalanced {
                bracket: '[',
                offset: 4
            })
        );
    }

    #[test]
    fn stray_closing_bracket_is_rejected() {
        assert_eq!(
            expand("node01]"),
            Err(HostlistError::Unbalanced {
                bracket: ']',
                offset: 6
            })
        );
    }

    #[test]
    fn nested_brackets_are_rejected() {
        assert_eq!(expand("n[1-[2]]"), Err(HostlistError::Nested { offset: 4 }));
    }

    #[test]
    fn reversed_range_is_rejected() {
        assert_eq!(
            expand("n[10-2]"),
            Err(HostlistError::Reversed {
                start: "10".into(),
                end: "2".into()
            })
        );
    }

    #[test]
    fn non_numeric_range_parts_are_rejected() {
        for bad in ["n[a-b]", "n[]", "n[1-]", "n[1,,2]", "n[-3]", "n[1-2-3]"] {
            assert!(
                matches!(expand(bad), Err(HostlistError::NotNumeric { .. })),
                "{bad}: {:?}",
                expand(bad)
            );
        }
    }

    #[test]
    fn whitespace_in_a_hostlist_is_rejected() {
        assert_eq!(
            expand("a, b"),
            Err(HostlistError::InvalidChar { ch: ' ', offset: 2 })
        );
    }

    #[test]
    fn more_than_max_hosts_is_rejected_without_allocating_them() {
        assert_eq!(expand("n[0-99999999999]"), Err(HostlistError::TooMany));
        assert_eq!(expand("a[0-999]b[0-999]"), Err(HostlistError::TooMany));
        assert_eq!(expand("n[1-65536],extra"), Err(HostlistError::TooMany));
        assert_eq!(ok("n[1-65536]").len(), MAX_HOSTS);
    }

    #[test]
    fn numbers_too_large_for_u64_are_rejected() {
        assert!(matches!(
            expand("n[99999999999999999999]"),
            Err(HostlistError::NotNumeric { .. })
        ));
    }
}
