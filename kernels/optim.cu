// Optimizer and elementwise kernels: AdamW (torch.optim.AdamW semantics, as the CPU reference),
// axpy, scale, sum of squares, and the add of an f32 accumulator into a storage tensor.
#include "common.cuh"

// a[i] += alpha * b[i]; grid-stride, block 256.
template <typename T>
__device__ void axpy(T* a, float alpha, const T* b, i64 n) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
    stf(a, i, ldf(a, i) + alpha * ldf(b, i));
}
LF_INST(axpy, (void* a, float alpha, const void* b, long long n), ((T*)a, alpha, (const T*)b, n))

// a[i] *= alpha.
template <typename T>
__device__ void scale(T* a, float alpha, i64 n) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
    stf(a, i, ldf(a, i) * alpha);
}
LF_INST(scale, (void* a, float alpha, long long n), ((T*)a, alpha, n))

// partial[blockIdx.x] = sum of a[i]^2 over the block's grid-stride share, in f64 (the host adds
// the partials in order, so the result does not depend on scheduling). Block 256.
template <typename T>
__device__ void sum_squares(const T* a, i64 n, double* partial) {
  double acc = 0.0;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    double v = ldf(a, i);
    acc += v * v;
  }
  acc = block_sum_d(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
LF_INST(sum_squares, (const void* a, long long n, double* partial), ((const T*)a, n, partial))

// dst[i] += src[i] (src an f32 accumulator).
template <typename T>
__device__ void add_f32(T* dst, const float* src, i64 n) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
    stf(dst, i, ldf(dst, i) + src[i]);
}
LF_INST(add_f32, (void* dst, const float* src, long long n), ((T*)dst, src, n))

// One AdamW step, torch's single-tensor path: w *= 1 - lr wd; m = b1 m + (1 - b1) g;
// v = b2 v + (1 - b2) g^2; w -= step_size m / (sqrt(v) / bc2_sqrt + eps), with
// step_size = lr / (1 - b1^t) and bc2_sqrt = sqrt(1 - b2^t) computed on the host in f64.
template <typename T>
__device__ void adamw(T* w, const T* g, T* m, T* v, i64 n, float b1, float b2, float eps,
                      float decay, float step_size, float bc2_sqrt) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    float gi = ldf(g, i);
    float wi = ldf(w, i) * decay;
    float mi = b1 * ldf(m, i) + (1.f - b1) * gi;
    float vi = b2 * ldf(v, i) + (1.f - b2) * gi * gi;
    float denom = sqrtf(vi) / bc2_sqrt + eps;
    wi -= step_size * mi / denom;
    stf(w, i, wi);
    stf(m, i, mi);
    stf(v, i, vi);
  }
}
LF_INST(adamw,
        (void* w, const void* g, void* m, void* v, long long n, float b1, float b2, float eps,
         float decay, float step_size, float bc2_sqrt),
        ((T*)w, (const T*)g, (T*)m, (T*)v, n, b1, b2, eps, decay, step_size, bc2_sqrt))
