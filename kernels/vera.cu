// The gradients of the low-rank term's scales (src/backend/lowrank.rs): the per-rank scale ρ
// (VeRA's lambda_d, AdaLoRA's lora_E) and the per-output scale o (VeRA's lambda_b), both in one
// launch, summed in f64 as the CPU reference. (VeRA's other pieces are the generic kernels of
// lora.cu: adapter_expand / linear_decode with dscale = lambda_d and bscale = lambda_b, scale_rows
// for the input gradient, lowrank_merge.)
#include "common.cuh"

// With nr = r when d_rank is non-null, else 0:
// Blocks [0, nr): d_rank[j] = s * sum_t g[t, j] h[t, j]   (g = ((dy ⊙ c) ⊙ o) B [T, r], h = x A^T).
// The next ceil(out / 256) blocks, when d_out is non-null:
//   d_out[o] = s * c[o] * sum_j P[o, j] B[o, j] rs[j]   (P = dy^T h [out, r] f32, B [>= out, r]
//   row stride r, rs = ρ [r] or null, c = mag / norm [out] or 1 when mag is null).
// Grid nr + (d_out ? ceil(out / 256) : 0); block 256; static smem of block_sum_d only.
template <typename T>
__device__ void lowrank_scale_grads(const T* g, const T* h, int ntok, int r, const float* P,
                                    const T* B, const T* rs, const T* mag, const T* norm,
                                    int out, T* d_rank, T* d_out, float s) {
  int nr = d_rank ? r : 0;
  if ((int)blockIdx.x < nr) {
    int j = blockIdx.x;
    double acc = 0.0;
    for (int t = threadIdx.x; t < ntok; t += blockDim.x)
      acc += (double)ldf(g, (i64)t * r + j) * (double)ldf(h, (i64)t * r + j);
    acc = block_sum_d(acc);
    if (threadIdx.x == 0) stf(d_rank, j, (float)(acc * (double)s));
    return;
  }
  if (!d_out) return;
  int o = (blockIdx.x - nr) * blockDim.x + threadIdx.x;
  if (o >= out) return;
  double acc = 0.0;
  for (int j = 0; j < r; ++j)
    acc += (double)P[(i64)o * r + j] * (double)ldf(B, (i64)o * r + j) * (double)ldf_or(rs, j, 1.f);
  float k = mag ? ldf(mag, o) / ldf(norm, o) : 1.f;
  stf(d_out, o, (float)(acc * (double)s * (double)k));
}
LF_INST(lowrank_scale_grads,
        (const void* g, const void* h, int ntok, int r, const float* P, const void* B,
         const void* rs, const void* mag, const void* norm, int out, void* d_rank, void* d_out,
         float s),
        ((const T*)g, (const T*)h, ntok, r, P, (const T*)B, (const T*)rs, (const T*)mag,
         (const T*)norm, out, (T*)d_rank, (T*)d_out, s))
