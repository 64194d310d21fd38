//! `swarmrun bench compress`: encode and decode speed of the boundary codec
//! (quantize + frame into reused buffers; frame + dequantize) on one thread, beside memcpy of
//! the same f32 buffer in the same run, with the reconstruction error and
//! compression ratio each codec reaches on activation-like input.

use std::time::{Duration, Instant};

use thiserror::Error;

use super::median;
use super::record::Tables;
use crate::compress::quant::quantize_into;
use crate::compress::{
    compression_ratio, frame, Bits, FrameError, QuantError, Quantized, Rounding,
};

#[derive(Debug, Error)]
pub enum BenchCompressError {
    #[error("cannot start a one-thread pool: {0}")]
    Pool(#[from] rayon::ThreadPoolBuildError),
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub codec: String,
    /// f32 input bytes per second of encode (memcpy: of the copy).
    pub encode_gbps: f64,
    pub decode_gbps: f64,
    /// `||x - x̂|| / ||x||`.
    pub rel_error: f64,
    pub ratio: f64,
}

/// Each measurement repeats its call for at least this long and this many
/// times, and keeps the median: the machine is shared.
const TIME_PER_MEASURE: Duration = Duration::from_millis(400);
const MIN_CALLS: usize = 5;

/// Activation-like input: standard Gaussian values, with every 32nd
/// channel ten times larger (the outlier channels of transformer
/// activations, which set each row's scale), from a fixed seed.
pub fn activations(rows: usize, width: usize) -> Vec<f32> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut unit = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..rows * width)
        .map(|i| {
            let gauss = (-2.0 * unit().ln()).sqrt() * (std::f64::consts::TAU * unit()).cos();
            let outlier = if i % width % 32 == 5 { 10.0 } else { 1.0 };
            (gauss * outlier) as f32
        })
        .collect()
}

/// The median duration of `f`, called repeatedly for `budget`.
fn time(
    budget: Duration,
    mut f: impl FnMut() -> Result<(), BenchCompressError>,
) -> Result<Duration, BenchCompressError> {
    f()?; // warm-up: page faults, allocator
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < MIN_CALLS || start.elapsed() < budget {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    Ok(median(times))
}

/// The table's lines for a `rows x width` input, each measurement taking
/// about `budget`, all on one thread.
pub fn measure(
    rows: usize,
    width: usize,
    budget: Duration,
) -> Result<Vec<Line>, BenchCompressError> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    pool.install(|| measure_here(rows, width, budget))
}

fn measure_here(
    rows: usize,
    width: usize,
    budget: Duration,
) -> Result<Vec<Line>, BenchCompressError> {
    let x = activations(rows, width);
    let bytes = (x.len() * 4) as f64;
    let gbps = |d: Duration| bytes / d.as_secs_f64() / 1e9;
    let mut out = vec![0.0f32; x.len()];
    let copy = time(budget, || {
        out.copy_from_slice(std::hint::black_box(&x));
        Ok(())
    })?;
    let mut lines = vec![Line {
        codec: "memcpy (f32)".into(),
        encode_gbps: gbps(copy),
        decode_gbps: gbps(copy),
        rel_error: 0.0,
        ratio: 1.0,
    }];
    for (bits, zstd) in [
        (Bits::Int8, false),
        (Bits::Int8, true),
        (Bits::Int4, false),
        (Bits::Int4, true),
    ] {
        // A sender's steady state: the same buffers for every tensor.
        let mut q = Quantized::empty(bits);
        let mut wire = Vec::new();
        let enc = time(budget, || {
            quantize_into(&x, rows, width, bits, Rounding::Nearest, &mut q)?;
            Ok(frame::encode_into(&q, zstd, &mut wire)?)
        })?;
        let dec = time(budget, || {
            frame::decode(&wire, x.len())?.dequantize_into(&mut out);
            Ok(())
        })?;
        lines.push(Line {
            codec: format!("{bits:?}{}", if zstd { " + zstd" } else { "" }).to_lowercase(),
            encode_gbps: gbps(enc),
            decode_gbps: gbps(dec),
            rel_error: relative_error(&x, &out),
            ratio: compression_ratio(rows, width, wire.len()),
        });
    }
    Ok(lines)
}

/// `||x - y|| / ||x||` (0 for an all-zero `x` equal to `y`).
fn relative_error(x: &[f32], y: &[f32]) -> f64 {
    let (diff, norm) = x.iter().zip(y).fold((0.0f64, 0.0f64), |(d, n), (&a, &b)| {
        let e = (a - b) as f64;
        (d + e * e, n + (a as f64) * (a as f64))
    });
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// The lines as an aligned table, encode speed also as a fraction of memcpy.
pub fn render(rows: usize, width: usize, lines: &[Line]) -> String {
    let memcpy = lines.first().map_or(f64::NAN, |l| l.encode_gbps);
    let mut s = format!(
        "# swarmrun bench compress: {rows} x {width} f32 ({:.1} MiB), one thread, round to nearest\n\
         # input: Gaussian rows, every 32nd channel 10x (outliers)\n\
         {:<16} {:>12} {:>12} {:>10} {:>12} {:>8}\n",
        (rows * width * 4) as f64 / (1 << 20) as f64,
        "codec", "encode GB/s", "decode GB/s", "enc/memcpy", "rel error", "ratio"
    );
    for l in lines {
        s += &format!(
            "{:<16} {:>12.2} {:>12.2} {:>10.2} {:>12.2e} {:>7.2}x\n",
            l.codec,
            l.encode_gbps,
            l.decode_gbps,
            l.encode_gbps / memcpy,
            l.rel_error,
            l.ratio
        );
    }
    s
}

/// Measures, prints and records the table.
pub fn run(rows: usize, width: usize, tables: &mut Tables) -> Result<(), BenchCompressError> {
    let lines = measure(rows, width, TIME_PER_MEASURE)?;
    print!("{}", render(rows, width, &lines));
    let memcpy = lines.first().map_or(f64::NAN, |l| l.encode_gbps);
    tables.start(
        format!("{rows} x {width} f32, one thread, Gaussian rows with outlier channels"),
        &[
            "codec",
            "encode_gbps",
            "decode_gbps",
            "encode_per_memcpy",
            "rel_error",
            "ratio",
        ],
    );
    for l in &lines {
        tables.row(vec![
            l.codec.to_string().into(),
            l.encode_gbps.into(),
            l.decode_gbps.into(),
            (l.encode_gbps / memcpy).into(),
            l.rel_error.into(),
            l.ratio.into(),
        ]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_run_gives_one_line_per_codec_with_sane_figures() {
        let lines = measure(8, 64, Duration::from_millis(1)).unwrap();
        assert_eq!(lines.len(), 5);
        for l in &lines {
            assert!(l.encode_gbps > 0.0 && l.decode_gbps.is_finite(), "{l:?}");
        }
        let (int8, int4) = (&lines[1], &lines[3]);
        assert!(int8.rel_error < 0.05, "{lines:?}");
        assert!(
            int8.rel_error < int4.rel_error && int4.rel_error < 0.5,
            "{lines:?}"
        );
        assert!(int4.ratio > int8.ratio && int8.ratio > 3.0, "{lines:?}");
        let table = render(8, 64, &lines);
        assert_eq!(table.lines().count(), 3 + 5, "{table}");
        assert!(table.contains("int4 + zstd"), "{table}");
    }

    #[test]
    fn relative_error_is_the_norm_of_the_difference_over_the_norm() {
        assert_eq!(relative_error(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        assert!((relative_error(&[3.0, 4.0], &[0.0, 4.0]) - 0.6).abs() < 1e-12);
    }
}
