// AdaLoRA kernels (PEFT `adalora.SVDLinear`). The E-masked forward is `scale_rows` (A ⊙ E) +
// cuBLAS + `adapter_expand` (s = scaling / (ranknum + 1e-5)); merges are `lowrank_merge`
// (ascale = E). This file turns M = c gB^T x into both factor gradients in one pass over M.
#include "common.cuh"

// M: [r, in] f32; dA = M ⊙ E [r, in]; dE[j] = sum_i M[j, i] A[j, i] (f64). Grid r, block 256.
template <typename T>
__device__ void adalora_grads(const float* M, const T* A, const T* E, T* dA, T* dE, int r,
                              int in) {
  int j = blockIdx.x;
  float e = ldf(E, j);
  double acc = 0.0;
  for (int i = threadIdx.x; i < in; i += blockDim.x) {
    i64 idx = (i64)j * in + i;
    float mv = M[idx];
    acc += (double)mv * (double)ldf(A, idx);
    stf(dA, idx, mv * e);
  }
  acc = block_sum_d(acc);
  if (threadIdx.x == 0) stf(dE, j, (float)acc);
}
LF_INST(adalora_grads,
        (const float* M, const void* A, const void* E, void* dA, void* dE, int r, int in),
        (M, (const T*)A, (const T*)E, (T*)dA, (T*)dE, r, in))
