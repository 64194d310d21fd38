//! Training text: the embedded tinyshakespeare or a file.

use std::path::Path;

use super::DataError;

/// tinyshakespeare (Karpathy's char-rnn corpus, 1,115,394 bytes),
/// zstd level 19, so the quickstart trains with no download.
const EMBEDDED_ZST: &[u8] = include_bytes!("../../data/tinyshakespeare.txt.zst");

/// A UTF-8 training text.
#[derive(Debug, Clone)]
pub struct Corpus {
    text: String,
}

impl Corpus {
    /// The embedded tinyshakespeare.
    pub fn embedded() -> Result<Corpus, DataError> {
        let bytes = zstd::decode_all(EMBEDDED_ZST).map_err(DataError::Embedded)?;
        let text =
            String::from_utf8(bytes).map_err(|e| DataError::Embedded(std::io::Error::other(e)))?;
        Ok(Corpus { text })
    }

    /// The UTF-8 text in `path`.
    pub fn from_file(path: &Path) -> Result<Corpus, DataError> {
        let bytes = std::fs::read(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|e| DataError::NotUtf8 {
            path: path.to_path_buf(),
            offset: e.utf8_error().valid_up_to(),
        })?;
        Ok(Corpus { text })
    }

    /// Text given in memory (tests, or a corpus fetched some other way).
    pub fn from_text(text: impl Into<String>) -> Corpus {
        Corpus { text: text.into() }
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}
