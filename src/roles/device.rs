//! Where a miner or validator runs its stage passes: the CPU, through
//! [`StageModel`], or a CUDA GPU, through [`crate::gpu::CudaStage`] (site
//! `device = "cuda"`, cargo feature `cuda`).
//!
//! The model itself (weights, AdamW, gradient sums, digests, checkpoints)
//! stays a host [`StageModel`] on either device; a GPU gets the weights
//! before each window's passes. So the collectives, receipts and ledger see
//! the same flat `f32` buffers whichever device computed them.

use candle_core::Tensor;

use super::TrainError;
use crate::collective::{
    all_reduce_redundant_moved, Call, CollectiveError, Handing, OverTransport, ReduceOp,
    SliceCopies, SliceTamper,
};
use crate::compress::Quantized;
use crate::config::{Device, Fabric};
use crate::model::{Pass, PassGrads, StageInput, StageModel};
use crate::pipeline::{BoundaryCodec, BoundaryError};
use crate::transport::Transport;

/// A rank's compute device, opened once.
pub struct StageDevice {
    inner: Inner,
}

/// A rank's site as its stage work sees it: where passes run, and how the
/// stage's all-reduce moves inside the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteFabric {
    pub device: Device,
    pub fabric: Fabric,
}

enum Inner {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda {
        gpu: std::sync::Arc<crate::gpu::Gpu>,
        /// The stage on the GPU, once a window ran.
        stage: Option<Box<crate::gpu::CudaStage>>,
        /// Whether the site's fabric is NCCL, and its communicator among
        /// the stage's miners of the site, once made.
        nccl: bool,
        mover: Option<Box<crate::gpu::nccl::NcclMover>>,
    },
}

/// A forward pass kept for its backward pass, on either device.
pub(crate) enum DevicePass {
    Cpu(Pass),
    #[cfg(feature = "cuda")]
    Cuda {
        pass: Box<crate::gpu::CudaPass>,
        /// `(B, T, width)` of the output.
        shape: (usize, usize, usize),
    },
}

impl DevicePass {
    /// The boundary tensor to send on (a non-last stage).
    pub(crate) fn output(&self) -> Result<Tensor, TrainError> {
        match self {
            DevicePass::Cpu(pass) => Ok(pass.output().clone()),
            #[cfg(feature = "cuda")]
            DevicePass::Cuda { pass, shape } => Ok(Tensor::from_slice(
                pass.output(),
                *shape,
                &candle_core::Device::Cpu,
            )?),
        }
    }

    /// The microbatch's loss (the last stage).
    pub(crate) fn loss(&self) -> Result<f32, TrainError> {
        match self {
            DevicePass::Cpu(pass) => Ok(pass.loss()?),
            #[cfg(feature = "cuda")]
            DevicePass::Cuda { pass, .. } => match pass.output() {
                [loss] => Ok(*loss),
                _ => Err(crate::model::ModelError::NotLastStage.into()),
            },
        }
    }
}

impl StageDevice {
    /// Opens the device of a rank's site for a rank with `local_rank` on its
    /// host.
    pub fn open(site: SiteFabric, local_rank: usize) -> Result<StageDevice, TrainError> {
        let inner = match site.device {
            Device::Cpu => Inner::Cpu,
            #[cfg(feature = "cuda")]
            Device::Cuda => {
                let gpus = crate::gpu::Gpu::count()?.max(1);
                let gpu = crate::gpu::Gpu::new(local_rank % gpus)?;
                tracing::info!("stage passes on GPU {} ({})", local_rank % gpus, gpu.name());
                Inner::Cuda {
                    gpu,
                    stage: None,
                    nccl: site.fabric == Fabric::Nccl,
                    mover: None,
                }
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => {
                let _ = local_rank;
                return Err(TrainError::DeviceNotBuilt(site.device));
            }
        };
        Ok(StageDevice { inner })
    }

    /// The CPU, which needs nothing opened: a device that can be made on
    /// any thread, where one opened on another cannot be sent.
    pub(crate) fn cpu() -> StageDevice {
        StageDevice { inner: Inner::Cpu }
    }

    pub(crate) fn is_cpu(&self) -> bool {
        matches!(self.inner, Inner::Cpu)
    }

    /// Gives the device `model`'s stage and current weights: before a
    /// window's passes, and after any step, rewind or move of stage.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(crate) fn prepare(&mut self, model: &StageModel) -> Result<(), TrainError> {
        match &mut self.inner {
            Inner::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Inner::Cuda { gpu, stage, .. } => {
                match stage {
                    Some(s) if s.stage() == model.stage() => {
                        s.set_params_flat(&model.params_flat()?)?
                    }
                    _ => *stage = Some(Box::new(crate::gpu::CudaStage::new(gpu.clone(), model)?)),
                }
                Ok(())
            }
        }
    }

    /// The stage's redundant all-reduce of fixed-point `sums` among the
    /// miners of this rank's site (`call`'s ranks, `members` as the job
    /// numbers them), with `tamper` on the slices it reduces and the
    /// reduced slices handed out as `handing` says: through NCCL when the
    /// site's fabric is `nccl`, else over the call's transport. A
    /// communicator is made for each new set of members (over the call's
    /// transport, on the tag after the call's) and dropped, which aborts
    /// it, when a call through it fails.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(crate) fn site_all_reduce<T: Transport + ?Sized>(
        &mut self,
        call: Call<'_, T>,
        sums: &mut [i64],
        copies: usize,
        (tamper, handing): (Option<&SliceTamper<'_, i64>>, Handing<'_, i64>),
        members: &[usize],
    ) -> Result<SliceCopies, CollectiveError> {
        match &mut self.inner {
            #[cfg(feature = "cuda")]
            Inner::Cuda {
                gpu,
                nccl: true,
                mover,
                ..
            } => {
                use crate::gpu::nccl::NcclMover;
                if mover.as_ref().map(|m| m.members()) != Some(members) {
                    *mover = None;
                    let mut setup = Call::new(call.transport, call.tag + 1);
                    setup.deadline = call.deadline;
                    let made = NcclMover::connect(gpu.clone(), setup, members.to_vec());
                    *mover = Some(Box::new(made.map_err(|e| match e {
                        crate::gpu::GpuError::Collective(e) => e,
                        other => CollectiveError::InvalidArgument(format!("NCCL: {other}")),
                    })?));
                }
                let Some(m) = mover.as_deref_mut() else {
                    return Err(CollectiveError::InvalidArgument(
                        "no NCCL communicator".into(),
                    ));
                };
                let reduced = all_reduce_redundant_moved(
                    call,
                    sums,
                    (ReduceOp::Sum, copies),
                    tamper,
                    handing,
                    m,
                );
                if reduced.is_err() {
                    *mover = None;
                }
                reduced
            }
            _ => all_reduce_redundant_moved(
                call,
                sums,
                (ReduceOp::Sum, copies),
                tamper,
                handing,
                &mut OverTransport,
            ),
        }
    }

    /// The input frame's codes for [`StageDevice::forward`]: a GPU
    /// dequantizes them itself, fused into a bottleneck's up-projection;
    /// `None` on the CPU, without a frame, or for plain `f32` frames.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(crate) fn codes_of(
        &self,
        codec: &BoundaryCodec,
        frame: Option<&[u8]>,
    ) -> Result<Option<Quantized>, BoundaryError> {
        match (&self.inner, frame) {
            #[cfg(feature = "cuda")]
            (Inner::Cuda { .. }, Some(frame)) => codec.decode_codes(frame),
            _ => Ok(None),
        }
    }

    /// `model.forward` on this device (after [`StageDevice::prepare`]).
    /// `codes`: the input frame's codes ([`StageDevice::codes_of`]); a GPU
    /// then computes from them instead of the decoded tensor in `input`.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(crate) fn forward(
        &self,
        model: &StageModel,
        input: StageInput<'_>,
        targets: Option<&Tensor>,
        codes: Option<&Quantized>,
    ) -> Result<DevicePass, TrainError> {
        match &self.inner {
            Inner::Cpu => Ok(DevicePass::Cpu(model.forward(input, targets)?)),
            #[cfg(feature = "cuda")]
            Inner::Cuda { stage, .. } => {
                let stage = stage.as_ref().ok_or(TrainError::DeviceUnprepared)?;
                let (ids, acts) = match input {
                    StageInput::Tokens(ids) => (ids, None),
                    StageInput::Activations(x, ids) => (ids, Some(x)),
                };
                let (b, t) = ids.dims2()?;
                let ids = ids.flatten_all()?.to_vec1::<u32>()?;
                let targets = targets
                    .map(|t| t.flatten_all()?.to_vec1::<u32>())
                    .transpose()?;
                // With the frame's codes the decoded tensor goes unused.
                let values = match codes {
                    Some(_) => None,
                    None => acts.map(host_f32).transpose()?,
                };
                let data = match (codes, &values) {
                    (Some(q), _) => Some(crate::gpu::StageData::Codes(q)),
                    (None, Some(v)) => Some(crate::gpu::StageData::Values(v)),
                    (None, None) => None,
                };
                let pass = stage.forward(&ids, b, data, targets.as_deref())?;
                let width = model.config().boundary_width();
                Ok(DevicePass::Cuda {
                    pass: Box::new(pass),
                    shape: (b, t, width),
                })
            }
        }
    }

    /// `model.gradients` on this device.
    pub(crate) fn gradients(
        &self,
        model: &StageModel,
        pass: DevicePass,
        grad_output: Option<&Tensor>,
    ) -> Result<PassGrads, TrainError> {
        match (&self.inner, pass) {
            (_, DevicePass::Cpu(pass)) => Ok(model.gradients(pass, grad_output)?),
            #[cfg(feature = "cuda")]
            (Inner::Cuda { stage, .. }, DevicePass::Cuda { pass, shape }) => {
                let stage = stage.as_ref().ok_or(TrainError::DeviceUnprepared)?;
                let grad = grad_output.map(host_f32).transpose()?;
                let grads = stage.gradients(*pass, grad.as_deref())?;
                let (b, t, _) = shape;
                let width = model.config().boundary_width();
                let input = grads
                    .input
                    .map(|g| Tensor::from_vec(g, (b, t, width), &candle_core::Device::Cpu))
                    .transpose()?;
                Ok(PassGrads {
                    params: grads.params,
                    input,
                })
            }
            #[cfg(feature = "cuda")]
            (Inner::Cpu, DevicePass::Cuda { .. }) => Err(TrainError::DeviceUnprepared),
        }
    }
}

/// A tensor's values as flat `f32`s, for a GPU stage.
#[cfg(feature = "cuda")]
fn host_f32(x: &Tensor) -> candle_core::Result<Vec<f32>> {
    x.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()
}
