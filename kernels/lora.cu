// The fused low-rank product (src/backend/lowrank.rs), y = c ⊙ (x W^T + s·o ⊙ (((x A^T) ⊙ ρ) B^T))
// + bias over a dense or NF4 base: LoRA, rsLoRA, DoRA, VeRA, AdaLoRA and their quantized twins are
// all these kernels with different scales (ρ = rank scale, o = out scale, c = m / n column scale;
// a null scale reads as 1). The big dense products (x W^T, x A^T for many tokens, the backward
// GEMMs) go to cuBLAS; these kernels are everything around them, fused:
//
//   adapter_expand    one pass over y: y = c ⊙ (base + s·o ⊙ ((ρ ⊙ h) B^T)) + bias (z saved when
//                     asked); with r = 0 it is the column scale (dy ⊙ c) or the bias add alone
//   shrink_small      h = x A^T for T <= 8 tokens (one warp per rank row, x read from cache)
//   linear_decode     T <= 8: y = x W^T + bias + s·o ⊙ ((ρ ⊙ h) B^T): reads W once, term fused
//   scale_rows        dst[o, j] = src[o, j] * scale[o] (diag(o) B, diag(ρ) A for the input gradient)
//   scale_rc_from_f32 an f32 product into storage with row and column scales (dA = s ρ ⊙ M,
//                     dB = s (c o) ⊙ P ⊙ ρ)
//   scale_rc_to_f32   storage into f32 with row and column scales (B' = diag(o) B diag(ρ))
//   lowrank_merge     in place W = post ⊙ (pre(W) + c · (o ⊙ B)(ρ ⊙ A)), one pass over W
#include "common.cuh"

#define EXPAND_COLS 128
#define EXPAND_ROWS 8

// y[t, o] = k[o] * z[t, o] + bias[o] with z[t, o] = base[t, o] + s * bscale[o] * sum_j dscale[j]
// h[t, j] B[o, j] and k = mag / norm (1 when mag is null); z written when non-null.
// base, y, z: [T, out] (base may alias y or z); h: [T, r]; B: [out, ldb] (first r columns used;
// h and B unread when r = 0); bias, bscale, mag, norm: [out] or null; dscale: [r] or null.
// Grid: (ceil(out / 128), ceil(T / 8)); block 128; dynamic smem 8 * r floats.
template <typename T>
__device__ void adapter_expand(const T* base, T* y, T* z, const T* h, const T* B, int ldb,
                               const T* bias, const T* dscale, const T* bscale, const T* mag,
                               const T* norm, int ntok, int out, int r, float s) {
  extern __shared__ float hs[];  // [EXPAND_ROWS][r]
  int t0 = blockIdx.y * EXPAND_ROWS;
  int rows = min(EXPAND_ROWS, ntok - t0);
  for (int k = threadIdx.x; k < EXPAND_ROWS * r; k += blockDim.x) {
    int tt = k / r, j = k % r;
    hs[k] = tt < rows ? ldf(h, (i64)(t0 + tt) * r + j) * ldf_or(dscale, j, 1.f) : 0.f;
  }
  __syncthreads();
  int o = blockIdx.x * EXPAND_COLS + threadIdx.x;
  if (o >= out) return;
  float acc[EXPAND_ROWS];
#pragma unroll
  for (int tt = 0; tt < EXPAND_ROWS; ++tt) acc[tt] = 0.f;
  const T* brow = B + (i64)o * ldb;
  for (int j = 0; j < r; ++j) {
    float b = ldf(brow, j);
#pragma unroll
    for (int tt = 0; tt < EXPAND_ROWS; ++tt) acc[tt] += hs[tt * r + j] * b;
  }
  float bs = ldf_or(bscale, o, 1.f);
  float k = mag ? ldf(mag, o) / ldf(norm, o) : 1.f;
  float bi = ldf_or(bias, o, 0.f);
#pragma unroll
  for (int tt = 0; tt < EXPAND_ROWS; ++tt) {
    if (tt < rows) {
      i64 idx = (i64)(t0 + tt) * out + o;
      float zv = ldf(base, idx) + s * (bs * acc[tt]);
      if (z) stf(z, idx, zv);
      stf(y, idx, (mag ? k * zv : zv) + bi);
    }
  }
}
LF_INST(adapter_expand,
        (const void* base, void* y, void* z, const void* h, const void* B, int ldb,
         const void* bias, const void* dscale, const void* bscale, const void* mag,
         const void* norm, int ntok, int out, int r, float s),
        ((const T*)base, (T*)y, (T*)z, (const T*)h, (const T*)B, ldb, (const T*)bias,
         (const T*)dscale, (const T*)bscale, (const T*)mag, (const T*)norm, ntok, out, r, s))

// h[t, j] = ascale[j] * sum_i x[t, i] A[j, i], t < ntok <= 8; A: [r, lda] (first `in` columns);
// ascale [r] or null (the fused op passes null: its h is x A^T, before the rank scale).
// Grid: ceil(r / 4); block 128 (one warp per rank row j); no dynamic smem.
template <typename T>
__device__ void shrink_small(const T* x, const T* A, int lda, const T* ascale, T* h, int ntok,
                             int in, int r) {
  int lane = threadIdx.x & 31;
  int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (j >= r) return;
  float acc[8];
#pragma unroll
  for (int t = 0; t < 8; ++t) acc[t] = 0.f;
  const T* arow = A + (i64)j * lda;
  for (int i = lane; i < in; i += 32) {
    float a = ldf(arow, i);
#pragma unroll
    for (int t = 0; t < 8; ++t)
      if (t < ntok) acc[t] += a * ldf(x, (i64)t * in + i);
  }
  float sc = ldf_or(ascale, j, 1.f);
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    float v = warp_sum(acc[t]);
    if (lane == 0 && t < ntok) stf(h, (i64)t * r + j, sc * v);
  }
}
LF_INST(shrink_small,
        (const void* x, const void* A, int lda, const void* ascale, void* h, int ntok, int in,
         int r),
        ((const T*)x, (const T*)A, lda, (const T*)ascale, (T*)h, ntok, in, r))

// Decode path (ntok <= 8): y[t, o] = sum_i x[t, i] W[o, i] + bias[o]
//                                    + s * bscale[o] * sum_j dscale[j] h[t, j] B[o, j].
// W: [out, in]; h: [T, r] or null (no adapter term); B: [out, ldb]; dscale [r], bscale [out] or
// null. One warp per output row: W is read once, 16 bytes per lane per step when rows are 16-byte
// aligned. Grid: ceil(out / 4); block 128; no dynamic smem.
template <typename T>
__device__ void linear_decode(const T* x, const T* W, const T* bias, T* y, const T* h,
                              const T* B, int ldb, const T* dscale, const T* bscale, int ntok,
                              int in, int out, int r, float s) {
  const int VEC = 16 / sizeof(T);
  int lane = threadIdx.x & 31;
  int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (o >= out) return;
  float acc[8];
#pragma unroll
  for (int t = 0; t < 8; ++t) acc[t] = 0.f;
  const T* wrow = W + (i64)o * in;
  int done = 0;
  if ((in % VEC) == 0 && (((unsigned long long)wrow) & 15) == 0) {
    for (int i0 = lane * VEC; i0 < in; i0 += 32 * VEC) {
      uint4 raw = *reinterpret_cast<const uint4*>(wrow + i0);
      const T* wv = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        float w = to_f<T>(wv[e]);
#pragma unroll
        for (int t = 0; t < 8; ++t)
          if (t < ntok) acc[t] += w * ldf(x, (i64)t * in + i0 + e);
      }
    }
    done = in;
  }
  for (int i = done + lane; i < in; i += 32) {
    float w = ldf(wrow, i);
#pragma unroll
    for (int t = 0; t < 8; ++t)
      if (t < ntok) acc[t] += w * ldf(x, (i64)t * in + i);
  }
  float lo[8];
#pragma unroll
  for (int t = 0; t < 8; ++t) lo[t] = 0.f;
  if (h) {
    for (int j = lane; j < r; j += 32) {
      float b = ldf(B, (i64)o * ldb + j) * ldf_or(dscale, j, 1.f);
#pragma unroll
      for (int t = 0; t < 8; ++t)
        if (t < ntok) lo[t] += ldf(h, (i64)t * r + j) * b;
    }
  }
  float bi = ldf_or(bias, o, 0.f), bs = ldf_or(bscale, o, 1.f);
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    float a = warp_sum(acc[t]);
    float l = warp_sum(lo[t]);
    if (lane == 0 && t < ntok) stf(y, (i64)t * out + o, a + bi + s * (bs * l));
  }
}
LF_INST(linear_decode,
        (const void* x, const void* W, const void* bias, void* y, const void* h, const void* B,
         int ldb, const void* dscale, const void* bscale, int ntok, int in, int out, int r,
         float s),
        ((const T*)x, (const T*)W, (const T*)bias, (T*)y, (const T*)h, (const T*)B, ldb,
         (const T*)dscale, (const T*)bscale, ntok, in, out, r, s))

// dst[o, j] = src[o * lds + j] * scale[o] for o < rows, j < cols; dst is dense [rows, cols].
// Grid: ceil(rows * cols / 256); block 256; no smem.
template <typename T>
__device__ void scale_rows(const T* src, int lds, const T* scale, T* dst, int rows, int cols) {
  i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= (i64)rows * cols) return;
  int o = (int)(k / cols), j = (int)(k % cols);
  stf(dst, k, ldf(src, (i64)o * lds + j) * ldf_or(scale, o, 1.f));
}
LF_INST(scale_rows, (const void* src, int lds, const void* scale, void* dst, int rows, int cols),
        ((const T*)src, lds, (const T*)scale, (T*)dst, rows, cols))

// dst[o, j] = s * src[o * lds + j] * rs[o] * (mag[o] / norm[o]) * cs[j] for o < rows, j < cols;
// each scale null reads as 1 (mag and norm go together); src: [rows, lds] (first cols used), dst
// dense [rows, cols]; the scales are storage-typed. One rounding to D per element.
// Grid: ceil(rows * cols / 256); block 256; no smem.
template <typename S, typename D, typename T>
__device__ void scale_rc(const S* src, int lds, D* dst, int rows, int cols, const T* rs,
                         const T* mag, const T* norm, const T* cs, float s) {
  i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= (i64)rows * cols) return;
  int o = (int)(k / cols), j = (int)(k % cols);
  float v = s * ldf(src, (i64)o * lds + j);
  v *= ldf_or(rs, o, 1.f);
  if (mag) v *= ldf(mag, o) / ldf(norm, o);
  v *= ldf_or(cs, j, 1.f);
  stf(dst, k, v);
}

// src f32 [rows, lds] -> dst storage [rows, cols] (the factor gradients from f32 GEMM products).
template <typename T>
__device__ void scale_rc_from_f32(const float* src, int lds, T* dst, int rows, int cols,
                                  const T* rs, const T* mag, const T* norm, const T* cs,
                                  float s) {
  scale_rc<float, T, T>(src, lds, dst, rows, cols, rs, mag, norm, cs, s);
}
LF_INST(scale_rc_from_f32,
        (const float* src, int lds, void* dst, int rows, int cols, const void* rs,
         const void* mag, const void* norm, const void* cs, float s),
        (src, lds, (T*)dst, rows, cols, (const T*)rs, (const T*)mag, (const T*)norm,
         (const T*)cs, s))

// src storage [rows, lds] -> dst f32 [rows, cols] (B' = diag(o) B diag(ρ) of the weight norm).
template <typename T>
__device__ void scale_rc_to_f32(const T* src, int lds, float* dst, int rows, int cols,
                                const T* rs, const T* mag, const T* norm, const T* cs, float s) {
  scale_rc<T, float, T>(src, lds, dst, rows, cols, rs, mag, norm, cs, s);
}
LF_INST(scale_rc_to_f32,
        (const void* src, int lds, float* dst, int rows, int cols, const void* rs,
         const void* mag, const void* norm, const void* cs, float s),
        ((const T*)src, lds, dst, rows, cols, (const T*)rs, (const T*)mag, (const T*)norm,
         (const T*)cs, s))

#define MERGE_ROWS 16
// In place, W [out, in]:
//   mode 0: W = W + c * acc                 (no column scale: merge c = s, unmerge c = -s)
//   mode 1: W = (m / n) * (W + c * acc)     (column scale merge, c = s)
//   mode 2: W = W / (m / n) + c * acc       (column scale unmerge, c = -s)
// with acc[o, i] = sum_j (bscale[o] B[o, j]) (ascale[j] A[j, i]); A: [r, lda] (first `in` columns),
// B: [out, ldb]; ascale = ρ [r], bscale = o [out], mag, norm [out] or null.
// Grid: (ceil(in / 256), ceil(out / 16)); block 256; dynamic smem 16 * r floats.
template <typename T>
__device__ void lowrank_merge(T* W, int out, int in, const T* A, int lda, const T* B, int ldb,
                              int r, const T* ascale, const T* bscale, const T* mag,
                              const T* norm, int mode, float c) {
  extern __shared__ float bs_[];  // [MERGE_ROWS][r]
  int o0 = blockIdx.y * MERGE_ROWS;
  int rows = min(MERGE_ROWS, out - o0);
  for (int k = threadIdx.x; k < MERGE_ROWS * r; k += blockDim.x) {
    int oo = k / r, j = k % r;
    bs_[k] = oo < rows ? ldf_or(bscale, o0 + oo, 1.f) * ldf(B, (i64)(o0 + oo) * ldb + j) : 0.f;
  }
  __syncthreads();
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= in) return;
  float acc[MERGE_ROWS];
#pragma unroll
  for (int oo = 0; oo < MERGE_ROWS; ++oo) acc[oo] = 0.f;
  for (int j = 0; j < r; ++j) {
    float a = ldf_or(ascale, j, 1.f) * ldf(A, (i64)j * lda + i);
#pragma unroll
    for (int oo = 0; oo < MERGE_ROWS; ++oo) acc[oo] += bs_[oo * r + j] * a;
  }
#pragma unroll
  for (int oo = 0; oo < MERGE_ROWS; ++oo) {
    if (oo < rows) {
      int o = o0 + oo;
      i64 idx = (i64)o * in + i;
      float w = ldf(W, idx);
      float k = mode ? ldf(mag, o) / ldf(norm, o) : 1.f;
      float v;
      if (mode == 1) v = k * (w + c * acc[oo]);
      else if (mode == 2) v = w / k + c * acc[oo];
      else v = w + c * acc[oo];
      stf(W, idx, v);
    }
  }
}
LF_INST(lowrank_merge,
        (void* W, int out, int in, const void* A, int lda, const void* B, int ldb, int r,
         const void* ascale, const void* bscale, const void* mag, const void* norm, int mode,
         float c),
        ((T*)W, out, in, (const T*)A, lda, (const T*)B, ldb, r, (const T*)ascale,
         (const T*)bscale, (const T*)mag, (const T*)norm, mode, c))
