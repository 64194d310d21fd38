//! A stage's weights, and optionally its AdamW state, as a safetensors file.
//!
//! Tensors carry their global names (`h.3.mlp.c_fc.weight`) and `f32`
//! little-endian data; the metadata records the stage and the weights
//! digest, which loading checks, so a torn or edited file is refused.
//! With the optimizer, the file also holds its moments as two flat tensors
//! (`adamw.m`, `adamw.v`, in the stage's flat-buffer order) and its step
//! count in the metadata: everything a resumed run needs to take the same
//! next step as an uninterrupted one.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::{digest, AdamW, ModelError, StageModel};

const DIGEST_KEY: &str = "swarmrun.weights_blake3";
const STAGE_KEY: &str = "swarmrun.stage";
const STEP_KEY: &str = "swarmrun.adamw.step";
const MOMENT1: &str = "adamw.m";
const MOMENT2: &str = "adamw.v";

impl StageModel {
    /// Writes the weights to `path` atomically (temporary file, fsync,
    /// rename), so a reader never sees half a checkpoint.
    pub fn save_safetensors(&self, path: &Path) -> Result<(), ModelError> {
        let file = self.to_safetensors(None, path)?;
        crate::fsutil::write_atomic(path, &file).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The bytes of a safetensors file with the weights and, if `opt` is
    /// given, its moments and step. Returned rather than written so that
    /// the caller can hash exactly what it writes; `path` only names the
    /// file in errors.
    pub fn to_safetensors(&self, opt: Option<&AdamW>, path: &Path) -> Result<Vec<u8>, ModelError> {
        let flat = self.params_flat()?;
        let weights = le_bytes(&flat);
        let mut tensors: Vec<(&str, Vec<usize>, &[u8])> = self
            .layout()
            .iter()
            .map(|p| {
                let data = &weights[p.offset * 4..p.range().end * 4];
                (p.name.as_str(), p.shape.clone(), data)
            })
            .collect();
        let mut metadata = HashMap::from([
            (DIGEST_KEY.to_string(), digest(&flat).to_hex().to_string()),
            (
                STAGE_KEY.to_string(),
                format!("{}/{}", self.stage(), self.n_stages()),
            ),
        ]);
        let moments = match opt {
            Some(opt) => {
                let (m, v) = opt.moments();
                super::stage::check_flat_len(m.len(), flat.len())?;
                metadata.insert(STEP_KEY.to_string(), opt.steps_taken().to_string());
                Some((le_bytes(m), le_bytes(v)))
            }
            None => None,
        };
        if let Some((m, v)) = &moments {
            tensors.push((MOMENT1, vec![flat.len()], m));
            tensors.push((MOMENT2, vec![flat.len()], v));
        }
        let views = tensors
            .into_iter()
            .map(|(name, shape, data)| Ok((name, TensorView::new(Dtype::F32, shape, data)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
            .map_err(|e| ModelError::checkpoint(path, e))?;
        safetensors::serialize(views, Some(metadata)).map_err(|e| ModelError::checkpoint(path, e))
    }

    /// Reads weights written by [`StageModel::save_safetensors`] for the
    /// same stage of the same model: every tensor of the layout must be
    /// there with its shape, and the data must match the recorded digest.
    pub fn load_safetensors(&mut self, path: &Path) -> Result<(), ModelError> {
        let file = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        self.load_safetensors_bytes(&file, path, None)
    }

    /// Loads the bytes of a file written by [`StageModel::to_safetensors`]
    /// (`path` only names it in errors): the weights always, and the
    /// optimizer state into `opt` if given, which the file must then hold.
    /// Nothing is changed unless the whole file checks out.
    pub fn load_safetensors_bytes(
        &mut self,
        file: &[u8],
        path: &Path,
        opt: Option<&mut AdamW>,
    ) -> Result<(), ModelError> {
        let st = SafeTensors::deserialize(file).map_err(|e| ModelError::checkpoint(path, e))?;
        let foreign = st.names().into_iter().find(|name| {
            ![MOMENT1, MOMENT2].contains(name) && !self.layout().iter().any(|p| p.name == *name)
        });
        if let Some(name) = foreign {
            return Err(ModelError::checkpoint(
                path,
                format!(
                    "tensor {name} is not a parameter of stage {} of this model",
                    self.stage()
                ),
            ));
        }
        let mut flat = Vec::with_capacity(self.numel());
        for p in self.layout() {
            flat.extend(read_f32(&st, &p.name, &p.shape, path)?);
        }
        let (_, meta) =
            SafeTensors::read_metadata(file).map_err(|e| ModelError::checkpoint(path, e))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let recorded = meta.get(DIGEST_KEY);
        let actual = digest(&flat).to_hex().to_string();
        if recorded != Some(&actual) {
            return Err(ModelError::checkpoint(
                path,
                format!("weights digest {actual} does not match the recorded {recorded:?}"),
            ));
        }
        if let Some(opt) = opt {
            let m = read_f32(&st, MOMENT1, &[flat.len()], path)?;
            let v = read_f32(&st, MOMENT2, &[flat.len()], path)?;
            let step = meta
                .get(STEP_KEY)
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| {
                    ModelError::checkpoint(path, format!("no valid {STEP_KEY} in the metadata"))
                })?;
            opt.restore(step, &m, &v)?;
        }
        self.set_params_flat(&flat)
    }
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Tensor `name` of `st`, which must be `f32` of `shape`.
fn read_f32(
    st: &SafeTensors<'_>,
    name: &str,
    shape: &[usize],
    path: &Path,
) -> Result<Vec<f32>, ModelError> {
    let view = st
        .tensor(name)
        .map_err(|_| ModelError::checkpoint(path, format!("missing tensor {name}")))?;
    if view.dtype() != Dtype::F32 || view.shape() != shape {
        return Err(ModelError::checkpoint(
            path,
            format!(
                "{name} is {:?} {:?}, expected F32 {shape:?}",
                view.dtype(),
                view.shape()
            ),
        ));
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}
