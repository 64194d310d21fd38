//! Matrix products whose bits do not depend on the CPU.
//!
//! A validator's replay must give a miner's bits, on whatever CPU each
//! runs. gemm (candle's CPU matmul) sums each output element as one chain
//! of fused multiply-adds over `k`, unless `k` is deeper than the block
//! it sizes from the CPU's vector width and L1 cache; then it adds the
//! blocks' partial sums, and a product's bits depend on the CPU. Measured
//! on the project's VM (Intel Xeon, 48 KiB L1d): with gemm's AVX-512
//! kernels a 768-deep product (a weight gradient over 12 x 64 tokens) no
//! longer matched the AVX2 one, while every product up to 512 deep did.
//!
//! So the model's products split `k` themselves into chunks of
//! [`K_CHUNK`], each summed as one chain and added to the result in order,
//! which any CPU with fused multiply-add computes alike; and each process
//! checks once, before its first pass, that its CPU gives exactly those
//! bits ([`check_cpu`]), so a CPU that would not is refused with a reason
//! instead of having its honest passes fail their replays.
//!
//! gemm takes other kernels for products of at most 256 outputs, of one
//! column, or at most 2 deep; the model's products are never that small,
//! and the check covers the shapes it runs.

use std::sync::OnceLock;

use super::ops::Real;
use super::ModelError;
use crate::data::rng::SplitMix64;

/// The depth of one chain of multiply-adds: below the block gemm picks
/// on any CPU we know of (at least 512 here with AVX-512), so that a
/// chunk is never split again.
pub(crate) const K_CHUNK: usize = 256;

/// A matrix operand: `rows x cols` elements of `data`, element `(i, j)`
/// at `i * row_stride + j * col_stride`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Operand<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> Operand<'a, T> {
    /// `data` as a row-major `rows x cols` matrix; `None` when it holds a
    /// different number of elements.
    pub(crate) fn rows(data: &'a [T], rows: usize, cols: usize) -> Option<Self> {
        (data.len() == rows * cols).then_some(Operand {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        })
    }

    /// `rows x cols` elements of `data` at the given strides; `None` when
    /// the last one would lie outside it.
    pub(crate) fn strided(
        data: &'a [T],
        (rows, cols): (usize, usize),
        (row_stride, col_stride): (usize, usize),
    ) -> Option<Self> {
        let last = match (rows, cols) {
            (0, _) | (_, 0) => 0,
            _ => (rows - 1) * row_stride + (cols - 1) * col_stride + 1,
        };
        (last <= data.len()).then_some(Operand {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// `(rows, cols)`.
    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The transpose, without moving an element.
    pub(crate) fn t(self) -> Self {
        Operand {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// `a @ b` as a row-major `a.rows x b.cols` matrix: for each output, the
/// chunks of [`K_CHUNK`] along `k` each summed as one chain of fused
/// multiply-adds from zero, then added up in order. `None` when the inner
/// dimensions differ.
pub(crate) fn product<T: Real>(a: Operand<T>, b: Operand<T>) -> Option<Vec<T>> {
    product_on(a, b, rayon::current_num_threads())
}

/// [`product`] on at most `threads` threads (1: on the caller's alone, for
/// small products that run many at once).
pub(crate) fn product_on<T: Real>(a: Operand<T>, b: Operand<T>, threads: usize) -> Option<Vec<T>> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        return None;
    }
    if m == 0 || n == 0 || k == 0 {
        return Some(vec![T::of(0.0); m * n]);
    }
    // Not zeroed first: the first chunk's gemm writes every element
    // without reading any (zeroing cost 2% of a miner's CPU time).
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    let parallelism = match threads {
        0 | 1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    };
    for start in (0..k).step_by(K_CHUNK) {
        let depth = K_CHUNK.min(k - start);
        let (a_at, b_at) = (start * a.col_stride, start * b.row_stride);
        // SAFETY: every element gemm reads is inside its slice: the last
        // of `a`'s chunk is (m-1, start+depth-1), at
        // (m-1)*row_stride + (start+depth-1)*col_stride < a.data.len() as
        // `Operand` holds rows x cols elements at its strides (and likewise
        // for `b`); `out` has room for m x n row-major, written only
        // there, and read only from the second chunk on, after the first
        // (`read_dst` false) wrote every element.
        unsafe {
            gemm::gemm(
                m,
                n,
                depth,
                out.as_mut_ptr(),
                1,
                n as isize,
                start > 0,
                a.data[a_at..].as_ptr(),
                a.col_stride as isize,
                a.row_stride as isize,
                b.data[b_at..].as_ptr(),
                b.col_stride as isize,
                b.row_stride as isize,
                T::of(1.0),
                T::of(1.0),
                false,
                false,
                false,
                parallelism,
            );
        }
    }
    // SAFETY: k > 0, so the first chunk ran and wrote all m x n elements.
    unsafe { out.set_len(m * n) };
    Some(out)
}

/// What [`product`] must give: each element one chain of fused
/// multiply-adds per [`K_CHUNK`] of `k`, from zero, the chains added in
/// order. A row's chains run side by side (each still in its own order),
/// so that they do not wait on each other's latency.
#[inline(always)]
fn reference<T: Real>(a: Operand<T>, b: Operand<T>) -> Vec<T> {
    let at = |o: &Operand<T>, i: usize, j: usize| o.data[i * o.row_stride + j * o.col_stride];
    let mut out = vec![T::of(0.0); a.rows * b.cols];
    let mut chains = vec![T::of(0.0); b.cols];
    for (i, row) in out.chunks_exact_mut(b.cols.max(1)).enumerate() {
        for start in (0..a.cols).step_by(K_CHUNK) {
            let end = (start + K_CHUNK).min(a.cols);
            chains.fill(T::of(0.0));
            for t in start..end {
                let x = at(&a, i, t);
                for (j, chain) in chains.iter_mut().enumerate() {
                    *chain = x.mul_add(at(&b, t, j), *chain);
                }
            }
            // The first chunk is the result as it is (adding it to zero
            // would turn a -0 into +0, which gemm does not).
            for (sum, &chain) in row.iter_mut().zip(&chains) {
                *sum = if start == 0 { chain } else { *sum + chain };
            }
        }
    }
    out
}

/// `n` values uniform in (-1, 1], the same for the same `seed`: operands
/// for checking products.
pub(crate) fn sample_values(n: usize, seed: u64) -> Vec<f32> {
    let mut draws = SplitMix64::new(seed, 0);
    (0..n)
        .map(|_| (draws.unit_open0() * 2.0 - 1.0) as f32)
        .collect()
}

/// Checks, once per process, that this CPU's products are [`product`]'s
/// definition, on shapes like the model's (rows of tokens, a weight
/// gradient over them, transposed operands).
pub(crate) fn check_cpu() -> Result<(), ModelError> {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let (rows, k, n) = (96, 2 * K_CHUNK + 40, 72);
            let (x, w) = (sample_values(rows * k, 1), sample_values(k * n, 2));
            let x = Operand::rows(&x, rows, k).ok_or("shape")?;
            let w = Operand::rows(&w, k, n).ok_or("shape")?;
            let y = sample_values(rows * n, 3);
            let y = Operand::rows(&y, rows, n).ok_or("shape")?;
            for (what, a, b) in [
                ("x @ w", x, w),
                ("x^T @ y (a weight gradient)", x.t(), y),
                ("y @ w^T (an input gradient)", y, w.t()),
            ] {
                let got = product(a, b).ok_or("shape")?;
                // Fused multiply-adds as instructions where the CPU has
                // them: the baseline build calls libm's `fmaf` for each
                // (the same bits, rounded once), which made this check
                // ~3% of a validator's CPU in `bench trust`'s short runs.
                let want = crate::isa::on_widest(
                    #[inline(always)]
                    || reference(a, b),
                );
                if let Some(at) = got
                    .iter()
                    .zip(&want)
                    .position(|(g, w)| g.to_bits() != w.to_bits())
                {
                    return Err(format!(
                        "{what}: element {at} is {:e}, the reference order gives {:e}",
                        got[at], want[at]
                    ));
                }
            }
            Ok(())
        })
        .clone()
        .map_err(ModelError::CpuProducts)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use super::sample_values as values;

    /// The bit patterns of `v`, for comparing results exactly.
    pub(crate) fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn this_cpu_gives_the_reference_bits() {
        check_cpu().unwrap();
    }

    #[test]
    fn products_deeper_than_a_chunk_are_the_reference_with_any_thread_count() {
        // A weight gradient of the quickstart: 768 tokens deep.
        let (x, dy) = (values(768 * 128, 1), values(768 * 96, 2));
        let x = Operand::rows(&x, 768, 128).unwrap();
        let dy = Operand::rows(&dy, 768, 96).unwrap();
        let want = bits(&reference(x.t(), dy));
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let got = pool.install(|| product(x.t(), dy)).unwrap();
            assert_eq!(bits(&got), want, "{threads} threads");
        }
        // One chain over all 768 would differ: the chunks are what is checked.
        let one_chain: Vec<u32> = (0..128 * 96)
            .map(|o| {
                let (i, j) = (o / 96, o % 96);
                (0..768)
                    .fold(0.0f32, |acc, t| {
                        x.data[t * 128 + i].mul_add(dy.data[t * 96 + j], acc)
                    })
                    .to_bits()
            })
            .collect();
        assert_ne!(one_chain, want);
    }

    #[test]
    fn mismatched_inner_dimensions_are_refused() {
        let a = values(6, 1);
        let a = Operand::rows(&a, 2, 3).unwrap();
        assert!(product(a, a).is_none());
        assert!(product(a, a.t()).is_some());
        assert!(Operand::rows(&values(5, 1), 2, 3).is_none());
    }
}
