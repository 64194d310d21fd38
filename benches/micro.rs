//! Micro-benchmarks of the pieces every training step leans on, with
//! criterion (`cargo bench --bench micro`; `launch/bench.sh` runs them
//! with `--quick`): the boundary codec, the fixed-point reduction that
//! makes all-reduce sums exact, TCP frames sealed and opened, and the
//! digests validators compare. Throughput is reported in bytes of f32
//! input (or of payload), so figures read against memcpy.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use swarmrun::collective::{segment_maxes, FixedPoint};
use swarmrun::config::{CompressionSpec, Quant};
use swarmrun::pipeline::BoundaryCodec;
use swarmrun::wire::{FrameKind, Session};

/// A microbatch's boundary tensor: 12 x 64 tokens, 128 wide.
const ROWS: usize = 768;
const WIDTH: usize = 128;

/// Deterministic activation-like values, a few channels 10x larger.
fn activations(n: usize) -> Vec<f32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|i| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            if i % 32 == 0 {
                10.0 * unit
            } else {
                unit
            }
        })
        .collect()
}

fn codec(c: &mut Criterion) {
    let x = activations(ROWS * WIDTH);
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Bytes((x.len() * 4) as u64));
    for quant in [Quant::Int8, Quant::Int4] {
        let spec = CompressionSpec {
            bottleneck: None,
            quant,
            zstd: false,
        };
        let codec = BoundaryCodec::new(spec, ROWS, WIDTH, WIDTH);
        let name = format!("{quant:?}").to_lowercase();
        group.bench_function(BenchmarkId::new("encode", &name), |b| {
            b.iter(|| codec.encode(black_box(&x)))
        });
        let bytes = codec.encode(&x).expect("the codec encodes its own shape");
        group.bench_function(BenchmarkId::new("decode", &name), |b| {
            b.iter(|| codec.decode(black_box(&bytes)))
        });
    }
    group.finish();
}

fn fixed_point(c: &mut Criterion) {
    // A stage's gradient: 1M parameters in 16 segments.
    let n = 1 << 20;
    let g = activations(n);
    let segments: Vec<_> = (0..16).map(|s| s * n / 16..(s + 1) * n / 16).collect();
    let fixed = FixedPoint::from_maxes(&segments, &segment_maxes(&g, &segments))
        .expect("finite maxes give scales");
    let mut group = c.benchmark_group("fixed_point");
    group.throughput(Throughput::Bytes((n * 4) as u64));
    group.bench_function("encode", |b| b.iter(|| fixed.encode(black_box(&[&g]))));
    // A miner's close: the window's passes on this miner, summed as encoded.
    let passes: Vec<Vec<f32>> = (0..4).map(|p| activations(n + p)[p..].to_vec()).collect();
    let passes: Vec<&[f32]> = passes.iter().map(Vec::as_slice).collect();
    group.bench_function("encode 4 passes", |b| {
        b.iter(|| fixed.encode(black_box(&passes)))
    });
    let sums = fixed.encode(&[&g]);
    let mut out = vec![0.0f32; n];
    group.bench_function("decode", |b| {
        b.iter(|| fixed.decode(black_box(&sums), &mut out))
    });
    let mut acc = vec![0i64; n];
    group.bench_function("add_rounded", |b| {
        b.iter(|| fixed.add_rounded(black_box(&g), 0..n, &mut acc))
    });
    group.finish();
}

fn frames(c: &mut Criterion) {
    let peer = SocketAddr::from(([127, 0, 0, 1], 9));
    let mut group = c.benchmark_group("frames");
    for size in [1 << 10, 1 << 16, 1 << 20] {
        let payload = vec![0x5au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        let mut writer = Session::new(&[7; 32], 4 << 20, peer);
        let mut stream = Vec::with_capacity(size + 64);
        group.bench_function(BenchmarkId::new("seal", size), |b| {
            b.iter(|| {
                stream.clear();
                writer
                    .write(&mut stream, FrameKind::Data, 1, &[black_box(&payload)])
                    .expect("a frame under the limit is sealed")
            })
        });
        // Opening needs the frames in sequence: seal a run of them first.
        let mut sealed = Vec::new();
        let mut sealer = Session::new(&[7; 32], 4 << 20, peer);
        let count = 64;
        for _ in 0..count {
            sealer
                .write(&mut sealed, FrameKind::Data, 1, &[&payload])
                .expect("a frame under the limit is sealed");
        }
        group.throughput(Throughput::Bytes((size * count) as u64));
        group.bench_function(BenchmarkId::new("open_64", size), |b| {
            b.iter(|| {
                let mut reader = Session::new(&[7; 32], 4 << 20, peer);
                let mut socket = &sealed[..];
                for _ in 0..count {
                    black_box(reader.read(&mut socket).expect("our own frames open"));
                }
            })
        });
    }
    group.finish();
}

fn digests(c: &mut Criterion) {
    let weights = activations(1 << 20);
    let mut group = c.benchmark_group("digest");
    group.throughput(Throughput::Bytes((weights.len() * 4) as u64));
    group.bench_function("weights_blake3", |b| {
        b.iter(|| swarmrun::model::digest(black_box(&weights)))
    });
    group.finish();
}

criterion_group!(micro, codec, fixed_point, frames, digests);
criterion_main!(micro);
