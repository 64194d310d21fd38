//! The CUDA kernels: every `kernels/*.cu` compiles with NVRTC (no GPU
//! needed, only libnvrtc), and on a GPU the kernels give the CPU
//! reference's codes bit for bit.
#![cfg(feature = "cuda")]

use std::path::Path;

use swarmrun::compress::cuda::{self, CudaCodec, CudaError};
use swarmrun::compress::{quantize, Bits, Quantized, Rounding};

/// Every kernel file in the crate's `kernels/`, read from disk so that a
/// new file is checked without being listed anywhere.
fn kernel_files() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_kernel_source_compiles_with_nvrtc_for_every_checked_arch() {
    let files = kernel_files();
    assert!(!files.is_empty(), "no kernels/*.cu");
    for (name, source) in &files {
        for &arch in cuda::CHECK_ARCHS {
            match cuda::compile(name, source, arch) {
                Ok(_) => println!("{name}: compiled for {arch}"),
                Err(e) => panic!("{e}"),
            }
        }
    }
}

#[test]
fn the_embedded_sources_are_the_files_on_disk() {
    let files = kernel_files();
    let embedded: Vec<(String, String)> = cuda::SOURCES
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect();
    assert_eq!(embedded, files, "add new kernels/*.cu to cuda::SOURCES");
}

#[test]
fn a_syntax_error_fails_compilation_with_nvrtc_s_log() {
    let err = cuda::compile(
        "broken.cu",
        "extern \"C\" __global__ void k() { int x = ; }",
        "sm_80",
    )
    .unwrap_err();
    assert!(matches!(err, CudaError::Compile { .. }), "{err}");
    assert!(err.to_string().contains("broken.cu"), "{err}");
}

/// The codec on this machine's GPU, or `None` (with the reason printed)
/// when it has none: no driver library and no /dev/nvidia0, or a driver
/// that finds no device. Any other failure fails the test.
fn gpu() -> Option<CudaCodec> {
    match CudaCodec::new(0) {
        Ok(codec) => Some(codec),
        Err(CudaError::NoDriver) if !Path::new("/dev/nvidia0").exists() => {
            println!("skipped: no GPU (no libcuda, no /dev/nvidia0)");
            None
        }
        Err(CudaError::NoDevice(e)) => {
            println!("skipped: no GPU ({e})");
            None
        }
        Err(e) => panic!("a GPU seems present but the kernels cannot run: {e}"),
    }
}

#[test]
fn gpu_codes_and_dequantized_values_are_bit_identical_to_the_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let mut s = 0x2545_f491_4f6c_dd1du64;
    for (rows, width) in [(1, 1), (3, 7), (64, 128), (257, 1000)] {
        let x: Vec<f32> = (0..rows * width)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                if i % 97 == 0 {
                    u * 300.0
                } else if i % 13 == 0 {
                    0.0
                } else {
                    u
                }
            })
            .collect();
        for bits in [Bits::Int8, Bits::Int4] {
            for rounding in [Rounding::Nearest, Rounding::Stochastic { seed: 77 }] {
                let cpu = quantize(&x, rows, width, bits, rounding).unwrap();
                let dev = gpu.quantize(&x, rows, width, bits, rounding).unwrap();
                assert_eq!(dev, cpu, "{rows}x{width} {bits:?} {rounding:?}");
                let back = gpu.dequantize(&cpu).unwrap();
                let want = cpu.dequantize();
                assert!(
                    back.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "dequantize {rows}x{width} {bits:?}"
                );
            }
        }
    }
    let mut bad = vec![1.0f32; 20];
    bad[15] = f32::NAN;
    let err = gpu
        .quantize(&bad, 2, 10, Bits::Int8, Rounding::Nearest)
        .unwrap_err();
    assert!(err.to_string().contains("row 1"), "{err}");
}

/// The fused kernel's arithmetic on the CPU: `scale * sum_k code_k * w[k, j]`
/// in `k` order, each op rounded to nearest (Rust never fuses them).
fn project_reference(q: &Quantized, w: &[f32], n: usize) -> Vec<f32> {
    let (rows, width) = (q.rows(), q.width());
    // Codes as exact integers: dequantizing with scale 1 is code * 1.
    let ones = vec![half::f16::ONE; rows];
    let codes = Quantized::from_parts(q.bits(), rows, width, ones, q.codes().to_vec())
        .unwrap()
        .dequantize();
    let mut out = vec![0.0f32; rows * n];
    for r in 0..rows {
        for j in 0..n {
            let acc = (0..width).fold(0.0f32, |acc, k| acc + codes[r * width + k] * w[k * n + j]);
            out[r * n + j] = acc * q.scales()[r].to_f32();
        }
    }
    out
}

#[test]
fn gpu_fused_dequantize_and_projection_is_bit_identical_to_the_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    for (rows, width, n) in [(1, 1, 1), (768, 4, 128), (33, 7, 65)] {
        let x: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 3.0)
            .collect();
        let w: Vec<f32> = (0..width * n)
            .map(|i| ((i * 13 % 11) as f32 - 5.0) / 50.0)
            .collect();
        for bits in [Bits::Int8, Bits::Int4] {
            let q = quantize(&x, rows, width, bits, Rounding::Nearest).unwrap();
            let dev = gpu.dequantize_project(&q, &w, n).unwrap();
            let want = project_reference(&q, &w, n);
            assert!(
                dev.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{rows}x{width}x{n} {bits:?}"
            );
        }
    }
    let q = quantize(&[1.0; 8], 2, 4, Bits::Int8, Rounding::Nearest).unwrap();
    let err = gpu.dequantize_project(&q, &[0.0; 7], 2).unwrap_err();
    assert!(matches!(err, CudaError::Weights { .. }), "{err}");
}
