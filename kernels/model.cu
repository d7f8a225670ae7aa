// Llama block kernels: embedding gather/scatter, RMSNorm (+ backward), RoPE (transformers'
// rotate_half), causal GQA attention over packed sequences with online softmax (no T x T
// matrix in global memory) and its backward from the saved log-sum-exp, the same forward over a
// KV cache (new queries over a longer context: attention_cached_fwd), SwiGLU (+ backward),
// and cross-entropy that reads the logits twice (online max/sum, then the gradient) and
// materializes softmax once, as the gradient.
#include "common.cuh"

template <typename T> __device__ __forceinline__ void atomic_add_f(T* p, float v);
template <> __device__ __forceinline__ void atomic_add_f<float>(float* p, float v) { atomicAdd(p, v); }
template <> __device__ __forceinline__ void atomic_add_f<__half>(__half* p, float v) {
  atomicAdd(p, __float2half_rn(v));
}
template <> __device__ __forceinline__ void atomic_add_f<__nv_bfloat16>(__nv_bfloat16* p, float v) {
  atomicAdd(p, __float2bfloat16_rn(v));
}

// out[i, :] = table[idx[i], :]; table [n, d]; grid ceil(nidx * d / 256), block 256.
template <typename T>
__device__ void gather_rows(const T* table, const int* idx, T* out, int nidx, int d) {
  i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= (i64)nidx * d) return;
  int i = (int)(k / d), c = (int)(k % d);
  out[k] = table[(i64)idx[i] * d + c];
}
LF_INST(gather_rows, (const void* table, const int* idx, void* out, int nidx, int d),
        ((const T*)table, idx, (T*)out, nidx, d))

// dst[idx[i], :] += src[i, :] (atomic: repeated indices add up).
template <typename T>
__device__ void scatter_add_rows(T* dst, const int* idx, const T* src, int nidx, int d) {
  i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= (i64)nidx * d) return;
  int i = (int)(k / d), c = (int)(k % d);
  atomic_add_f<T>(dst + (i64)idx[i] * d + c, ldf(src, k));
}
LF_INST(scatter_add_rows, (void* dst, const int* idx, const void* src, int nidx, int d),
        ((T*)dst, idx, (const T*)src, nidx, d))

// y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) (f32); one CTA of 256 per row.
template <typename T>
__device__ void rmsnorm(const T* x, const T* w, T* y, float* rstd, int d, float eps) {
  i64 row = blockIdx.x;
  float ss = 0.f;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float v = ldf(x, row * d + c);
    ss += v * v;
  }
  ss = block_sum(ss);
  float r = 1.f / sqrtf(ss / (float)d + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int c = threadIdx.x; c < d; c += blockDim.x)
    stf(y, row * d + c, ldf(w, c) * (ldf(x, row * d + c) * r));
}
LF_INST(rmsnorm, (const void* x, const void* w, void* y, float* rstd, int d, float eps),
        ((const T*)x, (const T*)w, (T*)y, rstd, d, eps))

// dx = r (dy w) - x r^3 mean(dy w x); one CTA of 256 per row.
template <typename T>
__device__ void rmsnorm_bwd(const T* dy, const T* x, const T* w, const float* rstd, T* dx, int d) {
  i64 row = blockIdx.x;
  float r = rstd[row];
  float dot = 0.f;
  for (int c = threadIdx.x; c < d; c += blockDim.x)
    dot += ldf(dy, row * d + c) * ldf(w, c) * ldf(x, row * d + c);
  dot = block_sum(dot);
  float k = r * r * r * dot / (float)d;
  for (int c = threadIdx.x; c < d; c += blockDim.x)
    stf(dx, row * d + c, r * ldf(dy, row * d + c) * ldf(w, c) - k * ldf(x, row * d + c));
}
LF_INST(rmsnorm_bwd,
        (const void* dy, const void* x, const void* w, const float* rstd, void* dx, int d),
        ((const T*)dy, (const T*)x, (const T*)w, rstd, (T*)dx, d))

// acc[c] += sum_t dy[t, c] x[t, c] rstd[t] (f32 accumulator, zeroed first).
// Grid (ceil(d / 32), ceil(T / 64)); block (32, 8).
template <typename T>
__device__ void rmsnorm_dw(const T* dy, const T* x, const float* rstd, float* acc, int ntok, int d) {
  __shared__ float part[8][33];
  int c = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (c < d) {
    int t1 = min(ntok, (int)(blockIdx.y + 1) * 64);
    for (int t = blockIdx.y * 64 + threadIdx.y; t < t1; t += 8)
      s += ldf(dy, (i64)t * d + c) * ldf(x, (i64)t * d + c) * rstd[t];
  }
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < d) {
    float tot = 0.f;
    for (int k = 0; k < 8; ++k) tot += part[k][threadIdx.x];
    atomicAdd(acc + c, tot);
  }
}
LF_INST(rmsnorm_dw,
        (const void* dy, const void* x, const float* rstd, float* acc, int ntok, int d),
        ((const T*)dy, (const T*)x, rstd, acc, ntok, d))

// In place on x [T, width]: in each head the pair (i, i + hd/2) rotates by pos[t] inv_freq[i]
// (sign = -1: the inverse rotation). Grid ceil(T * width / 2 / 256); block 256.
template <typename T>
__device__ void rope(T* x, const int* pos, const float* inv_freq, int ntok, int width, int hd,
                     float sign) {
  int half = hd / 2, hw = width / 2;
  i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= (i64)ntok * hw) return;
  int t = (int)(k / hw), rem = (int)(k % hw);
  int head = rem / half, i = rem % half;
  float a = (float)pos[t] * inv_freq[i];
  float c = cosf(a), s = sign * sinf(a);
  i64 base = (i64)t * width + (i64)head * hd;
  float x1 = ldf(x, base + i), x2 = ldf(x, base + i + half);
  stf(x, base + i, x1 * c - x2 * s);
  stf(x, base + i + half, x2 * c + x1 * s);
}
LF_INST(rope, (void* x, const int* pos, const float* inv_freq, int ntok, int width, int hd, float sign),
        ((T*)x, pos, inv_freq, ntok, width, hd, sign))

// ---- attention ---------------------------------------------------------------------------------
// q [T, Hq*hd], k and v [T, Hkv*hd]; sequences given by (starts, lens); query head h reads kv
// head h / (Hq / Hkv). Each CTA: 4 warps, one query (or key) row each, of one (sequence, head);
// K/V (or Q/dO) rows are staged through shared memory `kt` rows at a time (kt = 32 for
// hd <= 128, 16 for hd <= 256); lane j of a warp owns key j of the tile for the scores and
// dims lane, lane + 32, ... of the output row. hd <= 256.
#define ATT_WARPS 4
#define ATT_MAXC 8

// out [T, Hq*hd], lse [Hq, T] (f32). Grid (ceil(maxlen / 4), Hq, nseq); block 128;
// dynamic smem (2 kt (hd + 1) + 4 hd) floats.
template <typename T>
__device__ void attention_fwd(const T* q, const T* k, const T* v, T* out, float* lse,
                              const int* starts, const int* lens, int ntok, int Hq, int Hkv,
                              int hd, float scale, int kt) {
  extern __shared__ float sm[];
  float* ks = sm;
  float* vs = ks + kt * (hd + 1);
  float* qs = vs + kt * (hd + 1);
  int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int start = starts[blockIdx.z], len = lens[blockIdx.z];
  int i0 = blockIdx.x * ATT_WARPS;
  if (i0 >= len) return;
  int i = i0 + w;
  bool active = i < len;
  int h = blockIdx.y, kvh = h / (Hq / Hkv);
  i64 qw = (i64)Hq * hd, kw = (i64)Hkv * hd;
  for (int d = lane; d < hd; d += 32)
    qs[w * hd + d] = active ? ldf(q, (start + i) * qw + h * hd + d) : 0.f;
  float m = LF_NEG_INF, l = 0.f, o[ATT_MAXC];
#pragma unroll
  for (int c = 0; c < ATT_MAXC; ++c) o[c] = 0.f;
  int last = min(len - 1, i0 + ATT_WARPS - 1);
  for (int kb = 0; kb <= last; kb += kt) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kt * hd; idx += blockDim.x) {
      int jj = idx / hd, d = idx % hd, key = kb + jj;
      bool ok = key < len;
      ks[jj * (hd + 1) + d] = ok ? ldf(k, (start + key) * kw + kvh * hd + d) : 0.f;
      vs[jj * (hd + 1) + d] = ok ? ldf(v, (start + key) * kw + kvh * hd + d) : 0.f;
    }
    __syncthreads();
    if (active && kb <= i) {
      int key = kb + lane;
      float sc = LF_NEG_INF;
      if (lane < kt && key <= i) {
        float dot = 0.f;
        for (int d = 0; d < hd; ++d) dot += qs[w * hd + d] * ks[lane * (hd + 1) + d];
        sc = dot * scale;
      }
      float mnew = fmaxf(m, warp_max(sc));
      float corr = expf(m - mnew);
      float p = lane < kt && key <= i ? expf(sc - mnew) : 0.f;
      l = l * corr + warp_sum(p);
#pragma unroll
      for (int c = 0; c < ATT_MAXC; ++c) o[c] *= corr;
      int nk = min(kt, i - kb + 1);
      for (int jj = 0; jj < nk; ++jj) {
        float pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
        for (int c = 0; c < ATT_MAXC; ++c) {
          int d = lane + 32 * c;
          if (d < hd) o[c] += pj * vs[jj * (hd + 1) + d];
        }
      }
      m = mnew;
    }
  }
  if (!active) return;
#pragma unroll
  for (int c = 0; c < ATT_MAXC; ++c) {
    int d = lane + 32 * c;
    if (d < hd) stf(out, (start + i) * qw + h * hd + d, o[c] / l);
  }
  if (lane == 0) lse[(i64)h * ntok + start + i] = m + logf(l);
}
LF_INST(attention_fwd,
        (const void* q, const void* k, const void* v, void* out, float* lse, const int* starts,
         const int* lens, int ntok, int Hq, int Hkv, int hd, float scale, int kt),
        ((const T*)q, (const T*)k, (const T*)v, (T*)out, lse, starts, lens, ntok, Hq, Hkv, hd,
         scale, kt))

// Attention of each sequence's new tokens over its whole context (the KV cache of generation):
// sequence z's queries are rows q_starts[z] + i (i < q_lens[z]) of q [Tq, Hq*hd], its keys and
// values rows kv_starts[z] + j (j < kv_lens[z], the new tokens last) of k, v [Tk, Hkv*hd];
// query i sits at position p = kv_len - q_len + i and attends to keys 0..=p (causal), q_len <=
// kv_len. Otherwise as attention_fwd (no lse kept). out [Tq, Hq*hd].
// Grid (ceil(max q_len / 4), Hq, nseq); block 128; dynamic smem (2 kt (hd + 1) + 4 hd) floats.
template <typename T>
__device__ void attention_cached_fwd(const T* q, const T* k, const T* v, T* out,
                                     const int* q_starts, const int* q_lens,
                                     const int* kv_starts, const int* kv_lens, int Hq, int Hkv,
                                     int hd, float scale, int kt) {
  extern __shared__ float sm[];
  float* ks = sm;
  float* vs = ks + kt * (hd + 1);
  float* qs = vs + kt * (hd + 1);
  int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int qstart = q_starts[blockIdx.z], qlen = q_lens[blockIdx.z];
  int kstart = kv_starts[blockIdx.z], klen = kv_lens[blockIdx.z];
  int past = klen - qlen;
  int i0 = blockIdx.x * ATT_WARPS;
  if (i0 >= qlen) return;
  int i = i0 + w;
  bool active = i < qlen;
  int pos = past + i;
  int h = blockIdx.y, kvh = h / (Hq / Hkv);
  i64 qw = (i64)Hq * hd, kw = (i64)Hkv * hd;
  for (int d = lane; d < hd; d += 32)
    qs[w * hd + d] = active ? ldf(q, (qstart + i) * qw + h * hd + d) : 0.f;
  float m = LF_NEG_INF, l = 0.f, o[ATT_MAXC];
#pragma unroll
  for (int c = 0; c < ATT_MAXC; ++c) o[c] = 0.f;
  int last = past + min(qlen - 1, i0 + ATT_WARPS - 1);
  for (int kb = 0; kb <= last; kb += kt) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kt * hd; idx += blockDim.x) {
      int jj = idx / hd, d = idx % hd, key = kb + jj;
      bool ok = key < klen;
      ks[jj * (hd + 1) + d] = ok ? ldf(k, (kstart + key) * kw + kvh * hd + d) : 0.f;
      vs[jj * (hd + 1) + d] = ok ? ldf(v, (kstart + key) * kw + kvh * hd + d) : 0.f;
    }
    __syncthreads();
    if (active && kb <= pos) {
      int key = kb + lane;
      float sc = LF_NEG_INF;
      if (lane < kt && key <= pos) {
        float dot = 0.f;
        for (int d = 0; d < hd; ++d) dot += qs[w * hd + d] * ks[lane * (hd + 1) + d];
        sc = dot * scale;
      }
      float mnew = fmaxf(m, warp_max(sc));
      float corr = expf(m - mnew);
      float p = lane < kt && key <= pos ? expf(sc - mnew) : 0.f;
      l = l * corr + warp_sum(p);
#pragma unroll
      for (int c = 0; c < ATT_MAXC; ++c) o[c] *= corr;
      int nk = min(kt, pos - kb + 1);
      for (int jj = 0; jj < nk; ++jj) {
        float pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
        for (int c = 0; c < ATT_MAXC; ++c) {
          int d = lane + 32 * c;
          if (d < hd) o[c] += pj * vs[jj * (hd + 1) + d];
        }
      }
      m = mnew;
    }
  }
  if (!active) return;
#pragma unroll
  for (int c = 0; c < ATT_MAXC; ++c) {
    int d = lane + 32 * c;
    if (d < hd) stf(out, (qstart + i) * qw + h * hd + d, o[c] / l);
  }
}
LF_INST(attention_cached_fwd,
        (const void* q, const void* k, const void* v, void* out, const int* q_starts,
         const int* q_lens, const int* kv_starts, const int* kv_lens, int Hq, int Hkv, int hd,
         float scale, int kt),
        ((const T*)q, (const T*)k, (const T*)v, (T*)out, q_starts, q_lens, kv_starts, kv_lens,
         Hq, Hkv, hd, scale, kt))

// delta[h, t] = sum_d dO[t, h, d] O[t, h, d] (f32). Grid ceil(T * Hq / 4); block 128.
template <typename T>
__device__ void attention_bwd_delta(const T* dout, const T* out, float* delta, int ntok, int Hq,
                                    int hd) {
  int lane = threadIdx.x & 31;
  i64 task = (i64)blockIdx.x * 4 + (threadIdx.x >> 5);
  if (task >= (i64)ntok * Hq) return;
  int t = (int)(task / Hq), h = (int)(task % Hq);
  i64 base = (i64)t * Hq * hd + (i64)h * hd;
  float s = 0.f;
  for (int d = lane; d < hd; d += 32) s += ldf(dout, base + d) * ldf(out, base + d);
  s = warp_sum(s);
  if (lane == 0) delta[(i64)h * ntok + t] = s;
}
LF_INST(attention_bwd_delta, (const void* dout, const void* out, float* delta, int ntok, int Hq, int hd),
        ((const T*)dout, (const T*)out, delta, ntok, Hq, hd))

// dq [T, Hq*hd]: dS = P (dP - delta) scale, dq = dS K, P = exp(scale q.k - lse).
// Grid (ceil(maxlen / 4), Hq, nseq); block 128; dynamic smem (2 kt (hd + 1) + 8 hd) floats.
template <typename T>
__device__ void attention_bwd_dq(const T* q, const T* k, const T* v, const T* dout,
                                 const float* lse, const float* delta, T* dq, const int* starts,
                                 const int* lens, int ntok, int Hq, int Hkv, int hd, float scale,
                                 int kt) {
  extern __shared__ float sm[];
  float* ks = sm;
  float* vs = ks + kt * (hd + 1);
  float* qs = vs + kt * (hd + 1);
  float* ds_ = qs + ATT_WARPS * hd;
  int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int start = starts[blockIdx.z], len = lens[blockIdx.z];
  int i0 = blockIdx.x * ATT_WARPS;
  if (i0 >= len) return;
  int i = i0 + w;
  bool active = i < len;
  int h = blockIdx.y, kvh = h / (Hq / Hkv);
  i64 qw = (i64)Hq * hd, kw = (i64)Hkv * hd;
  for (int d = lane; d < hd; d += 32) {
    qs[w * hd + d] = active ? ldf(q, (start + i) * qw + h * hd + d) : 0.f;
    ds_[w * hd + d] = active ? ldf(dout, (start + i) * qw + h * hd + d) : 0.f;
  }
  float li = active ? lse[(i64)h * ntok + start + i] : 0.f;
  float di = active ? delta[(i64)h * ntok + start + i] : 0.f;
  float acc[ATT_MAXC];
#pragma unroll
  for (int c = 0; c < ATT_MAXC; ++c) acc[c] = 0.f;
  int last = min(len - 1, i0 + ATT_WARPS - 1);
  for (int kb = 0; kb <= last; kb += kt) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kt * hd; idx += blockDim.x) {
      int jj = idx / hd, d = idx % hd, key = kb + jj;
      bool ok = key < len;
      ks[jj * (hd + 1) + d] = ok ? ldf(k, (start + key) * kw + kvh * hd + d) : 0.f;
      vs[jj * (hd + 1) + d] = ok ? ldf(v, (start + key) * kw + kvh * hd + d) : 0.f;
    }
    __syncthreads();
    if (active && kb <= i) {
      int key = kb + lane;
      float dsv = 0.f;
      if (lane < kt && key <= i) {
        float s = 0.f, dp = 0.f;
        for (int d = 0; d < hd; ++d) {
          s += qs[w * hd + d] * ks[lane * (hd + 1) + d];
          dp += ds_[w * hd + d] * vs[lane * (hd + 1) + d];
        }
        float p = expf(s * scale - li);
        dsv = p * (dp - di) * scale;
      }
      int nk = min(kt, i - kb + 1);
      for (int jj = 0; jj < nk; ++jj) {
        float g = __shfl_sync(0xffffffffu, dsv, jj);
#pragma unroll
        for (int c = 0; c < ATT_MAXC; ++c) {
          int d = lane + 32 * c;
          if (d < hd) acc[c] += g * ks[jj * (hd + 1) + d];
        }
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int c = 0; c < ATT_MAXC; ++c) {
    int d = lane + 32 * c;
    if (d < hd) stf(dq, (start + i) * qw + h * hd + d, acc[c]);
  }
}
LF_INST(attention_bwd_dq,
        (const void* q, const void* k, const void* v, const void* dout, const float* lse,
         const float* delta, void* dq, const int* starts, const int* lens, int ntok, int Hq,
         int Hkv, int hd, float scale, int kt),
        ((const T*)q, (const T*)k, (const T*)v, (const T*)dout, lse, delta, (T*)dq, starts, lens,
         ntok, Hq, Hkv, hd, scale, kt))

// dk, dv [T, Hkv*hd]: for key row j of kv head kvh, over the group's query heads and the
// query rows i >= j: dv += P_ij dO_i, dk += dS_ij q_i. One warp per key row, no atomics.
// Grid (ceil(maxlen / 4), Hkv, nseq); block 128; dynamic smem (2 kt (hd + 1) + 2 kt + 8 hd).
template <typename T>
__device__ void attention_bwd_dkdv(const T* q, const T* k, const T* v, const T* dout,
                                   const float* lse, const float* delta, T* dk, T* dv,
                                   const int* starts, const int* lens, int ntok, int Hq, int Hkv,
                                   int hd, float scale, int kt) {
  extern __shared__ float sm[];
  float* qt = sm;
  float* dot_ = qt + kt * (hd + 1);
  float* lt = dot_ + kt * (hd + 1);
  float* dlt = lt + kt;
  float* kr = dlt + kt;
  float* vr = kr + ATT_WARPS * hd;
  int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int start = starts[blockIdx.z], len = lens[blockIdx.z];
  int j0 = blockIdx.x * ATT_WARPS;
  if (j0 >= len) return;
  int j = j0 + w;
  bool active = j < len;
  int kvh = blockIdx.y, group = Hq / Hkv;
  i64 qw = (i64)Hq * hd, kw = (i64)Hkv * hd;
  for (int d = lane; d < hd; d += 32) {
    kr[w * hd + d] = active ? ldf(k, (start + j) * kw + kvh * hd + d) : 0.f;
    vr[w * hd + d] = active ? ldf(v, (start + j) * kw + kvh * hd + d) : 0.f;
  }
  float ak[ATT_MAXC], av[ATT_MAXC];
#pragma unroll
  for (int c = 0; c < ATT_MAXC; ++c) ak[c] = av[c] = 0.f;
  for (int g = 0; g < group; ++g) {
    int h = kvh * group + g;
    for (int qb = j0; qb < len; qb += kt) {
      __syncthreads();
      for (int idx = threadIdx.x; idx < kt * hd; idx += blockDim.x) {
        int ii = idx / hd, d = idx % hd, row = qb + ii;
        bool ok = row < len;
        qt[ii * (hd + 1) + d] = ok ? ldf(q, (start + row) * qw + h * hd + d) : 0.f;
        dot_[ii * (hd + 1) + d] = ok ? ldf(dout, (start + row) * qw + h * hd + d) : 0.f;
      }
      for (int ii = threadIdx.x; ii < kt; ii += blockDim.x) {
        bool ok = qb + ii < len;
        lt[ii] = ok ? lse[(i64)h * ntok + start + qb + ii] : 0.f;
        dlt[ii] = ok ? delta[(i64)h * ntok + start + qb + ii] : 0.f;
      }
      __syncthreads();
      if (!active || qb + kt - 1 < j) continue;
      int i = qb + lane;
      float p = 0.f, dsv = 0.f;
      if (lane < kt && i < len && i >= j) {
        float s = 0.f, dp = 0.f;
        for (int d = 0; d < hd; ++d) {
          s += qt[lane * (hd + 1) + d] * kr[w * hd + d];
          dp += dot_[lane * (hd + 1) + d] * vr[w * hd + d];
        }
        p = expf(s * scale - lt[lane]);
        dsv = p * (dp - dlt[lane]) * scale;
      }
      int nq = min(kt, len - qb);
      for (int ii = 0; ii < nq; ++ii) {
        float pi = __shfl_sync(0xffffffffu, p, ii);
        float gi = __shfl_sync(0xffffffffu, dsv, ii);
#pragma unroll
        for (int c = 0; c < ATT_MAXC; ++c) {
          int d = lane + 32 * c;
          if (d < hd) {
            av[c] += pi * dot_[ii * (hd + 1) + d];
            ak[c] += gi * qt[ii * (hd + 1) + d];
          }
        }
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int c = 0; c < ATT_MAXC; ++c) {
    int d = lane + 32 * c;
    if (d < hd) {
      stf(dk, (start + j) * kw + kvh * hd + d, ak[c]);
      stf(dv, (start + j) * kw + kvh * hd + d, av[c]);
    }
  }
}
LF_INST(attention_bwd_dkdv,
        (const void* q, const void* k, const void* v, const void* dout, const float* lse,
         const float* delta, void* dk, void* dv, const int* starts, const int* lens, int ntok,
         int Hq, int Hkv, int hd, float scale, int kt),
        ((const T*)q, (const T*)k, (const T*)v, (const T*)dout, lse, delta, (T*)dk, (T*)dv,
         starts, lens, ntok, Hq, Hkv, hd, scale, kt))

// ---- SwiGLU ------------------------------------------------------------------------------------

// out = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
template <typename T>
__device__ void swiglu(const T* gate, const T* up, T* out, i64 n) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    float g = ldf(gate, i);
    stf(out, i, g / (1.f + expf(-g)) * ldf(up, i));
  }
}
LF_INST(swiglu, (const void* gate, const void* up, void* out, long long n),
        ((const T*)gate, (const T*)up, (T*)out, n))

// dgate = d up sig (1 + g (1 - sig)), dup = d silu(g); one pass producing both.
template <typename T>
__device__ void swiglu_bwd(const T* d, const T* gate, const T* up, T* dg, T* du, i64 n) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    float g = ldf(gate, i), u = ldf(up, i), dd = ldf(d, i);
    float sig = 1.f / (1.f + expf(-g));
    stf(dg, i, dd * u * sig * (1.f + g * (1.f - sig)));
    stf(du, i, dd * (g * sig));
  }
}
LF_INST(swiglu_bwd, (const void* d, const void* gate, const void* up, void* dg, void* du, long long n),
        ((const T*)d, (const T*)gate, (const T*)up, (T*)dg, (T*)du, n))

// ---- cross-entropy -----------------------------------------------------------------------------

// One CTA of 256 per row of logits [N, V]: pass 1 an online max/sum of exp, pass 2 the gradient
// grad = grad_scale (softmax - onehot) of a counted row (label >= 0). Every thread gets the
// row's max M and sum of exp(x - M) S.
template <typename T>
__device__ void ce_row(const T* x, T* g, int label, int V, float grad_scale, float& M, float& S) {
  float m = LF_NEG_INF, s = 0.f;
  for (int c = threadIdx.x; c < V; c += blockDim.x) {
    float v = ldf(x, c);
    if (v > m) {
      s = s * expf(m - v) + 1.f;
      m = v;
    } else {
      s += expf(v - m);
    }
  }
  M = block_max(m);
  S = block_sum(m == LF_NEG_INF ? 0.f : s * expf(m - M));
  float inv = grad_scale / S;
  for (int c = threadIdx.x; c < V; c += blockDim.x) {
    float e = expf(ldf(x, c) - M) * inv;
    if (c == label) e -= grad_scale;
    stf(g, c, e);
  }
}

// Grid N: the gradient of every row (zero on rows with a negative label) and loss[row] =
// logsumexp - logit[label] in f64 (0 on ignored rows).
template <typename T>
__device__ void cross_entropy(const T* logits, const int* labels, T* grad, double* loss, int V,
                              float grad_scale) {
  i64 row = blockIdx.x;
  int label = labels[row];
  const T* x = logits + row * V;
  T* g = grad + row * V;
  if (label < 0) {
    for (int c = threadIdx.x; c < V; c += blockDim.x) stf(g, c, 0.f);
    if (threadIdx.x == 0) loss[row] = 0.0;
    return;
  }
  float M, S;
  ce_row(x, g, label, V, grad_scale, M, S);
  if (threadIdx.x == 0) loss[row] = (double)M + log((double)S) - (double)ldf(x, label);
}
LF_INST(cross_entropy,
        (const void* logits, const int* labels, void* grad, double* loss, int V, float grad_scale),
        ((const T*)logits, labels, (T*)grad, loss, V, grad_scale))

// Grid K, one CTA per counted row rows[k] (the rows with label >= 0, in order; the others'
// gradient rows stay as allocated, zero): its gradient and stats[3k..3k+3] = (M, S, the logit
// of its label) in f32, from which the host forms the loss in f64 (the step's one readback).
template <typename T>
__device__ void cross_entropy_stats(const T* logits, const int* rows, const int* labels, T* grad,
                                    float* stats, int V, float grad_scale) {
  i64 k = blockIdx.x;
  i64 row = rows[k];
  int label = labels[row];
  const T* x = logits + row * V;
  float M, S;
  ce_row(x, grad + row * V, label, V, grad_scale, M, S);
  if (threadIdx.x == 0) {
    stats[3 * k] = M;
    stats[3 * k + 1] = S;
    stats[3 * k + 2] = ldf(x, label);
  }
}
LF_INST(cross_entropy_stats,
        (const void* logits, const int* rows, const int* labels, void* grad, float* stats, int V,
         float grad_scale),
        ((const T*)logits, rows, labels, (T*)grad, stats, V, grad_scale))
