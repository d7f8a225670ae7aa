// Shared helpers for every kernels/*.cu file. The Rust side pastes this file in place of
// `#include "common.cuh"` before NVRTC compiles a source, so no include path is needed for it.
//
// Storage types: float, __half, __nv_bfloat16; arithmetic and accumulation are always f32
// (f64 for the norms and reductions whose CPU reference accumulates in f64).
// Every kernel is a __device__ template `name<T>` instantiated by LF_INST as three extern "C"
// entry points `name_f32`, `name_f16`, `name_bf16`, taking untyped pointers.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned char u8;
typedef long long i64;
#define LF_NEG_INF __int_as_float(0xff800000)

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Load element i of a storage array as f32; a null pointer reads as `dflt`.
template <typename T> __device__ __forceinline__ float ldf(const T* p, i64 i) { return to_f<T>(p[i]); }
template <typename T> __device__ __forceinline__ float ldf_or(const T* p, i64 i, float dflt) {
  return p ? to_f<T>(p[i]) : dflt;
}
template <typename T> __device__ __forceinline__ void stf(T* p, i64 i, float v) { p[i] = from_f<T>(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float red_f[32];
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red_f[w] = v;
  __syncthreads();
  float t = lane < nw ? red_f[lane] : 0.f;
  return warp_sum(t);
}
__device__ __forceinline__ double block_sum_d(double v) {
  __shared__ double red_d[32];
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum_d(v);
  __syncthreads();
  if (lane == 0) red_d[w] = v;
  __syncthreads();
  double t = lane < nw ? red_d[lane] : 0.0;
  return warp_sum_d(t);
}
__device__ __forceinline__ float block_max(float v) {
  __shared__ float red_m[32];
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) red_m[w] = v;
  __syncthreads();
  float t = lane < nw ? red_m[lane] : LF_NEG_INF;
  return warp_max(t);
}

#define LF_INST(name, params, args)                                                   \
  extern "C" __global__ void name##_f32 params { typedef float T; name<T> args; }      \
  extern "C" __global__ void name##_f16 params { typedef __half T; name<T> args; }     \
  extern "C" __global__ void name##_bf16 params { typedef __nv_bfloat16 T; name<T> args; }
