//! Training a stage on a CUDA GPU (feature `cuda`): cuBLAS for the
//! matmuls, our NVRTC kernels (`kernels/train.cu`) for the rest, all
//! loaded at run time by cudarc, so a build needs no CUDA toolkit and a
//! machine without a GPU gets [`CudaError::NoDriver`] or
//! [`CudaError::NoDevice`], never a panic.
//!
//! Only the passes run on the GPU: a miner keeps its weights, AdamW and
//! gradient sums on the host as a CPU miner does (they are all-reduced,
//! digested and checkpointed there anyway), and uploads the weights after
//! each step. That keeps every flat buffer, digest and ledger line the same
//! for CPU and GPU miners of one stage, and costs one upload a window.
//!
//! Determinism: the kernels reduce in one thread in a fixed order, with no
//! atomics, and cuBLAS runs in its pedantic FP32 mode (no TF32, no
//! reduced-precision reductions) on one stream. So a pass computed twice on
//! the same GPU model and library versions gives the same bits, and a
//! validator with such a GPU replays a GPU miner's pass exactly. A CPU
//! replay of a GPU pass does not match bit for bit (cuBLAS sums in another
//! order, and `expf` rounds differently): `tests/gpu_stage.rs` measures the
//! difference (5e-8 to 7e-7 relative on an H200).
//!
//! Unsafe code stays in this file: kernel launches (the `launch!` macro and
//! its wrappers) and cuBLAS calls, each with the reason it is sound;
//! [`stage`] sees safe functions.

pub mod nccl;
pub mod stage;

use std::sync::Arc;

use cudarc::cublas::result::CublasError;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DriverError};
use thiserror::Error;

use crate::compress::cuda::{self as kernels, CudaError};
use crate::model::ModelError;

pub use stage::{CudaPass, CudaStage, StageData};

/// A device buffer of `f32`s.
pub(crate) type Buf = CudaSlice<f32>;

/// Threads per block of every training kernel (one thread per element or
/// per row).
const BLOCK: u32 = 256;

/// Why a GPU stage could not run.
#[derive(Debug, Error)]
pub enum GpuError {
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("cuBLAS: {0} (is libcublas on LD_LIBRARY_PATH?)")]
    Blas(#[from] CublasError),
    #[error(
        "no cuBLAS library (libcublas cannot be loaded): put its directory on LD_LIBRARY_PATH"
    )]
    NoCublas,
    #[error("no NCCL library (libnccl cannot be loaded): put its directory on LD_LIBRARY_PATH")]
    NoNccl,
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the stage has no parameter {0}")]
    MissingParam(String),
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    Token { id: u32, vocab: usize },
    #[error("a {m} x {k} x {n} matmul is too large for cuBLAS's 32-bit sizes")]
    TooLarge { m: usize, k: usize, n: usize },
}

impl From<DriverError> for GpuError {
    fn from(e: DriverError) -> Self {
        GpuError::Cuda(CudaError::Driver(e))
    }
}

/// One GPU with the training kernels loaded and a cuBLAS handle on its
/// stream. Everything runs on that one stream, in order.
pub struct Gpu {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    name: String,
}

struct Kernels {
    embed_fwd: CudaFunction,
    embed_bwd_wte_parts: CudaFunction,
    sum_parts: CudaFunction,
    embed_bwd_wpe: CudaFunction,
    layernorm_fwd: CudaFunction,
    layernorm_bwd: CudaFunction,
    column_dot_parts: CudaFunction,
    gelu_fwd: CudaFunction,
    gelu_bwd: CudaFunction,
    add_assign: CudaFunction,
    qkv_heads: CudaFunction,
    merge_heads: CudaFunction,
    causal_softmax_fwd: CudaFunction,
    causal_softmax_bwd: CudaFunction,
    cross_entropy_fwd: CudaFunction,
    cross_entropy_bwd: CudaFunction,
    /// The boundary codec's (`kernels/quant.cu`), for frames that arrive.
    dequantize_rows: CudaFunction,
    dequantize_project: CudaFunction,
}

/// `C = op(A) @ op(B)` on row-major matrices, `batch` of them at once
/// (strided: each matrix right after the previous). `op(A)` is `m x k`:
/// `A` is stored `m x k`, or `k x m` when `ta`; likewise `op(B)` is
/// `k x n`, stored `n x k` when `tb`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Matmul {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub ta: bool,
    pub tb: bool,
    pub batch: usize,
}

impl Matmul {
    /// `(m x k) @ (k x n)`, one matrix, no transposes.
    pub fn plain(m: usize, k: usize, n: usize) -> Matmul {
        Matmul {
            m,
            k,
            n,
            ta: false,
            tb: false,
            batch: 1,
        }
    }
}

impl Gpu {
    /// GPU `ordinal` with the kernels compiled (NVRTC) and loaded.
    pub fn new(ordinal: usize) -> Result<Arc<Gpu>, GpuError> {
        let ctx = kernels::context(ordinal)?;
        let name = ctx.name()?;
        let load = |file: &str| {
            let source = kernels::SOURCES
                .iter()
                .find(|(name, _)| *name == file)
                .map(|(_, source)| *source)
                .unwrap_or_default();
            let ptx = kernels::compile(file, source, kernels::LAUNCH_ARCH)?;
            Ok::<_, GpuError>(ctx.load_module(ptx)?)
        };
        let (module, quant) = (load("train.cu")?, load("quant.cu")?);
        let f = |name: &str| module.load_function(name);
        let k = Kernels {
            embed_fwd: f("embed_fwd")?,
            embed_bwd_wte_parts: f("embed_bwd_wte_parts")?,
            sum_parts: f("sum_parts")?,
            embed_bwd_wpe: f("embed_bwd_wpe")?,
            layernorm_fwd: f("layernorm_fwd")?,
            layernorm_bwd: f("layernorm_bwd")?,
            column_dot_parts: f("column_dot_parts")?,
            gelu_fwd: f("gelu_fwd")?,
            gelu_bwd: f("gelu_bwd")?,
            add_assign: f("add_assign")?,
            qkv_heads: f("qkv_heads")?,
            merge_heads: f("merge_heads")?,
            causal_softmax_fwd: f("causal_softmax_fwd")?,
            causal_softmax_bwd: f("causal_softmax_bwd")?,
            cross_entropy_fwd: f("cross_entropy_fwd")?,
            cross_entropy_bwd: f("cross_entropy_bwd")?,
            dequantize_rows: quant.load_function("dequantize_rows")?,
            dequantize_project: quant.load_function("dequantize_project")?,
        };
        let stream = ctx.default_stream();
        let blas = new_blas(&stream)?;
        Ok(Arc::new(Gpu {
            stream,
            blas,
            k,
            name,
        }))
    }

    /// How many GPUs this machine has; `NoDriver` without a driver.
    pub fn count() -> Result<usize, GpuError> {
        if !kernels::driver_present() {
            return Err(CudaError::NoDriver.into());
        }
        let n = cudarc::driver::CudaContext::device_count()?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// The device's name, as the driver reports it ("NVIDIA H200").
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn upload(&self, host: &[f32]) -> Result<Buf, GpuError> {
        Ok(self.stream.clone_htod(host)?)
    }

    /// Token ids, codes, scales: any plain values.
    pub(crate) fn upload_slice<T: cudarc::driver::DeviceRepr>(
        &self,
        host: &[T],
    ) -> Result<CudaSlice<T>, GpuError> {
        Ok(self.stream.clone_htod(host)?)
    }

    pub(crate) fn upload_into(&self, host: &[f32], dst: &mut Buf) -> Result<(), GpuError> {
        Ok(self.stream.memcpy_htod(host, dst)?)
    }

    pub(crate) fn download(&self, buf: &Buf) -> Result<Vec<f32>, GpuError> {
        Ok(self.stream.clone_dtoh(buf)?)
    }

    pub(crate) fn download_into(&self, buf: &Buf, host: &mut [f32]) -> Result<(), GpuError> {
        Ok(self.stream.memcpy_dtoh(buf, host)?)
    }

    /// A buffer of `len` zeros (every kernel writes all of its output; the
    /// zeros only keep an unwritten element from holding stale data).
    pub(crate) fn zeros(&self, len: usize) -> Result<Buf, GpuError> {
        Ok(self.stream.alloc_zeros(len)?)
    }

    /// Waits for everything queued on the stream.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }

    /// FLOP/s of an `n x n x n` FP32 matmul through the same cuBLAS path
    /// the stages use (pedantic FP32), on random inputs: the median of
    /// `reps` products after one warm-up.
    pub fn matmul_flops(&self, n: usize, reps: usize) -> Result<f64, GpuError> {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<f32> = (0..n * n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        let a = self.upload(&noise)?;
        let b = self.upload(&noise)?;
        let mut c = self.zeros(n * n)?;
        let mm = Matmul::plain(n, n, n);
        self.matmul(&mut c, &a, &b, mm)?;
        self.synchronize()?;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let started = std::time::Instant::now();
            self.matmul(&mut c, &a, &b, mm)?;
            self.synchronize()?;
            times.push(started.elapsed());
        }
        let t = crate::bench::median(times).as_secs_f64();
        Ok(2.0 * (n as f64).powi(3) / t)
    }

    pub(crate) fn matmul(&self, c: &mut Buf, a: &Buf, b: &Buf, mm: Matmul) -> Result<(), GpuError> {
        let too_large = || GpuError::TooLarge {
            m: mm.m,
            k: mm.k,
            n: mm.n,
        };
        let int = |v: usize| i32::try_from(v).map_err(|_| too_large());
        let (m, k, n) = (mm.m, mm.k, mm.n);
        let fits = |buf: &Buf, per: usize| buf.len() >= per * mm.batch;
        if !(fits(a, m * k) && fits(b, k * n) && fits(c, m * n)) {
            return Err(too_large());
        }
        let op = |t: bool| match t {
            true => cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T,
            false => cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        };
        // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T:
        // cuBLAS gets B as its first operand and A as its second.
        let gemm = GemmConfig {
            transa: op(mm.tb),
            transb: op(mm.ta),
            m: int(n)?,
            n: int(m)?,
            k: int(k)?,
            alpha: 1.0f32,
            lda: int(if mm.tb { k } else { n })?,
            ldb: int(if mm.ta { m } else { k })?,
            beta: 0.0f32,
            ldc: int(n)?,
        };
        if mm.batch == 1 {
            // SAFETY: the three buffers hold at least the elements the
            // shapes index (checked above), the leading dimensions are
            // those of the row-major layouts, and all are on this stream.
            unsafe { self.blas.gemm(gemm, b, a, c) }?;
        } else {
            let stride = |v: usize| i64::try_from(v).map_err(|_| too_large());
            let cfg = StridedBatchedConfig {
                gemm,
                batch_size: int(mm.batch)?,
                stride_a: stride(k * n)?,
                stride_b: stride(m * k)?,
                stride_c: stride(m * n)?,
            };
            // SAFETY: as above, for `batch` matrices laid out one after
            // another (the length checks counted all of them).
            unsafe { self.blas.gemm_strided_batched(cfg, b, a, c) }?;
        }
        Ok(())
    }
}

/// A cuBLAS handle on `stream`, in pedantic FP32 mode: the matmuls then
/// never use TF32 or reduced-precision reductions, whatever the
/// environment (`NVIDIA_TF32_OVERRIDE`) says, so results are plain FP32
/// and repeat bit for bit on the same GPU.
fn new_blas(stream: &Arc<CudaStream>) -> Result<CudaBlas, GpuError> {
    // SAFETY: only tries to dlopen libcublas under its usual names.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(GpuError::NoCublas);
    }
    let blas = CudaBlas::new(stream.clone())?;
    // SAFETY: the handle is live (owned by `blas`) and the mode is one of
    // the enum's values.
    let status = unsafe {
        cudarc::cublas::sys::cublasSetMathMode(
            *blas.handle(),
            cudarc::cublas::sys::cublasMath_t::CUBLAS_PEDANTIC_MATH,
        )
    };
    status.result()?;
    Ok(blas)
}

/// Launches kernel `$f` of `$gpu` with one thread per each of `$threads`
/// items and the given arguments, which must match the kernel's signature
/// in `kernels/train.cu` in order and type.
macro_rules! launch {
    ($gpu:expr, $f:ident, $threads:expr; $($arg:expr),* $(,)?) => {{
        use cudarc::driver::PushKernelArg;
        let threads = $threads as u64;
        if threads > 0 {
            let cfg = $crate::gpu::grid(threads)?;
            let mut builder = $gpu.stream.launch_builder(&$gpu.k.$f);
            $( builder.arg($arg); )*
            // SAFETY: every wrapper below passes the kernel's arguments in
            // its order and types, with buffers at least as long as the
            // sizes it passes; each thread bounds-checks its index.
            unsafe { builder.launch(cfg) }?;
        }
    }};
}

/// Blocks of [`BLOCK`] threads for one thread per each of `n` items.
fn grid(n: u64) -> Result<cudarc::driver::LaunchConfig, GpuError> {
    let blocks = u32::try_from(n.div_ceil(u64::from(BLOCK))).map_err(|_| GpuError::TooLarge {
        m: n as usize,
        k: 1,
        n: 1,
    })?;
    Ok(cudarc::driver::LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Rows summed per part by the two-launch column sums: [`ROWS_PER_PART`],
/// or more when `rows / ROWS_PER_PART` parts of `width` floats each would
/// pass [`PARTIAL_FLOATS`] (a large vocabulary's embedding gradient). A
/// function of the shapes alone, so the order of the sums is too.
fn rows_per_part(rows: usize, width: usize) -> usize {
    let most_parts = (PARTIAL_FLOATS / width.max(1)).max(1);
    ROWS_PER_PART.max(rows.div_ceil(most_parts))
}

/// See [`rows_per_part`].
const ROWS_PER_PART: usize = 32;
const PARTIAL_FLOATS: usize = 1 << 24;

fn u32_of(v: usize) -> Result<u32, GpuError> {
    u32::try_from(v).map_err(|_| GpuError::TooLarge { m: v, k: 1, n: 1 })
}

/// The training kernels, one safe wrapper each (sizes as the kernels
/// name them in `kernels/train.cu`).
impl Gpu {
    pub(crate) fn embed_fwd(
        &self,
        out: &mut Buf,
        ids: &CudaSlice<u32>,
        wte: &Buf,
        wpe: &Buf,
        (t, c): (usize, usize),
    ) -> Result<(), GpuError> {
        let rows = ids.len();
        let (n_, t_, c_) = (u32_of(rows)?, u32_of(t)?, u32_of(c)?);
        launch!(self, embed_fwd, rows * c; &mut *out, ids, wte, wpe, &n_, &t_, &c_);
        Ok(())
    }

    /// `dwte[v, c]`: the sum of `dout`'s rows whose token is `v`.
    pub(crate) fn embed_bwd_wte(
        &self,
        dwte: &mut Buf,
        ids: &CudaSlice<u32>,
        dout: &Buf,
        (vocab, c): (usize, usize),
    ) -> Result<(), GpuError> {
        let rows = ids.len();
        let rpp = rows_per_part(rows, vocab * c);
        let parts = rows.div_ceil(rpp);
        let mut partial = self.zeros(parts * vocab * c)?;
        let (n_, v_, c_, rpp_) = (u32_of(rows)?, u32_of(vocab)?, u32_of(c)?, u32_of(rpp)?);
        launch!(self, embed_bwd_wte_parts, parts * c;
            &mut partial, ids, dout, &n_, &v_, &c_, &rpp_);
        self.sum_parts(dwte, &partial, (parts, vocab * c))
    }

    /// `out[i]`: the sum of `partial`'s `parts` rows of `width`, in order.
    fn sum_parts(
        &self,
        out: &mut Buf,
        partial: &Buf,
        (parts, width): (usize, usize),
    ) -> Result<(), GpuError> {
        let (p_, w_) = (u32_of(parts)?, width as u64);
        launch!(self, sum_parts, width; &mut *out, partial, &p_, &w_);
        Ok(())
    }

    pub(crate) fn embed_bwd_wpe(
        &self,
        dwpe: &mut Buf,
        dout: &Buf,
        (b, t, t_max, c): (usize, usize, usize, usize),
    ) -> Result<(), GpuError> {
        let (b_, t_, tm_, c_) = (u32_of(b)?, u32_of(t)?, u32_of(t_max)?, u32_of(c)?);
        launch!(self, embed_bwd_wpe, t_max * c; &mut *dwpe, dout, &b_, &t_, &tm_, &c_);
        Ok(())
    }

    /// `(out, xhat, rstd)` of LayerNorm over rows of width `c`.
    pub(crate) fn layernorm_fwd(
        &self,
        [out, xhat, rstd]: [&mut Buf; 3],
        x: &Buf,
        gain: &Buf,
        (rows, c): (usize, usize),
    ) -> Result<(), GpuError> {
        let (n_, c_) = (u32_of(rows)?, u32_of(c)?);
        launch!(self, layernorm_fwd, rows; &mut *out, &mut *xhat, &mut *rstd, x, gain, &n_, &c_);
        Ok(())
    }

    pub(crate) fn layernorm_bwd(
        &self,
        dx: &mut Buf,
        [dout, xhat, rstd, gain]: [&Buf; 4],
        (rows, c): (usize, usize),
    ) -> Result<(), GpuError> {
        let (n_, c_) = (u32_of(rows)?, u32_of(c)?);
        launch!(self, layernorm_bwd, rows; &mut *dx, dout, xhat, rstd, gain, &n_, &c_);
        Ok(())
    }

    /// `out[c]`: the sum over rows of `a[n, c] * b[n, c]`.
    pub(crate) fn column_dot(
        &self,
        out: &mut Buf,
        a: &Buf,
        b: &Buf,
        (rows, c): (usize, usize),
    ) -> Result<(), GpuError> {
        let rpp = rows_per_part(rows, c);
        let parts = rows.div_ceil(rpp);
        let mut partial = self.zeros(parts * c)?;
        let (n_, c_, rpp_) = (u32_of(rows)?, u32_of(c)?, u32_of(rpp)?);
        launch!(self, column_dot_parts, parts * c; &mut partial, a, b, &n_, &c_, &rpp_);
        self.sum_parts(out, &partial, (parts, c))
    }

    pub(crate) fn gelu_fwd(&self, out: &mut Buf, x: &Buf) -> Result<(), GpuError> {
        let len = x.len() as u64;
        launch!(self, gelu_fwd, len; &mut *out, x, &len);
        Ok(())
    }

    pub(crate) fn gelu_bwd(&self, dx: &mut Buf, x: &Buf, dout: &Buf) -> Result<(), GpuError> {
        let len = x.len() as u64;
        launch!(self, gelu_bwd, len; &mut *dx, x, dout, &len);
        Ok(())
    }

    /// `a += b`.
    pub(crate) fn add_assign(&self, a: &mut Buf, b: &Buf) -> Result<(), GpuError> {
        let len = a.len() as u64;
        launch!(self, add_assign, len; &mut *a, b, &len);
        Ok(())
    }

    /// Heads of `qkv` into `[q, k, v]` (`back` false), or their gradients
    /// back into `qkv` (`back` true).
    pub(crate) fn qkv_heads(
        &self,
        qkv: &mut Buf,
        [q, k, v]: [&mut Buf; 3],
        (b, t, nh, hs): (usize, usize, usize, usize),
        back: bool,
    ) -> Result<(), GpuError> {
        let (b_, t_, nh_, hs_) = (u32_of(b)?, u32_of(t)?, u32_of(nh)?, u32_of(hs)?);
        let back = i32::from(back);
        launch!(self, qkv_heads, b * t * nh * hs;
            &mut *qkv, &mut *q, &mut *k, &mut *v, &b_, &t_, &nh_, &hs_, &back);
        Ok(())
    }

    /// Heads into `y` (`back` false), or `y`'s gradient into heads.
    pub(crate) fn merge_heads(
        &self,
        y: &mut Buf,
        heads: &mut Buf,
        (b, t, nh, hs): (usize, usize, usize, usize),
        back: bool,
    ) -> Result<(), GpuError> {
        let (b_, t_, nh_, hs_) = (u32_of(b)?, u32_of(t)?, u32_of(nh)?, u32_of(hs)?);
        let back = i32::from(back);
        launch!(self, merge_heads, b * t * nh * hs;
            &mut *y, &mut *heads, &b_, &t_, &nh_, &hs_, &back);
        Ok(())
    }

    pub(crate) fn causal_softmax_fwd(
        &self,
        out: &mut Buf,
        x: &Buf,
        (rows, t, scale): (usize, usize, f32),
    ) -> Result<(), GpuError> {
        let (r_, t_) = (u32_of(rows)?, u32_of(t)?);
        launch!(self, causal_softmax_fwd, rows; &mut *out, x, &r_, &t_, &scale);
        Ok(())
    }

    pub(crate) fn causal_softmax_bwd(
        &self,
        dx: &mut Buf,
        y: &Buf,
        g: &Buf,
        (rows, t, scale): (usize, usize, f32),
    ) -> Result<(), GpuError> {
        let (r_, t_) = (u32_of(rows)?, u32_of(t)?);
        launch!(self, causal_softmax_bwd, rows; &mut *dx, y, g, &r_, &t_, &scale);
        Ok(())
    }

    /// `backward` false: each row's loss into `out` (`rows`); true: the
    /// mean loss's gradient into `out` (`rows x vocab`).
    pub(crate) fn cross_entropy(
        &self,
        out: &mut Buf,
        logits: &Buf,
        targets: &CudaSlice<u32>,
        (vocab, backward): (usize, bool),
    ) -> Result<(), GpuError> {
        let rows = targets.len();
        let (n_, v_) = (u32_of(rows)?, u32_of(vocab)?);
        match backward {
            false => launch!(self, cross_entropy_fwd, rows; &mut *out, logits, targets, &n_, &v_),
            true => launch!(self, cross_entropy_bwd, rows; &mut *out, logits, targets, &n_, &v_),
        }
        Ok(())
    }

    /// A frame's codes back to `rows x width` floats (`quant.cu`).
    pub(crate) fn dequantize(
        &self,
        out: &mut Buf,
        (codes, scales): (&CudaSlice<u8>, &CudaSlice<u16>),
        (rows, width, int4): (usize, usize, bool),
    ) -> Result<(), GpuError> {
        let (r_, w_, int4) = (u32_of(rows)?, u32_of(width)?, i32::from(int4));
        launch!(self, dequantize_rows, rows * 32; codes, scales, &mut *out, &r_, &w_, &int4);
        Ok(())
    }

    /// `dequantize(codes) @ w` (`w` is `width x n`) without the floats in
    /// between: the up-projection of a bottleneck fused with the frame's
    /// dequantization (`quant.cu`).
    pub(crate) fn dequantize_project(
        &self,
        out: &mut Buf,
        (codes, scales): (&CudaSlice<u8>, &CudaSlice<u16>),
        w: &Buf,
        (rows, width, n, int4): (usize, usize, usize, bool),
    ) -> Result<(), GpuError> {
        let (r_, w_, n_, int4) = (u32_of(rows)?, u32_of(width)?, u32_of(n)?, i32::from(int4));
        launch!(self, dequantize_project, rows * n;
            codes, scales, w, &mut *out, &r_, &w_, &n_, &int4);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_sums_take_parts_of_32_rows_unless_the_partial_sums_would_pass_their_bound() {
        // The quickstart: 768 rows of 128 (a LayerNorm gain).
        assert_eq!(rows_per_part(768, 128), ROWS_PER_PART);
        // Fewer rows than a part: one part of 32.
        assert_eq!(rows_per_part(5, 8), ROWS_PER_PART);
        // 12288 rows of 100k: 384 parts would pass the bound; 167 fit.
        let rpp = rows_per_part(12288, 100_000);
        assert_eq!(
            12288usize.div_ceil(rpp),
            167,
            "{} floats at most",
            PARTIAL_FLOATS
        );
        // A width past the bound on its own: one part.
        assert_eq!(rows_per_part(12288, 50_257 * 768), 12288);
    }
}
