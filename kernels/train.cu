// The GPT stage's training kernels (forward and backward), compiled at run
// time by NVRTC (src/gpu). Matmuls are cuBLAS's; these are the rest.
//
// Every reduction runs in one thread, in a fixed order, with no atomics:
// a pass computed twice on the same GPU gives the same bits, which is what
// lets a validator replay a GPU miner's pass and compare digests. The
// formulas and orders are those of the CPU kernels (src/model/ops.rs); the
// results differ from the CPU's only by `expf`/`sqrtf` rounding and by
// cuBLAS's summation order.
//
// Shapes: N = B * T rows of width C; heads nh of size hs = C / nh; the
// attention matrices are (B * nh, T, T). All buffers are row-major f32,
// token ids u32. One thread per output element or per row; every thread
// checks its index.

#define GELU_C 0.7978845608028654f
#define GELU_A 0.044715f
#define LN_EPS 1e-5f

__device__ __forceinline__ unsigned long long tid() {
    return (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
}

// tanh(u) = 1 - 2 / (exp(2u) + 1): exact at both ends, as on the CPU.
__device__ __forceinline__ float tanh_of(float u) {
    return 1.0f - 2.0f / (expf(u + u) + 1.0f);
}

// out[n, c] = wte[ids[n], c] + wpe[n % T, c]
extern "C" __global__ void embed_fwd(float* out, const unsigned* ids, const float* wte,
                                     const float* wpe, unsigned N, unsigned T, unsigned C) {
    unsigned long long i = tid();
    if (i >= (unsigned long long)N * C) return;
    unsigned n = i / C, c = i % C;
    out[i] = wte[(unsigned long long)ids[n] * C + c] + wpe[(unsigned long long)(n % T) * C + c];
}

// Sums over many rows run in two launches with a fixed order: each part
// of `rpp` consecutive rows is summed in row order into partial[p], then
// the parts in part order (sum_parts). Parallel over parts, and the same
// bits every time.

// partial[(p * V + v) * C + c] = sum over the rows n of part p with
// ids[n] == v of dout[n, c], in n order (partial zeroed before).
extern "C" __global__ void embed_bwd_wte_parts(float* partial, const unsigned* ids,
                                               const float* dout, unsigned N, unsigned V,
                                               unsigned C, unsigned rpp) {
    unsigned long long i = tid();
    unsigned parts = (N + rpp - 1) / rpp;
    if (i >= (unsigned long long)parts * C) return;
    unsigned p = i / C, c = i % C;
    unsigned end = min(N, (p + 1) * rpp);
    for (unsigned n = p * rpp; n < end; n++) {
        partial[((unsigned long long)p * V + ids[n]) * C + c] += dout[(unsigned long long)n * C + c];
    }
}

// out[i] = sum over p of partial[p * width + i], in p order.
extern "C" __global__ void sum_parts(float* out, const float* partial, unsigned parts,
                                     unsigned long long width) {
    unsigned long long i = tid();
    if (i >= width) return;
    float acc = 0.0f;
    for (unsigned p = 0; p < parts; p++) acc += partial[p * width + i];
    out[i] = acc;
}

// dwpe[t, c] = sum over b of dout[b, t, c] for t < T; 0 for the rows of
// positions past this microbatch's length.
extern "C" __global__ void embed_bwd_wpe(float* dwpe, const float* dout, unsigned B, unsigned T,
                                         unsigned Tmax, unsigned C) {
    unsigned long long i = tid();
    if (i >= (unsigned long long)Tmax * C) return;
    unsigned t = i / C, c = i % C;
    float acc = 0.0f;
    if (t < T) {
        for (unsigned b = 0; b < B; b++) acc += dout[((unsigned long long)b * T + t) * C + c];
    }
    dwpe[i] = acc;
}

// Per row: xhat = (x - mean) / sqrt(var + eps), out = xhat * gain; keeps
// xhat and 1 / std for the backward pass.
extern "C" __global__ void layernorm_fwd(float* out, float* xhat, float* rstd, const float* x,
                                         const float* gain, unsigned N, unsigned C) {
    unsigned long long n = tid();
    if (n >= N) return;
    const float* row = x + n * C;
    float mean = 0.0f;
    for (unsigned c = 0; c < C; c++) mean += row[c];
    mean /= (float)C;
    float var = 0.0f;
    for (unsigned c = 0; c < C; c++) var += (row[c] - mean) * (row[c] - mean);
    var /= (float)C;
    float r = 1.0f / sqrtf(var + LN_EPS);
    rstd[n] = r;
    for (unsigned c = 0; c < C; c++) {
        float h = (row[c] - mean) * r;
        xhat[n * C + c] = h;
        out[n * C + c] = h * gain[c];
    }
}

// Per row, with g = dout * gain: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
extern "C" __global__ void layernorm_bwd(float* dx, const float* dout, const float* xhat,
                                         const float* rstd, const float* gain, unsigned N,
                                         unsigned C) {
    unsigned long long n = tid();
    if (n >= N) return;
    const float* d = dout + n * C;
    const float* h = xhat + n * C;
    float g_mean = 0.0f, gx_mean = 0.0f;
    for (unsigned c = 0; c < C; c++) {
        float g = d[c] * gain[c];
        g_mean += g;
        gx_mean += g * h[c];
    }
    g_mean /= (float)C;
    gx_mean /= (float)C;
    float r = rstd[n];
    for (unsigned c = 0; c < C; c++) {
        float g = d[c] * gain[c];
        dx[n * C + c] = r * (g - g_mean - h[c] * gx_mean);
    }
}

// partial[p * C + c] = sum over the rows n of part p of a[n, c] * b[n, c],
// in n order: with sum_parts, a LayerNorm gain's gradient (a = dout,
// b = xhat).
extern "C" __global__ void column_dot_parts(float* partial, const float* a, const float* b,
                                            unsigned N, unsigned C, unsigned rpp) {
    unsigned long long i = tid();
    unsigned parts = (N + rpp - 1) / rpp;
    if (i >= (unsigned long long)parts * C) return;
    unsigned p = i / C, c = i % C;
    unsigned end = min(N, (p + 1) * rpp);
    float acc = 0.0f;
    for (unsigned n = p * rpp; n < end; n++) {
        acc += a[(unsigned long long)n * C + c] * b[(unsigned long long)n * C + c];
    }
    partial[i] = acc;
}

extern "C" __global__ void gelu_fwd(float* out, const float* x, unsigned long long len) {
    unsigned long long i = tid();
    if (i >= len) return;
    float v = x[i];
    float t = tanh_of(GELU_C * (v + GELU_A * v * v * v));
    out[i] = 0.5f * v * (1.0f + t);
}

extern "C" __global__ void gelu_bwd(float* dx, const float* x, const float* dout,
                                    unsigned long long len) {
    unsigned long long i = tid();
    if (i >= len) return;
    float v = x[i];
    float t = tanh_of(GELU_C * (v + GELU_A * v * v * v));
    float du = GELU_C * (1.0f + 3.0f * GELU_A * v * v);
    dx[i] = dout[i] * (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du);
}

// a += b
extern "C" __global__ void add_assign(float* a, const float* b, unsigned long long len) {
    unsigned long long i = tid();
    if (i >= len) return;
    a[i] += b[i];
}

// Element i of a (B, nh, T, hs) tensor of heads as (b, h, t, d).
__device__ __forceinline__ void head_index(unsigned long long i, unsigned T, unsigned nh,
                                           unsigned hs, unsigned* b, unsigned* t, unsigned* h,
                                           unsigned* d) {
    *d = i % hs;
    *t = (i / hs) % T;
    *h = (i / ((unsigned long long)hs * T)) % nh;
    *b = i / ((unsigned long long)hs * T * nh);
}

// qkv (B, T, 3, nh, hs) <-> q, k, v (B, nh, T, hs). `back` = 0: split the
// forward's qkv into heads; 1: gather the heads' gradients into dqkv.
extern "C" __global__ void qkv_heads(float* qkv, float* q, float* k, float* v, unsigned B,
                                     unsigned T, unsigned nh, unsigned hs, int back) {
    unsigned long long i = tid();
    unsigned long long len = (unsigned long long)B * nh * T * hs;
    if (i >= len) return;
    unsigned b, t, h, d;
    head_index(i, T, nh, hs, &b, &t, &h, &d);
    unsigned long long C = (unsigned long long)nh * hs;
    unsigned long long base = ((unsigned long long)b * T + t) * 3 * C + (unsigned long long)h * hs + d;
    if (back) {
        qkv[base] = q[i];
        qkv[base + C] = k[i];
        qkv[base + 2 * C] = v[i];
    } else {
        q[i] = qkv[base];
        k[i] = qkv[base + C];
        v[i] = qkv[base + 2 * C];
    }
}

// y (B, T, nh, hs) <-> heads (B, nh, T, hs). `back` = 0: merge heads into
// y; 1: split y's gradient into heads.
extern "C" __global__ void merge_heads(float* y, float* heads, unsigned B, unsigned T, unsigned nh,
                                       unsigned hs, int back) {
    unsigned long long i = tid();
    unsigned long long len = (unsigned long long)B * nh * T * hs;
    if (i >= len) return;
    unsigned b, t, h, d;
    head_index(i, T, nh, hs, &b, &t, &h, &d);
    unsigned long long at = ((unsigned long long)b * T + t) * nh * hs + (unsigned long long)h * hs + d;
    if (back) heads[i] = y[at];
    else y[at] = heads[i];
}

// Row r of the (rows, T) scores is query position i = r % T: softmax of
// scale * x over x[0..=i], 0 past it.
extern "C" __global__ void causal_softmax_fwd(float* out, const float* x, unsigned rows, unsigned T,
                                              float scale) {
    unsigned long long r = tid();
    if (r >= rows) return;
    const float* row = x + r * T;
    float* o = out + r * T;
    unsigned visible = (unsigned)(r % T) + 1;
    float max = row[0];
    for (unsigned j = 1; j < visible; j++) max = row[j] > max ? row[j] : max;
    float sum = 0.0f;
    for (unsigned j = 0; j < visible; j++) {
        o[j] = expf((row[j] - max) * scale);
        sum += o[j];
    }
    for (unsigned j = 0; j < visible; j++) o[j] = o[j] / sum;
    for (unsigned j = visible; j < T; j++) o[j] = 0.0f;
}

// dx = scale * y * (g - sum(g * y)) per row; masked entries have y = 0.
extern "C" __global__ void causal_softmax_bwd(float* dx, const float* y, const float* g,
                                              unsigned rows, unsigned T, float scale) {
    unsigned long long r = tid();
    if (r >= rows) return;
    const float* yr = y + r * T;
    const float* gr = g + r * T;
    float dot = 0.0f;
    for (unsigned j = 0; j < T; j++) dot += yr[j] * gr[j];
    for (unsigned j = 0; j < T; j++) dx[r * T + j] = scale * yr[j] * (gr[j] - dot);
}

// A row's maximum and sum of exp(x - max): log_softmax's statistics.
__device__ __forceinline__ void softmax_stats(const float* row, unsigned V, float* max, float* sum) {
    float m = row[0];
    for (unsigned j = 1; j < V; j++) m = row[j] > m ? row[j] : m;
    float s = 0.0f;
    for (unsigned j = 0; j < V; j++) s += expf(row[j] - m);
    *max = m;
    *sum = s;
}

// losses[n] = -log_softmax(logits[n])[targets[n]].
extern "C" __global__ void cross_entropy_fwd(float* losses, const float* logits,
                                             const unsigned* targets, unsigned N, unsigned V) {
    unsigned long long n = tid();
    if (n >= N) return;
    const float* row = logits + n * V;
    float max, sum;
    softmax_stats(row, V, &max, &sum);
    losses[n] = -(row[targets[n]] - max - logf(sum));
}

// The mean loss's gradient: (softmax(logits) - onehot(target)) / N.
extern "C" __global__ void cross_entropy_bwd(float* dlogits, const float* logits,
                                             const unsigned* targets, unsigned N, unsigned V) {
    unsigned long long n = tid();
    if (n >= N) return;
    const float* row = logits + n * V;
    float max, sum;
    softmax_stats(row, V, &max, &sum);
    float inv_n = 1.0f / (float)N;
    for (unsigned j = 0; j < V; j++) {
        float p = expf(row[j] - max) / sum;
        dlogits[n * V + j] = (p - (j == targets[n] ? 1.0f : 0.0f)) * inv_n;
    }
}
