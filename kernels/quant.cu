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

// The code of element (r, c) read straight from the frame's bytes.
__device__ __forceinline__ int code_at(const unsigned char* __restrict__ codes, unsigned long long r,
                                       unsigned int c, unsigned int width, int int4) {
    if (!int4) return (int)(signed char)codes[r * width + c];
    unsigned int byte = codes[r * ((width + 1u) / 2u) + c / 2u];
    int nibble = (int)((c & 1u) ? (byte >> 4) : (byte & 0xfu));
    return nibble >= 8 ? nibble - 16 : nibble;
}

// The codes of four consecutive elements, from element e on, each masked
// to its width (0xff for int8, 0xf for int4).
__device__ __forceinline__ void codes4(float4 v, float inv, int qmax, int stochastic,
                                       unsigned long long seed, unsigned long long e,
                                       unsigned int mask, unsigned int q[4]) {
    q[0] = (unsigned int)code_of(v.x, inv, qmax, stochastic, seed, e) & mask;
    q[1] = (unsigned int)code_of(v.y, inv, qmax, stochastic, seed, e + 1) & mask;
    q[2] = (unsigned int)code_of(v.z, inv, qmax, stochastic, seed, e + 2) & mask;
    q[3] = (unsigned int)code_of(v.w, inv, qmax, stochastic, seed, e + 3) & mask;
}

// One warp per row (blockDim.x a multiple of 32): the row's absolute
// maximum as bits (a max is exact in any order), its f16 scale, then the
// codes, in one pass over the row; the second read of the row hits the
// cache. Rows of a width divisible by 4 are read 16 bytes at a time and
// their codes written 4 (int8) or 2 (int4) bytes at a time.
// int8 codes[r * width + c]; int4 rows of (width + 1) / 2 bytes.
extern "C" __global__ void quantize_rows(const float* __restrict__ x,
                                         unsigned short* __restrict__ scales,
                                         unsigned char* __restrict__ codes,
                                         unsigned int* __restrict__ status,
                                         unsigned int rows, unsigned int width, int int4,
                                         int stochastic, unsigned long long seed) {
    unsigned int lane = threadIdx.x & 31u;
    unsigned long long r = ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (r >= rows) return;
    int qmax = int4 ? 7 : 127;
    const float* row = x + r * width;
    bool vec = (width & 3u) == 0u;
    unsigned int m = 0;
    if (vec) {
        const float4* row4 = reinterpret_cast<const float4*>(row);
        for (unsigned int c = lane; c < width / 4u; c += 32u) {
            float4 v = row4[c];
            unsigned int a = __float_as_uint(v.x) & ABS_MASK, b = __float_as_uint(v.y) & ABS_MASK;
            unsigned int d = __float_as_uint(v.z) & ABS_MASK, e = __float_as_uint(v.w) & ABS_MASK;
            m = max(m, max(max(a, b), max(d, e)));
        }
    } else {
        for (unsigned int c = lane; c < width; c += 32u) m = max(m, __float_as_uint(row[c]) & ABS_MASK);
    }
    for (int off = 16; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
    unsigned short h = 0;
    if (m >= INF_BITS) {
        if (lane == 0) atomicOr(status, STATUS_NON_FINITE);
    } else {
        h = f32_to_f16_up(__fdiv_rn(__uint_as_float(m), (float)qmax));
        if (lane == 0 && (h & 0x7fffu) == 0x7c00u) atomicOr(status, STATUS_SCALE_OVERFLOW);
    }
    if (lane == 0) scales[r] = h;
    float inv = inverse(f16_to_f32(h));
    unsigned long long e0 = r * width;
    if (!int4) {
        unsigned char* out = codes + r * width;
        if (vec) {
            const float4* row4 = reinterpret_cast<const float4*>(row);
            unsigned int* out4 = reinterpret_cast<unsigned int*>(out);
            for (unsigned int c = lane; c < width / 4u; c += 32u) {
                unsigned int q[4];
                codes4(row4[c], inv, qmax, stochastic, seed, e0 + 4ull * c, 0xffu, q);
                out4[c] = q[0] | (q[1] << 8) | (q[2] << 16) | (q[3] << 24);
            }
        } else {
            for (unsigned int c = lane; c < width; c += 32u) {
                out[c] = (unsigned char)code_of(row[c], inv, qmax, stochastic, seed, e0 + c);
            }
        }
        return;
    }
    unsigned int row_bytes = (width + 1u) / 2u;
    unsigned char* out = codes + r * row_bytes;
    if (vec) {
        const float4* row4 = reinterpret_cast<const float4*>(row);
        unsigned short* out2 = reinterpret_cast<unsigned short*>(out);
        for (unsigned int c = lane; c < width / 4u; c += 32u) {
            unsigned int q[4];
            codes4(row4[c], inv, qmax, stochastic, seed, e0 + 4ull * c, 0xfu, q);
            out2[c] = (unsigned short)(q[0] | (q[1] << 4) | (q[2] << 8) | (q[3] << 12));
        }
    } else {
        for (unsigned int b = lane; b < row_bytes; b += 32u) {
            unsigned int c = 2u * b;
            int lo = code_of(row[c], inv, qmax, stochastic, seed, e0 + c);
            int hi = c + 1 < width ? code_of(row[c + 1], inv, qmax, stochastic, seed, e0 + c + 1) : 0;
            out[b] = (unsigned char)((lo & 0xf) | ((hi & 0xf) << 4));
        }
    }
}

// One warp per row, as quantize_rows: out[r * width + c] = code * scale_r.
extern "C" __global__ void dequantize_rows(const unsigned char* __restrict__ codes,
                                           const unsigned short* __restrict__ scales,
                                           float* __restrict__ out,
                                           unsigned int rows, unsigned int width, int int4) {
    unsigned int lane = threadIdx.x & 31u;
    unsigned long long r = ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (r >= rows) return;
    float scale = f16_to_f32(scales[r]);
    float* row = out + r * width;
    if ((width & 3u) == 0u) {
        float4* row4 = reinterpret_cast<float4*>(row);
        for (unsigned int c = lane; c < width / 4u; c += 32u) {
            int q[4];
            if (int4) {
                unsigned int b = reinterpret_cast<const unsigned short*>(codes + r * (width / 2u))[c];
                for (int k = 0; k < 4; k++) {
                    int nibble = (int)((b >> (4 * k)) & 0xfu);
                    q[k] = nibble >= 8 ? nibble - 16 : nibble;
                }
            } else {
                unsigned int b = reinterpret_cast<const unsigned int*>(codes + r * width)[c];
                for (int k = 0; k < 4; k++) q[k] = (int)(signed char)(b >> (8 * k));
            }
            row4[c] = make_float4(__fmul_rn((float)q[0], scale), __fmul_rn((float)q[1], scale),
                                  __fmul_rn((float)q[2], scale), __fmul_rn((float)q[3], scale));
        }
        return;
    }
    for (unsigned int c = lane; c < width; c += 32u) {
        row[c] = __fmul_rn((float)code_at(codes, r, c, width, int4), scale);
    }
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
