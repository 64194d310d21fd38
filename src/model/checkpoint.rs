//! A stage's weights as a safetensors file.
//!
//! Tensors carry their global names (`h.3.mlp.c_fc.weight`) and `f32`
//! little-endian data; the metadata records the stage and the weights
//! digest, which loading checks, so a torn or edited file is refused.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::{digest, ModelError, StageModel};

const DIGEST_KEY: &str = "swarmrun.weights_blake3";
const STAGE_KEY: &str = "swarmrun.stage";

impl StageModel {
    /// Writes the weights to `path` atomically (temporary file, fsync,
    /// rename), so a reader never sees half a checkpoint.
    pub fn save_safetensors(&self, path: &Path) -> Result<(), ModelError> {
        let flat = self.params_flat()?;
        let bytes: Vec<u8> = flat.iter().flat_map(|x| x.to_le_bytes()).collect();
        let views = self
            .layout()
            .iter()
            .map(|p| {
                let data = &bytes[p.offset * 4..p.range().end * 4];
                Ok((
                    p.name.as_str(),
                    TensorView::new(Dtype::F32, p.shape.clone(), data)?,
                ))
            })
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
            .map_err(|e| ModelError::checkpoint(path, e))?;
        let metadata = HashMap::from([
            (DIGEST_KEY.to_string(), digest(&flat).to_hex().to_string()),
            (
                STAGE_KEY.to_string(),
                format!("{}/{}", self.stage(), self.n_stages()),
            ),
        ]);
        let file = safetensors::serialize(views, Some(metadata))
            .map_err(|e| ModelError::checkpoint(path, e))?;
        crate::fsutil::write_atomic(path, &file).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads weights written by [`StageModel::save_safetensors`] for the
    /// same stage of the same model: every tensor of the layout must be
    /// there with its shape, and the data must match the recorded digest.
    pub fn load_safetensors(&mut self, path: &Path) -> Result<(), ModelError> {
        let file = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let st = SafeTensors::deserialize(&file).map_err(|e| ModelError::checkpoint(path, e))?;
        if st.len() != self.layout().len() {
            return Err(ModelError::checkpoint(
                path,
                format!(
                    "{} tensors, but this stage has {}",
                    st.len(),
                    self.layout().len()
                ),
            ));
        }
        let mut flat = Vec::with_capacity(self.numel());
        for p in self.layout() {
            let view = st
                .tensor(&p.name)
                .map_err(|e| ModelError::checkpoint(path, e))?;
            if view.dtype() != Dtype::F32 || view.shape() != p.shape.as_slice() {
                return Err(ModelError::checkpoint(
                    path,
                    format!(
                        "{} is {:?} {:?}, expected F32 {:?}",
                        p.name,
                        view.dtype(),
                        view.shape(),
                        p.shape
                    ),
                ));
            }
            flat.extend(
                view.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        let (_, meta) =
            SafeTensors::read_metadata(&file).map_err(|e| ModelError::checkpoint(path, e))?;
        let recorded = meta.metadata().as_ref().and_then(|m| m.get(DIGEST_KEY));
        let actual = digest(&flat).to_hex().to_string();
        if recorded != Some(&actual) {
            return Err(ModelError::checkpoint(
                path,
                format!("weights digest {actual} does not match the recorded {recorded:?}"),
            ));
        }
        self.set_params_flat(&flat)
    }
}
