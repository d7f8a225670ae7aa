// AdaLoRA kernels (PEFT `adalora.SVDLinear`). The layer itself is the fused low-rank product with
// lora_E as its rank scale (lora.cu: `adapter_expand` / `linear_decode` with dscale = E, the
// factor gradients by `scale_rc_from_f32`, dE by `lowrank_scale_grads` in vera.cu, merges by
// `lowrank_merge` with ascale = E). This file holds the rank allocator (PEFT `RankAllocator`:
// importance EMAs, triplet scores, kthvalue, masking) and the orthogonal regularizer's
// Gram-matrix steps, so that nothing is read back.
#include "common.cuh"

// ---- the rank allocator (PEFT `RankAllocator`) ---------------------------------------------------

// PEFT `update_ipt`, elementwise, each operation rounded as torch's f32 ops (no FMA contraction):
// I = |p g|; ipt = b1 ipt + (1 - b1) I; unc = b2 unc + (1 - b2) |I - ipt| (the new ipt).
// Grid-stride, block 256.
template <typename T>
__device__ void adalora_update_ipt(const T* p, const T* g, T* ipt, T* unc, i64 n, float b1,
                                   float omb1, float b2, float omb2) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    float I = fabsf(__fmul_rn(ldf(p, i), ldf(g, i)));
    float a = __fadd_rn(__fmul_rn(b1, ldf(ipt, i)), __fmul_rn(omb1, I));
    float u = __fadd_rn(__fmul_rn(b2, ldf(unc, i)), __fmul_rn(omb2, fabsf(__fsub_rn(I, a))));
    stf(ipt, i, a);
    stf(unc, i, u);
  }
}
LF_INST(adalora_update_ipt,
        (const void* p, const void* g, void* ipt, void* unc, long long n, float b1, float omb1,
         float b2, float omb2),
        ((const T*)p, (const T*)g, (T*)ipt, (T*)unc, n, b1, omb1, b2, omb2))

// Triplet scores of one layer (PEFT `_combine_ipt`), grid r, block 256: with s = ipt * unc,
// scores[off + i] = s(E_i) + (mean_j s(A_ij) + mean_k s(B_ki)), the means summed in f64 and
// rounded once (as the CPU); a mean over no entries is NaN. A [r, in], B [out, r], E [r].
template <typename T>
__device__ void adalora_triplet_scores(const T* ia, const T* ua, const T* ib, const T* ub,
                                       const T* ie, const T* ue, T* scores, int off, int r,
                                       int in, int out) {
  int i = blockIdx.x;
  double sa = 0.0, sb = 0.0;
  for (int j = threadIdx.x; j < in; j += blockDim.x) {
    i64 idx = (i64)i * in + j;
    sa += (double)__fmul_rn(ldf(ia, idx), ldf(ua, idx));
  }
  for (int k = threadIdx.x; k < out; k += blockDim.x) {
    i64 idx = (i64)k * r + i;
    sb += (double)__fmul_rn(ldf(ib, idx), ldf(ub, idx));
  }
  sa = block_sum_d(sa);
  sb = block_sum_d(sb);
  if (threadIdx.x == 0) {
    float nan = __int_as_float(0x7fc00000);
    float ma = in > 0 ? (float)(sa / (double)in) : nan;
    float mb = out > 0 ? (float)(sb / (double)out) : nan;
    float se = __fmul_rn(ldf(ie, i), ldf(ue, i));
    stf(scores, (i64)off + i, __fadd_rn(se, __fadd_rn(ma, mb)));
  }
}
LF_INST(adalora_triplet_scores,
        (const void* ia, const void* ua, const void* ib, const void* ub, const void* ie,
         const void* ue, void* scores, int off, int r, int in, int out),
        ((const T*)ia, (const T*)ua, (const T*)ib, (const T*)ub, (const T*)ie, (const T*)ue,
         (T*)scores, off, r, in, out))

// f32::total_cmp's order (torch's sort order, NaN above +inf) as an unsigned key.
__device__ __forceinline__ unsigned order_key(float x) {
  unsigned u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// torch.kthvalue(s[0..n], k), 1-based: out[0] = the k-th smallest. Grid ceil(n / 256), block
// 256: each thread counts, for its element, the elements below it (lt) and at or below it (le),
// reading the scores in shared-memory tiles; element i is the answer when lt < k <= le, and of
// equal elements only the first writes.
template <typename T>
__device__ void adalora_kthvalue(const T* s, int n, int k, T* out) {
  __shared__ unsigned tile[256];
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  unsigned key = i < n ? order_key(ldf(s, i)) : 0u;
  int lt = 0, le = 0, ties = 0;
  for (int t0 = 0; t0 < n; t0 += 256) {
    int j = t0 + threadIdx.x;
    if (j < n) tile[threadIdx.x] = order_key(ldf(s, j));
    __syncthreads();
    int m = min(256, n - t0);
    for (int q = 0; q < m; ++q) {
      unsigned kq = tile[q];
      lt += kq < key;
      le += kq <= key;
      ties += (kq == key && t0 + q < i);
    }
    __syncthreads();
  }
  if (i < n && lt < k && k <= le && ties == 0) out[0] = s[i];
}
LF_INST(adalora_kthvalue, (const void* s, int n, int k, void* out),
        ((const T*)s, n, k, (T*)out))

// keep[i] = 0 where s[i] <= t[0] (PEFT masks those), else 1; a NaN compares false and keeps.
template <typename T>
__device__ void adalora_rank_mask(const T* s, const T* t, T* keep, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) stf(keep, i, ldf(s, i) <= ldf(t, 0) ? 0.f : 1.f);
}
LF_INST(adalora_rank_mask, (const void* s, const void* t, void* keep, int n),
        ((const T*)s, (const T*)t, (T*)keep, n))

// lora_E[i] = 0 where keep[off + i] == 0 (PEFT `masked_fill_`), i < r.
template <typename T>
__device__ void adalora_apply_mask(T* e, const T* keep, int off, int r) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < r && ldf(keep, (i64)off + i) == 0.f) stf(e, i, 0.f);
}
LF_INST(adalora_apply_mask, (void* e, const void* keep, int off, int r),
        ((T*)e, (const T*)keep, off, r))

// ---- the orthogonal regularizer (PEFT `AdaLoraModel.forward`) -------------------------------------

// One block of 256 on a Gram matrix G = V V^T [r, r] (cuBLAS): G -= I; norms[slot] = ||G||_F
// (f64 sum); G *= coef / ||G||_F (0 when the norm is 0), so that the gradient is one GEMM away.
template <typename T>
__device__ void adalora_orth_gram(T* G, int r, float coef, float* norms, int slot) {
  i64 nn = (i64)r * r;
  double acc = 0.0;
  for (i64 e = threadIdx.x; e < nn; e += blockDim.x) {
    float v = ldf(G, e);
    if (e % (r + 1) == 0) v -= 1.f;
    stf(G, e, v);
    acc += (double)v * (double)v;
  }
  double norm = sqrt(block_sum_d(acc));
  if (threadIdx.x == 0) norms[slot] = (float)norm;
  float f = norm > 0.0 ? (float)((double)coef / norm) : 0.f;
  for (i64 e = threadIdx.x; e < nn; e += blockDim.x) stf(G, e, ldf(G, e) * f);
}
LF_INST(adalora_orth_gram, (void* G, int r, float coef, float* norms, int slot),
        ((T*)G, r, coef, norms, slot))

// One block of 256: loss[0] = weight / n * sum(norms[0..n]) in f64 (n = 2 n_layers: PEFT's mean
// over the lora_A and lora_B parameters), rounded once.
template <typename T>
__device__ void adalora_orth_total(const float* norms, int n, float weight, T* loss) {
  double acc = 0.0;
  for (int e = threadIdx.x; e < n; e += blockDim.x) acc += (double)norms[e];
  acc = block_sum_d(acc);
  if (threadIdx.x == 0) stf(loss, 0, (float)(acc * ((double)weight / (double)n)));
}
LF_INST(adalora_orth_total, (const float* norms, int n, float weight, void* loss),
        (norms, n, weight, (T*)loss))
