//! Fused CPU kernels, each with its backward pass: GELU, causal
//! self-attention (with its causal softmax), LayerNorm with its gain, the
//! bias-free linear layer, whose products go through [`product`], and the
//! mean cross-entropy of the logits.
//!
//! Composed from candle's primitive ops these take 5 to 10 passes over
//! memory each way (candle's fused `softmax_last_dim` and `layer_norm` have
//! no backward pass), and the backward pass of candle's `gelu_erf` is nine
//! ops with 1/sqrt(2 pi) rounded to 0.398942, an error an `f64` gradient
//! check sees. Here each is one pass forward and one back, with exact
//! derivatives (backward 10-15% faster than the composed ops).
//! Every kernel works row by row (or element by element, or sequence by
//! sequence) in a fixed order, so results do not depend on the thread
//! count; rayon only hands out rows or sequences, and gemm splits a
//! product's outputs, never its sums. `f32` and `f64` are served (`f64`
//! for gradient checks).

use std::ops::{Add, Div, Mul, Neg, Sub};

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::elementary;
use super::matmul::{product, product_on, Operand};
use super::wide;

/// Elements per parallel work unit: big enough to amortize hand-out,
/// small enough to split a (768, 512) activation across cores.
const CHUNK: usize = 1 << 14;

pub(crate) trait Real:
    'static
    + Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    fn of(x: f64) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    /// `self * a + b` rounded once.
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// The storage's data, when it holds this type.
    fn data(s: &CpuStorage) -> Option<&[Self]>;
    fn storage(data: Vec<Self>) -> CpuStorage;
}

macro_rules! real {
    ($t:ty, $variant:ident, $exp:expr, $ln:expr) => {
        impl Real for $t {
            fn of(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            fn ln(self) -> Self {
                $ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            // Inlined, so that code built for a CPU with FMA has the
            // instruction instead of a call to libm's `fmaf`.
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
            fn data(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn storage(data: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(data)
            }
        }
    };
}
// f32 through our own exp and ln, so the kernels' loops vectorize and their
// bits are the same on every CPU (see `elementary`); f64 serves gradient
// checks only.
real!(f32, F32, elementary::exp_f32, elementary::ln_f32);
real!(f64, F64, f64::exp, f64::ln);

/// A kernel over rows of `n` elements of one or two same-shaped inputs.
pub(super) trait RowKernel: Sync {
    fn name(&self) -> &'static str;
    /// Refuses shapes the kernel cannot serve.
    fn check(&self, _shape: &Shape) -> Result<()> {
        Ok(())
    }
    /// Writes `out` from `a` (and `b`, empty for one input); all `n` long.
    fn row<T: Real>(&self, index: usize, a: &[T], b: &[T], out: &mut [T]);
}

/// A one-input op with its backward pass, which runs other ops.
trait Differentiable: Fused {
    /// The gradient of the input `arg`, given the output `res` and the
    /// output's (contiguous) gradient `grad`.
    fn backward(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Tensor>;
}

/// An op over the contiguous data of its inputs, all of one float type.
trait Fused: Sync {
    fn name(&self) -> &'static str;
    /// The output and its shape, from the inputs' data and shapes.
    fn compute<T: Real>(&self, inputs: &[(&[T], &Shape)]) -> Result<(Vec<T>, Shape)>;
    /// The gradients of a two-input op's inputs, given the output's
    /// (contiguous) gradient `grad`; a backward kernel has none.
    fn backward(&self, _a: &Tensor, _b: &Tensor, _grad: &Tensor) -> Result<(Tensor, Tensor)> {
        bail!("{} has no backward pass", self.name())
    }
}

/// Runs `k` on the storages of its inputs, `f32` or `f64` as the first is.
fn fused<K: Fused>(k: &K, inputs: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
    match inputs.first().map(|(s, _)| s) {
        Some(CpuStorage::F32(_)) => fused_as::<K, f32>(k, inputs),
        Some(CpuStorage::F64(_)) => fused_as::<K, f64>(k, inputs),
        _ => bail!("{}: f32 or f64 inputs of one dtype only", k.name()),
    }
}

fn fused_as<K: Fused, T: Real>(
    k: &K,
    inputs: &[(&CpuStorage, &Layout)],
) -> Result<(CpuStorage, Shape)> {
    let data = inputs
        .iter()
        .map(|&(s, l)| match (T::data(s), l.contiguous_offsets()) {
            (Some(v), Some((start, end))) => Ok((&v[start..end], l.shape())),
            (None, _) => bail!("{}: f32 or f64 inputs of one dtype only", k.name()),
            (_, None) => bail!("{}: inputs must be contiguous", k.name()),
        })
        .collect::<Result<Vec<_>>>()?;
    let (out, shape) = k.compute(&data)?;
    Ok((T::storage(out), shape))
}

/// A [`RowKernel`] as a [`Fused`] op: one or two inputs of one shape.
struct Rows<K>(K);

impl<K: RowKernel> Fused for Rows<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn compute<T: Real>(&self, inputs: &[(&[T], &Shape)]) -> Result<(Vec<T>, Shape)> {
        let (a, b) = match inputs {
            [(a, shape)] => ((a, shape), &[][..]),
            [(a, shape), (b, other)] if other == shape => ((a, shape), *b),
            _ => bail!("{}: one input, or two of one shape", self.name()),
        };
        let (a, shape) = a;
        self.0.check(shape)?;
        let n = shape.dims().last().copied().unwrap_or(1);
        Ok((run_rows(&self.0, n, a, b), (*shape).clone()))
    }
}

/// Makes a [`Differentiable`] op a candle op.
struct Op<K>(K);

impl<K: Differentiable> CustomOp1 for Op<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fused(&self.0, &[(s, l)])
    }
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(Differentiable::backward(&self.0, arg, res, &grad)?))
    }
}

/// Makes a two-input [`Fused`] op a candle op.
struct Op2<K>(K);

impl<K: Fused> CustomOp2 for Op2<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fused(&self.0, &[(s1, l1), (s2, l2)])
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = self.0.backward(a, b, &grad.contiguous()?)?;
        Ok((Some(da), Some(db)))
    }
}

/// `len` elements written `n` at a time by `row(index, out)`, rows
/// handed out to rayon in chunks.
fn par_rows<T: Real>(n: usize, len: usize, row: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    let mut out = vec![T::of(0.0); len];
    let n = n.max(1);
    let rows_per_chunk = (CHUNK / n).max(1);
    out.par_chunks_mut(rows_per_chunk * n)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (r, o) in chunk.chunks_mut(n).enumerate() {
                row(c * rows_per_chunk + r, o);
            }
        });
    out
}

fn run_rows<K: RowKernel, T: Real>(k: &K, n: usize, a: &[T], b: &[T]) -> Vec<T> {
    par_rows(n, a.len(), |row, out| {
        let span = row * n..(row + 1) * n;
        let b = b.get(span.clone()).unwrap_or(&[]);
        wide::row(k, row, &a[span], b, out);
    })
}

// ---- GELU ----

/// sqrt(2 / pi).
const GELU_C: f64 = 0.797_884_560_802_865_4;
const GELU_A: f64 = 0.044_715;

/// GELU in GPT-2's tanh form, `0.5 x (1 + tanh(c (x + a x^3)))`.
/// nanoGPT uses the erf form; the two differ by under 1e-3 and the tanh
/// form needs only `exp`, with tanh(u) = 1 - 2 / (exp(2u) + 1), which is
/// exact at both ends (exp overflowing to inf gives 1).
pub(crate) fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Op(Rows(Gelu)))
}

struct Gelu;
struct GeluGrad;

#[inline(always)]
fn tanh_of<T: Real>(u: T) -> T {
    T::of(1.0) - T::of(2.0) / ((u + u).exp() + T::of(1.0))
}

impl RowKernel for Gelu {
    fn name(&self) -> &'static str {
        "swarmrun-gelu"
    }
    #[inline(always)]
    fn row<T: Real>(&self, _: usize, x: &[T], _: &[T], out: &mut [T]) {
        for (o, &x) in out.iter_mut().zip(x) {
            let t = tanh_of(T::of(GELU_C) * (x + T::of(GELU_A) * x * x * x));
            *o = T::of(0.5) * x * (T::of(1.0) + t);
        }
    }
}

impl Differentiable for Rows<Gelu> {
    fn backward(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Tensor> {
        arg.apply_op2_no_bwd(grad, &Op2(Rows(GeluGrad)))
    }
}

/// `(x, g) -> g * gelu'(x)`.
impl RowKernel for GeluGrad {
    fn name(&self) -> &'static str {
        "swarmrun-gelu-grad"
    }
    #[inline(always)]
    fn row<T: Real>(&self, _: usize, x: &[T], g: &[T], out: &mut [T]) {
        let (c, a, half, one) = (T::of(GELU_C), T::of(GELU_A), T::of(0.5), T::of(1.0));
        for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
            let t = tanh_of(c * (x + a * x * x * x));
            let du = c * (one + T::of(3.0) * a * x * x);
            *o = g * (half * (one + t) + half * x * (one - t * t) * du);
        }
    }
}

// ---- causal softmax ----

/// `softmax(scale * att)` over the last dimension, keeping only entries
/// `j <= i` of each `(T, T)` matrix (the rest are 0): the attention mask,
/// the scaling and the softmax in one pass, row by row.
struct CausalSoftmax {
    scale: f64,
}
struct CausalSoftmaxGrad {
    scale: f64,
}

impl RowKernel for CausalSoftmax {
    fn name(&self) -> &'static str {
        "swarmrun-causal-softmax"
    }
    fn check(&self, shape: &Shape) -> Result<()> {
        match shape.dims() {
            [.., a, b] if a == b => Ok(()),
            dims => bail!("causal softmax needs (..., T, T), got {dims:?}"),
        }
    }
    /// Row `i` of a matrix sees `x[..=i]`; `scale > 0`, so the maximum
    /// of `x` is the maximum of `scale * x`.
    #[inline(always)]
    fn row<T: Real>(&self, index: usize, x: &[T], _: &[T], out: &mut [T]) {
        let visible = index % x.len() + 1;
        let scale = T::of(self.scale);
        let max = lane_max(&x[..visible]);
        for (o, &v) in out[..visible].iter_mut().zip(x) {
            *o = ((v - max) * scale).exp();
        }
        let sum = lane_sum(&out[..visible], &out[..visible], |o, _| o);
        for o in &mut out[..visible] {
            *o = *o / sum;
        }
    }
}

/// `(y, g) -> scale * y * (g - sum(g * y))` per row; masked entries have
/// `y = 0` and so get 0.
impl RowKernel for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "swarmrun-causal-softmax-grad"
    }
    #[inline(always)]
    fn row<T: Real>(&self, _: usize, y: &[T], g: &[T], out: &mut [T]) {
        let dot = lane_sum(y, g, |y, g| y * g);
        let scale = T::of(self.scale);
        for ((o, &y), &g) in out.iter_mut().zip(y).zip(g) {
            *o = scale * y * (g - dot);
        }
    }
}

// ---- linear ----

/// `x: (B, T, in) @ w: (in, out)` -> `(B, T, out)`, a bias-free linear
/// layer as one 2-D product, and its backward pass `dy w^T`, `x^T dy`:
/// all three products through [`product`], whose bits are the same on
/// every CPU (candle's matmul, deeper than a block, sums in an order that
/// depends on the CPU). As one op it also spares the graph the reshapes
/// around the product, each of which cost the backward pass a zeroed
/// buffer and an addition the size of an activation.
pub(crate) fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Op2(Linear))
}

struct Linear;

/// `a @ b` with each input taken as a matrix (a `(B, T, C)` tensor as its
/// `(B * T, C)` rows) and transposed where asked: a linear layer's product
/// and the two of its backward pass.
struct Product {
    transpose_a: bool,
    transpose_b: bool,
}

impl Product {
    /// `x @ w`, the forward product.
    const FORWARD: Product = Product {
        transpose_a: false,
        transpose_b: false,
    };
    /// `dy @ w^T`, the gradient of a linear layer's input.
    const INPUT_GRAD: Product = Product {
        transpose_a: false,
        transpose_b: true,
    };
    /// `x^T @ dy`, the gradient of its weight.
    const WEIGHT_GRAD: Product = Product {
        transpose_a: true,
        transpose_b: false,
    };
}

/// `data` of `shape` as a matrix: a `(B, T, C)` tensor as `(B * T, C)`.
fn matrix<'a, T>(name: &str, data: &'a [T], shape: &Shape) -> Result<Operand<'a, T>> {
    let (rows, cols) = match shape.dims() {
        &[b, t, c] => (b * t, c),
        &[r, c] => (r, c),
        dims => bail!("{name}: a matrix or (B, T, C) tensor, got {dims:?}"),
    };
    match Operand::rows(data, rows, cols) {
        Some(m) => Ok(m),
        None => bail!("{name}: {} elements for {shape:?}", data.len()),
    }
}

impl Fused for Product {
    fn name(&self) -> &'static str {
        "swarmrun-linear-product"
    }
    fn compute<T: Real>(&self, inputs: &[(&[T], &Shape)]) -> Result<(Vec<T>, Shape)> {
        let [(a, a_shape), (b, b_shape)] = inputs else {
            bail!("{}: takes two inputs", self.name())
        };
        let (mut a_m, mut b_m) = (
            matrix(self.name(), a, a_shape)?,
            matrix(self.name(), b, b_shape)?,
        );
        if self.transpose_a {
            a_m = a_m.t();
        }
        if self.transpose_b {
            b_m = b_m.t();
        }
        let (m, n) = (a_m.shape().0, b_m.shape().1);
        let Some(out) = product(a_m, b_m) else {
            bail!(
                "{}: {a_shape:?} and {b_shape:?} do not multiply",
                self.name()
            )
        };
        // Rows of tokens in, rows of tokens out.
        let shape = match (self.transpose_a, a_shape.dims()) {
            (false, &[b, t, _]) => Shape::from((b, t, n)),
            _ => Shape::from((m, n)),
        };
        Ok((out, shape))
    }
}

impl Fused for Linear {
    fn name(&self) -> &'static str {
        "swarmrun-linear"
    }
    fn compute<T: Real>(&self, inputs: &[(&[T], &Shape)]) -> Result<(Vec<T>, Shape)> {
        Product::FORWARD.compute(inputs)
    }
    fn backward(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let dx = grad.apply_op2_no_bwd(w, &Op2(Product::INPUT_GRAD))?;
        let dw = x.apply_op2_no_bwd(grad, &Op2(Product::WEIGHT_GRAD))?;
        Ok((dx, dw))
    }
}

// ---- causal self-attention ----

/// Causal self-attention of `qkv: (B, T, 3C)` (queries, keys and values
/// side by side, `n_head` heads each) -> `(B, T, C)`, the heads' outputs
/// side by side: per head `softmax(q k^T / sqrt(hs), causal) v`. One op:
/// the heads are read where they lie in `qkv` (strided operands) instead
/// of being split off, copied contiguous and merged back, nodes whose
/// backward passes cost a zeroed buffer and an addition each. The softmax
/// is recomputed in the backward pass rather than kept. The products and
/// the softmax are the ones the split-off heads went through, so the bits
/// are the same (a test compares them).
pub(crate) fn attention(qkv: &Tensor, n_head: usize) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(Op(Attention { n_head }))
}

struct Attention {
    n_head: usize,
}

/// `(dy, qkv) -> dqkv` for [`Attention`].
struct AttentionGrad {
    n_head: usize,
}

/// Where head `h` of sequence `b` lies in a `(B, T, 3C)` buffer.
#[derive(Clone, Copy)]
struct Heads {
    t: usize,
    c: usize,
    hs: usize,
    scale: f64,
}

impl Heads {
    fn of(name: &str, shape: &Shape, n_head: usize) -> Result<(usize, Heads)> {
        match shape.dims3() {
            Ok((b, t, c3)) if n_head > 0 && c3 > 0 && c3.is_multiple_of(3 * n_head) => {
                let (c, hs) = (c3 / 3, c3 / 3 / n_head);
                let scale = 1.0 / (hs as f64).sqrt();
                Ok((b, Heads { t, c, hs, scale }))
            }
            _ => bail!("{name}: (B, T, 3C) with C a multiple of {n_head} heads, got {shape:?}"),
        }
    }

    /// Part `part` (0 q, 1 k, 2 v) of head `h` in sequence `seq`, a
    /// `(T, 3C)` slice: `T x hs`, rows 3C apart.
    fn part<'a, T>(&self, seq: &'a [T], part: usize, h: usize) -> Result<Operand<'a, T>> {
        let at = part * self.c + h * self.hs;
        match Operand::strided(&seq[at..], (self.t, self.hs), (3 * self.c, 1)) {
            Some(o) => Ok(o),
            None => bail!("attention: a head outside its sequence"),
        }
    }

    /// The causal softmax of head `h`'s scores, `(T, T)`.
    fn softmax<T: Real>(&self, seq: &[T], h: usize) -> Result<Vec<T>> {
        let (q, k) = (self.part(seq, 0, h)?, self.part(seq, 1, h)?);
        let scores = checked_product_on(q, k.t())?;
        let mut att = vec![T::of(0.0); self.t * self.t];
        let softmax = CausalSoftmax { scale: self.scale };
        for (i, (row, out)) in scores
            .chunks(self.t)
            .zip(att.chunks_mut(self.t))
            .enumerate()
        {
            wide::row(&softmax, i, row, &[], out);
        }
        Ok(att)
    }
}

fn shapes() -> candle_core::Error {
    candle_core::Error::Msg("attention: operands of mismatched shapes".into())
}

/// One head's small product on the calling thread (heads run in parallel).
fn checked_product_on<T: Real>(a: Operand<T>, b: Operand<T>) -> Result<Vec<T>> {
    product_on(a, b, 1).ok_or_else(shapes)
}

/// Writes `rows` (`T x hs`, row-major) into `out` at `at`, rows `stride` apart.
fn scatter<T: Copy>(rows: &[T], hs: usize, out: &mut [T], at: usize, stride: usize) {
    for (i, row) in rows.chunks(hs).enumerate() {
        out[at + i * stride..at + i * stride + hs].copy_from_slice(row);
    }
}

impl Fused for Attention {
    fn name(&self) -> &'static str {
        "swarmrun-attention"
    }
    fn compute<T: Real>(&self, inputs: &[(&[T], &Shape)]) -> Result<(Vec<T>, Shape)> {
        let [(qkv, shape)] = inputs else {
            bail!("{}: takes qkv", self.name())
        };
        let (b, heads) = Heads::of(self.name(), shape, self.n_head)?;
        let (t, c, hs) = (heads.t, heads.c, heads.hs);
        let mut y = vec![T::of(0.0); b * t * c];
        y.par_chunks_mut((t * c).max(1))
            .zip(qkv.par_chunks((3 * t * c).max(1)))
            .try_for_each(|(y, seq)| -> Result<()> {
                for h in 0..self.n_head {
                    let att = heads.softmax(seq, h)?;
                    let att = Operand::rows(&att, t, t).ok_or_else(shapes)?;
                    let out = checked_product_on(att, heads.part(seq, 2, h)?)?;
                    scatter(&out, hs, y, h * hs, c);
                }
                Ok(())
            })?;
        Ok((y, Shape::from((b, t, c))))
    }
}

impl Differentiable for Attention {
    fn backward(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let op = AttentionGrad {
            n_head: self.n_head,
        };
        grad.apply_op2_no_bwd(qkv, &Op2(op))
    }
}

impl Fused for AttentionGrad {
    fn name(&self) -> &'static str {
        "swarmrun-attention-grad"
    }
    fn compute<T: Real>(&self, inputs: &[(&[T], &Shape)]) -> Result<(Vec<T>, Shape)> {
        let [(dy, dy_shape), (qkv, shape)] = inputs else {
            bail!("{}: takes (dy, qkv)", self.name())
        };
        let (b, heads) = Heads::of(self.name(), shape, self.n_head)?;
        let (t, c, hs) = (heads.t, heads.c, heads.hs);
        if dy_shape.dims() != [b, t, c] {
            bail!("{}: dy {dy_shape:?} for qkv {shape:?}", self.name());
        }
        let softmax_grad = CausalSoftmaxGrad { scale: heads.scale };
        let mut dqkv = vec![T::of(0.0); b * t * 3 * c];
        dqkv.par_chunks_mut((3 * t * c).max(1))
            .zip(qkv.par_chunks((3 * t * c).max(1)))
            .zip(dy.par_chunks((t * c).max(1)))
            .try_for_each(|((dqkv, seq), dy)| -> Result<()> {
                for h in 0..self.n_head {
                    let att = heads.softmax(seq, h)?;
                    let att_m = Operand::rows(&att, t, t).ok_or_else(shapes)?;
                    let dy_h =
                        Operand::strided(&dy[h * hs..], (t, hs), (c, 1)).ok_or_else(shapes)?;
                    let (q, k, v) = (
                        heads.part(seq, 0, h)?,
                        heads.part(seq, 1, h)?,
                        heads.part(seq, 2, h)?,
                    );
                    let datt = checked_product_on(dy_h, v.t())?;
                    let dv = checked_product_on(att_m.t(), dy_h)?;
                    let mut dscores = vec![T::of(0.0); t * t];
                    for (i, out) in dscores.chunks_mut(t).enumerate() {
                        let span = i * t..(i + 1) * t;
                        wide::row(&softmax_grad, i, &att[span.clone()], &datt[span], out);
                    }
                    let ds = Operand::rows(&dscores, t, t).ok_or_else(shapes)?;
                    let dq = checked_product_on(ds, k)?;
                    let dk = checked_product_on(ds.t(), q)?;
                    for (part, rows) in [(0, &dq), (1, &dk), (2, &dv)] {
                        scatter(rows, hs, dqkv, part * c + h * hs, 3 * c);
                    }
                }
                Ok(())
            })?;
        Ok((dqkv, (*shape).clone()))
    }
}

// ---- LayerNorm ----

const LN_EPS: f64 = 1e-5;

/// LayerNorm over the last dimension with a gain and no bias,
/// `(x - mean) / sqrt(var + 1e-5) * gain`, `gain` as long as a row. One
/// op, so the backward pass broadcasts no gain and sums its gradient
/// without candle's strided reduction; the bits are those of the
/// normalization followed by a broadcast multiply (the gain's gradient
/// summed over the rows in order, as candle's sum adds them).
pub(crate) fn layer_norm(x: &Tensor, gain: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&gain.contiguous()?, Op2(LayerNorm))
}

struct LayerNorm;
/// `(x, g) -> dx`, for the gain held here (a row's worth; `f64` holds an
/// `f32` or `f64` gain exactly).
struct LayerNormGrad {
    gain: Vec<f64>,
}
/// `(x, g) -> dgain`, the sum over rows of `g * xhat`.
struct GainGrad;
struct Normalize;
struct NormalizeGrad;

/// The length of `shape`'s rows, which `other` must also be.
fn row_length(name: &str, shape: &Shape, other: usize) -> Result<usize> {
    match shape.dims().last() {
        Some(&n) if n == other && n > 0 => Ok(n),
        _ => bail!("{name}: rows of {shape:?} against {other} elements"),
    }
}

impl Fused for LayerNorm {
    fn name(&self) -> &'static str {
        "swarmrun-layer-norm"
    }
    fn compute<T: Real>(&self, inputs: &[(&[T], &Shape)]) -> Result<(Vec<T>, Shape)> {
        let [(x, shape), (gain, _)] = inputs else {
            bail!("{}: takes (x, gain)", self.name())
        };
        let n = row_length(self.name(), shape, gain.len())?;
        let out = par_rows(n, x.len(), |row, out| {
            wide::row(&Normalize, row, &x[row * n..(row + 1) * n], &[], out);
            for (o, &g) in out.iter_mut().zip(*gain) {
                *o = *o * g;
            }
        });
        Ok((out, (*shape).clone()))
    }
    fn backward(&self, x: &Tensor, gain: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let gain = gain.to_dtype(candle_core::DType::F64)?.to_vec1()?;
        let dx = x.apply_op2_no_bwd(grad, &Op2(LayerNormGrad { gain }))?;
        let dgain = x.apply_op2_no_bwd(grad, &Op2(GainGrad))?;
        Ok((dx, dgain))
    }
}

impl Fused for LayerNormGrad {
    fn name(&self) -> &'static str {
        "swarmrun-layer-norm-grad"
    }
    fn compute<T: Real>(&self, inputs: &[(&[T], &Shape)]) -> Result<(Vec<T>, Shape)> {
        let [(x, shape), (g, g_shape)] = inputs else {
            bail!("{}: takes (x, g)", self.name())
        };
        if g_shape != shape {
            bail!("{}: shapes {shape:?} and {g_shape:?} differ", self.name());
        }
        let n = row_length(self.name(), shape, self.gain.len())?;
        let gain: Vec<T> = self.gain.iter().map(|&w| T::of(w)).collect();
        let out = par_rows(n, x.len(), |row, out| {
            let span = row * n..(row + 1) * n;
            let g: Vec<T> = g[span.clone()]
                .iter()
                .zip(&gain)
                .map(|(&g, &w)| g * w)
                .collect();
            wide::row(&NormalizeGrad, row, &x[span], &g, out);
        });
        Ok((out, (*shape).clone()))
    }
}

impl Fused for GainGrad {
    fn name(&self) -> &'static str {
        "swarmrun-gain-grad"
    }
    fn compute<T: Real>(&self, inputs: &[(&[T], &Shape)]) -> Result<(Vec<T>, Shape)> {
        let [(x, shape), (g, g_shape)] = inputs else {
            bail!("{}: takes (x, g)", self.name())
        };
        if g_shape != shape {
            bail!("{}: shapes {shape:?} and {g_shape:?} differ", self.name());
        }
        let n = shape.dims().last().copied().unwrap_or(0).max(1);
        let (mut xhat, mut sum) = (vec![T::of(0.0); n], vec![T::of(0.0); n]);
        for (x, g) in x.chunks_exact(n).zip(g.chunks_exact(n)) {
            wide::row(&Normalize, 0, x, &[], &mut xhat);
            for ((s, &g), &h) in sum.iter_mut().zip(g).zip(&xhat) {
                *s = *s + g * h;
            }
        }
        Ok((sum, Shape::from(n)))
    }
}

// ---- cross-entropy ----

/// The mean cross-entropy of `logits: (N, V)` against `targets: (N,)`
/// u32 token ids, a scalar. candle's `cross_entropy` is a log-softmax of
/// six ops and a gather, with libm's `expf` and `logf` (whose last bit
/// may differ by CPU, and a validator must replay the loss and its
/// gradient to the bit); here it is one pass each way with our `exp` and
/// `ln`, each row's sums in the fixed order of the other kernels.
pub(crate) fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.to_vec1::<u32>()?.into();
    logits.contiguous()?.apply_op1(Op(CrossEntropy { targets }))
}

struct CrossEntropy {
    targets: std::sync::Arc<[u32]>,
}

/// `(logits, g) -> g / N * (softmax(logits) - onehot(targets))`, `g` the
/// loss's gradient, a scalar.
struct CrossEntropyGrad {
    targets: std::sync::Arc<[u32]>,
}

/// Each row's length `V`, once `shape` is `(N, V)` with `N` the number of
/// targets, every target below `V`.
fn classes(name: &str, targets: &[u32], shape: &Shape) -> Result<usize> {
    let &[n, v] = shape.dims() else {
        bail!("{name}: logits must be (N, V), got {:?}", shape.dims())
    };
    if n != targets.len() || n == 0 || v == 0 {
        bail!(
            "{name}: {n} rows of {v} logits against {} targets",
            targets.len()
        );
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
        bail!("{name}: target {t} is not one of the {v} classes");
    }
    Ok(v)
}

/// A row's maximum and the sum of `exp(x - max)`: the softmax is
/// `exp(x - max) / sum`, the log-softmax `x - max - ln sum`.
#[inline(always)]
fn max_and_sum<T: Real>(row: &[T]) -> (T, T) {
    let max = lane_max(row);
    (max, lane_sum(row, row, |x, _| (x - max).exp()))
}

impl Fused for CrossEntropy {
    fn name(&self) -> &'static str {
        "swarmrun-cross-entropy"
    }
    fn compute<T: Real>(&self, inputs: &[(&[T], &Shape)]) -> Result<(Vec<T>, Shape)> {
        let [(logits, shape)] = inputs else {
            bail!("{}: takes the logits alone", self.name())
        };
        let v = classes(self.name(), &self.targets, shape)?;
        let losses: Vec<T> = logits
            .chunks_exact(v)
            .zip(self.targets.iter())
            .map(|(row, &t)| {
                let (max, sum) = max_and_sum(row);
                sum.ln() - (row[t as usize] - max)
            })
            .collect();
        let mean = lane_sum(&losses, &losses, |l, _| l) / T::of(losses.len() as f64);
        Ok((vec![mean], Shape::from(())))
    }
}

impl Differentiable for CrossEntropy {
    fn backward(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let targets = self.targets.clone();
        arg.apply_op2_no_bwd(grad, &Op2(CrossEntropyGrad { targets }))
    }
}

impl Fused for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "swarmrun-cross-entropy-grad"
    }
    fn compute<T: Real>(&self, inputs: &[(&[T], &Shape)]) -> Result<(Vec<T>, Shape)> {
        let [(logits, shape), (&[g], _)] = inputs else {
            bail!("{}: takes the logits and a scalar gradient", self.name())
        };
        let v = classes(self.name(), &self.targets, shape)?;
        let scale = g / T::of(self.targets.len() as f64);
        let out = par_rows(v, logits.len(), |r, out| {
            let row = &logits[r * v..(r + 1) * v];
            let (max, sum) = max_and_sum(row);
            for (o, &x) in out.iter_mut().zip(row) {
                *o = (x - max).exp() / sum * scale;
            }
            let t = self.targets[r] as usize;
            out[t] = ((row[t] - max).exp() / sum - T::of(1.0)) * scale;
        });
        Ok((out, (*shape).clone()))
    }
}

/// Mean and 1 / std of a row.
#[inline(always)]
fn moments<T: Real>(x: &[T]) -> (T, T) {
    let n = T::of(x.len() as f64);
    let mean = lane_sum(x, x, |v, _| v) / n;
    let var = lane_sum(x, x, |v, _| (v - mean) * (v - mean)) / n;
    (mean, T::of(1.0) / (var + T::of(LN_EPS)).sqrt())
}

/// The largest of `x` (not empty), NaNs skipped unless `x[0]` is one,
/// as one chain of comparisons from `x[0]` would give, but in `LANES`
/// chains, which vectorize. Where a +0 and a -0 tie it may pick the
/// other zero; the softmax uses it only as `v - max`, where that gives
/// the same bits.
#[inline(always)]
fn lane_max<T: Real>(x: &[T]) -> T {
    let larger = |m: T, v: T| if v > m { v } else { m };
    let mut maxima = [x[0]; LANES];
    let whole = x.chunks_exact(LANES);
    let tail = whole.remainder();
    for chunk in whole {
        for (m, &v) in maxima.iter_mut().zip(chunk) {
            *m = larger(*m, v);
        }
    }
    let max = maxima.iter().fold(x[0], |m, &v| larger(m, v));
    tail.iter().fold(max, |m, &v| larger(m, v))
}

/// Running sums in [`lane_sum`]: one AVX-512 register of `f32`.
const LANES: usize = 16;

/// The sum of `term(a[i], b[i])` over `a`'s length (`b` at least as long)
/// in a fixed order that vectorizes: `LANES` running sums, sum `j` taking
/// the terms `j, j + LANES, ...`, added in order, then the terms past the
/// last whole `LANES`. One running sum, as before, made every row's sums
/// a chain of dependent additions (LayerNorm's rows were the slowest
/// kernel per element); the order is the code's, so the bits are still
/// the same on every CPU and at every vector width.
#[inline(always)]
fn lane_sum<T: Real>(a: &[T], b: &[T], term: impl Fn(T, T) -> T) -> T {
    let mut sums = [T::of(0.0); LANES];
    let (whole, rest) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_tail, b_tail) = (whole.remainder(), &b[a.len() - a.len() % LANES..]);
    for (a, b) in whole.zip(rest) {
        for ((s, &a), &b) in sums.iter_mut().zip(a).zip(b) {
            *s = *s + term(a, b);
        }
    }
    let sum = sums.iter().fold(T::of(0.0), |acc, &s| acc + s);
    a_tail
        .iter()
        .zip(b_tail)
        .fold(sum, |acc, (&a, &b)| acc + term(a, b))
}

impl RowKernel for Normalize {
    fn name(&self) -> &'static str {
        "swarmrun-normalize"
    }
    #[inline(always)]
    fn row<T: Real>(&self, _: usize, x: &[T], _: &[T], out: &mut [T]) {
        let (mean, rstd) = moments(x);
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (v - mean) * rstd;
        }
    }
}

/// `(x, g) -> rstd * (g - mean(g) - xhat * mean(g * xhat))` per row, the
/// statistics recomputed from `x` rather than kept from the forward pass.
impl RowKernel for NormalizeGrad {
    fn name(&self) -> &'static str {
        "swarmrun-normalize-grad"
    }
    #[inline(always)]
    fn row<T: Real>(&self, _: usize, x: &[T], g: &[T], out: &mut [T]) {
        let (mean, rstd) = moments(x);
        let n = T::of(x.len() as f64);
        let g_mean = lane_sum(g, g, |g, _| g) / n;
        let gx_mean = lane_sum(x, g, |v, g| g * (v - mean) * rstd) / n;
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(g) {
            *o = rstd * (g - g_mean - (v - mean) * rstd * gx_mean);
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::super::matmul::{self, sample_values};
    use super::*;

    /// The normalization alone as an op, as layers used it before
    /// [`layer_norm`]: the reference the fused op must match bit for bit.
    impl Differentiable for Rows<Normalize> {
        fn backward(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Tensor> {
            arg.apply_op2_no_bwd(grad, &Op2(Rows(NormalizeGrad)))
        }
    }

    /// The causal softmax alone as an op, as the attention used it before
    /// [`attention`]: part of the reference it must match bit for bit.
    impl Differentiable for Rows<CausalSoftmax> {
        fn backward(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Tensor> {
            let scale = self.0.scale;
            res.apply_op2_no_bwd(grad, &Op2(Rows(CausalSoftmaxGrad { scale })))
        }
    }

    /// Attention as the layers composed it before [`attention`]: heads
    /// split off and copied contiguous, batched products, merged back.
    fn attention_composed(qkv: &Tensor, nh: usize) -> Tensor {
        let (b, t, c3) = qkv.dims3().unwrap();
        let (c, hs) = (c3 / 3, c3 / 3 / nh);
        let qkv = qkv
            .reshape((b, t, 3, nh, hs))
            .unwrap()
            .permute((2, 0, 3, 1, 4))
            .unwrap();
        let part = |i| qkv.get(i).unwrap().contiguous().unwrap();
        let (q, k, v) = (part(0), part(1), part(2));
        let scores = q.matmul(&k.t().unwrap()).unwrap().contiguous().unwrap();
        let att = scores
            .apply_op1(Op(Rows(CausalSoftmax {
                scale: 1.0 / (hs as f64).sqrt(),
            })))
            .unwrap();
        let y = att.matmul(&v).unwrap().transpose(1, 2).unwrap();
        y.reshape((b, t, c)).unwrap()
    }

    #[test]
    fn fused_attention_gives_the_bits_of_the_split_heads_it_replaces() {
        let qkv = Var::from_tensor(&values(&[3, 64, 3 * 32], 5)).unwrap();
        let weights = values(&[3, 64, 32], 6);
        let (fused, composed) = (attention(&qkv, 4).unwrap(), attention_composed(&qkv, 4));
        assert_eq!(bits(&fused), bits(&composed));
        let grad = |y: Tensor| {
            let g = (y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            bits(g.get(&qkv).unwrap())
        };
        assert_eq!(grad(fused), grad(composed));
    }

    /// Every kernel's rows, through each instruction set this CPU has,
    /// against the baseline build: the same bits, so a pass replays to
    /// the same digests on any x86-64.
    #[test]
    fn row_kernels_give_the_same_bits_at_every_vector_width() {
        use super::wide::row_on;
        use crate::isa::Isa;
        fn same<K: RowKernel>(isa: Isa, k: &K, a: &[f32], b: &[f32], n: usize) {
            for (i, a) in a.chunks(n).enumerate() {
                let b = b.get(i * n..(i + 1) * n).unwrap_or(&[]);
                let (mut wide, mut base) = (vec![0.0f32; n], vec![0.0f32; n]);
                row_on(isa, k, i, a, b, &mut wide);
                k.row(i, a, b, &mut base);
                let (wide, base) = (matmul::tests::bits(&wide), matmul::tests::bits(&base));
                assert_eq!(wide, base, "{} on {isa:?}, row {i}", k.name());
            }
        }
        let isas: Vec<Isa> = Isa::available()
            .filter(|&isa| isa != Isa::Baseline)
            .collect();
        if isas.is_empty() {
            eprintln!("skipped: this CPU has neither AVX-512 nor AVX2, only the baseline runs");
        }
        for isa in isas {
            for n in [64, 67, 512] {
                // Wide enough that tanh saturates and exp underflows.
                let a: Vec<f32> = sample_values(n * n, 11).iter().map(|x| x * 12.0).collect();
                let b = sample_values(n * n, 12);
                let probs: Vec<f32> = a.iter().map(|x| x.abs() / 12.0 / n as f32).collect();
                same(isa, &Gelu, &a, &[], n);
                same(isa, &GeluGrad, &a, &b, n);
                same(isa, &CausalSoftmax { scale: 0.125 }, &a, &[], n);
                same(isa, &CausalSoftmaxGrad { scale: 0.125 }, &probs, &b, n);
                same(isa, &Normalize, &a, &[], n);
                same(isa, &NormalizeGrad, &a, &b, n);
            }
        }
    }

    /// Values uniform in (-1, 1], shaped.
    fn values(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(sample_values(n, seed), shape, &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        matmul::tests::bits(&t.flatten_all().unwrap().to_vec1().unwrap())
    }

    #[test]
    fn fused_linear_and_layer_norm_give_the_bits_of_the_ops_they_replace() {
        let x = Var::from_tensor(&values(&[3, 7, 16], 1)).unwrap();
        let gain = Var::from_tensor(&(values(&[16], 2) + 1.0).unwrap()).unwrap();
        let w = Var::from_tensor(&values(&[16, 24], 3)).unwrap();
        let weights = values(&[3, 7, 24], 4);
        let loss = |y: Tensor| (y * &weights).unwrap().sum_all().unwrap();

        let fused = linear(&layer_norm(&x, &gain).unwrap(), &w).unwrap();
        let composed = {
            let norm = x
                .contiguous()
                .unwrap()
                .apply_op1(Op(Rows(Normalize)))
                .unwrap()
                .broadcast_mul(&gain)
                .unwrap();
            norm.reshape((21, 16))
                .unwrap()
                .matmul(&w)
                .unwrap()
                .reshape((3, 7, 24))
                .unwrap()
        };
        assert_eq!(bits(&fused), bits(&composed));
        let (g_fused, g_composed) = (
            loss(fused).backward().unwrap(),
            loss(composed).backward().unwrap(),
        );
        for v in [&x, &gain, &w] {
            let grad = |g: &candle_core::backprop::GradStore| bits(g.get(v).unwrap());
            assert_eq!(grad(&g_fused), grad(&g_composed));
        }
    }

    /// The log-softmax and gather the head used before [`cross_entropy`]
    /// (candle_nn's, through libm): the same loss and gradient to within
    /// rounding, and a target past the vocabulary is an error, not a panic.
    #[test]
    fn cross_entropy_matches_the_composed_log_softmax_and_refuses_bad_targets() {
        let (n, v) = (50, 65);
        let logits = Var::from_tensor(&(values(&[n, v], 7) * 8.0).unwrap()).unwrap();
        let ids: Vec<u32> = (0..n as u32).map(|i| i * 37 % v as u32).collect();
        let targets = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
        let composed = {
            let max = logits.max_keepdim(1).unwrap();
            let shifted = logits.broadcast_sub(&max).unwrap();
            let log_sum = shifted
                .exp()
                .unwrap()
                .sum_keepdim(1)
                .unwrap()
                .log()
                .unwrap();
            let log_probs = shifted.broadcast_sub(&log_sum).unwrap();
            let picked = log_probs.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap();
            (picked.sum_all().unwrap() / -(n as f64)).unwrap()
        };
        let fused = cross_entropy(&logits, &targets).unwrap();
        let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap();
        let (a, b) = (scalar(&fused), scalar(&composed));
        assert!((a - b).abs() <= 2e-6 * b.abs(), "loss {a} against {b}");
        let grad = |t: &Tensor| {
            let g = t.backward().unwrap();
            g.get(&logits)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (ga, gb) = (grad(&fused), grad(&composed));
        let worst = ga
            .iter()
            .zip(&gb)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(worst <= 1e-8, "gradients differ by up to {worst}");
        assert!(ga.iter().any(|&g| g != 0.0));

        let bad = Tensor::new(&[3u32, 65][..], &Device::Cpu).unwrap();
        let two = logits.narrow(0, 0, 2).unwrap();
        let err = cross_entropy(&two, &bad).unwrap_err().to_string();
        assert!(
            err.contains("target 65 is not one of the 65 classes"),
            "{err}"
        );
        assert!(cross_entropy(&logits, &bad).is_err());
    }
}
