// The per-axis scales and sums, activations and row softmaxes of the additive methods (IA3, bias
// tuning, bottleneck adapters, AdapterFusion); backend/cuda/pointwise.rs launches them.
// Shapes: x, a, b, y are row-major [n, d]; v is [d] (axis 0: per column) or [n] (axis 1: per
// row). Sums accumulate in f64 (as the CPU reference does), so any dtype sums alike.
#include "common.cuh"

// y[i, j] = x[i, j] * v[axis ? i : j]. Grid-stride, block 256, grid ceil(n d / 256) capped.
template <typename T>
__device__ void mul_vector(const T* x, const T* v, T* y, int n, int d, int axis) {
  i64 total = (i64)n * d;
  for (i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += (i64)gridDim.x * blockDim.x) {
    int i = (int)(k / d), j = (int)(k % d);
    stf(y, k, ldf(x, k) * ldf(v, axis ? i : j));
  }
}
LF_INST(mul_vector, (const void* x, const void* v, void* y, int n, int d, int axis),
        ((const T*)x, (const T*)v, (T*)y, n, d, axis))

// out[j] = sum_i a[i, j] b[i, j] (b null: 1). Block (32, 8): 32 columns per CTA, 8 row lanes
// each, combined in shared memory (8 x 32 doubles = 2 KiB); grid ceil(d / 32).
template <typename T>
__device__ void sum_cols(const T* a, const T* b, T* out, int n, int d) {
  __shared__ double part[8][32];
  int j = blockIdx.x * 32 + threadIdx.x;
  double s = 0.0;
  if (j < d) {
    for (int i = threadIdx.y; i < n; i += 8) {
      i64 k = (i64)i * d + j;
      s += (double)ldf(a, k) * (double)ldf_or(b, k, 1.f);
    }
  }
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && j < d) {
    double t = 0.0;
    for (int r = 0; r < 8; ++r) t += part[r][threadIdx.x];
    stf(out, j, (float)t);
  }
}
LF_INST(sum_cols, (const void* a, const void* b, void* out, int n, int d),
        ((const T*)a, (const T*)b, (T*)out, n, d))

// out[i] = sum_j a[i, j] b[i, j] (b null: 1). One CTA of 256 per row; grid n.
template <typename T>
__device__ void sum_rows(const T* a, const T* b, T* out, int n, int d) {
  int i = blockIdx.x;
  if (i >= n) return;
  double s = 0.0;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    i64 k = (i64)i * d + j;
    s += (double)ldf(a, k) * (double)ldf_or(b, k, 1.f);
  }
  s = block_sum_d(s);
  if (threadIdx.x == 0) stf(out, i, (float)s);
}
LF_INST(sum_rows, (const void* a, const void* b, void* out, int n, int d),
        ((const T*)a, (const T*)b, (T*)out, n, d))

// kind: 0 ReLU, 1 SiLU, 2 tanh (Activation in backend/tensor.rs).
__device__ __forceinline__ float act_f(float x, int kind) {
  if (kind == 0) return fmaxf(x, 0.f);
  if (kind == 1) return x / (1.f + expf(-x));
  return tanhf(x);
}
// act'(x); ReLU's derivative at 0 is 0, as torch's.
__device__ __forceinline__ float act_grad(float x, int kind) {
  if (kind == 0) return x > 0.f ? 1.f : 0.f;
  if (kind == 1) {
    float s = 1.f / (1.f + expf(-x));
    return s * (1.f + x * (1.f - s));
  }
  float t = tanhf(x);
  return 1.f - t * t;
}

// y = act(x), or with dy given dx = dy act'(x) into y. Grid-stride, block 256.
template <typename T>
__device__ void activation(const T* x, const T* dy, T* y, i64 total, int kind) {
  for (i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += (i64)gridDim.x * blockDim.x) {
    float v = ldf(x, k);
    stf(y, k, dy ? ldf(dy, k) * act_grad(v, kind) : act_f(v, kind));
  }
}
LF_INST(activation, (const void* x, const void* dy, void* y, long long total, int kind),
        ((const T*)x, (const T*)dy, (T*)y, total, kind))

// Row softmax of x [n, k] into p, or with dy given the backward dx = p (dy - rowdot(dy, p)) from
// p = x. One thread per row (k is a handful of adapters); block 256, grid ceil(n / 256).
template <typename T>
__device__ void softmax_rows(const T* x, const T* dy, T* out, int n, int k) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const i64 o = (i64)i * k;
  if (dy) {
    float dot = 0.f;
    for (int c = 0; c < k; ++c) dot = fmaf(ldf(x, o + c), ldf(dy, o + c), dot);
    for (int c = 0; c < k; ++c) stf(out, o + c, ldf(x, o + c) * (ldf(dy, o + c) - dot));
    return;
  }
  float m = LF_NEG_INF;
  for (int c = 0; c < k; ++c) m = fmaxf(m, ldf(x, o + c));
  float s = 0.f;
  for (int c = 0; c < k; ++c) s += expf(ldf(x, o + c) - m);
  float inv = 1.f / s;
  for (int c = 0; c < k; ++c) stf(out, o + c, expf(ldf(x, o + c) - m) * inv);
}
LF_INST(softmax_rows, (const void* x, const void* dy, void* out, int n, int k),
        ((const T*)x, (const T*)dy, (T*)out, n, k))
