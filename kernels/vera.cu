// VeRA kernels (PEFT `vera.Linear`). lambda_d and lambda_b enter the forward through
// `adapter_expand` (lora.cu: dscale = lambda_d, bscale = lambda_b) and the backward through
// `scale_rows` (lambda ⊙ the shared slices); this file reduces both lambda gradients in one
// launch.
#include "common.cuh"

// Blocks [0, r): dlambda_d[j] = sum_t q[t, j] h[t, j]   (q = (dy ⊙ lambda_b) Bs, [T, r]).
// Blocks [r, r + ceil(out / 256)): dlambda_b[o] = sum_j gh[o, j] Bs[o, j] lambda_d[j]
// (gh = dy^T h, [out, r], f32). Both in f64. Block 256.
template <typename T>
__device__ void vera_lambda_grads(const T* q, const T* h, int ntok, int r, const float* gh,
                                  const T* Bs, const T* ld, int out, T* dld, T* dlb) {
  if ((int)blockIdx.x < r) {
    int j = blockIdx.x;
    double acc = 0.0;
    for (int t = threadIdx.x; t < ntok; t += blockDim.x)
      acc += (double)ldf(q, (i64)t * r + j) * (double)ldf(h, (i64)t * r + j);
    acc = block_sum_d(acc);
    if (threadIdx.x == 0) stf(dld, j, (float)acc);
    return;
  }
  int o = (blockIdx.x - r) * blockDim.x + threadIdx.x;
  if (o >= out) return;
  double acc = 0.0;
  for (int j = 0; j < r; ++j)
    acc += (double)gh[(i64)o * r + j] * (double)ldf(Bs, (i64)o * r + j) * (double)ldf(ld, j);
  stf(dlb, o, (float)acc);
}
LF_INST(vera_lambda_grads,
        (const void* q, const void* h, int ntok, int r, const float* gh, const void* Bs,
         const void* ld, int out, void* dld, void* dlb),
        ((const T*)q, (const T*)h, ntok, r, gh, (const T*)Bs, (const T*)ld, out, (T*)dld,
         (T*)dlb))
