//! Compression of the tensors that cross a pipeline stage boundary
//! (activations forward, their gradients backward): per-row int8 or int4
//! quantization (`quant`, with the per-element arithmetic that CPU and GPU
//! share in `scalar`, and its AVX2 kernels in `simd`), the wire frame that carries it (`frame`), error
//! feedback for gradients (`feedback`), and the CUDA kernels of the same
//! layout (`cuda`, feature `cuda`). The job file chooses the codec in
//! `[pipeline.compression]` (`crate::config::CompressionSpec`). The learned bottleneck that shrinks the width first belongs to
//! the model.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod feedback;
pub mod frame;
pub mod quant;
mod scalar;
mod simd;

pub use feedback::ErrorFeedback;
pub use frame::{compression_ratio, FrameError};
pub use quant::{quantize, Bits, QuantError, Quantized, Rounding};
