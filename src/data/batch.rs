//! Token ids, the train/validation split, and batches named by id.

use super::rng::SplitMix64;
use super::{Corpus, DataError, Tokenizer};

/// Which part of the corpus a batch is drawn from: the first 90% of the
/// tokens train, the rest validate (nanoGPT's `prepare.py` split).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
}

/// A tokenized corpus, split for training.
#[derive(Debug, Clone)]
pub struct Dataset {
    tokenizer: Tokenizer,
    tokens: Vec<u32>,
    n_train: usize,
}

/// `batch_size` windows of `block_size` tokens, row-major
/// (`inputs[row * block_size + t]`); `targets` is each window shifted by
/// one token, so `targets[i]` is the token that follows `inputs[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub batch_size: usize,
    pub block_size: usize,
}

impl Dataset {
    pub fn new(corpus: &Corpus) -> Result<Dataset, DataError> {
        let tokenizer = Tokenizer::from_text(corpus.text());
        let tokens = tokenizer.encode(corpus.text())?;
        let n_train = tokens.len() * 9 / 10;
        Ok(Dataset {
            tokenizer,
            tokens,
            n_train,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn tokens(&self, split: Split) -> &[u32] {
        match split {
            Split::Train => &self.tokens[..self.n_train],
            Split::Val => &self.tokens[self.n_train..],
        }
    }

    /// The batch named `id` under `seed`: a pure function of its arguments,
    /// so every rank that holds the corpus derives the same tokens for a
    /// microbatch id and no data travels. Window starts are drawn uniformly
    /// (with replacement, as nanoGPT's `get_batch`) from a SplitMix64 stream
    /// keyed by `(seed, id)`.
    pub fn batch(
        &self,
        split: Split,
        id: u64,
        seed: u64,
        batch_size: usize,
        block_size: usize,
    ) -> Result<Batch, DataError> {
        let tokens = self.tokens(split);
        if block_size == 0 || tokens.len() <= block_size {
            return Err(DataError::SplitTooShort {
                split,
                tokens: tokens.len(),
                block_size,
            });
        }
        let n_starts = (tokens.len() - block_size) as u64;
        let mut rng = SplitMix64::new(seed, id);
        let mut inputs = Vec::with_capacity(batch_size * block_size);
        let mut targets = Vec::with_capacity(batch_size * block_size);
        for _ in 0..batch_size {
            let start = rng.below(n_starts) as usize;
            inputs.extend_from_slice(&tokens[start..start + block_size]);
            targets.extend_from_slice(&tokens[start + 1..start + block_size + 1]);
        }
        Ok(Batch {
            inputs,
            targets,
            batch_size,
            block_size,
        })
    }
}
