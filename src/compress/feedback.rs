//! Error feedback: what quantization drops from one tensor is added to the
//! next one sent over the same boundary, so the errors do not accumulate
//! over steps (the sum of what was received tracks the sum of what was
//! sent to within one step's error), as gradient compressors do.

use super::quant::{quantize, Bits, QuantError, Quantized, Rounding};

/// The residual carried between the tensors of one boundary.
#[derive(Debug, Default)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// Quantizes `x` plus the carried residual and keeps, as the next
    /// residual, what the codes miss of that sum. A tensor of another size
    /// than the last starts from a zero residual.
    pub fn quantize(
        &mut self,
        x: &[f32],
        rows: usize,
        width: usize,
        bits: Bits,
        rounding: Rounding,
    ) -> Result<Quantized, QuantError> {
        if self.residual.len() != x.len() {
            self.residual = vec![0.0; x.len()];
        }
        for (r, &v) in self.residual.iter_mut().zip(x) {
            *r += v;
        }
        let q = quantize(&self.residual, rows, width, bits, rounding)?;
        let sent = q.dequantize();
        for (r, s) in self.residual.iter_mut().zip(sent) {
            *r -= s;
        }
        Ok(q)
    }
}
