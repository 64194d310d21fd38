//! A whole pipeline in one process: the reference a distributed run is
//! checked against, and a plain single-machine trainer.

use rayon::prelude::*;

use super::stage::{Pass, PassGrads, StageInput, StageModel};
use super::{batch_tensors, AdamW, AdamWConfig, GptConfig, ModelError};
use crate::data::Batch;

/// Every stage of one model with its optimizer, boundary tensors and their
/// gradients handed from stage to stage in memory exactly as a pipeline
/// would send them over the network.
#[derive(Debug)]
pub struct LocalPipeline {
    stages: Vec<StageModel>,
    optimizers: Vec<AdamW>,
}

impl LocalPipeline {
    /// All stages of the model split as `layers`, initialized from `seed`.
    pub fn new(
        config: &GptConfig,
        layers: &[usize],
        seed: u64,
        adamw: &AdamWConfig,
    ) -> Result<Self, ModelError> {
        // At least one stage, so an empty split gets StageModel's error.
        let stages = (0..layers.len().max(1))
            .map(|s| StageModel::new(config, layers, s, seed))
            .collect::<Result<Vec<_>, _>>()?;
        let optimizers = stages
            .iter()
            .map(|s| AdamW::new(adamw.clone(), s.layout()))
            .collect();
        Ok(LocalPipeline { stages, optimizers })
    }

    pub fn stages(&self) -> &[StageModel] {
        &self.stages
    }

    /// One optimizer step: forward and backward of each microbatch through
    /// every stage, then AdamW on each stage with the gradients averaged
    /// over the microbatches. Returns the mean loss before the step.
    ///
    /// Microbatches run concurrently on rayon's threads, as the miners of
    /// a swarm would run them side by side; their gradients are added in
    /// microbatch order, so the result is the same on any number of
    /// threads.
    pub fn train_step(&mut self, microbatches: &[Batch]) -> Result<f32, ModelError> {
        if microbatches.is_empty() {
            return Err(ModelError::NoMicrobatches);
        }
        let results = microbatches
            .par_iter()
            .map(|batch| self.microbatch(batch))
            .collect::<Result<Vec<_>, _>>()?;
        let mut loss_sum = 0.0;
        for (loss, grads) in &results {
            loss_sum += loss;
            for (stage, grads) in self.stages.iter_mut().zip(grads) {
                stage.accumulate(grads)?;
            }
        }
        let scale = 1.0 / microbatches.len() as f32;
        for (stage, opt) in self.stages.iter_mut().zip(&mut self.optimizers) {
            let grads = stage.grads_flat();
            stage.optimizer_step(opt, &grads, scale)?;
            stage.zero_grads();
        }
        Ok(loss_sum / microbatches.len() as f32)
    }

    /// Loss and per-stage gradients of one microbatch: the boundary
    /// gradient each stage returns is what the stage before it receives.
    fn microbatch(&self, batch: &Batch) -> Result<(f32, Vec<PassGrads>), ModelError> {
        let passes = self.forward(batch)?;
        let loss = last_loss(&passes)?;
        let mut grads = Vec::with_capacity(passes.len());
        for (stage, pass) in self.stages.iter().zip(passes).rev() {
            let grad_output = grads.last().and_then(|g: &PassGrads| g.input.as_ref());
            grads.push(stage.gradients(pass, grad_output)?);
        }
        grads.reverse();
        Ok((loss, grads))
    }

    /// Mean cross-entropy of `batch` under the current weights.
    pub fn loss(&self, batch: &Batch) -> Result<f32, ModelError> {
        last_loss(&self.forward(batch)?)
    }

    /// The parameters of all stages, concatenated in stage order; equal to
    /// the single-stage model's flat buffer.
    pub fn params_flat(&self) -> Result<Vec<f32>, ModelError> {
        let mut flat = Vec::new();
        for stage in &self.stages {
            flat.extend(stage.params_flat()?);
        }
        Ok(flat)
    }

    fn forward(&self, batch: &Batch) -> Result<Vec<Pass>, ModelError> {
        let (ids, targets) = batch_tensors(batch)?;
        let mut passes: Vec<Pass> = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            let input = match passes.last() {
                None => StageInput::Tokens(&ids),
                Some(prev) => StageInput::Activations(prev.output(), &ids),
            };
            let targets = stage.is_last().then_some(&targets);
            passes.push(stage.forward(input, targets)?);
        }
        Ok(passes)
    }
}

fn last_loss(passes: &[Pass]) -> Result<f32, ModelError> {
    passes.last().ok_or(ModelError::NotLastStage)?.loss()
}
