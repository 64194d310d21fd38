//! Quantization of a row-major `rows x width` f32 matrix (one row per token
//! of a boundary tensor) to int8 or packed int4 codes with one f16 scale
//! per row, and back.
//!
//! Layout (shared with `kernels/quant.cu` and the wire frame):
//! - `scales[r]` = `max|row r| / qmax` rounded up to f16 (`qmax` = 127 for
//!   int8, 7 for int4); 0 for an all-zero row.
//! - int8: `codes[r * width + c]` is the two's-complement code of element
//!   `(r, c)`, in `-127..=127`.
//! - int4: each row takes `ceil(width / 2)` bytes; element `2k` is the low
//!   nibble of the row's byte `k`, element `2k + 1` its high nibble, each a
//!   4-bit two's-complement code in `-7..=7`; an odd width leaves the last
//!   high nibble 0.
//!
//! Error bound: round-to-nearest gives `|x - x̂| <= scale / 2` per element,
//! up to f32 rounding of `x / scale` (a relative `2^-23`); because the scale
//! is rounded up, its own f16 rounding adds nothing to that bound, only
//! makes `scale` up to `2^-11` (relative) larger than `max|x| / qmax`.
//! Stochastic rounding gives `|x - x̂| < scale` and `E[x̂] = x`.

use half::f16;
use rayon::prelude::*;
use thiserror::Error;

use super::scalar::{self, abs_bits, code_nearest, code_stochastic, inverse, INF_BITS};
use super::simd::Avx2;

/// Code width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bits {
    Int8,
    Int4,
}

impl Bits {
    /// The largest code magnitude: the range is symmetric, so that `-x`
    /// codes to minus the code of `x`.
    pub fn qmax(self) -> i32 {
        match self {
            Bits::Int8 => 127,
            Bits::Int4 => 7,
        }
    }

    /// Bytes of codes for one row of `width` elements.
    pub fn row_bytes(self, width: usize) -> usize {
        match self {
            Bits::Int8 => width,
            Bits::Int4 => width.div_ceil(2),
        }
    }
}

/// How values between two codes are rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// To the nearest code, ties to even: the smallest error.
    Nearest,
    /// Up with probability equal to the distance from the code below:
    /// unbiased, for gradients whose small components would otherwise
    /// always round to zero. Element `i` (row-major index) draws from
    /// `(seed, i)`, so the same seed gives the same codes on any device.
    Stochastic { seed: u64 },
}

/// Why a matrix cannot be quantized, or parts do not make a quantized one.
#[derive(Debug, Error, PartialEq)]
pub enum QuantError {
    #[error("{len} values do not make a {rows} x {width} matrix")]
    Shape {
        rows: usize,
        width: usize,
        len: usize,
    },
    #[error("row {row} holds a NaN or an infinity")]
    NonFinite { row: usize },
    #[error("row {row}'s largest magnitude {absmax} needs a scale past f16's range")]
    ScaleOverflow { row: usize, absmax: f32 },
    #[error("{got} scales for {rows} rows")]
    ScaleCount { rows: usize, got: usize },
    #[error("{got} bytes of codes, {expected} expected for {rows} rows of width {width}")]
    CodeBytes {
        rows: usize,
        width: usize,
        expected: usize,
        got: usize,
    },
    #[error("row {row}'s scale {scale} is not a finite non-negative number")]
    BadScale { row: usize, scale: f32 },
}

/// A quantized matrix: its lengths and scales are checked on construction,
/// so dequantizing it cannot fail.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    bits: Bits,
    rows: usize,
    width: usize,
    scales: Vec<f16>,
    codes: Vec<u8>,
}

/// Rayon splits a matrix into tasks of at least this many elements: below
/// it, a task's fork-join costs more than its work.
const TASK_MIN_ELEMENTS: usize = 1 << 15;

/// Rows per rayon task for rows of `width` elements (at least one).
fn min_rows_per_task(width: usize) -> usize {
    (TASK_MIN_ELEMENTS / width.max(1)).max(1)
}

impl Quantized {
    /// Assembles parts received from elsewhere (a wire frame, a GPU),
    /// refusing lengths that do not match the shape and scales that are
    /// negative, NaN or infinite.
    pub fn from_parts(
        bits: Bits,
        rows: usize,
        width: usize,
        scales: Vec<f16>,
        codes: Vec<u8>,
    ) -> Result<Quantized, QuantError> {
        if scales.len() != rows {
            return Err(QuantError::ScaleCount {
                rows,
                got: scales.len(),
            });
        }
        let expected = rows
            .checked_mul(bits.row_bytes(width))
            .ok_or(QuantError::CodeBytes {
                rows,
                width,
                expected: usize::MAX,
                got: codes.len(),
            })?;
        if codes.len() != expected {
            return Err(QuantError::CodeBytes {
                rows,
                width,
                expected,
                got: codes.len(),
            });
        }
        if let Some((row, s)) = scales
            .iter()
            .enumerate()
            .find(|(_, s)| !(s.is_finite() && s.to_f32() >= 0.0))
        {
            return Err(QuantError::BadScale {
                row,
                scale: s.to_f32(),
            });
        }
        Ok(Quantized {
            bits,
            rows,
            width,
            scales,
            codes,
        })
    }

    /// No rows: what `quantize_into` fills.
    pub fn empty(bits: Bits) -> Quantized {
        Quantized {
            bits,
            rows: 0,
            width: 0,
            scales: Vec::new(),
            codes: Vec::new(),
        }
    }

    pub fn bits(&self) -> Bits {
        self.bits
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn width(&self) -> usize {
        self.width
    }
    pub fn scales(&self) -> &[f16] {
        &self.scales
    }
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// The matrix the codes stand for, `code * scale`, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.width];
        self.dequantize_into(&mut out);
        out
    }

    /// Writes the dequantized matrix into `out`, which must hold exactly
    /// `rows * width` values (a receiver reuses one buffer per boundary).
    ///
    /// # Panics
    /// When `out` has another length: a caller's bug, not bad input.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.rows * self.width, "output length");
        if self.width == 0 {
            return;
        }
        let (bits, simd) = (self.bits, Avx2::detect());
        out.par_chunks_exact_mut(self.width)
            .zip(self.codes.par_chunks_exact(bits.row_bytes(self.width)))
            .zip(&self.scales)
            .with_min_len(min_rows_per_task(self.width))
            .for_each(|((out, codes), scale)| {
                dequantize_row(simd, bits, codes, scale.to_f32(), out)
            });
    }
}

/// Quantizes `x`, a row-major `rows x width` matrix.
pub fn quantize(
    x: &[f32],
    rows: usize,
    width: usize,
    bits: Bits,
    rounding: Rounding,
) -> Result<Quantized, QuantError> {
    let mut q = Quantized::empty(bits);
    quantize_into(x, rows, width, bits, rounding, &mut q)?;
    Ok(q)
}

/// `quantize` into `q`, reusing its buffers: a sender quantizes every
/// microbatch's boundary tensor into the same one, and fresh buffers would
/// cost their page faults on every call. On an error `q` is left empty.
pub fn quantize_into(
    x: &[f32],
    rows: usize,
    width: usize,
    bits: Bits,
    rounding: Rounding,
    q: &mut Quantized,
) -> Result<(), QuantError> {
    quantize_into_with(Avx2::detect(), x, rows, width, bits, rounding, q)
}

/// `quantize_into` with the AVX2 kernels, or with the scalar loops alone
/// (`simd` = `None`): the same bytes either way.
fn quantize_into_with(
    simd: Option<Avx2>,
    x: &[f32],
    rows: usize,
    width: usize,
    bits: Bits,
    rounding: Rounding,
    q: &mut Quantized,
) -> Result<(), QuantError> {
    let mut scales = std::mem::take(&mut q.scales);
    let mut codes = std::mem::take(&mut q.codes);
    *q = Quantized::empty(bits);
    if rows.checked_mul(width) != Some(x.len()) {
        return Err(QuantError::Shape {
            rows,
            width,
            len: x.len(),
        });
    }
    let row_bytes = bits.row_bytes(width);
    // Every element is overwritten below, so what the buffers held does
    // not matter, only their capacity.
    scales.resize(rows, f16::ZERO);
    codes.resize(rows * row_bytes, 0);
    if width > 0 {
        x.par_chunks_exact(width)
            .zip(codes.par_chunks_exact_mut(row_bytes))
            .zip(scales.par_iter_mut())
            .enumerate()
            .with_min_len(min_rows_per_task(width))
            .try_for_each(|(r, ((x, codes), scale))| {
                *scale = quantize_row(simd, bits, rounding, r, width, x, codes)?;
                Ok(())
            })?;
    }
    *q = Quantized {
        bits,
        rows,
        width,
        scales,
        codes,
    };
    Ok(())
}

/// One row: its scale, then its codes into `out` (`bits.row_bytes(width)`
/// bytes). `r` is the row's index, for errors and stochastic draws. The
/// AVX2 kernels, when `simd` has them, take the absolute maximum and the
/// round-to-nearest codes of all but a row's last `width % 32` elements;
/// stochastic codes stay scalar (their 64-bit hash per element has no
/// cheap AVX2 form, and they are the rarer rounding).
fn quantize_row(
    simd: Option<Avx2>,
    bits: Bits,
    rounding: Rounding,
    r: usize,
    width: usize,
    x: &[f32],
    out: &mut [u8],
) -> Result<f16, QuantError> {
    let max_bits = match simd {
        Some(avx2) => avx2.abs_max_bits(x),
        None => x.iter().fold(0u32, |m, &v| m.max(abs_bits(v))),
    };
    if max_bits >= INF_BITS {
        return Err(QuantError::NonFinite { row: r });
    }
    let absmax = f32::from_bits(max_bits);
    let qmax = bits.qmax();
    let scale = scalar::scale_for(absmax, qmax);
    if scale.is_infinite() {
        return Err(QuantError::ScaleOverflow { row: r, absmax });
    }
    let inv = inverse(scale.to_f32());
    match rounding {
        Rounding::Nearest => {
            let done = match (simd, bits) {
                (Some(avx2), Bits::Int8) => avx2.int8_nearest(x, inv, qmax, out),
                (Some(avx2), Bits::Int4) => avx2.int4_nearest(x, inv, qmax, out),
                (None, _) => 0,
            };
            // `done` is a multiple of 32, so the int4 tail starts a byte.
            let out = &mut out[bits.row_bytes(done)..];
            write_codes(bits, &x[done..], out, |_, v| code_nearest(v, inv, qmax))
        }
        Rounding::Stochastic { seed } => {
            let base = (r * width) as u64;
            write_codes(bits, x, out, |c, v| {
                code_stochastic(v, inv, qmax, seed, base + c as u64)
            })
        }
    }
    Ok(scale)
}

/// Writes the codes `code(column, value)` of one row in `bits`' layout.
#[inline(always)]
fn write_codes(bits: Bits, x: &[f32], out: &mut [u8], code: impl Fn(usize, f32) -> i32) {
    match bits {
        Bits::Int8 => {
            for (c, (o, &v)) in out.iter_mut().zip(x).enumerate() {
                *o = code(c, v) as u8;
            }
        }
        Bits::Int4 => {
            let pairs = x.chunks_exact(2);
            let tail = pairs.remainder();
            for (k, (o, p)) in out.iter_mut().zip(pairs).enumerate() {
                *o = pack(code(2 * k, p[0]), code(2 * k + 1, p[1]));
            }
            if let [v] = tail {
                out[out.len() - 1] = pack(code(x.len() - 1, *v), 0);
            }
        }
    }
}

/// Two int4 codes in one byte: `lo` in bits 0-3, `hi` in bits 4-7.
#[inline(always)]
pub fn pack(lo: i32, hi: i32) -> u8 {
    ((lo & 0xf) | ((hi & 0xf) << 4)) as u8
}

/// The two int4 codes of a byte, `(low nibble, high nibble)`, sign-extended.
#[inline(always)]
pub fn unpack(byte: u8) -> (i32, i32) {
    let b = byte as i8;
    (((b << 4) >> 4) as i32, (b >> 4) as i32)
}

/// One row's `code * scale` into `out`, the AVX2 kernels (when `simd` has
/// them) taking all but the last `width % 32` elements.
fn dequantize_row(simd: Option<Avx2>, bits: Bits, codes: &[u8], scale: f32, out: &mut [f32]) {
    let done = match (simd, bits) {
        (Some(avx2), Bits::Int8) => avx2.dequantize_int8(codes, scale, out),
        (Some(avx2), Bits::Int4) => avx2.dequantize_int4(codes, scale, out),
        (None, _) => 0,
    };
    let (codes, out) = (&codes[bits.row_bytes(done)..], &mut out[done..]);
    match bits {
        Bits::Int8 => {
            for (o, &q) in out.iter_mut().zip(codes) {
                *o = (q as i8) as f32 * scale;
            }
        }
        Bits::Int4 => {
            let mut pairs = out.chunks_exact_mut(2);
            for (p, &b) in (&mut pairs).zip(codes) {
                let (lo, hi) = unpack(b);
                p[0] = lo as f32 * scale;
                p[1] = hi as f32 * scale;
            }
            if let [o] = pairs.into_remainder() {
                *o = unpack(codes[codes.len() - 1]).0 as f32 * scale;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64: test data with no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        /// Uniform in `[-1, 1)`.
        fn signed_unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        fn sign(&mut self) -> f32 {
            if self.next() & 1 == 0 {
                1.0
            } else {
                -1.0
            }
        }
    }

    const WIDTHS: [usize; 17] = [
        1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 64, 127, 128, 129, 1000,
    ];

    /// f16's largest finite value: a row's `absmax / qmax` past it has no
    /// scale.
    const F16_MAX: f32 = 65504.0;

    /// Finite rows of `width` that probe each step of the codec: zeros of
    /// both signs, tiny subnormals, magnitudes from subnormal to huge in
    /// one row, rows whose scale is just inside, at or just past the top
    /// of f16's range (an error both ways past it), exact ties `x * inv =
    /// k + 1/2` under power-of-two scales, and a row's maximum at any
    /// position, tail included.
    fn finite_rows(width: usize, rng: &mut Rng) -> Vec<Vec<f32>> {
        let mut rows = vec![
            vec![0.0; width],
            (0..width).map(|_| rng.sign() * 0.0).collect(),
        ];
        for _ in 0..4 {
            rows.push((0..width).map(|_| rng.signed_unit()).collect());
            // Any exponent from subnormal (2^-149) to 2^20.
            rows.push(
                (0..width)
                    .map(|_| rng.signed_unit() * 2f32.powi(rng.below(170) as i32 - 149))
                    .collect(),
            );
            rows.push(
                (0..width)
                    .map(|_| rng.sign() * f32::from_bits(rng.below(0x7f_ffff) as u32 + 1))
                    .collect(),
            );
            for edge in [F16_MAX * 127.0, F16_MAX * 7.0] {
                for factor in [1.0 - 1.0 / 4096.0, 1.0, 1.0 + 1.0 / 4096.0] {
                    let mut row: Vec<f32> = (0..width)
                        .map(|_| rng.signed_unit() * edge * factor)
                        .collect();
                    row[rng.below(width)] = rng.sign() * edge * factor;
                    rows.push(row);
                }
            }
            for qmax in [127, 7] {
                let step = 2f32.powi(rng.below(20) as i32 - 10);
                let mut row: Vec<f32> = (0..width)
                    .map(|_| {
                        let k = rng.below(2 * qmax) as f32 - qmax as f32;
                        (k + 0.5) * step
                    })
                    .collect();
                row[rng.below(width)] = rng.sign() * qmax as f32 * step;
                if rng.next() & 1 == 0 {
                    row[rng.below(width)] = -0.0;
                }
                rows.push(row);
            }
            let mut row: Vec<f32> = (0..width).map(|_| rng.signed_unit()).collect();
            let at = if rng.next() & 1 == 0 {
                width - 1
            } else {
                rng.below(width)
            };
            row[at] = rng.sign() * 1000.0;
            rows.push(row);
        }
        rows
    }

    /// Quantizes `x` both ways and requires the same result, byte for
    /// byte (scales compared as bits), then the same dequantized floats;
    /// returns whether it quantized (every row had a scale).
    fn assert_same_bytes(avx2: Avx2, bits: Bits, x: &[f32], rows: usize, width: usize) -> bool {
        let (mut scalar, mut simd) = (Quantized::empty(bits), Quantized::empty(bits));
        let nearest = Rounding::Nearest;
        let a = quantize_into_with(None, x, rows, width, bits, nearest, &mut scalar);
        let b = quantize_into_with(Some(avx2), x, rows, width, bits, nearest, &mut simd);
        assert_eq!(a, b, "{bits:?} width {width}: {x:?}");
        let scale_bits = |q: &Quantized| q.scales().iter().map(|s| s.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            scale_bits(&scalar),
            scale_bits(&simd),
            "{bits:?} width {width}: {x:?}"
        );
        assert_eq!(
            scalar.codes(),
            simd.codes(),
            "{bits:?} width {width}: {x:?}"
        );
        if a.is_ok() {
            assert_same_dequantized(avx2, &scalar);
        }
        a.is_ok()
    }

    fn assert_same_dequantized(avx2: Avx2, q: &Quantized) {
        let (bits, width) = (q.bits(), q.width());
        let mut a = vec![0.0f32; width];
        let mut b = vec![1.0f32; width];
        for (codes, scale) in q
            .codes()
            .chunks_exact(bits.row_bytes(width))
            .zip(q.scales())
        {
            dequantize_row(None, bits, codes, scale.to_f32(), &mut a);
            dequantize_row(Some(avx2), bits, codes, scale.to_f32(), &mut b);
            let as_bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                as_bits(&a),
                as_bits(&b),
                "{bits:?} width {width}: {codes:?}"
            );
        }
    }

    #[test]
    fn avx2_kernels_write_the_scalar_bytes_for_every_kind_of_row() {
        let Some(avx2) = Avx2::detect() else {
            eprintln!("this CPU has no AVX2: no kernels to compare");
            return;
        };
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for width in WIDTHS {
            let rows = finite_rows(width, &mut rng);
            for bits in [Bits::Int8, Bits::Int4] {
                let mut coded = Vec::new();
                for row in &rows {
                    if assert_same_bytes(avx2, bits, row, 1, width) {
                        coded.extend_from_slice(row);
                    }
                }
                // Those that have a scale as one matrix, through the
                // parallel split (no two errors to race).
                assert_same_bytes(avx2, bits, &coded, coded.len() / width, width);
                // Non-finite values anywhere, the tail included: the same
                // error.
                for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut row: Vec<f32> = (0..width).map(|_| rng.signed_unit()).collect();
                    row[rng.below(width)] = bad;
                    assert!(!assert_same_bytes(avx2, bits, &row, 1, width));
                    row[width - 1] = bad;
                    assert!(!assert_same_bytes(avx2, bits, &row, 1, width));
                }
            }
        }
    }

    #[test]
    fn avx2_dequantization_gives_the_scalar_floats_for_any_code_bytes() {
        let Some(avx2) = Avx2::detect() else {
            eprintln!("this CPU has no AVX2: no kernels to compare");
            return;
        };
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for width in WIDTHS {
            for bits in [Bits::Int8, Bits::Int4] {
                let rows = 5;
                let scales = (0..rows)
                    .map(|_| f16::from_bits(rng.below(0x7c00) as u16))
                    .collect();
                // Every byte, -128 and the int4 nibble -8 included, which
                // `quantize` never writes but a frame may carry.
                let codes = (0..rows * bits.row_bytes(width))
                    .map(|_| rng.next() as u8)
                    .collect();
                let q = Quantized::from_parts(bits, rows, width, scales, codes).unwrap();
                assert_same_dequantized(avx2, &q);
            }
        }
    }
}
