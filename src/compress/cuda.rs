//! The codec's CUDA kernels (`kernels/quant.cu`), compiled at run time by
//! NVRTC and launched through the driver API, both loaded with `dlopen` by
//! cudarc: a build needs no CUDA toolkit, a run needs `libnvrtc` to compile
//! and a GPU driver to launch. The kernels give the CPU reference's codes
//! bit for bit (see `scalar`).
//!
//! Unsafe code stays at the bottom of this file: library probes and kernel
//! launches, each with the reason it is sound; callers see safe functions.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError};
use cudarc::nvrtc::{CompileOptions, Ptx};
use half::f16;
use thiserror::Error;

use super::quant::{quantize, Bits, QuantError, Quantized, Rounding};

/// Every kernel source of the crate, by file name, embedded at build time.
pub const SOURCES: &[(&str, &str)] = &[
    ("quant.cu", include_str!("../../kernels/quant.cu")),
    ("train.cu", include_str!("../../kernels/train.cu")),
];

const QUANT_SOURCE: &str = SOURCES[0].1;

/// Real architectures the sources are checked against: compiling for a
/// real one (`sm_*`) runs ptxas inside NVRTC, which checks the inline PTX
/// too, where a virtual one (`compute_*`) would pass it on unread.
pub const CHECK_ARCHS: &[&str] = &["sm_80", "sm_90"];

/// The virtual architecture launched kernels are compiled for: the driver
/// compiles the PTX for whatever GPU it finds (Ampere or newer).
pub(crate) const LAUNCH_ARCH: &str = "compute_80";

/// Threads per block: 8 warps, one row each, or one thread per output of
/// `dequantize_project`.
const BLOCK: u32 = 256;

/// Why a kernel could not be compiled or run.
#[derive(Debug, Error)]
pub enum CudaError {
    #[error("libnvrtc cannot be loaded: put its directory (e.g. pip's nvidia/cuda_nvrtc/lib) on LD_LIBRARY_PATH")]
    NoNvrtc,
    #[error("no CUDA driver (libcuda cannot be loaded)")]
    NoDriver,
    #[error("no CUDA device: {0}")]
    NoDevice(DriverError),
    #[error("NVRTC could not compile {name} for {arch}:\n{log}")]
    Compile {
        name: String,
        arch: String,
        log: String,
    },
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("a {width} x {n} projection needs {} weights, got {got}", width * n)]
    Weights { width: usize, n: usize, got: usize },
    #[error("{rows} x {width} is too large for the kernels' 32-bit shapes")]
    TooLarge { rows: usize, width: usize },
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// The kernel flags only rows the CPU reference refuses too; this is
    /// a kernel bug, reported rather than hidden.
    #[error("the GPU flagged a row that the CPU reference accepts (a kernel bug)")]
    FlagMismatch,
}

/// Compiles one kernel source with NVRTC for `arch`, and returns its PTX.
pub fn compile(name: &str, source: &str, arch: &'static str) -> Result<Ptx, CudaError> {
    if !nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let opts = CompileOptions {
        arch: Some(arch),
        name: Some(name.to_string()),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| CudaError::Compile {
        name: name.to_string(),
        arch: arch.to_string(),
        log: match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => other.to_string(),
        },
    })
}

/// GPU `ordinal`'s context, or why there is none: `NoDriver` and
/// `NoDevice` say that this machine has no GPU to use.
pub(crate) fn context(ordinal: usize) -> Result<Arc<CudaContext>, CudaError> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    CudaContext::new(ordinal).map_err(CudaError::NoDevice)
}

/// The codec's kernels, loaded on one GPU.
pub struct CudaCodec {
    stream: Arc<CudaStream>,
    quantize_rows: CudaFunction,
    dequantize_rows: CudaFunction,
    dequantize_project: CudaFunction,
}

impl CudaCodec {
    /// Compiles and loads the kernels on GPU `ordinal`. `NoDriver` and
    /// `NoDevice` say that this machine has no GPU to use.
    pub fn new(ordinal: usize) -> Result<CudaCodec, CudaError> {
        let ctx = context(ordinal)?;
        let module = ctx.load_module(compile("quant.cu", QUANT_SOURCE, LAUNCH_ARCH)?)?;
        Ok(CudaCodec {
            stream: ctx.default_stream(),
            quantize_rows: module.load_function("quantize_rows")?,
            dequantize_rows: module.load_function("dequantize_rows")?,
            dequantize_project: module.load_function("dequantize_project")?,
        })
    }

    /// `quant::quantize` on the GPU: the same codes and scales. When a row
    /// is bad (non-finite, or past f16's range), the kernel only flags it;
    /// the CPU reference then names the row in the error.
    pub fn quantize(
        &self,
        x: &[f32],
        rows: usize,
        width: usize,
        bits: Bits,
        rounding: Rounding,
    ) -> Result<Quantized, CudaError> {
        let shape = Shape::new(x.len(), rows, width, bits)?;
        let (stochastic, seed) = match rounding {
            Rounding::Nearest => (0i32, 0u64),
            Rounding::Stochastic { seed } => (1, seed),
        };
        let x_dev = self.stream.clone_htod(x)?;
        let mut scales = self.stream.alloc_zeros::<u16>(rows)?;
        let mut codes = self.stream.alloc_zeros::<u8>(shape.code_bytes)?;
        let mut status = self.stream.alloc_zeros::<u32>(1)?;
        launch_quantize(
            &self.stream,
            &self.quantize_rows,
            &shape,
            QuantArgs {
                x: &x_dev,
                scales: &mut scales,
                codes: &mut codes,
                status: &mut status,
                int4: i32::from(bits == Bits::Int4),
                stochastic,
                seed,
            },
        )?;
        if self.stream.clone_dtoh(&status)?[0] != 0 {
            quantize(x, rows, width, bits, rounding)?;
            return Err(CudaError::FlagMismatch);
        }
        let scales = self
            .stream
            .clone_dtoh(&scales)?
            .into_iter()
            .map(f16::from_bits)
            .collect();
        let codes = self.stream.clone_dtoh(&codes)?;
        Ok(Quantized::from_parts(bits, rows, width, scales, codes)?)
    }

    /// `Quantized::dequantize` on the GPU.
    pub fn dequantize(&self, q: &Quantized) -> Result<Vec<f32>, CudaError> {
        let shape = Shape::new(q.rows() * q.width(), q.rows(), q.width(), q.bits())?;
        let scale_bits: Vec<u16> = q.scales().iter().map(|s| s.to_bits()).collect();
        let scales = self.stream.clone_htod(&scale_bits)?;
        let codes = self.stream.clone_htod(q.codes())?;
        let mut out = self.stream.alloc_zeros::<f32>(shape.elements as usize)?;
        let int4 = i32::from(q.bits() == Bits::Int4);
        let f = &self.dequantize_rows;
        launch_dequantize(&self.stream, (f, int4), &shape, &codes, &scales, &mut out)?;
        Ok(self.stream.clone_dtoh(&out)?)
    }

    /// A bottleneck's up-projection `dequantize(q) @ w` (`w` row-major
    /// `q.width() x n`) with the dequantization fused into it: the codes go
    /// to the GPU as they came off the wire and are never expanded to
    /// floats in memory. Each output is `scale * sum_k code_k * w[k, j]`,
    /// summed in `k` order: the scale is applied once, after the sum.
    pub fn dequantize_project(
        &self,
        q: &Quantized,
        w: &[f32],
        n: usize,
    ) -> Result<Vec<f32>, CudaError> {
        if q.width().checked_mul(n) != Some(w.len()) {
            return Err(CudaError::Weights {
                width: q.width(),
                n,
                got: w.len(),
            });
        }
        let shape = Shape::new(q.rows() * n, q.rows(), n, Bits::Int8)?;
        let width = u32::try_from(q.width()).map_err(|_| CudaError::TooLarge {
            rows: q.rows(),
            width: q.width(),
        })?;
        let int4 = i32::from(q.bits() == Bits::Int4);
        let scale_bits: Vec<u16> = q.scales().iter().map(|s| s.to_bits()).collect();
        let scales = self.stream.clone_htod(&scale_bits)?;
        let codes = self.stream.clone_htod(q.codes())?;
        let w_dev = self.stream.clone_htod(w)?;
        let mut out = self.stream.alloc_zeros::<f32>(shape.elements as usize)?;
        if shape.elements > 0 {
            use cudarc::driver::{LaunchConfig, PushKernelArg};
            let cfg = LaunchConfig {
                grid_dim: (Shape::grid(shape.elements)?, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match `dequantize_project(codes,
            // scales, w, out, rows, width, n, int4)` in quant.cu; `codes`
            // and `scales` are a checked `Quantized`'s, `w` holds width x n
            // floats (checked above), `out` rows x n; each thread
            // bounds-checks its index.
            unsafe {
                self.stream
                    .launch_builder(&self.dequantize_project)
                    .arg(&codes)
                    .arg(&scales)
                    .arg(&w_dev)
                    .arg(&mut out)
                    .arg(&shape.rows)
                    .arg(&width)
                    .arg(&shape.width)
                    .arg(&int4)
                    .launch(cfg)?;
            }
        }
        Ok(self.stream.clone_dtoh(&out)?)
    }
}

/// Seconds per call of the codec's kernels on data already on the GPU,
/// and of a device-to-device copy of the same `f32` input: the GPU's own
/// speed, without the host transfers that [`CudaCodec::quantize`] adds
/// (`swarmrun bench compress --device cuda`).
#[derive(Debug, Clone, Copy)]
pub struct ResidentTimes {
    pub encode_s: f64,
    pub decode_s: f64,
    pub copy_s: f64,
}

impl CudaCodec {
    /// Times quantizing `x` (`rows x width`) to `bits` and dequantizing it
    /// back, and copying it, all on the GPU: the median of 5 rounds of
    /// `calls` calls each, after one warm-up call.
    pub fn time_resident(
        &self,
        x: &[f32],
        (rows, width): (usize, usize),
        bits: Bits,
        calls: usize,
    ) -> Result<ResidentTimes, CudaError> {
        let shape = Shape::new(x.len(), rows, width, bits)?;
        let x_dev = self.stream.clone_htod(x)?;
        let mut scales = self.stream.alloc_zeros::<u16>(rows)?;
        let mut codes = self.stream.alloc_zeros::<u8>(shape.code_bytes)?;
        let mut status = self.stream.alloc_zeros::<u32>(1)?;
        let mut out = self.stream.alloc_zeros::<f32>(x.len())?;
        let int4 = i32::from(bits == Bits::Int4);
        let time = |f: &mut dyn FnMut() -> Result<(), CudaError>| -> Result<f64, CudaError> {
            f()?;
            self.stream.synchronize()?;
            let mut rounds = Vec::with_capacity(5);
            for _ in 0..5 {
                let started = std::time::Instant::now();
                for _ in 0..calls.max(1) {
                    f()?;
                }
                self.stream.synchronize()?;
                rounds.push(started.elapsed() / calls.max(1) as u32);
            }
            Ok(crate::bench::median(rounds).as_secs_f64())
        };
        let encode_s = time(&mut || {
            let args = QuantArgs {
                x: &x_dev,
                scales: &mut scales,
                codes: &mut codes,
                status: &mut status,
                int4,
                stochastic: 0,
                seed: 0,
            };
            launch_quantize(&self.stream, &self.quantize_rows, &shape, args)
        })?;
        let decode_s = time(&mut || {
            launch_dequantize(
                &self.stream,
                (&self.dequantize_rows, int4),
                &shape,
                &codes,
                &scales,
                &mut out,
            )
        })?;
        let copy_s = time(&mut || Ok(self.stream.memcpy_dtod(&x_dev, &mut out)?))?;
        Ok(ResidentTimes {
            encode_s,
            decode_s,
            copy_s,
        })
    }
}

/// A matrix's sizes as the kernels take them (32-bit rows and width).
struct Shape {
    rows: u32,
    width: u32,
    elements: u64,
    code_bytes: usize,
}

impl Shape {
    fn new(len: usize, rows: usize, width: usize, bits: Bits) -> Result<Shape, CudaError> {
        if rows.checked_mul(width) != Some(len) {
            return Err(QuantError::Shape { rows, width, len }.into());
        }
        let too_large = || CudaError::TooLarge { rows, width };
        Ok(Shape {
            rows: u32::try_from(rows).map_err(|_| too_large())?,
            width: u32::try_from(width).map_err(|_| too_large())?,
            elements: len as u64,
            code_bytes: rows * bits.row_bytes(width),
        })
    }

    /// Blocks of `BLOCK` threads for one thread per each of `n` items.
    fn grid(n: u64) -> Result<u32, CudaError> {
        u32::try_from(n.div_ceil(BLOCK as u64)).map_err(|_| CudaError::TooLarge {
            rows: n as usize,
            width: 1,
        })
    }
}

/// The buffers and parameters of one quantization.
struct QuantArgs<'a> {
    x: &'a CudaSlice<f32>,
    scales: &'a mut CudaSlice<u16>,
    codes: &'a mut CudaSlice<u8>,
    status: &'a mut CudaSlice<u32>,
    int4: i32,
    stochastic: i32,
    seed: u64,
}

fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen libnvrtc under its usual names; loading
    // it runs no code of ours and keeps no pointer.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

pub(crate) fn driver_present() -> bool {
    // SAFETY: as for `nvrtc_present`, with libcuda.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Blocks of [`BLOCK`] threads for one warp per each of `rows` rows.
fn per_row(rows: u32) -> Result<cudarc::driver::LaunchConfig, CudaError> {
    Ok(cudarc::driver::LaunchConfig {
        grid_dim: (Shape::grid(u64::from(rows) * 32)?, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `quantize_rows`: one warp per row computes the row's scale and codes.
fn launch_quantize(
    stream: &CudaStream,
    quantize_rows: &CudaFunction,
    shape: &Shape,
    a: QuantArgs<'_>,
) -> Result<(), CudaError> {
    use cudarc::driver::PushKernelArg;
    if shape.elements == 0 {
        return Ok(());
    }
    // SAFETY: the argument list matches `quantize_rows` in quant.cu (types
    // and order); every buffer holds what the kernel indexes: `x` rows x
    // width floats, `scales` rows, `codes` the code bytes, `status` one
    // word; each warp bounds-checks its row.
    unsafe {
        stream
            .launch_builder(quantize_rows)
            .arg(a.x)
            .arg(&mut *a.scales)
            .arg(&mut *a.codes)
            .arg(&mut *a.status)
            .arg(&shape.rows)
            .arg(&shape.width)
            .arg(&a.int4)
            .arg(&a.stochastic)
            .arg(&a.seed)
            .launch(per_row(shape.rows)?)?;
    }
    Ok(())
}

/// `dequantize_rows`, one warp per row.
fn launch_dequantize(
    stream: &CudaStream,
    (f, int4): (&CudaFunction, i32),
    shape: &Shape,
    codes: &CudaSlice<u8>,
    scales: &CudaSlice<u16>,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    use cudarc::driver::PushKernelArg;
    if shape.elements == 0 {
        return Ok(());
    }
    // SAFETY: as in `launch_quantize`: the arguments match
    // `dequantize_rows(codes, scales, out, rows, width, int4)` and `out`
    // holds rows x width floats.
    unsafe {
        stream
            .launch_builder(f)
            .arg(codes)
            .arg(scales)
            .arg(out)
            .arg(&shape.rows)
            .arg(&shape.width)
            .arg(&int4)
            .launch(per_row(shape.rows)?)?;
    }
    Ok(())
}
