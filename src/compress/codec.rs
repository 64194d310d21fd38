//! The codec a job asks for at its stage boundaries, as the job file's
//! `[pipeline.compression]` table will spell it: `quant = "int8" | "int4" |
//! "none"`, `zstd = true | false`.

use serde::Deserialize;

use super::quant::Bits;

/// Quantization of boundary tensors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    /// Tensors cross in f32, uncompressed.
    #[default]
    None,
    Int8,
    Int4,
}

impl Quant {
    /// The code width, or `None` when tensors are not quantized.
    pub fn bits(self) -> Option<Bits> {
        match self {
            Quant::None => None,
            Quant::Int8 => Some(Bits::Int8),
            Quant::Int4 => Some(Bits::Int4),
        }
    }
}

/// A boundary codec: quantization, then optionally zstd over the frame's
/// scales and codes. The default sends tensors as they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Codec {
    #[serde(default)]
    pub quant: Quant,
    #[serde(default)]
    pub zstd: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_reads_the_job_file_spelling() {
        let c: Codec = toml::from_str("quant = \"int4\"\nzstd = true").unwrap();
        assert_eq!(c.quant.bits(), Some(Bits::Int4));
        assert!(c.zstd);
        let c: Codec = toml::from_str("quant = \"none\"").unwrap();
        assert_eq!(c, Codec::default());
        assert!(toml::from_str::<Codec>("quant = \"int2\"").is_err());
        assert!(toml::from_str::<Codec>("quant = \"int8\"\nlevel = 3").is_err());
    }
}
