//! AVX2 kernels of the codec's hot loops, for x86_64 CPUs that have AVX2
//! (checked at run time): the absolute maximum of a row, its
//! round-to-nearest codes (int8, and int4 packed two to a byte), and the
//! dequantization of its codes. The scalar loops in `quant.rs` compile for
//! the x86_64 baseline, SSE2: four lanes at most, an unsigned max emulated
//! with compares and masks. These take eight lanes, `vpmaxud`, and narrow
//! 32 codes to 32 bytes (or 16 bytes of int4 pairs) with a few packs: at
//! 4096 x 128, int8 and int4 encode went from about a third of memcpy's
//! speed to about three quarters (`swarmrun bench compress`).
//!
//! Each kernel performs `scalar.rs`'s operations, one IEEE-754 operation
//! for one, so the bytes they write are the scalar reference's bytes for
//! every input (a test in `quant.rs` compares them):
//! - absolute maximum: the unsigned integer max of `abs_bits`;
//! - code: `x * inv` (`vmulps`, never fused with anything), clamped to
//!   `[-qmax, qmax]` by `vmaxps` then `vminps` (the same as `f32::clamp`
//!   for the non-NaN products of a finite row), rounded by `vcvtps2dq`,
//!   which rounds to nearest, ties to even, under the default MXCSR that
//!   Rust code runs with (as `scalar::round_even` does);
//! - dequantization: the code converted to f32 (exact) times the scale.
//!
//! All `unsafe` of the codec's CPU side is here, behind [`Avx2`]: a value
//! of it exists only once the CPU is known to have AVX2, so its safe
//! methods may call the `#[target_feature(enable = "avx2")]` functions,
//! and those read and write only within the slices they are given.
//! Kernels handle the longest prefix they can in whole vectors and return
//! its length; the caller codes the rest with the scalar loops.

#[cfg(target_arch = "x86_64")]
pub(super) use x86::Avx2;

/// Elsewhere there is no AVX2: a type with no values, so that `detect`
/// is always `None` and callers need no `cfg` of their own.
#[cfg(not(target_arch = "x86_64"))]
#[derive(Debug, Clone, Copy)]
pub(super) enum Avx2 {}

#[cfg(not(target_arch = "x86_64"))]
impl Avx2 {
    pub(super) fn detect() -> Option<Avx2> {
        None
    }
    pub(super) fn abs_max_bits(self, _: &[f32]) -> u32 {
        match self {}
    }
    pub(super) fn int8_nearest(self, _: &[f32], _: f32, _: i32, _: &mut [u8]) -> usize {
        match self {}
    }
    pub(super) fn int4_nearest(self, _: &[f32], _: f32, _: i32, _: &mut [u8]) -> usize {
        match self {}
    }
    pub(super) fn dequantize_int8(self, _: &[u8], _: f32, _: &mut [f32]) -> usize {
        match self {}
    }
    pub(super) fn dequantize_int4(self, _: &[u8], _: f32, _: &mut [f32]) -> usize {
        match self {}
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::compress::scalar::abs_bits;

    /// Proof that this CPU has AVX2: only `detect` makes one.
    #[derive(Debug, Clone, Copy)]
    pub(in crate::compress) struct Avx2(());

    impl Avx2 {
        /// `Some` when the CPU running this has AVX2 (a cached check,
        /// cheap enough to make once per matrix).
        pub(in crate::compress) fn detect() -> Option<Avx2> {
            is_x86_feature_detected!("avx2").then_some(Avx2(()))
        }

        /// The largest `abs_bits` of `x` (0 when empty).
        pub(in crate::compress) fn abs_max_bits(self, x: &[f32]) -> u32 {
            // SAFETY: `self` exists, so the CPU has AVX2.
            unsafe { abs_max_bits(x) }
        }

        /// Writes the int8 codes of the first `n` elements of `x` to
        /// `out[..n]` and returns `n`: the most whole blocks of 32 that
        /// both hold.
        pub(in crate::compress) fn int8_nearest(
            self,
            x: &[f32],
            inv: f32,
            qmax: i32,
            out: &mut [u8],
        ) -> usize {
            // SAFETY: `self` exists, so the CPU has AVX2.
            unsafe { int8_nearest(x, inv, qmax, out) }
        }

        /// Writes the int4 codes of the first `n` elements of `x`, two to
        /// a byte, to `out[..n / 2]` and returns `n`: the most whole
        /// blocks of 32 elements that both hold.
        pub(in crate::compress) fn int4_nearest(
            self,
            x: &[f32],
            inv: f32,
            qmax: i32,
            out: &mut [u8],
        ) -> usize {
            // SAFETY: `self` exists, so the CPU has AVX2.
            unsafe { int4_nearest(x, inv, qmax, out) }
        }

        /// Writes `code * scale` of the first `n` int8 codes to
        /// `out[..n]` and returns `n`: the most whole blocks of 32 that
        /// both hold.
        pub(in crate::compress) fn dequantize_int8(
            self,
            codes: &[u8],
            scale: f32,
            out: &mut [f32],
        ) -> usize {
            // SAFETY: `self` exists, so the CPU has AVX2.
            unsafe { dequantize_int8(codes, scale, out) }
        }

        /// Writes `code * scale` of the first `n` int4 codes (the first
        /// `n / 2` bytes) to `out[..n]` and returns `n`: the most whole
        /// blocks of 32 elements that both hold.
        pub(in crate::compress) fn dequantize_int4(
            self,
            codes: &[u8],
            scale: f32,
            out: &mut [f32],
        ) -> usize {
            // SAFETY: `self` exists, so the CPU has AVX2.
            unsafe { dequantize_int4(codes, scale, out) }
        }
    }

    /// Elements per block: four vectors of eight, enough independent work
    /// to keep both vector ports busy.
    const BLOCK: usize = 32;

    #[target_feature(enable = "avx2")]
    unsafe fn abs_max_bits(x: &[f32]) -> u32 {
        let mask = _mm256_set1_epi32(0x7fff_ffff);
        let mut m = [_mm256_setzero_si256(); 4];
        let mut blocks = x.chunks_exact(BLOCK);
        for b in &mut blocks {
            for (j, m) in m.iter_mut().enumerate() {
                // SAFETY: `b` holds 32 floats, so 8 from `8 * j < 32`.
                let v = unsafe { _mm256_loadu_si256(b.as_ptr().add(8 * j).cast()) };
                *m = _mm256_max_epu32(*m, _mm256_and_si256(v, mask));
            }
        }
        let mut eights = blocks.remainder().chunks_exact(8);
        for e in &mut eights {
            // SAFETY: `e` holds 8 floats.
            let v = unsafe { _mm256_loadu_si256(e.as_ptr().cast()) };
            m[0] = _mm256_max_epu32(m[0], _mm256_and_si256(v, mask));
        }
        let m = _mm256_max_epu32(_mm256_max_epu32(m[0], m[1]), _mm256_max_epu32(m[2], m[3]));
        let mut lanes = [0u32; 8];
        // SAFETY: `lanes` is 32 bytes.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), m) };
        let tail = eights.remainder().iter().map(|&v| abs_bits(v));
        lanes.into_iter().chain(tail).max().unwrap_or(0)
    }

    /// The codes of 8 floats at `p`, as 32-bit integers: `scalar::
    /// code_nearest` lane by lane.
    ///
    /// # Safety
    /// 8 floats from `p` are readable; the CPU has AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn codes8(p: *const f32, inv: __m256, lo: __m256, hi: __m256) -> __m256i {
        // SAFETY: the caller's.
        let x = unsafe { _mm256_loadu_ps(p) };
        let v = _mm256_mul_ps(x, inv);
        _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi))
    }

    /// The codes of the 32 floats of `b`, as bytes in order (each in
    /// `-qmax..=qmax`, so the saturating packs change none).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn codes32(b: &[f32], inv: __m256, lo: __m256, hi: __m256) -> __m256i {
        assert_eq!(b.len(), BLOCK);
        let p = b.as_ptr();
        // SAFETY: `b` holds 32 floats, so 8 from each of 0, 8, 16, 24.
        let (c0, c1, c2, c3) = unsafe {
            (
                codes8(p, inv, lo, hi),
                codes8(p.add(8), inv, lo, hi),
                codes8(p.add(16), inv, lo, hi),
                codes8(p.add(24), inv, lo, hi),
            )
        };
        // The packs work within each 128-bit lane: 32-bit groups come out
        // as 0-3 8-11 16-19 24-27 | 4-7 12-15 20-23 28-31; the permute
        // puts them in order.
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(c0, c1), _mm256_packs_epi32(c2, c3));
        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }

    #[target_feature(enable = "avx2")]
    unsafe fn int8_nearest(x: &[f32], inv: f32, qmax: i32, out: &mut [u8]) -> usize {
        let (inv, hi) = (_mm256_set1_ps(inv), _mm256_set1_ps(qmax as f32));
        let lo = _mm256_set1_ps(-(qmax as f32));
        let mut n = 0;
        for (b, o) in x.chunks_exact(BLOCK).zip(out.chunks_exact_mut(BLOCK)) {
            // SAFETY: `codes32`'s assert checks `b`; `o` is 32 bytes.
            unsafe { _mm256_storeu_si256(o.as_mut_ptr().cast(), codes32(b, inv, lo, hi)) };
            n += BLOCK;
        }
        n
    }

    #[target_feature(enable = "avx2")]
    unsafe fn int4_nearest(x: &[f32], inv: f32, qmax: i32, out: &mut [u8]) -> usize {
        let (inv, hi) = (_mm256_set1_ps(inv), _mm256_set1_ps(qmax as f32));
        let lo = _mm256_set1_ps(-(qmax as f32));
        let nibble = _mm256_set1_epi8(0x0f);
        // Byte multipliers 1, 16, 1, 16, ...: `vpmaddubsw` then makes each
        // 16-bit lane `low nibble + 16 * high nibble`, one packed byte
        // (at most 255) per pair of codes.
        let weights = _mm256_set1_epi16(0x1001);
        let mut n = 0;
        for (b, o) in x.chunks_exact(BLOCK).zip(out.chunks_exact_mut(BLOCK / 2)) {
            // SAFETY: `codes32`'s assert checks `b`.
            let codes = unsafe { codes32(b, inv, lo, hi) };
            let pairs = _mm256_maddubs_epi16(_mm256_and_si256(codes, nibble), weights);
            let packed = _mm_packus_epi16(
                _mm256_castsi256_si128(pairs),
                _mm256_extracti128_si256(pairs, 1),
            );
            // SAFETY: `o` is 16 bytes.
            unsafe { _mm_storeu_si128(o.as_mut_ptr().cast(), packed) };
            n += BLOCK;
        }
        n
    }

    /// Stores `code * scale` for the 8 int8 codes in the low half of `c`.
    ///
    /// # Safety
    /// 8 floats from `p` are writable; the CPU has AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn store8(p: *mut f32, c: __m128i, scale: __m256) {
        let v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)), scale);
        // SAFETY: the caller's.
        unsafe { _mm256_storeu_ps(p, v) };
    }

    /// Stores `code * scale` for the 16 int8 codes of `c` to the 16 floats
    /// of `o`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn store16(o: &mut [f32], c: __m128i, scale: __m256) {
        assert_eq!(o.len(), 16);
        let p = o.as_mut_ptr();
        // SAFETY: `o` holds 16 floats, so 8 from each of 0 and 8.
        unsafe {
            store8(p, c, scale);
            store8(p.add(8), _mm_srli_si128(c, 8), scale);
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn dequantize_int8(codes: &[u8], scale: f32, out: &mut [f32]) -> usize {
        let scale = _mm256_set1_ps(scale);
        let mut n = 0;
        for (c, o) in codes.chunks_exact(BLOCK).zip(out.chunks_exact_mut(BLOCK)) {
            let (o0, o1) = o.split_at_mut(16);
            // SAFETY: `c` is 32 bytes, so 16 from each of 0 and 16.
            let (c0, c1) = unsafe {
                let p = c.as_ptr().cast::<__m128i>();
                (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1)))
            };
            // SAFETY: `store16`'s assert checks `o0` and `o1`.
            unsafe {
                store16(o0, c0, scale);
                store16(o1, c1, scale);
            }
            n += BLOCK;
        }
        n
    }

    #[target_feature(enable = "avx2")]
    unsafe fn dequantize_int4(codes: &[u8], scale: f32, out: &mut [f32]) -> usize {
        let scale = _mm256_set1_ps(scale);
        let (nibble, eight) = (_mm_set1_epi8(0x0f), _mm_set1_epi8(8));
        let mut n = 0;
        for (c, o) in codes
            .chunks_exact(BLOCK / 2)
            .zip(out.chunks_exact_mut(BLOCK))
        {
            // SAFETY: `c` is 16 bytes.
            let b = unsafe { _mm_loadu_si128(c.as_ptr().cast()) };
            // A 4-bit two's-complement nibble `v` is `(v ^ 8) - 8`.
            let low = _mm_xor_si128(_mm_and_si128(b, nibble), eight);
            let high = _mm_xor_si128(_mm_and_si128(_mm_srli_epi16(b, 4), nibble), eight);
            // Element 2k is byte k's low nibble, 2k + 1 its high one.
            let first = _mm_sub_epi8(_mm_unpacklo_epi8(low, high), eight);
            let second = _mm_sub_epi8(_mm_unpackhi_epi8(low, high), eight);
            let (o0, o1) = o.split_at_mut(16);
            // SAFETY: `store16`'s assert checks `o0` and `o1`.
            unsafe {
                store16(o0, first, scale);
                store16(o1, second, scale);
            }
            n += BLOCK;
        }
        n
    }
}
