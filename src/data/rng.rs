//! A counter-based random number generator: SplitMix64.
//!
//! Every rank must derive the same token windows and the same initial
//! weights from a few integers, with no state carried between calls and no
//! dependency on a library whose stream might change between versions.
//! SplitMix64 is a dozen lines, passes BigCrush, and its output for a given
//! state is fixed forever.

/// SplitMix64's finalizer: a bijective mix of 64 bits. Used to turn
/// structured inputs (a seed, a microbatch id) into well-spread states.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A SplitMix64 stream: output `i` is `splitmix64(state + i * gamma)`.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A stream keyed by two integers (a seed and an id); distinct pairs give
    /// unrelated streams because both pass through the mixer.
    pub fn new(seed: u64, id: u64) -> Self {
        SplitMix64 {
            state: splitmix64(splitmix64(seed) ^ id),
        }
    }

    /// The position in the stream: [`SplitMix64::from_state`] of it
    /// continues with exactly the outputs this stream would give next, so a
    /// checkpoint can save a generator and a resumed run draw the same.
    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn from_state(state: u64) -> Self {
        SplitMix64 { state }
    }

    pub fn next_u64(&mut self) -> u64 {
        let out = splitmix64(self.state);
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        out
    }

    /// Uniform in `0..n` by Lemire's multiply-shift (bias below 2^-64 * n,
    /// far under anything a token sampler could notice). `n` must be > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `(0, 1]` with 53 random bits; never 0, so `ln` is finite.
    pub fn unit_open0(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Moves a uniform sample of `k` of `items` (all where there are fewer)
    /// to the front, by a partial Fisher-Yates shuffle, and returns it.
    pub fn sample<'i, I>(&mut self, k: usize, items: &'i mut [I]) -> &'i [I] {
        let k = k.min(items.len());
        for i in 0..k {
            let j = i + self.below((items.len() - i) as u64) as usize;
            items.swap(i, j);
        }
        &items[..k]
    }

    /// Standard normal by Box-Muller (one value per two draws, so a value
    /// depends only on its index in the stream).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.unit_open0(), self.unit_open0());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_output_matches_the_reference_implementation() {
        // Vigna's splitmix64.c with x = 1234567: first output.
        let mut s = SplitMix64 { state: 1234567 };
        assert_eq!(s.next_u64(), 6457827717110365317);
    }

    #[test]
    fn a_stream_rebuilt_from_its_state_continues_with_the_same_outputs() {
        let mut s = SplitMix64::new(3, 4);
        s.next_u64();
        let mut t = SplitMix64::from_state(s.state());
        assert!((0..10).all(|_| s.next_u64() == t.next_u64()));
    }

    #[test]
    fn below_stays_in_range_and_normal_has_unit_spread() {
        let mut s = SplitMix64::new(7, 0);
        assert!((0..1000).all(|_| s.below(10) < 10));
        let xs: Vec<f64> = (0..20_000).map(|_| s.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
