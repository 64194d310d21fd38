//! Sampling text from a trained pipeline, one token at a time.
//!
//! Each new token runs the whole context (cropped to `block_size`) through
//! every stage, as nanoGPT's `generate`: no key/value cache, because a
//! character model's context is short and sampling is not the hot path.

use candle_core::{DType, Device, IndexOp, Tensor};

use super::{ModelError, StageInput, StageModel};
use crate::data::rng::SplitMix64;

/// Stream id of the sampler's generator, so the same seed gives the same
/// text and no other draw of the job's seed shares its stream.
const SAMPLER_STREAM: u64 = 0x5341_4d50_4c45;

/// How [`generate`] picks each token.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleOptions {
    /// Number of tokens to add.
    pub tokens: usize,
    /// Divides the logits: below 1 sharpens the distribution, above 1
    /// flattens it; 0 always takes the most likely token.
    pub temperature: f64,
    /// Draw only among the `top_k` most likely tokens; 0 means all.
    pub top_k: usize,
    pub seed: u64,
}

/// Continues `context` (token ids, at least one) by `opts.tokens` tokens
/// drawn from the model made of `stages`, every stage in order. Returns
/// only the new tokens; the same options give the same tokens.
pub fn generate(
    stages: &[StageModel],
    context: &[u32],
    opts: &SampleOptions,
) -> Result<Vec<u32>, ModelError> {
    let whole = stages
        .iter()
        .enumerate()
        .all(|(i, s)| s.stage() == i && s.n_stages() == stages.len());
    let Some((last, body)) = stages.split_last().filter(|_| whole) else {
        return Err(ModelError::IncompletePipeline(
            stages.iter().map(StageModel::stage).collect(),
        ));
    };
    if context.is_empty() {
        return Err(ModelError::EmptyContext);
    }
    if !(opts.temperature >= 0.0 && opts.temperature.is_finite()) {
        return Err(ModelError::Temperature(opts.temperature));
    }
    let block_size = last.config().block_size;
    let mut rng = SplitMix64::new(opts.seed, SAMPLER_STREAM);
    let mut ids = context.to_vec();
    for _ in 0..opts.tokens {
        let window = &ids[ids.len().saturating_sub(block_size)..];
        let logits = next_logits(body, last, window)?;
        ids.push(pick(&logits, opts, &mut rng));
    }
    Ok(ids.split_off(context.len()))
}

/// Logits of the token after `window`, through the stages of `body`, then
/// the last stage.
fn next_logits(
    body: &[StageModel],
    last: &StageModel,
    window: &[u32],
) -> Result<Vec<f32>, ModelError> {
    let ids = Tensor::from_slice(window, (1, window.len()), &Device::Cpu)?;
    let mut acts: Option<Tensor> = None;
    for stage in body {
        let input = acts.as_ref().map_or(StageInput::Tokens(&ids), |a| {
            StageInput::Activations(a, &ids)
        });
        acts = Some(stage.forward(input, None)?.output().clone());
    }
    let input = acts.as_ref().map_or(StageInput::Tokens(&ids), |a| {
        StageInput::Activations(a, &ids)
    });
    let logits = last.logits(input)?;
    Ok(logits
        .i((0, window.len() - 1))?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}

/// Draws a token from `softmax(logits / temperature)`, restricted to the
/// `top_k` largest logits (ties at the k-th value are kept, as nanoGPT).
fn pick(logits: &[f32], opts: &SampleOptions, rng: &mut SplitMix64) -> u32 {
    let argmax = || {
        (0u32..)
            .zip(logits)
            .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 {
                    (i, l)
                } else {
                    best
                }
            })
            .0
    };
    if opts.temperature == 0.0 {
        return argmax();
    }
    let mut scaled: Vec<f64> = logits
        .iter()
        .map(|&l| f64::from(l) / opts.temperature)
        .collect();
    if (1..scaled.len()).contains(&opts.top_k) {
        let mut sorted = scaled.clone();
        sorted.sort_unstable_by(|a, b| b.total_cmp(a));
        let kth = sorted[opts.top_k - 1];
        scaled
            .iter_mut()
            .filter(|x| **x < kth)
            .for_each(|x| *x = f64::NEG_INFINITY);
    }
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scaled.iter().map(|x| (x - max).exp()).collect();
    let mut point = rng.unit_open0() * weights.iter().sum::<f64>();
    (0u32..)
        .zip(&weights)
        .find(|(_, w)| {
            point -= *w;
            point <= 0.0
        })
        // Only reached through rounding, or logits that are not numbers.
        .map_or_else(argmax, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(temperature: f64, top_k: usize) -> SampleOptions {
        SampleOptions {
            tokens: 1,
            temperature,
            top_k,
            seed: 1,
        }
    }

    #[test]
    fn temperature_zero_takes_the_most_likely_token() {
        let mut rng = SplitMix64::new(0, 0);
        assert_eq!(pick(&[0.1, 3.0, -2.0, 2.9], &opts(0.0, 0), &mut rng), 1);
    }

    #[test]
    fn top_k_draws_only_among_the_k_largest_logits_in_proportion() {
        let mut rng = SplitMix64::new(0, 0);
        let logits = [1.0, 5.0, 0.0, 5.0f32.ln() + 5.0, 4.9];
        let mut counts = [0usize; 5];
        for _ in 0..6000 {
            counts[pick(&logits, &opts(1.0, 2), &mut rng) as usize] += 1;
        }
        assert_eq!(counts[0] + counts[2] + counts[4], 0, "{counts:?}");
        // Token 3 is 5 times as likely as token 1.
        let share = counts[3] as f64 / 6000.0;
        assert!((share - 5.0 / 6.0).abs() < 0.02, "{counts:?}");
    }
}
