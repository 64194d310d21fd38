// Boundary codec kernels: per-row f16 scales, int8 and packed int4 codes,
// and their dequantization, in the layout of src/compress/quant.rs and with
// the arithmetic of src/compress/scalar.rs, operation for operation, so
// that codes are bit-identical to the CPU reference. Every float operation
// is an explicit round-to-nearest intrinsic, so that no compiler flag
// (-fmad, fast math) can fuse or approximate it. No headers: NVRTC's
// builtin set has no cuda_fp16.h, so f16 conversions are inline PTX.
//
// Layout: scales[r] = f16 bits of max|row r| / qmax rounded up; int8
// codes[r * width + c]; int4 rows of (width + 1) / 2 bytes, element 2k in
// the low nibble of byte k, element 2k + 1 in its high nibble.

#define ABS_MASK 0x7fffffffu
#define INF_BITS 0x7f800000u
#define GOLDEN 0x9e3779b97f4a7c15ull
// status bits, ORed by row_scales: the host turns them into errors.
#define STATUS_NON_FINITE 1u
#define STATUS_SCALE_OVERFLOW 2u

__device__ __forceinline__ unsigned short f32_to_f16_up(float x) {
    unsigned short h;
    asm("cvt.rp.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float x;
    asm("cvt.f32.f16 %0, %1;" : "=f"(x) : "h"(h));
    return x;
}

// scalar::inverse
__device__ __forceinline__ float inverse(float scale) {
    return scale > 0.0f ? __fdiv_rn(1.0f, scale) : 0.0f;
}

// scalar::uniform: SplitMix64 at position index + 1 from seed.
__device__ __forceinline__ float uniform(unsigned long long seed, unsigned long long index) {
    unsigned long long z = seed + (index + 1ull) * GOLDEN;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return __fmul_rn((float)(unsigned int)(z >> 40), 1.0f / 16777216.0f);
}

__device__ __forceinline__ int clamp_code(int q, int qmax) {
    return q < -qmax ? -qmax : (q > qmax ? qmax : q);
}

// scalar::code_nearest and scalar::code_stochastic.
__device__ __forceinline__ int code_of(float x, float inv, int qmax, int stochastic,
                                       unsigned long long seed, unsigned long long index) {
    float v = __fmul_rn(x, inv);
    if (stochastic) {
        return clamp_code((int)floorf(__fadd_rn(v, uniform(seed, index))), qmax);
    }
    return clamp_code(__float2int_rn(v), qmax);
}

// One block per row (blockDim.x a power of two, at most 1024): the row's
// absolute maximum as bits, then its f16 scale.
extern "C" __global__ void row_scales(const float* __restrict__ x,
                                      unsigned short* __restrict__ scales,
                                      unsigned int* __restrict__ status,
                                      unsigned int rows, unsigned int width, int qmax) {
    __shared__ unsigned int partial[1024];
    unsigned int r = blockIdx.x;
    if (r >= rows) return;
    const float* row = x + (unsigned long long)r * width;
    unsigned int m = 0;
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        unsigned int b = __float_as_uint(row[c]) & ABS_MASK;
        m = b > m ? b : m;
    }
    partial[threadIdx.x] = m;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s && partial[threadIdx.x + s] > partial[threadIdx.x]) {
            partial[threadIdx.x] = partial[threadIdx.x + s];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        unsigned int bits = partial[0];
        unsigned short h = 0;
        if (bits >= INF_BITS) {
            atomicOr(status, STATUS_NON_FINITE);
        } else {
            h = f32_to_f16_up(__fdiv_rn(__uint_as_float(bits), (float)qmax));
            if ((h & 0x7fffu) == 0x7c00u) atomicOr(status, STATUS_SCALE_OVERFLOW);
        }
        scales[r] = h;
    }
}

// One thread per code byte: rows x width bytes.
extern "C" __global__ void quantize_int8(const float* __restrict__ x,
                                         const unsigned short* __restrict__ scales,
                                         unsigned char* __restrict__ codes,
                                         unsigned int rows, unsigned int width,
                                         int stochastic, unsigned long long seed) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned long long)rows * width) return;
    float inv = inverse(f16_to_f32(scales[i / width]));
    codes[i] = (unsigned char)code_of(x[i], inv, 127, stochastic, seed, i);
}

// One thread per code byte: rows x (width + 1) / 2 bytes.
extern "C" __global__ void quantize_int4(const float* __restrict__ x,
                                         const unsigned short* __restrict__ scales,
                                         unsigned char* __restrict__ codes,
                                         unsigned int rows, unsigned int width,
                                         int stochastic, unsigned long long seed) {
    unsigned long long row_bytes = (width + 1u) / 2u;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * row_bytes) return;
    unsigned long long r = i / row_bytes;
    unsigned long long c = 2ull * (i % row_bytes);
    unsigned long long e = r * width + c;
    float inv = inverse(f16_to_f32(scales[r]));
    int lo = code_of(x[e], inv, 7, stochastic, seed, e);
    int hi = c + 1 < width ? code_of(x[e + 1], inv, 7, stochastic, seed, e + 1) : 0;
    codes[i] = (unsigned char)((lo & 0xf) | ((hi & 0xf) << 4));
}

// One thread per element.
extern "C" __global__ void dequantize_int8(const unsigned char* __restrict__ codes,
                                           const unsigned short* __restrict__ scales,
                                           float* __restrict__ out,
                                           unsigned int rows, unsigned int width) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned long long)rows * width) return;
    out[i] = __fmul_rn((float)(signed char)codes[i], f16_to_f32(scales[i / width]));
}

// One thread per element.
extern "C" __global__ void dequantize_int4(const unsigned char* __restrict__ codes,
                                           const unsigned short* __restrict__ scales,
                                           float* __restrict__ out,
                                           unsigned int rows, unsigned int width) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned long long)rows * width) return;
    unsigned long long r = i / width;
    unsigned long long c = i % width;
    unsigned int byte = codes[r * ((width + 1u) / 2u) + c / 2u];
    int nibble = (int)((c & 1u) ? (byte >> 4) : (byte & 0xfu));
    int q = nibble >= 8 ? nibble - 16 : nibble;
    out[i] = __fmul_rn((float)q, f16_to_f32(scales[r]));
}

// The code of element (r, c) read straight from the frame's bytes.
__device__ __forceinline__ int code_at(const unsigned char* __restrict__ codes, unsigned long long r,
                                       unsigned int c, unsigned int width, int int4) {
    if (!int4) return (int)(signed char)codes[r * width + c];
    unsigned int byte = codes[r * ((width + 1u) / 2u) + c / 2u];
    int nibble = (int)((c & 1u) ? (byte >> 4) : (byte & 0xfu));
    return nibble >= 8 ? nibble - 16 : nibble;
}

// The receiving side of a bottleneck: its up-projection with the
// dequantization fused into the input, one thread per output element:
// out[r * n + j] = scale_r * sum_k code(r, k) * w[k * n + j], with w the
// row-major width x n weight. The codes are read as they came off the wire,
// never written out as floats, and the scale multiplies once per output
// instead of once per code. Sums run in k order, every op rounded to
// nearest (the CPU reference in tests/compress_nvrtc.rs does the same).
extern "C" __global__ void dequantize_project(const unsigned char* __restrict__ codes,
                                              const unsigned short* __restrict__ scales,
                                              const float* __restrict__ w,
                                              float* __restrict__ out,
                                              unsigned int rows, unsigned int width,
                                              unsigned int n, int int4) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned long long)rows * n) return;
    unsigned long long r = i / n;
    unsigned int j = (unsigned int)(i % n);
    float acc = 0.0f;
    for (unsigned int k = 0; k < width; ++k) {
        acc = __fadd_rn(acc, __fmul_rn((float)code_at(codes, r, k, width, int4), w[(unsigned long long)k * n + j]));
    }
    out[i] = __fmul_rn(acc, f16_to_f32(scales[r]));
}
