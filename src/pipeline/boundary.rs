//! A boundary tensor (one microbatch's `B x T x w` activations, or their
//! gradient; `w` is the model width `d`, or the bottleneck's code width `b`)
//! as bytes on the wire: plain little-endian f32, or each token's `w`
//! values quantized with one f16 scale and framed
//! ([`crate::compress::frame`]), as the job's `[pipeline.compression]`
//! says. Both directions use the same codec, so the gradient a stage sends
//! back is as coarse as the activations it received: the sender's backward
//! then treats the quantization as the identity (straight-through).

use candle_core::{Device, Tensor};
use thiserror::Error;

use crate::compress::{frame, quantize, Bits, FrameError, QuantError, Quantized, Rounding};
use crate::config::{CompressionSpec, Quant};

#[derive(Debug, Error)]
pub enum BoundaryError {
    #[error("boundary tensor of {got} bytes, expected {expected}")]
    Length { got: usize, expected: usize },
    #[error("boundary frame of {rows} x {width}, expected {want_rows} x {want_width}")]
    Shape {
        rows: usize,
        width: usize,
        want_rows: usize,
        want_width: usize,
    },
    #[error("boundary frame coded as {got:?}, the job says {want:?}")]
    Codec { got: Bits, want: Bits },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error("boundary tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Encodes and decodes the boundary tensors of one job.
#[derive(Debug, Clone, Copy)]
pub struct BoundaryCodec {
    bits: Option<Bits>,
    zstd: bool,
    /// Tokens per microbatch (`B x T`) and the width `w` of what crosses.
    rows: usize,
    width: usize,
    /// The model width `d`: without a bottleneck, `w`.
    stream_width: usize,
}

impl BoundaryCodec {
    /// The codec of `rows x width` boundary tensors of a model whose
    /// residual stream is `stream_width` wide.
    pub fn new(
        spec: CompressionSpec,
        rows: usize,
        width: usize,
        stream_width: usize,
    ) -> BoundaryCodec {
        let bits = match spec.quant {
            Quant::None => None,
            Quant::Int8 => Some(Bits::Int8),
            Quant::Int4 => Some(Bits::Int4),
        };
        BoundaryCodec {
            bits,
            zstd: spec.zstd,
            rows,
            width,
            stream_width,
        }
    }

    /// Bytes of the residual stream at the boundary as computed (f32):
    /// what would cross without bottleneck and codec, the numerator of the
    /// compression ratio.
    pub fn dense_bytes(&self) -> usize {
        self.rows * self.stream_width * 4
    }

    pub fn encode(&self, x: &[f32]) -> Result<Vec<u8>, BoundaryError> {
        match self.bits {
            None => Ok(bytemuck::cast_slice(x).to_vec()),
            Some(bits) => {
                let q = quantize(x, self.rows, self.width, bits, Rounding::Nearest)?;
                Ok(frame::encode(&q, self.zstd)?)
            }
        }
    }

    /// [`BoundaryCodec::encode`] of a tensor's values, whatever its shape.
    pub fn encode_tensor(&self, x: &Tensor) -> Result<Vec<u8>, BoundaryError> {
        crate::model::with_f32(x, |values| self.encode(values))?
    }

    /// [`BoundaryCodec::decode`] as a `(batch, rows / batch, width)`
    /// tensor: a microbatch's `B x T` tokens of `width` values.
    pub fn decode_tensor(&self, bytes: &[u8], batch: usize) -> Result<Tensor, BoundaryError> {
        let values = self.decode(bytes)?;
        let shape = (batch, self.rows / batch.max(1), self.width);
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    }

    /// The tensor back, refusing anything but this job's shape and codec.
    pub fn decode(&self, bytes: &[u8]) -> Result<Vec<f32>, BoundaryError> {
        match self.decode_codes(bytes)? {
            Some(q) => Ok(q.dequantize()),
            None => Ok(bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
        }
    }

    /// The frame's codes and scales as they came, checked as
    /// [`BoundaryCodec::decode`] checks them, for a GPU that dequantizes
    /// them itself; `None` when this job sends plain `f32` (whose length
    /// is checked too).
    pub fn decode_codes(&self, bytes: &[u8]) -> Result<Option<Quantized>, BoundaryError> {
        let Some(want) = self.bits else {
            let expected = self.rows * self.width * 4;
            if bytes.len() != expected {
                return Err(BoundaryError::Length {
                    got: bytes.len(),
                    expected,
                });
            }
            return Ok(None);
        };
        let q = frame::decode(bytes, self.rows * self.width)?;
        if (q.rows(), q.width()) != (self.rows, self.width) {
            return Err(BoundaryError::Shape {
                rows: q.rows(),
                width: q.width(),
                want_rows: self.rows,
                want_width: self.width,
            });
        }
        if q.bits() != want {
            return Err(BoundaryError::Codec {
                got: q.bits(),
                want,
            });
        }
        Ok(Some(q))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec(quant: Quant, zstd: bool) -> BoundaryCodec {
        BoundaryCodec::new(
            CompressionSpec {
                bottleneck: None,
                quant,
                zstd,
            },
            6,
            128,
            128,
        )
    }

    fn tensor() -> Vec<f32> {
        (0..6 * 128)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect()
    }

    #[test]
    fn plain_f32_round_trips_exactly_and_quantized_within_half_a_step() {
        let x = tensor();
        let plain = codec(Quant::None, false);
        assert_eq!(plain.decode(&plain.encode(&x).unwrap()).unwrap(), x);
        for (quant, qmax) in [(Quant::Int8, 127.0), (Quant::Int4, 7.0)] {
            let c = codec(quant, true);
            let bytes = c.encode(&x).unwrap();
            assert!(
                bytes.len() * 3 < c.dense_bytes(),
                "{quant:?}: {}",
                bytes.len()
            );
            let y = c.decode(&bytes).unwrap();
            for (row_x, row_y) in x.chunks(128).zip(y.chunks(128)) {
                let max = row_x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for (a, b) in row_x.iter().zip(row_y) {
                    // Half a step of the (rounded-up f16) scale.
                    assert!((a - b).abs() <= 0.5 * max / qmax * 1.001, "{quant:?}");
                }
            }
        }
    }

    #[test]
    fn frames_of_another_shape_or_codec_are_refused() {
        let x = tensor();
        let int8 = codec(Quant::Int8, false);
        let bytes = int8.encode(&x).unwrap();
        let int4 = codec(Quant::Int4, false);
        assert!(matches!(
            int4.decode(&bytes),
            Err(BoundaryError::Codec { .. })
        ));
        let narrow = BoundaryCodec::new(
            CompressionSpec {
                bottleneck: None,
                quant: Quant::Int8,
                zstd: false,
            },
            12,
            64,
            64,
        );
        assert!(matches!(
            narrow.decode(&bytes),
            Err(BoundaryError::Shape { .. })
        ));
        let plain = codec(Quant::None, false);
        assert!(matches!(
            plain.decode(&bytes),
            Err(BoundaryError::Length { .. })
        ));
    }
}
