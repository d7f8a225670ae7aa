// The mixed-batch low-rank term (src/backend/multi.rs): every row t of a batch adds the term of
// its own adapter i = adapter_of_row[t] to one base product already in y,
//
//   y[t, o] += sum_j h[t, j] B_i'[o, j],   h[t, j] = sum_k x[t, k] A[a_row_i + j, k],
//
// over a ragged pool (A_i stacked in A [R, in], B_i' [out, r_i] row-major at b_off_i in a flat
// B). Punica's SGMV (one run of rows per sequence) and BGMV (one row per sequence, interleaved)
// are the same launch here: the host buckets the rows that have a term by adapter, in row order,
// and cuts each adapter's rows into groups of at most MULTI_ROWS rows, wherever the rows are in
// the batch; a group is one adapter and one rank, so any mix of ranks runs in one launch (no
// padding to a common rank, no list of supported shapes).
//
//   multi_shrink   h = x A_i^T for every group (one warp per rank row j, A's row read once for
//                  the group's rows), into an f32 scratch
//   multi_expand   y += h B_i'^T for every group (one thread per output, B's row read once for
//                  the group's rows; h staged in shared memory in chunks of MULTI_JT ranks)
//
// The tables (int32, built by src/backend/cuda/multi.rs):
//   groups [G, MULTI_GROUP_INTS]: first, n, a_row, r, b_off, h_off of group g, where entries
//     [first, first + n) of `rows` are its rows (1 <= n <= MULTI_ROWS, all of one adapter of
//     rank r >= 1) and h[h_off + q r + j] is h of its q-th row;
//   rows [E]: the batch row t of every entry.
#include "common.cuh"

#define MULTI_ROWS 8
#define MULTI_GROUP_INTS 6
#define MULTI_WARPS 4
#define MULTI_COLS 128
#define MULTI_JT 64

// h[h_off_g + q r_g + j] = sum_k x[rows[first_g + q], k] A[a_row_g + j, k] in f32, for every
// group g, q < n_g, j < r_g. x: [T, in]; A: [R, in]; h: f32 [sum of n_g r_g].
// Grid (G, min(ceil(max r / 4), 65535)) (rank rows beyond the grid loop); block 128 (one warp
// per rank row j, lanes stride over in); no dynamic smem.
template <typename T>
__device__ void multi_shrink(const T* x, const T* A, const int* groups, const int* rows, float* h,
                             int in) {
  const int* gp = groups + (i64)blockIdx.x * MULTI_GROUP_INTS;
  int first = gp[0], n = gp[1], a_row = gp[2], r = gp[3], h_off = gp[5];
  int lane = threadIdx.x & 31;
  i64 xoff[MULTI_ROWS];
#pragma unroll
  for (int q = 0; q < MULTI_ROWS; ++q) xoff[q] = q < n ? (i64)rows[first + q] * in : 0;
  // j is the same for the 32 lanes of a warp, so every lane reaches the shuffles.
  for (int j = blockIdx.y * MULTI_WARPS + (threadIdx.x >> 5); j < r;
       j += gridDim.y * MULTI_WARPS) {
    float acc[MULTI_ROWS];
#pragma unroll
    for (int q = 0; q < MULTI_ROWS; ++q) acc[q] = 0.f;
    const T* arow = A + (i64)(a_row + j) * in;
    for (int k = lane; k < in; k += 32) {
      float a = ldf(arow, k);
#pragma unroll
      for (int q = 0; q < MULTI_ROWS; ++q)
        if (q < n) acc[q] += a * ldf(x, xoff[q] + k);
    }
#pragma unroll
    for (int q = 0; q < MULTI_ROWS; ++q) {
      float v = warp_sum(acc[q]);
      if (lane == 0 && q < n) h[(i64)h_off + (i64)q * r + j] = v;
    }
  }
}
LF_INST(multi_shrink,
        (const void* x, const void* A, const void* groups, const void* rows, float* h, int in),
        ((const T*)x, (const T*)A, (const int*)groups, (const int*)rows, h, in))

// y[rows[first_g + q], o] += sum_j h[h_off_g + q r_g + j] B[b_off_g + o r_g + j] (sum in f32,
// one rounding into y) for every group g, q < n_g, o < out. y: [T, out] (already x W^T + bias);
// h: f32 from multi_shrink; B: flat, block [out, r_g] row-major at b_off_g.
// Grid (G, min(ceil(out / 128), 65535)) (output tiles beyond the grid loop); block 128 (one
// thread per output o); static smem MULTI_ROWS * MULTI_JT floats (h of the group's rows, one
// chunk of MULTI_JT ranks at a time, so any rank fits).
template <typename T>
__device__ void multi_expand(T* y, const float* h, const T* B, const int* groups,
                             const int* rows, int out) {
  __shared__ float hs[MULTI_ROWS * MULTI_JT];
  const int* gp = groups + (i64)blockIdx.x * MULTI_GROUP_INTS;
  int first = gp[0], n = gp[1], r = gp[3], b_off = gp[4], h_off = gp[5];
  // o0 depends on the block only: every thread runs the same iterations (the barriers).
  for (int o0 = blockIdx.y * MULTI_COLS; o0 < out; o0 += gridDim.y * MULTI_COLS) {
    int o = o0 + threadIdx.x;
    float acc[MULTI_ROWS];
#pragma unroll
    for (int q = 0; q < MULTI_ROWS; ++q) acc[q] = 0.f;
    const T* brow = B + (i64)b_off + (i64)(o < out ? o : 0) * r;
    for (int j0 = 0; j0 < r; j0 += MULTI_JT) {
      int jn = min(MULTI_JT, r - j0);
      __syncthreads();  // the previous chunk's readers are done with hs
      for (int k = threadIdx.x; k < MULTI_ROWS * MULTI_JT; k += blockDim.x) {
        int q = k / MULTI_JT, jj = k % MULTI_JT;
        hs[k] = (q < n && jj < jn) ? h[(i64)h_off + (i64)q * r + j0 + jj] : 0.f;
      }
      __syncthreads();
      if (o < out) {
        for (int jj = 0; jj < jn; ++jj) {
          float b = ldf(brow, j0 + jj);
#pragma unroll
          for (int q = 0; q < MULTI_ROWS; ++q) acc[q] += hs[q * MULTI_JT + jj] * b;
        }
      }
    }
    if (o < out) {
#pragma unroll
      for (int q = 0; q < MULTI_ROWS; ++q) {
        if (q < n) {
          i64 idx = (i64)rows[first + q] * out + o;
          stf(y, idx, ldf(y, idx) + acc[q]);
        }
      }
    }
  }
}
LF_INST(multi_expand,
        (void* y, const float* h, const void* B, const void* groups, const void* rows, int out),
        ((T*)y, h, (const T*)B, (const int*)groups, (const int*)rows, out))
