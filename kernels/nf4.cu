// NF4 kernels in bitsandbytes' layout (src/quant/nf4.rs): two 4-bit indices per byte, high
// nibble first; absmax f32 per block of `bs` elements, or double quant: u8 codes `aq` into the
// 256-entry `code2` map, times `nested[b / nbs]`, plus `offset`. Every decode is
// `code16[q] * absmax` with absmax = `code2[aq[b]] * nested[b / nbs] + offset`, each step one
// rounded f32 operation (__fmul_rn/__fadd_rn: never contracted to an FMA), so values equal
// `Nf4Tensor::dequantize` bit for bit.
//
//   nf4_dequantize   elements [start, start + count) -> out (T); 8 elements per thread
//   nf4_gemv         T <= 8 tokens: y = x W^T + bias (+ s h B^T), packed W streamed once,
//                    code table in shared memory, one warp per output row (a term with a rank,
//                    out or column scale: nf4_gemv for the base, then lora.cu's adapter_expand)
//   nf4_row_sq_norms ||dequant(W)||_row^2 in f64
//   nf4_quantize     bnb quantize_4bit (nf4): absmax, reciprocal, bucketize, pack
//   nf4_double_quant bnb quantize_blockwise of absmax - offset with the 65536-cell LUT
#include "common.cuh"

__device__ __forceinline__ float nf4_absmax(i64 b, const float* absmax, const u8* aq,
                                            const float* nested, const float* code2,
                                            float offset, int nbs) {
  if (absmax) return absmax[b];
  return __fadd_rn(__fmul_rn(code2[aq[b]], nested[b / nbs]), offset);
}

__device__ __forceinline__ int nf4_index(const u8* packed, i64 e) {
  u8 byte = packed[e >> 1];
  return (e & 1) ? (byte & 15) : (byte >> 4);
}

#define NF4_ARGS_DECL                                                                      \
  const u8 *packed, const float *absmax, const u8 *aq, const float *nested,                \
      const float *code2, float offset, int nbs, int bs, const float *code16
#define NF4_ARGS packed, absmax, aq, nested, code2, offset, nbs, bs, code16

// Grid ceil(count / (256 * 8)); block 256; static smem 16 floats (the code table).
template <typename T>
__device__ void nf4_dequantize(NF4_ARGS_DECL, i64 start, i64 count, T* out) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = code16[threadIdx.x];
  __syncthreads();
  i64 k0 = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  i64 blk = -1;
  float am = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    i64 k = k0 + e;
    if (k < count) {
      i64 j = start + k;
      i64 b = j / bs;
      if (b != blk) {
        blk = b;
        am = nf4_absmax(b, absmax, aq, nested, code2, offset, nbs);
      }
      stf(out, k, __fmul_rn(code[nf4_index(packed, j)], am));
    }
  }
}
LF_INST(nf4_dequantize,
        (NF4_ARGS_DECL, long long start, long long count, void* out),
        (NF4_ARGS, start, count, (T*)out))

// x [ntok, in], W [out, in] (NF4), bias [out] or null, h [ntok, r] or null, B [out, r].
// y [ntok, out] = x W^T + bias + s h B^T. Grid ceil(out / 4); block 128; static smem 16 floats.
template <typename T>
__device__ void nf4_gemv(NF4_ARGS_DECL, const T* x, int ntok, int in, int out, const T* bias,
                         T* y, const T* h, const T* B, int r, float s) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = code16[threadIdx.x];
  __syncthreads();
  int lane = threadIdx.x & 31;
  int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (o >= out) return;
  float acc[8];
#pragma unroll
  for (int t = 0; t < 8; ++t) acc[t] = 0.f;
  i64 rowbase = (i64)o * in;
  int done = 0;
  if ((in & 7) == 0 && (bs & 7) == 0) {
    // 8 elements (4 bytes, one aligned word) per lane per step, all in one quant block.
    const unsigned* words = reinterpret_cast<const unsigned*>(packed);
    for (int i0 = lane * 8; i0 < in; i0 += 256) {
      i64 e0 = rowbase + i0;
      unsigned wd = words[e0 >> 3];
      float am = nf4_absmax(e0 / bs, absmax, aq, nested, code2, offset, nbs);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        unsigned byte = (wd >> (8 * k)) & 0xffu;
        float w0 = __fmul_rn(code[byte >> 4], am);
        float w1 = __fmul_rn(code[byte & 15u], am);
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          if (t < ntok) {
            i64 xi = (i64)t * in + i0 + 2 * k;
            acc[t] += w0 * ldf(x, xi) + w1 * ldf(x, xi + 1);
          }
        }
      }
    }
    done = in;
  }
  for (int i = done + lane; i < in; i += 32) {
    i64 e = rowbase + i;
    float w = __fmul_rn(code[nf4_index(packed, e)],
                        nf4_absmax(e / bs, absmax, aq, nested, code2, offset, nbs));
#pragma unroll
    for (int t = 0; t < 8; ++t)
      if (t < ntok) acc[t] += w * ldf(x, (i64)t * in + i);
  }
  float lo[8];
#pragma unroll
  for (int t = 0; t < 8; ++t) lo[t] = 0.f;
  if (h) {
    for (int j = lane; j < r; j += 32) {
      float b = ldf(B, (i64)o * r + j);
#pragma unroll
      for (int t = 0; t < 8; ++t)
        if (t < ntok) lo[t] += ldf(h, (i64)t * r + j) * b;
    }
  }
  float bi = ldf_or(bias, o, 0.f);
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    float a = warp_sum(acc[t]);
    float l = warp_sum(lo[t]);
    if (lane == 0 && t < ntok) stf(y, (i64)t * out + o, a + bi + s * l);
  }
}
LF_INST(nf4_gemv,
        (NF4_ARGS_DECL, const void* x, int ntok, int in, int out, const void* bias, void* y,
         const void* h, const void* B, int r, float s),
        (NF4_ARGS, (const T*)x, ntok, in, out, (const T*)bias, (T*)y, (const T*)h, (const T*)B,
         r, s))

// res [out] = row sums of squares of dequant(W) [out, in]; grid ceil(out / 4), block 128; static
// smem 16 floats.
template <typename T>
__device__ void nf4_row_sq_norms(NF4_ARGS_DECL, int out, int in, T* res) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = code16[threadIdx.x];
  __syncthreads();
  int lane = threadIdx.x & 31;
  int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (o >= out) return;
  double acc = 0.0;
  for (int i = lane; i < in; i += 32) {
    i64 e = (i64)o * in + i;
    double w = __fmul_rn(code[nf4_index(packed, e)],
                         nf4_absmax(e / bs, absmax, aq, nested, code2, offset, nbs));
    acc += w * w;
  }
  acc = warp_sum_d(acc);
  if (lane == 0) stf(res, o, (float)acc);
}
LF_INST(nf4_row_sq_norms, (NF4_ARGS_DECL, int out, int in, void* res),
        (NF4_ARGS, out, in, (T*)res))

// torch.bucketize(v, bounds, right=False) over 15 ascending bounds (a NaN goes to the end).
__device__ __forceinline__ int bucketize15(float v, const float* bounds) {
  int start = 0, end = 15;
  while (start < end) {
    int mid = start + ((end - start) >> 1);
    if (!(bounds[mid] >= v)) start = mid + 1;
    else end = mid;
  }
  return start;
}

// w [n] -> packed [(n + 1) / 2], absmax [ceil(n / bs)]; one warp per quant block, 4 per CTA.
// `bad` receives the smallest flat index of a non-finite input (initialised to n).
template <typename T>
__device__ void nf4_quantize(const T* w, i64 n, int bs, const float* bounds15, u8* packed,
                             float* absmax, i64* bad) {
  __shared__ float bounds[15];
  if (threadIdx.x < 15) bounds[threadIdx.x] = bounds15[threadIdx.x];
  __syncthreads();
  int lane = threadIdx.x & 31;
  i64 b = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  i64 nblocks = (n + bs - 1) / bs;
  if (b >= nblocks) return;
  i64 s0 = b * bs, s1 = min(n, s0 + bs);
  float m = 0.f;
  for (i64 j = s0 + lane; j < s1; j += 32) {
    float v = ldf(w, j);
    if (!isfinite(v)) atomicMin((unsigned long long*)bad, (unsigned long long)j);
    m = fmaxf(m, fabsf(v));
  }
  m = warp_max(m);
  bool full = (s1 - s0) == bs;
  const float amin = 1e-38f;
  float recip = 0.f, div = 0.f;
  if (full) {
    recip = __frcp_rn(fmaxf(m, amin));
  } else {
    div = fmaxf(m, amin);
  }
  if (lane == 0) absmax[b] = full ? m : div;
  i64 pairs = (s1 - s0 + 1) / 2;
  for (i64 p = lane; p < pairs; p += 32) {
    i64 j = s0 + 2 * p;
    int q[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      if (j + k < s1) {
        float x = ldf(w, j + k);
        float v = full ? __fmul_rn(x, recip) : __fdiv_rn(x, div);
        q[k] = bucketize15(fminf(fmaxf(v, -1.f), 1.f), bounds);
      } else {
        q[k] = 7;
      }
    }
    packed[j >> 1] = (u8)((q[0] << 4) | q[1]);
  }
}
LF_INST(nf4_quantize,
        (const void* w, long long n, int bs, const float* bounds15, u8* packed, float* absmax,
         long long* bad),
        ((const T*)w, n, bs, bounds15, packed, absmax, bad))

// Double quant of absmax [nblocks] around `offset`: one CTA of 256 threads per nested block.
// q[i] = lut[cell((absmax[i] - offset) / max|.|)], nested[b] = max|absmax - offset|.
extern "C" __global__ void nf4_double_quant(const float* absmax, long long nblocks, float offset,
                                            const u8* lut, u8* q, float* nested) {
  i64 i = (i64)blockIdx.x * 256 + threadIdx.x;
  float c = i < nblocks ? __fsub_rn(absmax[i], offset) : 0.f;
  float m = block_max(fabsf(c));
  if (threadIdx.x == 0) nested[blockIdx.x] = m;
  if (i >= nblocks) return;
  if (m == 0.f) {
    q[i] = 0;
    return;
  }
  float v = __fmul_rn(c, __frcp_rn(m));
  float t = __fmul_rn(__fadd_rn(fminf(fmaxf(v, -1.f), 1.f), 1.f), 0.5f);
  unsigned cell = (unsigned)__fmaf_rn(t, 65535.f, 0.5f);
  q[i] = lut[cell];
}
