//! Character-level tokenizer, as nanoGPT's shakespeare-char.

use std::collections::HashMap;

use super::DataError;

/// Maps each distinct character of a text to its rank in sorted order
/// (65 tokens for tinyshakespeare), so any rank that reads the same corpus
/// builds the same vocabulary.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    chars: Vec<char>,
    ids: HashMap<char, u32>,
}

impl Tokenizer {
    pub fn from_text(text: &str) -> Tokenizer {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        let ids = chars.iter().zip(0u32..).map(|(&c, i)| (c, i)).collect();
        Tokenizer { chars, ids }
    }

    pub fn vocab_size(&self) -> usize {
        self.chars.len()
    }

    /// The vocabulary, token id = index.
    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        text.chars()
            .enumerate()
            .map(|(position, ch)| {
                self.ids
                    .get(&ch)
                    .copied()
                    .ok_or(DataError::UnknownChar { ch, position })
            })
            .collect()
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        ids.iter()
            .map(|&id| {
                self.chars
                    .get(id as usize)
                    .copied()
                    .ok_or(DataError::UnknownToken {
                        id,
                        vocab_size: self.chars.len(),
                    })
            })
            .collect()
    }
}
