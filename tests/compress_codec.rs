//! The boundary codec: quantization error bounds, the int4 packing, frames
//! and the errors that refuse malformed ones.

use half::f16;
use swarmrun::compress::frame::{self, FrameError, HEADER_BYTES};
use swarmrun::compress::quant::{pack, unpack};
use swarmrun::compress::{
    compression_ratio, quantize, Bits, ErrorFeedback, QuantError, Quantized, Rounding,
};

/// A deterministic pseudo-random matrix with values of mixed magnitudes
/// (xorshift; no dependency needed for test data).
fn matrix(rows: usize, width: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..rows * width)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            let row_scale = 1.0 + (i / width) as f64;
            (u * row_scale) as f32
        })
        .collect()
}

/// Checks `|x - x̂| <= bound_in_scales * scale` element by element.
fn assert_within(x: &[f32], q: &Quantized, bound_in_scales: f32) {
    let back = q.dequantize();
    for (i, (&a, &b)) in x.iter().zip(&back).enumerate() {
        let scale = q.scales()[i / q.width()].to_f32();
        // f32 rounding of x / scale: a relative 2^-23 of the code.
        let bound = bound_in_scales * scale * (1.0 + 1e-6) + a.abs() * 1e-6;
        assert!(
            (a - b).abs() <= bound,
            "element {i}: {a} -> {b}, scale {scale}"
        );
    }
}

#[test]
fn nearest_rounding_stays_within_half_a_scale_for_int8_and_int4() {
    for bits in [Bits::Int8, Bits::Int4] {
        for width in [1, 7, 128] {
            let x = matrix(33, width, 5);
            let q = quantize(&x, 33, width, bits, Rounding::Nearest).unwrap();
            assert_within(&x, &q, 0.5);
        }
    }
}

#[test]
fn stochastic_rounding_stays_within_one_scale() {
    for bits in [Bits::Int8, Bits::Int4] {
        let x = matrix(16, 65, 9);
        let q = quantize(&x, 16, 65, bits, Rounding::Stochastic { seed: 3 }).unwrap();
        assert_within(&x, &q, 1.0);
    }
}

#[test]
fn stochastic_rounding_is_unbiased_over_seeds() {
    let width = 64;
    let x = matrix(4, width, 11);
    let seeds = 2000;
    let mut mean_err = vec![0.0f64; x.len()];
    for seed in 0..seeds {
        let q = quantize(&x, 4, width, Bits::Int4, Rounding::Stochastic { seed }).unwrap();
        for (m, (a, b)) in mean_err.iter_mut().zip(x.iter().zip(q.dequantize())) {
            *m += (b - a) as f64 / seeds as f64;
        }
    }
    let q = quantize(&x, 4, width, Bits::Int4, Rounding::Nearest).unwrap();
    for (i, m) in mean_err.iter().enumerate() {
        let scale = q.scales()[i / width].to_f64();
        // One draw's error is below a scale; the mean of 2000 is within
        // ~5 standard deviations (scale / 2 / sqrt(2000)) of zero.
        assert!(m.abs() < 0.06 * scale, "element {i}: mean error {m}");
    }
}

#[test]
fn the_straight_through_gradient_matches_central_differences_of_the_expected_codec() {
    // Backward passes take the codec for the identity (straight-through):
    // the gradient of `<g, decode(encode(x))>` with respect to `x` is taken
    // to be `g`. With stochastic rounding `E[decode(encode(x))] = x`, so `g`
    // is the exact gradient of the expected output; check it by central
    // differences averaged over seeds (the same seed on both sides), in a
    // direction `v` that leaves each row's largest element, so its scale,
    // alone.
    let (rows, width) = (4, 16);
    let mut x = matrix(rows, width, 21);
    let g = matrix(rows, width, 22);
    let mut v = matrix(rows, width, 23);
    for r in 0..rows {
        x[r * width] = 4.0;
        v[r * width] = 0.0;
    }
    let analytic: f64 = g.iter().zip(&v).map(|(a, b)| f64::from(a * b)).sum();
    // Large steps are fine: the expected output is linear while no
    // element passes its row's maximum (|x|, |v| <= 2 here).
    let h = 0.5f32;
    for bits in [Bits::Int8, Bits::Int4] {
        let f = |sign: f32, seed: u64| -> f64 {
            let probe: Vec<f32> = x.iter().zip(&v).map(|(x, v)| x + sign * h * v).collect();
            let q = quantize(&probe, rows, width, bits, Rounding::Stochastic { seed }).unwrap();
            q.dequantize()
                .iter()
                .zip(&g)
                .map(|(y, g)| f64::from(y * g))
                .sum()
        };
        let seeds = 20_000u64;
        let samples: Vec<f64> = (0..seeds)
            .map(|seed| (f(1.0, seed) - f(-1.0, seed)) / (2.0 * f64::from(h)))
            .collect();
        let mean = samples.iter().sum::<f64>() / seeds as f64;
        let var = samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / seeds as f64;
        let std_of_mean = (var / seeds as f64).sqrt();
        assert!(
            (mean - analytic).abs() <= 5.0 * std_of_mean,
            "{bits:?}: straight-through {analytic}, central differences {mean} +- {std_of_mean}"
        );
        // The check has teeth: a codec off by 3% would fail it.
        assert!(
            0.03 * analytic.abs() > 5.0 * std_of_mean,
            "{bits:?}: too noisy: {std_of_mean} for {analytic}"
        );
    }
}

#[test]
fn same_seed_gives_same_codes_and_another_seed_others() {
    let x = matrix(8, 32, 2);
    let code = |seed| {
        quantize(&x, 8, 32, Bits::Int8, Rounding::Stochastic { seed })
            .unwrap()
            .codes()
            .to_vec()
    };
    assert_eq!(code(1), code(1));
    assert_ne!(code(1), code(2));
}

#[test]
fn int4_pack_and_unpack_are_exact_for_all_sixteen_codes() {
    for lo in -8..8 {
        for hi in -8..8 {
            assert_eq!(unpack(pack(lo, hi)), (lo, hi));
        }
    }
    assert_eq!(pack(1, -1), 0xf1, "element 2k in the low nibble");
}

#[test]
fn int4_codes_of_an_odd_width_leave_the_last_high_nibble_zero() {
    let x = [7.0f32, -7.0, 7.0];
    let q = quantize(&x, 1, 3, Bits::Int4, Rounding::Nearest).unwrap();
    assert_eq!(q.scales()[0].to_f32(), 1.0);
    assert_eq!(q.codes(), &[pack(7, -7), pack(7, 0)]);
    assert_eq!(q.dequantize(), x);
}

#[test]
fn an_all_zero_row_gets_scale_zero_and_codes_zero() {
    let mut x = matrix(3, 10, 4);
    x[10..20].fill(0.0);
    for bits in [Bits::Int8, Bits::Int4] {
        let q = quantize(&x, 3, 10, bits, Rounding::Stochastic { seed: 1 }).unwrap();
        assert_eq!(q.scales()[1], f16::ZERO);
        assert!(q.dequantize()[10..20].iter().all(|&v| v == 0.0));
    }
}

#[test]
fn large_inputs_code_the_same_in_parallel_as_row_by_row() {
    let (rows, width) = (1024, 96);
    let x = matrix(rows, width, 8);
    let whole = quantize(&x, rows, width, Bits::Int4, Rounding::Nearest).unwrap();
    let first = quantize(&x[..width], 1, width, Bits::Int4, Rounding::Nearest).unwrap();
    assert_eq!(&whole.codes()[..width / 2], first.codes());
    assert_within(&x, &whole, 0.5);
}

#[test]
fn non_finite_and_out_of_range_rows_are_refused_by_row() {
    let mut x = vec![1.0f32; 20];
    x[13] = f32::NAN;
    assert_eq!(
        quantize(&x, 2, 10, Bits::Int8, Rounding::Nearest),
        Err(QuantError::NonFinite { row: 1 })
    );
    x[13] = f32::NEG_INFINITY;
    assert!(matches!(
        quantize(&x, 2, 10, Bits::Int8, Rounding::Nearest),
        Err(QuantError::NonFinite { row: 1 })
    ));
    x[13] = 1e6;
    assert!(matches!(
        quantize(&x, 2, 10, Bits::Int4, Rounding::Nearest),
        Err(QuantError::ScaleOverflow { row: 1, .. })
    ));
    assert!(matches!(
        quantize(&x, 3, 10, Bits::Int4, Rounding::Nearest),
        Err(QuantError::Shape { .. })
    ));
}

#[test]
fn error_feedback_keeps_the_sum_of_received_tensors_within_one_step_of_the_sent() {
    let (rows, width) = (4, 16);
    let mut feedback = ErrorFeedback::default();
    let mut sent = vec![0.0f64; rows * width];
    let mut received = vec![0.0f64; rows * width];
    let mut last_scale = 0.0f32;
    for step in 0..50 {
        let x = matrix(rows, width, 100 + step);
        let q = feedback
            .quantize(&x, rows, width, Bits::Int4, Rounding::Nearest)
            .unwrap();
        last_scale = q.scales().iter().map(|s| s.to_f32()).fold(0.0, f32::max);
        for ((s, r), (a, b)) in sent
            .iter_mut()
            .zip(received.iter_mut())
            .zip(x.iter().zip(q.dequantize()))
        {
            *s += *a as f64;
            *r += b as f64;
        }
    }
    for (s, r) in sent.iter().zip(&received) {
        assert!((s - r).abs() <= last_scale as f64 * 0.51, "{s} vs {r}");
    }
}

fn sample_frame(bits: Bits, zstd: bool) -> (Quantized, Vec<u8>) {
    let x = matrix(12, 40, 3);
    let q = quantize(&x, 12, 40, bits, Rounding::Nearest).unwrap();
    let f = frame::encode(&q, zstd).unwrap();
    (q, f)
}

#[test]
fn frames_round_trip_with_and_without_zstd() {
    for bits in [Bits::Int8, Bits::Int4] {
        for zstd in [false, true] {
            let (q, f) = sample_frame(bits, zstd);
            assert_eq!(frame::decode(&f, 12 * 40).unwrap(), q);
        }
    }
}

#[test]
fn zstd_shrinks_a_compressible_frame_and_is_skipped_when_it_would_grow() {
    let zeros = quantize(&[0.0; 4096], 32, 128, Bits::Int8, Rounding::Nearest).unwrap();
    let packed = frame::encode(&zeros, true).unwrap();
    assert_eq!(packed[6], 1, "zstd flag set");
    assert!(packed.len() < frame::encode(&zeros, false).unwrap().len() / 10);
    assert_eq!(frame::decode(&packed, 4096).unwrap(), zeros);
    let tiny = quantize(&[1.0, -1.0], 1, 2, Bits::Int4, Rounding::Nearest).unwrap();
    assert_eq!(frame::encode(&tiny, true).unwrap()[6], 0, "zstd flag clear");
}

#[test]
fn compression_ratio_counts_header_and_scales() {
    // 4096 tokens x 128 wide, int4, no zstd: 64 code bytes and a 2-byte
    // scale per row, and one header.
    let q = quantize(
        &vec![0.5; 4096 * 128],
        4096,
        128,
        Bits::Int4,
        Rounding::Nearest,
    )
    .unwrap();
    let f = frame::encode(&q, false).unwrap();
    assert_eq!(f.len(), HEADER_BYTES + 4096 * (64 + 2));
    let expected = 128.0 * 4.0 / (64.0 + 2.0 + HEADER_BYTES as f64 / 4096.0);
    assert!((compression_ratio(4096, 128, f.len()) - expected).abs() < 1e-12);
    assert!((expected - 7.757).abs() < 1e-3);
}

fn put_u32(f: &mut [u8], at: usize, v: u32) {
    f[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn frames_with_a_bad_header_are_refused() {
    let (_, f) = sample_frame(Bits::Int8, false);
    let refuse = |f: &[u8]| frame::decode(f, 1 << 20).unwrap_err();
    assert!(matches!(
        refuse(&f[..10]),
        FrameError::Truncated { len: 10 }
    ));
    let mut bad = f.clone();
    bad[0] = b'X';
    assert!(matches!(refuse(&bad), FrameError::BadMagic { .. }));
    let mut bad = f.clone();
    bad[4] = 9;
    assert!(matches!(refuse(&bad), FrameError::BadVersion { found: 9 }));
    let mut bad = f.clone();
    bad[5] = 3;
    assert!(matches!(refuse(&bad), FrameError::BadCodec { found: 3 }));
    let mut bad = f.clone();
    bad[6] = 0x80;
    assert!(matches!(refuse(&bad), FrameError::BadFlags { .. }));
}

#[test]
fn frames_with_a_wrong_length_are_refused() {
    let (_, f) = sample_frame(Bits::Int4, false);
    let err = frame::decode(&f[..f.len() - 1], 1 << 20).unwrap_err();
    assert!(matches!(err, FrameError::WrongLength { .. }), "{err}");
    let mut long = f.clone();
    long.push(0);
    let err = frame::decode(&long, 1 << 20).unwrap_err();
    assert!(matches!(err, FrameError::WrongLength { .. }), "{err}");
}

#[test]
fn frames_whose_counts_do_not_match_their_sections_are_refused() {
    let (_, f) = sample_frame(Bits::Int8, false);
    // One more row than the sections hold.
    let mut bad = f.clone();
    put_u32(&mut bad, 8, 13);
    let err = frame::decode(&bad, 1 << 20).unwrap_err();
    assert!(matches!(err, FrameError::ScaleSection { .. }), "{err}");
    // A wider row than the code section holds.
    let mut bad = f.clone();
    put_u32(&mut bad, 12, 41);
    let err = frame::decode(&bad, 1 << 20).unwrap_err();
    assert!(matches!(err, FrameError::CodeSection { .. }), "{err}");
    assert!(err.to_string().contains("492 expected"), "{err}");
}

#[test]
fn frames_with_a_wrong_scale_section_are_refused() {
    let (_, f) = sample_frame(Bits::Int8, false);
    // Scale section one row short, code section one row long: same total.
    let mut bad = f.clone();
    put_u32(&mut bad, 16, 22);
    put_u32(&mut bad, 20, 12 * 40 + 2);
    let err = frame::decode(&bad, 1 << 20).unwrap_err();
    assert!(
        matches!(err, FrameError::ScaleSection { got: 22, .. }),
        "{err}"
    );
    // A negative and a NaN scale.
    for (bits, row) in [(0xbc00u16, 3usize), (0x7e00, 5)] {
        let mut bad = f.clone();
        bad[HEADER_BYTES + 2 * row..][..2].copy_from_slice(&bits.to_le_bytes());
        let err = frame::decode(&bad, 1 << 20).unwrap_err();
        assert!(
            matches!(err, FrameError::Content(QuantError::BadScale { row: r, .. }) if r == row),
            "{err}"
        );
    }
}

#[test]
fn frames_larger_than_the_receiver_accepts_are_refused_before_allocating() {
    let (_, f) = sample_frame(Bits::Int8, true);
    let mut bad = f.clone();
    put_u32(&mut bad, 8, u32::MAX);
    put_u32(&mut bad, 12, u32::MAX);
    let err = frame::decode(&bad, 1 << 20).unwrap_err();
    assert!(matches!(err, FrameError::Oversized { .. }), "{err}");
    assert!(matches!(
        frame::decode(&f, 12 * 40 - 1).unwrap_err(),
        FrameError::Oversized { .. }
    ));
}

#[test]
fn corrupt_zstd_payloads_are_refused() {
    let zeros = quantize(&[0.0; 4096], 32, 128, Bits::Int8, Rounding::Nearest).unwrap();
    let mut f = frame::encode(&zeros, true).unwrap();
    let last = f.len() - 1;
    f[HEADER_BYTES + 4] ^= 0xff;
    f[last] ^= 0xff;
    let err = frame::decode(&f, 4096).unwrap_err();
    assert!(
        matches!(err, FrameError::Zstd(_) | FrameError::PayloadLength { .. }),
        "{err}"
    );
}
