//! One pipeline stage's forward and backward pass on the GPU: the same
//! model as [`StageModel`] (same parameters, names, flat order and
//! formulas), written out layer by layer with the backward pass by hand,
//! as llm.c does, instead of through an autograd graph.

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use super::{Buf, Gpu, GpuError, Matmul};
use crate::compress::{Bits, Quantized};
use crate::model::{GptConfig, ModelError, ParamInfo, StageModel};

/// The boundary tensor a stage after the first gets.
#[derive(Debug, Clone, Copy)]
pub enum StageData<'a> {
    /// `B * T * w` floats (a job without a codec, or decoded on the host).
    Values(&'a [f32]),
    /// A frame's codes and scales as they came off the wire: the GPU
    /// dequantizes them, into the bottleneck's up-projection when the
    /// stage has one (`dequantize_project`).
    Codes(&'a Quantized),
}

impl StageData<'_> {
    fn len(&self) -> usize {
        match self {
            StageData::Values(v) => v.len(),
            StageData::Codes(q) => q.rows() * q.width(),
        }
    }
}

/// A stage's weights on one GPU, and the passes over them.
pub struct CudaStage {
    gpu: Arc<Gpu>,
    config: GptConfig,
    stage: usize,
    layout: Vec<ParamInfo>,
    weights: Vec<Buf>,
    parts: Parts,
}

/// Where each layer's parameters sit in the layout.
#[derive(Debug)]
struct Parts {
    /// `wte`, `wpe` (stage 0).
    embeddings: Option<[usize; 2]>,
    /// `up`, `wte`, `wpe` of the bottleneck's receiving half.
    up: Option<[usize; 3]>,
    /// `ln_1`, `c_attn`, `attn.c_proj`, `ln_2`, `c_fc`, `mlp.c_proj`.
    blocks: Vec<[usize; 6]>,
    /// `ln`, `down` of the bottleneck's sending half.
    down: Option<[usize; 2]>,
    /// `ln_f`, `lm_head` (last stage).
    head: Option<[usize; 2]>,
}

/// A LayerNorm's output and what its backward pass needs.
struct Norm {
    out: Buf,
    xhat: Buf,
    rstd: Buf,
}

/// What a block's backward pass needs of its forward pass.
struct BlockActs {
    ln_1: Norm,
    /// q, k, v as `(B, nh, T, hs)`.
    q: Buf,
    k: Buf,
    v: Buf,
    /// The causal softmax's output `(B * nh, T, T)`.
    att: Buf,
    /// The heads' outputs merged `(N, C)`: the attention projection's input.
    y: Buf,
    ln_2: Norm,
    /// The MLP's first projection before and after GELU `(N, 4C)`.
    h_pre: Buf,
    h: Buf,
}

/// A forward pass kept on the GPU for its backward pass.
pub struct CudaPass {
    b: usize,
    t: usize,
    ids: CudaSlice<u32>,
    targets: Option<CudaSlice<u32>>,
    /// The bottleneck's code that came in (later stages with a
    /// bottleneck), for the up-projection's weight gradient.
    input: Option<Buf>,
    blocks: Vec<BlockActs>,
    /// The LayerNorm before the down-projection or the LM head.
    norm: Option<Norm>,
    logits: Option<Buf>,
    output: Vec<f32>,
}

impl CudaPass {
    /// The boundary tensor `(B, T, w)` to send on, or `[loss]` on the last
    /// stage.
    pub fn output(&self) -> &[f32] {
        &self.output
    }
}

/// A backward pass's results, on the host.
pub struct CudaGrads {
    /// Parameter gradients, flat, in the stage's layout order.
    pub params: Vec<f32>,
    /// Gradient of the input boundary tensor (`None` on stage 0).
    pub input: Option<Vec<f32>>,
}

impl CudaStage {
    /// `model`'s stage on `gpu`, with `model`'s current weights.
    pub fn new(gpu: Arc<Gpu>, model: &StageModel) -> Result<CudaStage, GpuError> {
        let layout = model.layout().to_vec();
        let index = |name: String| {
            layout
                .iter()
                .position(|p| p.name == name)
                .ok_or(GpuError::MissingParam(name))
        };
        let config = model.config().clone();
        let s = model.stage();
        let parts = Parts {
            embeddings: match model.is_first() {
                true => Some([index("wte.weight".into())?, index("wpe.weight".into())?]),
                false => None,
            },
            up: match (config.bottleneck, model.is_first()) {
                (Some(_), false) => Some([
                    index(format!("boundary.{}.up.weight", s - 1))?,
                    index(format!("boundary.{}.wte.weight", s - 1))?,
                    index(format!("boundary.{}.wpe.weight", s - 1))?,
                ]),
                _ => None,
            },
            blocks: model
                .blocks()
                .map(|i| {
                    Ok([
                        index(format!("h.{i}.ln_1.weight"))?,
                        index(format!("h.{i}.attn.c_attn.weight"))?,
                        index(format!("h.{i}.attn.c_proj.weight"))?,
                        index(format!("h.{i}.ln_2.weight"))?,
                        index(format!("h.{i}.mlp.c_fc.weight"))?,
                        index(format!("h.{i}.mlp.c_proj.weight"))?,
                    ])
                })
                .collect::<Result<_, GpuError>>()?,
            down: match (config.bottleneck, model.is_last()) {
                (Some(_), false) => Some([
                    index(format!("boundary.{s}.ln.weight"))?,
                    index(format!("boundary.{s}.down.weight"))?,
                ]),
                _ => None,
            },
            head: match model.is_last() {
                true => Some([
                    index("ln_f.weight".into())?,
                    index("lm_head.weight".into())?,
                ]),
                false => None,
            },
        };
        let flat = model.params_flat()?;
        let weights = layout
            .iter()
            .map(|p| gpu.upload(&flat[p.range()]))
            .collect::<Result<_, _>>()?;
        Ok(CudaStage {
            gpu,
            config,
            stage: s,
            layout,
            weights,
            parts,
        })
    }

    /// Which stage of the model this is.
    pub fn stage(&self) -> usize {
        self.stage
    }

    /// Replaces the weights (after an optimizer step on the host).
    pub fn set_params_flat(&mut self, flat: &[f32]) -> Result<(), GpuError> {
        let want: usize = self.layout.iter().map(ParamInfo::numel).sum();
        if flat.len() != want {
            return Err(ModelError::FlatLength {
                got: flat.len(),
                want,
            }
            .into());
        }
        for (p, w) in self.layout.iter().zip(&mut self.weights) {
            self.gpu.upload_into(&flat[p.range()], w)?;
        }
        Ok(())
    }

    /// Runs the stage on `b` sequences of token ids `ids` (`b * T`),
    /// with the boundary tensor `input` (`b * T * w`, every stage but the
    /// first) and the targets (last stage only), as [`StageModel::forward`].
    pub fn forward(
        &self,
        ids: &[u32],
        b: usize,
        input: Option<StageData<'_>>,
        targets: Option<&[u32]>,
    ) -> Result<CudaPass, GpuError> {
        let cfg = &self.config;
        let (c, w) = (cfg.n_embd, cfg.boundary_width());
        let t = ids.len().checked_div(b).unwrap_or(0);
        if b == 0 || t == 0 || b * t != ids.len() || t > cfg.block_size {
            return Err(shape(
                "token ids",
                format!("(B, T <= {})", cfg.block_size),
                ids.len(),
            ));
        }
        let n = b * t;
        self.check_tokens(ids)?;
        if let Some(targets) = targets {
            self.check_tokens(targets)?;
            if targets.len() != n {
                return Err(shape("targets", format!("{n} ids"), targets.len()));
            }
        }
        let is_last = self.parts.head.is_some();
        if targets.is_some() != is_last {
            return Err(ModelError::Targets {
                stage: self.stage,
                needed: is_last,
            }
            .into());
        }
        let gpu = &self.gpu;
        let ids_dev = gpu.upload_slice(ids)?;
        let (mut x, input) = match (self.parts.embeddings, input) {
            (Some([wte, wpe]), None) => {
                let mut x = gpu.zeros(n * c)?;
                gpu.embed_fwd(&mut x, &ids_dev, self.w(wte), self.w(wpe), (t, c))?;
                (x, None)
            }
            (None, Some(input)) => {
                let shaped = match input {
                    StageData::Codes(q) => q.rows() == n && q.width() == w,
                    StageData::Values(_) => true,
                };
                if input.len() != n * w || !shaped {
                    return Err(shape(
                        "input activations",
                        format!("{n} x {w}"),
                        input.len(),
                    ));
                }
                let (code, fused) = match input {
                    StageData::Values(v) => (gpu.upload(v)?, None),
                    StageData::Codes(q) => {
                        let codes = gpu.upload_slice(q.codes())?;
                        let bits: Vec<u16> = q.scales().iter().map(|s| s.to_bits()).collect();
                        let scales = gpu.upload_slice(&bits)?;
                        let int4 = q.bits() == Bits::Int4;
                        let mut code = gpu.zeros(n * w)?;
                        gpu.dequantize(&mut code, (&codes, &scales), (n, w, int4))?;
                        (code, Some((codes, scales, int4)))
                    }
                };
                match self.parts.up {
                    Some([up, wte, wpe]) => {
                        let mut x = match fused {
                            Some((codes, scales, int4)) => {
                                let mut x = gpu.zeros(n * c)?;
                                let shape = (n, w, c, int4);
                                gpu.dequantize_project(
                                    &mut x,
                                    (&codes, &scales),
                                    self.w(up),
                                    shape,
                                )?;
                                x
                            }
                            None => self.linear(&code, up, (n, w, c))?,
                        };
                        let mut emb = gpu.zeros(n * c)?;
                        gpu.embed_fwd(&mut emb, &ids_dev, self.w(wte), self.w(wpe), (t, c))?;
                        gpu.add_assign(&mut x, &emb)?;
                        // The code stays for the up-projection's gradient.
                        (x, Some(code))
                    }
                    // The stream itself crossed: the blocks start from it,
                    // and the input's gradient is the stream's.
                    None => (code, None),
                }
            }
            _ => {
                return Err(ModelError::WrongInput {
                    stage: self.stage,
                    tokens_expected: self.parts.embeddings.is_some(),
                }
                .into())
            }
        };
        let mut blocks = Vec::with_capacity(self.parts.blocks.len());
        for params in &self.parts.blocks {
            let acts = self.block_forward(&mut x, params, (b, t))?;
            blocks.push(acts);
        }
        let mut pass = CudaPass {
            b,
            t,
            ids: ids_dev,
            targets: None,
            input,
            blocks,
            norm: None,
            logits: None,
            output: Vec::new(),
        };
        match (self.parts.head, self.parts.down, targets) {
            (Some([ln_f, lm_head]), _, Some(targets)) => {
                let v = cfg.vocab_size;
                let norm = self.layernorm(&x, ln_f, (n, c))?;
                let logits = self.linear(&norm.out, lm_head, (n, c, v))?;
                let targets = gpu.upload_slice(targets)?;
                let mut losses = gpu.zeros(n)?;
                gpu.cross_entropy(&mut losses, &logits, &targets, (v, false))?;
                let losses = gpu.download(&losses)?;
                // Summed on the host in row order: the same bits each time.
                let sum = losses.iter().fold(0.0f32, |acc, &l| acc + l);
                pass.output = vec![sum / n as f32];
                pass.norm = Some(norm);
                pass.logits = Some(logits);
                pass.targets = Some(targets);
            }
            (None, Some([ln, down]), None) => {
                let norm = self.layernorm(&x, ln, (n, c))?;
                let code = self.linear(&norm.out, down, (n, c, w))?;
                pass.output = gpu.download(&code)?;
                pass.norm = Some(norm);
            }
            (None, None, None) => pass.output = gpu.download(&x)?,
            _ => unreachable!("targets were checked against the head above"),
        }
        Ok(pass)
    }

    /// The backward pass of `pass`, as [`StageModel::gradients`]:
    /// `grad_output` is the gradient of the pass's output sent back by the
    /// next stage (`None` on the last stage, which starts from the loss).
    pub fn gradients(
        &self,
        pass: CudaPass,
        grad_output: Option<&[f32]>,
    ) -> Result<CudaGrads, GpuError> {
        let cfg = &self.config;
        let gpu = &self.gpu;
        let (b, t) = (pass.b, pass.t);
        let (n, c, w, v) = (b * t, cfg.n_embd, cfg.boundary_width(), cfg.vocab_size);
        let mut grads: Vec<Option<Buf>> = (0..self.layout.len()).map(|_| None).collect();
        let mut dx = match (self.parts.head, self.parts.down, grad_output) {
            (Some([ln_f, lm_head]), _, None) => {
                let (Some(norm), Some(logits), Some(targets)) =
                    (&pass.norm, &pass.logits, &pass.targets)
                else {
                    unreachable!("a last stage's pass keeps its head's activations")
                };
                let mut dlogits = gpu.zeros(n * v)?;
                gpu.cross_entropy(&mut dlogits, logits, targets, (v, true))?;
                let dnorm = self.linear_bwd(&norm.out, lm_head, &dlogits, (n, c, v), &mut grads)?;
                self.layernorm_bwd(norm, ln_f, &dnorm, (n, c), &mut grads)?
            }
            (None, down, Some(grad)) => {
                let width = if down.is_some() { w } else { c };
                if grad.len() != n * width {
                    return Err(shape("grad_output", format!("{n} x {width}"), grad.len()));
                }
                let grad = gpu.upload(grad)?;
                match (down, &pass.norm) {
                    (Some([ln, down]), Some(norm)) => {
                        let dnorm =
                            self.linear_bwd(&norm.out, down, &grad, (n, c, w), &mut grads)?;
                        self.layernorm_bwd(norm, ln, &dnorm, (n, c), &mut grads)?
                    }
                    _ => grad,
                }
            }
            (head, _, _) => {
                return Err(ModelError::GradOutput {
                    stage: self.stage,
                    needed: head.is_none(),
                }
                .into())
            }
        };
        for (params, acts) in self.parts.blocks.iter().zip(&pass.blocks).rev() {
            self.block_backward(&mut dx, params, acts, (b, t), &mut grads)?;
        }
        let t_max = cfg.block_size;
        let mut embeddings_bwd = |[wte, wpe]: [usize; 2], dx: &Buf| -> Result<(), GpuError> {
            let mut dwte = gpu.zeros(v * c)?;
            gpu.embed_bwd_wte(&mut dwte, &pass.ids, dx, (v, c))?;
            let mut dwpe = gpu.zeros(t_max * c)?;
            gpu.embed_bwd_wpe(&mut dwpe, dx, (b, t, t_max, c))?;
            grads[wte] = Some(dwte);
            grads[wpe] = Some(dwpe);
            Ok(())
        };
        let input = match (self.parts.embeddings, self.parts.up, &pass.input) {
            (Some(emb), _, _) => {
                embeddings_bwd(emb, &dx)?;
                None
            }
            (None, Some([up, wte, wpe]), Some(code)) => {
                embeddings_bwd([wte, wpe], &dx)?;
                let dcode = self.linear_bwd(code, up, &dx, (n, w, c), &mut grads)?;
                Some(gpu.download(&dcode)?)
            }
            _ => Some(gpu.download(&dx)?),
        };
        let total: usize = self.layout.iter().map(ParamInfo::numel).sum();
        let mut params = vec![0.0f32; total];
        for (info, grad) in self.layout.iter().zip(&grads) {
            let grad = grad
                .as_ref()
                .ok_or_else(|| ModelError::NoGradient(info.name.clone()))?;
            gpu.download_into(grad, &mut params[info.range()])?;
        }
        Ok(CudaGrads { params, input })
    }

    /// A pre-LayerNorm block on `x` (`(B, T, C)`, replaced by the block's
    /// output), as `layers::Block::forward`.
    fn block_forward(
        &self,
        x: &mut Buf,
        &[ln_1, c_attn, attn_proj, ln_2, c_fc, mlp_proj]: &[usize; 6],
        (b, t): (usize, usize),
    ) -> Result<BlockActs, GpuError> {
        let gpu = &self.gpu;
        let c = self.config.n_embd;
        let nh = self.config.n_head;
        let (n, hs, bh) = (b * t, c / nh, b * nh);
        let ln_1 = self.layernorm(x, ln_1, (n, c))?;
        let mut qkv = self.linear(&ln_1.out, c_attn, (n, c, 3 * c))?;
        let (mut q, mut k, mut v) = (gpu.zeros(n * c)?, gpu.zeros(n * c)?, gpu.zeros(n * c)?);
        gpu.qkv_heads(&mut qkv, [&mut q, &mut k, &mut v], (b, t, nh, hs), false)?;
        let scores = self.product(&q, &k, batched(t, hs, t, false, true, bh))?;
        let mut att = gpu.zeros(bh * t * t)?;
        let scale = 1.0 / (hs as f64).sqrt();
        gpu.causal_softmax_fwd(&mut att, &scores, (bh * t, t, scale as f32))?;
        let mut heads = self.product(&att, &v, batched(t, t, hs, false, false, bh))?;
        let mut y = gpu.zeros(n * c)?;
        gpu.merge_heads(&mut y, &mut heads, (b, t, nh, hs), false)?;
        let a = self.linear(&y, attn_proj, (n, c, c))?;
        gpu.add_assign(x, &a)?;
        let ln_2 = self.layernorm(x, ln_2, (n, c))?;
        let h_pre = self.linear(&ln_2.out, c_fc, (n, c, 4 * c))?;
        let mut h = gpu.zeros(n * 4 * c)?;
        gpu.gelu_fwd(&mut h, &h_pre)?;
        let m = self.linear(&h, mlp_proj, (n, 4 * c, c))?;
        gpu.add_assign(x, &m)?;
        Ok(BlockActs {
            ln_1,
            q,
            k,
            v,
            att,
            y,
            ln_2,
            h_pre,
            h,
        })
    }

    /// The backward pass of one block: `dx` holds the gradient of the
    /// block's output and is replaced by that of its input.
    fn block_backward(
        &self,
        dx: &mut Buf,
        &[ln_1, c_attn, attn_proj, ln_2, c_fc, mlp_proj]: &[usize; 6],
        acts: &BlockActs,
        (b, t): (usize, usize),
        grads: &mut [Option<Buf>],
    ) -> Result<(), GpuError> {
        let gpu = &self.gpu;
        let c = self.config.n_embd;
        let nh = self.config.n_head;
        let (n, hs, bh) = (b * t, c / nh, b * nh);
        // MLP: x_out = x_mid + mlp(ln_2(x_mid)).
        let dh = self.linear_bwd(&acts.h, mlp_proj, dx, (n, 4 * c, c), grads)?;
        let mut dh_pre = gpu.zeros(n * 4 * c)?;
        gpu.gelu_bwd(&mut dh_pre, &acts.h_pre, &dh)?;
        let dln_2 = self.linear_bwd(&acts.ln_2.out, c_fc, &dh_pre, (n, c, 4 * c), grads)?;
        let d_mid = self.layernorm_bwd(&acts.ln_2, ln_2, &dln_2, (n, c), grads)?;
        gpu.add_assign(dx, &d_mid)?;
        // Attention: x_mid = x + proj(attention(ln_1(x))).
        let mut dy = self.linear_bwd(&acts.y, attn_proj, dx, (n, c, c), grads)?;
        let mut dheads = gpu.zeros(n * c)?;
        gpu.merge_heads(&mut dy, &mut dheads, (b, t, nh, hs), true)?;
        let datt = self.product(&dheads, &acts.v, batched(t, hs, t, false, true, bh))?;
        let mut dv = self.product(&acts.att, &dheads, batched(t, t, hs, true, false, bh))?;
        let mut dscores = gpu.zeros(bh * t * t)?;
        let scale = 1.0 / (hs as f64).sqrt();
        gpu.causal_softmax_bwd(&mut dscores, &acts.att, &datt, (bh * t, t, scale as f32))?;
        let mut dq = self.product(&dscores, &acts.k, batched(t, t, hs, false, false, bh))?;
        let mut dk = self.product(&dscores, &acts.q, batched(t, t, hs, true, false, bh))?;
        let mut dqkv = gpu.zeros(n * 3 * c)?;
        gpu.qkv_heads(&mut dqkv, [&mut dq, &mut dk, &mut dv], (b, t, nh, hs), true)?;
        let dln_1 = self.linear_bwd(&acts.ln_1.out, c_attn, &dqkv, (n, c, 3 * c), grads)?;
        let d_in = self.layernorm_bwd(&acts.ln_1, ln_1, &dln_1, (n, c), grads)?;
        gpu.add_assign(dx, &d_in)
    }

    /// A new buffer holding `a @ b` as `mm` says.
    fn product(&self, a: &Buf, b: &Buf, mm: Matmul) -> Result<Buf, GpuError> {
        let mut out = self.gpu.zeros(mm.batch * mm.m * mm.n)?;
        self.gpu.matmul(&mut out, a, b, mm)?;
        Ok(out)
    }

    /// `x (rows, din) @ W (din, dout)`.
    fn linear(
        &self,
        x: &Buf,
        w: usize,
        (rows, din, dout): (usize, usize, usize),
    ) -> Result<Buf, GpuError> {
        self.product(x, self.w(w), Matmul::plain(rows, din, dout))
    }

    /// The backward pass of [`CudaStage::linear`]: stores `W`'s gradient
    /// `x^T dy` and returns `x`'s, `dy W^T`.
    fn linear_bwd(
        &self,
        x: &Buf,
        w: usize,
        dy: &Buf,
        (rows, din, dout): (usize, usize, usize),
        grads: &mut [Option<Buf>],
    ) -> Result<Buf, GpuError> {
        let dw = self.product(x, dy, batched(din, rows, dout, true, false, 1))?;
        grads[w] = Some(dw);
        let dx = self.product(dy, self.w(w), batched(rows, dout, din, false, true, 1))?;
        Ok(dx)
    }

    fn layernorm(&self, x: &Buf, gain: usize, (rows, c): (usize, usize)) -> Result<Norm, GpuError> {
        let gpu = &self.gpu;
        let mut norm = Norm {
            out: gpu.zeros(rows * c)?,
            xhat: gpu.zeros(rows * c)?,
            rstd: gpu.zeros(rows)?,
        };
        gpu.layernorm_fwd(
            [&mut norm.out, &mut norm.xhat, &mut norm.rstd],
            x,
            self.w(gain),
            (rows, c),
        )?;
        Ok(norm)
    }

    /// Stores the gain's gradient and returns the input's.
    fn layernorm_bwd(
        &self,
        norm: &Norm,
        gain: usize,
        dout: &Buf,
        (rows, c): (usize, usize),
        grads: &mut [Option<Buf>],
    ) -> Result<Buf, GpuError> {
        let gpu = &self.gpu;
        let mut dgain = gpu.zeros(c)?;
        gpu.column_dot(&mut dgain, dout, &norm.xhat, (rows, c))?;
        grads[gain] = Some(dgain);
        let mut dx = gpu.zeros(rows * c)?;
        gpu.layernorm_bwd(
            &mut dx,
            [dout, &norm.xhat, &norm.rstd, self.w(gain)],
            (rows, c),
        )?;
        Ok(dx)
    }

    fn w(&self, index: usize) -> &Buf {
        &self.weights[index]
    }

    /// Token ids index the embedding tables on the device: one past the
    /// vocabulary would read another row's memory, so they are checked here.
    fn check_tokens(&self, ids: &[u32]) -> Result<(), GpuError> {
        let vocab = self.config.vocab_size;
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(&id) => Err(GpuError::Token { id, vocab }),
            None => Ok(()),
        }
    }
}

fn batched(m: usize, k: usize, n: usize, ta: bool, tb: bool, batch: usize) -> Matmul {
    Matmul {
        m,
        k,
        n,
        ta,
        tb,
        batch,
    }
}

fn shape(what: &'static str, expected: String, got: usize) -> GpuError {
    ModelError::Shape {
        what,
        expected,
        got: vec![got],
    }
    .into()
}
