//! Training data: corpus, character tokenizer, and batches named by id.
//!
//! No data is shipped between ranks: every rank holds the corpus (the
//! embedded tinyshakespeare by default) and derives a microbatch's tokens
//! from its id, so the orchestrator only sends ids.
//!
//! ```
//! use swarmrun::data::{Corpus, Dataset, Split};
//!
//! let data = Dataset::new(&Corpus::embedded()?)?;
//! assert_eq!(data.tokenizer().vocab_size(), 65);
//! let batch = data.batch(Split::Train, /* id */ 3, /* seed */ 1337, 12, 64)?;
//! assert_eq!(batch.inputs.len(), 12 * 64);
//! # Ok::<(), swarmrun::data::DataError>(())
//! ```
//!
//! API:
//!
//! ```text
//! Corpus::embedded() / from_file(&Path) / from_text(s) -> Corpus; .text()
//! Tokenizer::from_text(&str); .vocab_size(), .chars(), .encode(&str), .decode(&[u32])
//! Dataset::new(&Corpus); .tokenizer(), .tokens(Split),
//!     .batch(Split, id, seed, batch_size, block_size) -> Batch {inputs, targets, batch_size, block_size}
//! Split::{Train, Val}                     first 90% of tokens / last 10%
//! rng::splitmix64(u64), rng::SplitMix64::new(seed, id); .next_u64(), .below(n), .normal()
//! ```
//!
//! Token ids are `u32` because candle indexes embeddings with `u32`.

mod batch;
mod corpus;
pub mod rng;
mod tokenizer;

use std::path::PathBuf;

pub use batch::{Batch, Dataset, Split};
pub use corpus::Corpus;
pub use tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read corpus {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corpus {} is not UTF-8 (first bad byte at offset {offset})", path.display())]
    NotUtf8 { path: PathBuf, offset: usize },
    /// The embedded corpus failed to decompress: a broken build.
    #[error("embedded corpus is corrupt: {0}")]
    Embedded(std::io::Error),
    #[error("character {ch:?} at position {position} is not in the vocabulary")]
    UnknownChar { ch: char, position: usize },
    #[error("token id {id} is outside the vocabulary of {vocab_size}")]
    UnknownToken { id: u32, vocab_size: usize },
    #[error(
        "{split:?} split has {tokens} tokens, too few for windows of {block_size} (+1 target)"
    )]
    SplitTooShort {
        split: Split,
        tokens: usize,
        block_size: usize,
    },
}
