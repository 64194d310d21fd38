//! Errors for job files, and the byte-offset -> line:column arithmetic that
//! lets every one of them point into the file.

use std::ops::Range;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// A job file that could not be read or is not a valid job.
///
/// `Invalid` displays as `FILE:LINE:COL: field `PATH`: MESSAGE` (the `field`
/// part is left out when no field applies, e.g. a TOML syntax error), the
/// shape compilers use, so editors and terminals can jump to the spot.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{}:{line}:{column}: {}{message}", .file.display(), field_prefix(.field))]
    Invalid {
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column, counted in characters.
        column: usize,
        /// Dotted path of the offending field as written in the file, e.g.
        /// `site[1].ranks_per_host` (indices are 0-based).
        field: Option<String>,
        message: String,
    },
    #[error("{}: cannot read job file: {source}", .file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn field_prefix(field: &Option<String>) -> String {
    match field {
        Some(field) => format!("field `{field}`: "),
        None => String::new(),
    }
}

impl ConfigError {
    /// Builds an `Invalid` error for the byte range `span` of `text`; an
    /// unknown span points at the start of the file.
    pub(crate) fn at(
        text: &str,
        file: &Path,
        span: Option<Range<usize>>,
        field: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        let (line, column) = line_column(text, span.map_or(0, |s| s.start));
        ConfigError::Invalid {
            file: file.to_path_buf(),
            line,
            column,
            field,
            message: message.into(),
        }
    }
}

/// 1-based line and character column of byte `offset` in `text`. Offsets past
/// the end or inside a character are moved back to the nearest character
/// start, so a bad span can never panic.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_is_one_based_and_counts_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 4), (1, 5));
        assert_eq!(line_column(text, 6), (2, 1));
        // `=` on line 2 follows a two-byte character.
        assert_eq!(line_column(text, 10), (2, 4));
    }

    #[test]
    fn line_column_clamps_offsets_past_the_end_or_inside_a_character() {
        assert_eq!(line_column("ab", 99), (1, 3));
        assert_eq!(line_column("é", 1), (1, 1));
    }
}
