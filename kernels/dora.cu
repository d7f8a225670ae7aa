// The column scale c = m / n of the fused low-rank product (DoRA, PEFT `DoraLinearLayer`): the
// weight norm n = ||W + ΔW||_row by the low-rank identity and the magnitude's gradient. The
// forward epilogue (c fused into the expand) is `adapter_expand` in lora.cu, the merges are
// `lowrank_merge` there.
//
//   row_sq_norms     ||W||_row^2 in f64, one warp per row (never an [out, in] temporary)
//   dora_norm_finish n = sqrt(max(0, ||W||^2 + 2 s rowdot(W A^T, B') + s^2 rowdot(B' A A^T, B'))),
//                    B' = diag(o) B diag(ρ)
//   dora_bwd_scale   one pass over dy and z: dm partial sums of dy ⊙ z (and g' = dy ⊙ (m / n)
//                    when asked)
//   dora_dm_finish   dm = sum / n
#include "common.cuh"

// w: [out, in] -> res [out]; grid ceil(out / 4), block 128 (one warp per row); no smem.
template <typename T>
__device__ void row_sq_norms(const T* w, int out, int in, T* res) {
  int lane = threadIdx.x & 31;
  int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (o >= out) return;
  double acc = 0.0;
  for (int i = lane; i < in; i += 32) {
    double v = ldf(w, (i64)o * in + i);
    acc += v * v;
  }
  acc = warp_sum_d(acc);
  if (lane == 0) stf(res, o, (float)acc);
}
LF_INST(row_sq_norms, (const void* w, int out, int in, void* res),
        ((const T*)w, out, in, (T*)res))

// P = W A^T [out, r] (f32), Bf = B' = diag(o) B diag(ρ) [out, r] (f32), Q = B' (A A^T) [out, r]
// (f32), sq = ||W||_row^2 [out] -> n [out]. Grid ceil(out / 128), block 128; no smem.
template <typename T>
__device__ void dora_norm_finish(const float* P, const float* Q, const float* Bf, const T* sq,
                                 T* n, int out, int r, float s) {
  int o = blockIdx.x * blockDim.x + threadIdx.x;
  if (o >= out) return;
  double cross = 0.0, quad = 0.0;
  for (int j = 0; j < r; ++j) {
    double b = Bf[(i64)o * r + j];
    cross += (double)P[(i64)o * r + j] * b;
    quad += (double)Q[(i64)o * r + j] * b;
  }
  double sd = s;
  double v = (double)ldf(sq, o) + 2.0 * sd * cross + sd * sd * quad;
  stf(n, o, (float)sqrt(v > 0.0 ? v : 0.0));
}
LF_INST(dora_norm_finish,
        (const float* P, const float* Q, const float* Bf, const void* sq, void* n, int out,
         int r, float s),
        (P, Q, Bf, (const T*)sq, (T*)n, out, r, s))

#define DM_ROWS 64
// dy, z: [T, out]; dm_acc[o] += sum_t dy z (f64, zeroed first); gk = dy * (m / n) [T, out] when
// gk is non-null. Grid (ceil(out / 32), ceil(T / 64)); block (32, 8); static smem 8 x 33 doubles.
template <typename T>
__device__ void dora_bwd_scale(const T* dy, const T* z, const T* m, const T* n, T* gk,
                               double* dm_acc, int ntok, int out) {
  __shared__ double part[8][33];
  int o = blockIdx.x * 32 + threadIdx.x;
  double acc = 0.0;
  if (o < out) {
    float k = ldf(m, o) / ldf(n, o);
    int t1 = min(ntok, (int)(blockIdx.y + 1) * DM_ROWS);
    for (int t = blockIdx.y * DM_ROWS + threadIdx.y; t < t1; t += 8) {
      i64 idx = (i64)t * out + o;
      float g = ldf(dy, idx);
      if (gk) stf(gk, idx, g * k);
      acc += (double)g * (double)ldf(z, idx);
    }
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && o < out) {
    double s = 0.0;
    for (int k = 0; k < 8; ++k) s += part[k][threadIdx.x];
    atomicAdd(dm_acc + o, s);
  }
}
LF_INST(dora_bwd_scale,
        (const void* dy, const void* z, const void* m, const void* n, void* gk, double* dm_acc,
         int ntok, int out),
        ((const T*)dy, (const T*)z, (const T*)m, (const T*)n, (T*)gk, dm_acc, ntok, out))

// dm[o] = acc[o] / n[o]; grid ceil(out / 128), block 128; no smem.
template <typename T>
__device__ void dora_dm_finish(const double* acc, const T* n, T* dm, int out) {
  int o = blockIdx.x * blockDim.x + threadIdx.x;
  if (o < out) stf(dm, o, (float)(acc[o] / (double)ldf(n, o)));
}
LF_INST(dora_dm_finish, (const double* acc, const void* n, void* dm, int out),
        (acc, (const T*)n, (T*)dm, out))
