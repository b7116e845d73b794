// Causal softmax attention on CUDA, flash style, on CUDA cores (fp32/fp64/bf16/fp16 storage,
// fp32 accumulation; fp64 in fp64). Forward: a thread block takes 16 query rows of one
// (batch, head) (4 warps x 4 rows), walks the keys in tiles of 32 staged in shared memory and keeps
// an online softmax per row: lane j scores key j0 + j against the block's rows, the warp reduces
// max / sum with shuffles, and lane d accumulates output dims d, d + 32, ... . Tiles above the
// diagonal are never loaded; only out and the per-row log-sum-exp are written. Traffic: q, out
// once; k, v once per 16 query rows.
// Backward (flash-attention-2 recompute of P = exp(S - lse)), two deterministic passes and no
// atomics: per 32-key tile, dK and dV are accumulated in registers over all later query rows
// (each thread owns 8 x (D/32) fixed (key, dim) elements); a separate per-query-tile pass (the
// forward's shape) accumulates dQ. Both recompute S; delta = rowsum(dO * O) is precomputed.
// Decode runs the forward kernel with one query row per (batch, head) placed at cache_length - 1.
// Tensor cores (WMMA/wgmma) are not used yet: this is the clear CUDA-core path.
#include "cuda_common.cuh"
#include "op_checks.h"
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace ryzen_llm {
namespace cuda {
namespace {

constexpr int64_t kMinHeadDim = 8;
constexpr int64_t kMaxHeadDim = 128;
constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kBlockQ = kWarps * kRowsPerWarp;  // 16 query rows per block
constexpr int kBlockK = 32;                     // keys per tile: one per lane
constexpr int kThreads = kWarps * 32;

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

struct Strides3 {
  int64_t b, h, t;  // the head-dim stride is 1 (checked)
};

Strides3 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

struct ForwardParams {
  const void *q, *k, *v;
  Strides3 sq, sk, sv;
  const bool* mask;        // (B, Tk) True = real key; null without a mask
  const int64_t* lengths;  // decode: (B) cache lengths, the one query sits at lengths[b] - 1
  void* out;               // (B, H, Tq, D) contiguous
  void* lse;               // (B, H, Tq) accumulation type; null for decode
  int64_t H, Tq, Tk, D, q_tiles;
  double scale;
};

// Dynamic shared memory of the forward kernel, in acc_t elements: Q (16 x DP), K (32 x DP+1), V (32 x DP).
template <int DPL>
constexpr int64_t forward_smem_elems() {
  return kBlockQ * 32 * DPL + kBlockK * (32 * DPL + 1) + kBlockK * 32 * DPL;
}

template <typename scalar_t, typename acc_t, int DPL>
__global__ void __launch_bounds__(kThreads) causal_attention_forward_kernel(ForwardParams p) {
  constexpr int DP = 32 * DPL;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* Qs = reinterpret_cast<acc_t*>(smem_raw);  // (16, DP)
  acc_t* Ks = Qs + kBlockQ * DP;                    // (32, DP + 1): lane j reads row j
  acc_t* Vs = Ks + kBlockK * (DP + 1);              // (32, DP)
  const int64_t bh = blockIdx.x / p.q_tiles;
  const int64_t tile = p.q_tiles - 1 - blockIdx.x % p.q_tiles;  // heaviest (last) tiles first
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t i0 = tile * kBlockQ;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const scalar_t* q = static_cast<const scalar_t*>(p.q) + b * p.sq.b + h * p.sq.h;
  const scalar_t* k = static_cast<const scalar_t*>(p.k) + b * p.sk.b + h * p.sk.h;
  const scalar_t* v = static_cast<const scalar_t*>(p.v) + b * p.sv.b + h * p.sv.h;
  const bool* mask = p.mask != nullptr ? p.mask + b * p.Tk : nullptr;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  // Absolute position of each query row (keys j <= pos are visible); -1 for rows past the end.
  const int64_t decode_pos = p.lengths != nullptr ? p.lengths[b] - 1 : 0;
  auto pos_of = [&](int64_t i) -> int64_t {
    if (i >= p.Tq) return -1;
    return p.lengths != nullptr ? decode_pos : i;
  };
  const int64_t last_key = p.lengths != nullptr ? decode_pos : min(i0 + kBlockQ, p.Tq) - 1;

  for (int idx = threadIdx.x; idx < kBlockQ * DP; idx += kThreads) {
    const int r = idx / DP, d = idx % DP;
    Qs[idx] = (i0 + r < p.Tq && d < p.D) ? static_cast<acc_t>(q[(i0 + r) * p.sq.t + d]) : acc_t(0);
  }
  acc_t o[kRowsPerWarp][DPL], m[kRowsPerWarp], l[kRowsPerWarp];
  int64_t pos[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = neg_inf;
    l[rr] = 0;
    pos[rr] = pos_of(i0 + warp * kRowsPerWarp + rr);
#pragma unroll
    for (int c = 0; c < DPL; ++c) o[rr][c] = 0;
  }

  for (int64_t j0 = 0; j0 <= last_key; j0 += kBlockK) {
    __syncthreads();  // the previous tile is no longer read (and Q is written, first time)
    for (int idx = threadIdx.x; idx < kBlockK * DP; idx += kThreads) {
      const int jj = idx / DP, d = idx % DP;
      const bool in = j0 + jj < p.Tk && d < p.D;
      Ks[jj * (DP + 1) + d] = in ? static_cast<acc_t>(k[(j0 + jj) * p.sk.t + d]) : acc_t(0);
      Vs[jj * DP + d] = in ? static_cast<acc_t>(v[(j0 + jj) * p.sv.t + d]) : acc_t(0);
    }
    __syncthreads();
    acc_t s[kRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) s[rr] = 0;
    const acc_t* qrow = Qs + warp * kRowsPerWarp * DP;
#pragma unroll 8
    for (int d = 0; d < DP; ++d) {
      const acc_t kd = Ks[lane * (DP + 1) + d];
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) s[rr] += qrow[rr * DP + d] * kd;
    }
    const int64_t j = j0 + lane;
    const bool key_ok = j < p.Tk && (mask == nullptr || mask[j]);
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const acc_t sc = (key_ok && j <= pos[rr]) ? s[rr] * scale : neg_inf;
      const acc_t tile_max = warp_max(sc);
      const acc_t m_new = tile_max > m[rr] ? tile_max : m[rr];
      if (m_new == neg_inf) continue;  // no visible key yet (warp-uniform)
      const acc_t alpha = exp_acc(m[rr] - m_new);  // 0 when m was -inf
      const acc_t pj = exp_acc(sc - m_new);         // 0 for hidden keys
      l[rr] = l[rr] * alpha + warp_sum(pj);
      m[rr] = m_new;
#pragma unroll
      for (int c = 0; c < DPL; ++c) o[rr][c] *= alpha;
      for (int jj = 0; jj < kBlockK; ++jj) {
        const acc_t pb = __shfl_sync(0xffffffffu, pj, jj);
#pragma unroll
        for (int c = 0; c < DPL; ++c) o[rr][c] += pb * Vs[jj * DP + lane + 32 * c];
      }
    }
  }

  scalar_t* out = static_cast<scalar_t*>(p.out) + bh * p.Tq * p.D;
  acc_t* lse = p.lse != nullptr ? static_cast<acc_t*>(p.lse) + bh * p.Tq : nullptr;
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t i = i0 + warp * kRowsPerWarp + rr;
    if (i >= p.Tq) continue;
    const acc_t inv = l[rr] > 0 ? acc_t(1) / l[rr] : acc_t(0);  // rows with no key give zeros
#pragma unroll
    for (int c = 0; c < DPL; ++c) {
      const int d = lane + 32 * c;
      if (d < p.D) out[i * p.D + d] = static_cast<scalar_t>(o[rr][c] * inv);
    }
    if (lse != nullptr && lane == 0) lse[i] = l[rr] > 0 ? m[rr] + log_acc(l[rr]) : neg_inf;
  }
}

struct BackwardParams {
  const void *q, *k, *v, *grad_out, *out;
  Strides3 sq, sk, sv, sgo, so;
  const bool* mask;
  const void* lse;    // (B, H, T) acc_t
  void* delta;        // (B, H, T) acc_t: rowsum(grad_out * out)
  void *grad_q, *grad_k, *grad_v;  // (B, H, T, D) contiguous
  int64_t H, T, D, q_tiles, k_tiles;
  double scale;
};

// delta[bh, i] = sum_d grad_out * out: one warp per row.
template <typename scalar_t, typename acc_t>
__global__ void attention_delta_kernel(BackwardParams p, int64_t rows) {
  const int64_t row = blockIdx.x * (int64_t)kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t bh = row / p.T, i = row % p.T, b = bh / p.H, h = bh % p.H;
  const scalar_t* go = static_cast<const scalar_t*>(p.grad_out) + b * p.sgo.b + h * p.sgo.h + i * p.sgo.t;
  const scalar_t* o = static_cast<const scalar_t*>(p.out) + b * p.so.b + h * p.so.h + i * p.so.t;
  acc_t s = 0;
  for (int64_t d = lane; d < p.D; d += 32) s += static_cast<acc_t>(go[d]) * static_cast<acc_t>(o[d]);
  s = warp_sum(s);
  if (lane == 0) static_cast<acc_t*>(p.delta)[row] = s;
}

// Q, dO (16 x DP each), K, V (32 x DP+1 each).
template <int DPL>
constexpr int64_t grad_q_smem_elems() {
  return 2 * kBlockQ * 32 * DPL + 2 * kBlockK * (32 * DPL + 1);
}

// dQ_i = scale * sum_j dS_ij K_j, dS_ij = P_ij (dO_i . V_j - delta_i), P_ij = exp(scale q_i.k_j - lse_i).
template <typename scalar_t, typename acc_t, int DPL>
__global__ void __launch_bounds__(kThreads) causal_attention_grad_q_kernel(BackwardParams p) {
  constexpr int DP = 32 * DPL;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* Qs = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* Gs = Qs + kBlockQ * DP;
  acc_t* Ks = Gs + kBlockQ * DP;
  acc_t* Vs = Ks + kBlockK * (DP + 1);
  const int64_t bh = blockIdx.x / p.q_tiles;
  const int64_t tile = p.q_tiles - 1 - blockIdx.x % p.q_tiles;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t i0 = tile * kBlockQ;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const scalar_t* q = static_cast<const scalar_t*>(p.q) + b * p.sq.b + h * p.sq.h;
  const scalar_t* k = static_cast<const scalar_t*>(p.k) + b * p.sk.b + h * p.sk.h;
  const scalar_t* v = static_cast<const scalar_t*>(p.v) + b * p.sv.b + h * p.sv.h;
  const scalar_t* go = static_cast<const scalar_t*>(p.grad_out) + b * p.sgo.b + h * p.sgo.h;
  const bool* mask = p.mask != nullptr ? p.mask + b * p.T : nullptr;
  const acc_t* lse = static_cast<const acc_t*>(p.lse) + bh * p.T;
  const acc_t* delta = static_cast<const acc_t*>(p.delta) + bh * p.T;
  const acc_t scale = static_cast<acc_t>(p.scale);

  for (int idx = threadIdx.x; idx < kBlockQ * DP; idx += kThreads) {
    const int r = idx / DP, d = idx % DP;
    const bool in = i0 + r < p.T && d < p.D;
    Qs[idx] = in ? static_cast<acc_t>(q[(i0 + r) * p.sq.t + d]) : acc_t(0);
    Gs[idx] = in ? static_cast<acc_t>(go[(i0 + r) * p.sgo.t + d]) : acc_t(0);
  }
  acc_t dq[kRowsPerWarp][DPL], row_lse[kRowsPerWarp], row_delta[kRowsPerWarp];
  int64_t pos[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t i = i0 + warp * kRowsPerWarp + rr;
    pos[rr] = i < p.T ? i : -1;
    row_lse[rr] = i < p.T ? lse[i] : acc_t(0);
    row_delta[rr] = i < p.T ? delta[i] : acc_t(0);
#pragma unroll
    for (int c = 0; c < DPL; ++c) dq[rr][c] = 0;
  }
  const int64_t last_key = min(i0 + kBlockQ, p.T) - 1;
  for (int64_t j0 = 0; j0 <= last_key; j0 += kBlockK) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kBlockK * DP; idx += kThreads) {
      const int jj = idx / DP, d = idx % DP;
      const bool in = j0 + jj < p.T && d < p.D;
      Ks[jj * (DP + 1) + d] = in ? static_cast<acc_t>(k[(j0 + jj) * p.sk.t + d]) : acc_t(0);
      Vs[jj * (DP + 1) + d] = in ? static_cast<acc_t>(v[(j0 + jj) * p.sv.t + d]) : acc_t(0);
    }
    __syncthreads();
    acc_t s[kRowsPerWarp], dp[kRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) s[rr] = dp[rr] = 0;
    const acc_t* qrow = Qs + warp * kRowsPerWarp * DP;
    const acc_t* grow = Gs + warp * kRowsPerWarp * DP;
#pragma unroll 8
    for (int d = 0; d < DP; ++d) {
      const acc_t kd = Ks[lane * (DP + 1) + d], vd = Vs[lane * (DP + 1) + d];
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        s[rr] += qrow[rr * DP + d] * kd;
        dp[rr] += grow[rr * DP + d] * vd;
      }
    }
    const int64_t j = j0 + lane;
    const bool key_ok = j < p.T && (mask == nullptr || mask[j]);
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const bool vis = key_ok && j <= pos[rr];
      const acc_t pj = vis ? exp_acc(s[rr] * scale - row_lse[rr]) : acc_t(0);
      const acc_t ds = pj * (dp[rr] - row_delta[rr]);
      if (__all_sync(0xffffffffu, ds == acc_t(0))) continue;
      for (int jj = 0; jj < kBlockK; ++jj) {
        const acc_t db = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
        for (int c = 0; c < DPL; ++c) dq[rr][c] += db * Ks[jj * (DP + 1) + lane + 32 * c];
      }
    }
  }
  scalar_t* gq = static_cast<scalar_t*>(p.grad_q) + bh * p.T * p.D;
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t i = i0 + warp * kRowsPerWarp + rr;
    if (i >= p.T) continue;
#pragma unroll
    for (int c = 0; c < DPL; ++c) {
      const int d = lane + 32 * c;
      if (d < p.D) gq[i * p.D + d] = static_cast<scalar_t>(dq[rr][c] * scale);
    }
  }
}

// K, V (32 x DP+1), Q, dO (16 x DP), P, dS (16 x 32), lse, delta (16).
template <int DPL>
constexpr int64_t grad_kv_smem_elems() {
  return 2 * kBlockK * (32 * DPL + 1) + 2 * kBlockQ * 32 * DPL + 2 * kBlockQ * kBlockK + 2 * kBlockQ;
}

// dV_j = sum_i P_ij dO_i, dK_j = scale * sum_i dS_ij Q_i over the query rows i >= j (causal).
template <typename scalar_t, typename acc_t, int DPL>
__global__ void __launch_bounds__(kThreads) causal_attention_grad_kv_kernel(BackwardParams p) {
  constexpr int DP = 32 * DPL;
  constexpr int kOwned = kBlockK * DP / kThreads;  // (key, dim) elements per thread: 8 * DPL
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* Ks = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* Vs = Ks + kBlockK * (DP + 1);
  acc_t* Qs = Vs + kBlockK * (DP + 1);
  acc_t* Gs = Qs + kBlockQ * DP;
  acc_t* Ps = Gs + kBlockQ * DP;
  acc_t* Ss = Ps + kBlockQ * kBlockK;
  acc_t* Ls = Ss + kBlockQ * kBlockK;
  acc_t* Ds = Ls + kBlockQ;
  const int64_t bh = blockIdx.x / p.k_tiles;
  const int64_t tile = blockIdx.x % p.k_tiles;  // early key tiles see the most queries: first
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t j0 = tile * kBlockK;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const scalar_t* q = static_cast<const scalar_t*>(p.q) + b * p.sq.b + h * p.sq.h;
  const scalar_t* k = static_cast<const scalar_t*>(p.k) + b * p.sk.b + h * p.sk.h;
  const scalar_t* v = static_cast<const scalar_t*>(p.v) + b * p.sv.b + h * p.sv.h;
  const scalar_t* go = static_cast<const scalar_t*>(p.grad_out) + b * p.sgo.b + h * p.sgo.h;
  const bool* mask = p.mask != nullptr ? p.mask + b * p.T : nullptr;
  const acc_t* lse = static_cast<const acc_t*>(p.lse) + bh * p.T;
  const acc_t* delta = static_cast<const acc_t*>(p.delta) + bh * p.T;
  const acc_t scale = static_cast<acc_t>(p.scale);

  for (int idx = threadIdx.x; idx < kBlockK * DP; idx += kThreads) {
    const int jj = idx / DP, d = idx % DP;
    const bool in = j0 + jj < p.T && d < p.D;
    Ks[jj * (DP + 1) + d] = in ? static_cast<acc_t>(k[(j0 + jj) * p.sk.t + d]) : acc_t(0);
    Vs[jj * (DP + 1) + d] = in ? static_cast<acc_t>(v[(j0 + jj) * p.sv.t + d]) : acc_t(0);
  }
  acc_t dk[kOwned], dv[kOwned];
#pragma unroll
  for (int e = 0; e < kOwned; ++e) dk[e] = dv[e] = 0;
  const int64_t j = j0 + lane;
  const bool key_ok = j < p.T && (mask == nullptr || mask[j]);

  for (int64_t i0 = (j0 / kBlockQ) * kBlockQ; i0 < p.T; i0 += kBlockQ) {
    __syncthreads();  // K/V written (first time); Q, dO, P, dS no longer read
    for (int idx = threadIdx.x; idx < kBlockQ * DP; idx += kThreads) {
      const int r = idx / DP, d = idx % DP;
      const bool in = i0 + r < p.T && d < p.D;
      Qs[idx] = in ? static_cast<acc_t>(q[(i0 + r) * p.sq.t + d]) : acc_t(0);
      Gs[idx] = in ? static_cast<acc_t>(go[(i0 + r) * p.sgo.t + d]) : acc_t(0);
    }
    if (threadIdx.x < kBlockQ) {
      const int64_t i = i0 + threadIdx.x;
      Ls[threadIdx.x] = i < p.T ? lse[i] : acc_t(0);
      Ds[threadIdx.x] = i < p.T ? delta[i] : acc_t(0);
    }
    __syncthreads();
    acc_t s[kRowsPerWarp], dp[kRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) s[rr] = dp[rr] = 0;
    const acc_t* qrow = Qs + warp * kRowsPerWarp * DP;
    const acc_t* grow = Gs + warp * kRowsPerWarp * DP;
#pragma unroll 8
    for (int d = 0; d < DP; ++d) {
      const acc_t kd = Ks[lane * (DP + 1) + d], vd = Vs[lane * (DP + 1) + d];
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        s[rr] += qrow[rr * DP + d] * kd;
        dp[rr] += grow[rr * DP + d] * vd;
      }
    }
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t i = i0 + r;
      const bool vis = key_ok && i < p.T && j <= i;
      const acc_t pj = vis ? exp_acc(s[rr] * scale - Ls[r]) : acc_t(0);
      Ps[r * kBlockK + lane] = pj;
      Ss[r * kBlockK + lane] = pj * (dp[rr] - Ds[r]);
    }
    __syncthreads();
#pragma unroll
    for (int e = 0; e < kOwned; ++e) {
      const int idx = threadIdx.x + e * kThreads;
      const int jj = idx / DP, d = idx % DP;
      acc_t a = dv[e], g = dk[e];
#pragma unroll 4
      for (int r = 0; r < kBlockQ; ++r) {
        a += Ps[r * kBlockK + jj] * Gs[r * DP + d];
        g += Ss[r * kBlockK + jj] * Qs[r * DP + d];
      }
      dv[e] = a;
      dk[e] = g;
    }
  }
  scalar_t* gk = static_cast<scalar_t*>(p.grad_k) + bh * p.T * p.D;
  scalar_t* gv = static_cast<scalar_t*>(p.grad_v) + bh * p.T * p.D;
#pragma unroll
  for (int e = 0; e < kOwned; ++e) {
    const int idx = threadIdx.x + e * kThreads;
    const int jj = idx / DP, d = idx % DP;
    if (j0 + jj < p.T && d < p.D) {
      gk[(j0 + jj) * p.D + d] = static_cast<scalar_t>(dk[e] * scale);
      gv[(j0 + jj) * p.D + d] = static_cast<scalar_t>(dv[e]);
    }
  }
}

// ---- dispatch on the head dim ------------------------------------------------------------

template <typename F>
void with_dpl(int64_t D, const F& f) {
  const int64_t dpl = (D + 31) / 32;
  switch (dpl) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

template <typename scalar_t, typename acc_t>
void launch_forward(const ForwardParams& p, int64_t blocks) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  with_dpl(p.D, [&](auto dpl) {
    constexpr int DPL = decltype(dpl)::value;
    const size_t smem = forward_smem_elems<DPL>() * sizeof(acc_t);
    auto kernel = causal_attention_forward_kernel<scalar_t, acc_t, DPL>;
    allow_dynamic_smem(kernel, smem);
    kernel<<<blocks, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---- argument checks ----------------------------------------------------------------------

// A (B, nh, T, hs) operand on a CUDA device in a float dtype (see attention_operand).
at::Tensor checked_operand(const at::Tensor& t, const char* name, const at::Tensor* like,
                           const char* like_name) {
  check_cuda(t, name);
  check_float_dtype_cuda(t, name);
  return attention_operand(t, name, like, like_name);
}

void check_cuda_head_dim(const at::Tensor& q) {
  check_head_dim(q, kMinHeadDim, kMaxHeadDim, " on CUDA");
}

at::Tensor checked_mask(const c10::optional<at::Tensor>& mask, const at::Tensor& q) {
  if (!mask.has_value()) return at::Tensor();
  check_key_padding_mask(*mask, q);
  return mask->contiguous();
}

std::tuple<at::Tensor, at::Tensor> causal_attention_forward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& key_padding_mask, double scale) {
  at::Tensor q = checked_operand(q_in, "q", nullptr, nullptr);
  at::Tensor k = checked_operand(k_in, "k", &q_in, "q");
  at::Tensor v = checked_operand(v_in, "v", &q_in, "q");
  check_cuda_head_dim(q);
  check_attention_scale(scale);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor mask = checked_mask(key_padding_mask, q);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const auto acc_type = at::toOpMathType(q.scalar_type());
  auto out = at::empty({B, H, T, D}, q.options());
  auto lse = at::empty({B, H, T}, q.options().dtype(acc_type));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ForwardParams p{q.data_ptr(), k.data_ptr(), v.data_ptr(), strides_of(q), strides_of(k),
                    strides_of(v), mask.defined() ? mask.data_ptr<bool>() : nullptr, nullptr,
                    out.data_ptr(), lse.data_ptr(), H, T, T, D, (T + kBlockQ - 1) / kBlockQ, scale};
    launch_forward<scalar_t, acc_t>(p, B * H * p.q_tiles);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const c10::optional<at::Tensor>& key_padding_mask, double scale) {
  at::Tensor q = checked_operand(q_in, "q", nullptr, nullptr);
  at::Tensor k = checked_operand(k_in, "k", &q_in, "q");
  at::Tensor v = checked_operand(v_in, "v", &q_in, "q");
  at::Tensor grad_out = checked_operand(grad_out_in, "grad_out", &q_in, "q");
  at::Tensor out = checked_operand(out_in, "out", &q_in, "q");
  check_cuda_head_dim(q);
  check_attention_scale(scale);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const auto acc_type = at::toOpMathType(q.scalar_type());
  check_attention_lse(lse_in, q);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor lse = lse_in.contiguous();
  at::Tensor mask = checked_mask(key_padding_mask, q);
  auto grad_q = at::empty({B, H, T, D}, q.options());
  auto grad_k = at::empty({B, H, T, D}, q.options());
  auto grad_v = at::empty({B, H, T, D}, q.options());
  if (grad_q.numel() == 0) return {grad_q, grad_k, grad_v};
  auto delta = at::empty({B, H, T}, q.options().dtype(acc_type));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BackwardParams p{q.data_ptr(), k.data_ptr(), v.data_ptr(), grad_out.data_ptr(), out.data_ptr(),
                     strides_of(q), strides_of(k), strides_of(v), strides_of(grad_out), strides_of(out),
                     mask.defined() ? mask.data_ptr<bool>() : nullptr, lse.data_ptr(),
                     delta.data_ptr(), grad_q.data_ptr(), grad_k.data_ptr(), grad_v.data_ptr(),
                     H, T, D, (T + kBlockQ - 1) / kBlockQ, (T + kBlockK - 1) / kBlockK, scale};
    const int64_t rows = B * H * T;
    attention_delta_kernel<scalar_t, acc_t><<<(rows + kWarps - 1) / kWarps, kThreads, 0, stream>>>(p, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    with_dpl(D, [&](auto dpl) {
      constexpr int DPL = decltype(dpl)::value;
      const size_t smem_kv = grad_kv_smem_elems<DPL>() * sizeof(acc_t);
      auto kv_kernel = causal_attention_grad_kv_kernel<scalar_t, acc_t, DPL>;
      allow_dynamic_smem(kv_kernel, smem_kv);
      kv_kernel<<<B * H * p.k_tiles, kThreads, smem_kv, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const size_t smem_q = grad_q_smem_elems<DPL>() * sizeof(acc_t);
      auto q_kernel = causal_attention_grad_q_kernel<scalar_t, acc_t, DPL>;
      allow_dynamic_smem(q_kernel, smem_q);
      q_kernel<<<B * H * p.q_tiles, kThreads, smem_q, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_q, grad_k, grad_v};
}

at::Tensor causal_attention_decode_cuda(const at::Tensor& q_in, const at::Tensor& k_cache_in,
                                        const at::Tensor& v_cache_in,
                                        const at::Tensor& cache_lengths, double scale,
                                        const c10::optional<at::Tensor>& k_scale,
                                        const c10::optional<at::Tensor>& v_scale) {
  // The dispatcher lands here when any argument is on CUDA, the scales included.
  TORCH_CHECK(k_cache_in.scalar_type() != at::kChar && !k_scale.has_value() &&
                  !v_scale.has_value(),
              "k_cache: int8 KV caches (with k_scale, v_scale) have a CPU kernel only; got "
              "k_cache of dtype ", k_cache_in.scalar_type(), " on ", k_cache_in.device(),
              k_scale.has_value() ? ", k_scale on " : "",
              k_scale.has_value() ? k_scale->device().str() : std::string());
  at::Tensor q = checked_operand(q_in, "q", nullptr, nullptr);
  check_cuda_head_dim(q);
  check_attention_scale(scale);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  TORCH_CHECK(q.size(2) == 1, "q: expected one query per sequence (size 2 == 1), got sizes ",
              q.sizes());
  at::Tensor k_cache = checked_operand(k_cache_in, "k_cache", nullptr, nullptr);
  at::Tensor v_cache = checked_operand(v_cache_in, "v_cache", nullptr, nullptr);
  check_same_dtype(k_cache, q, "k_cache", "q");
  check_same_dtype(v_cache, q, "v_cache", "q");
  const int64_t Tmax = check_decode_shapes(q, k_cache, v_cache, cache_lengths);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor lengths = cache_lengths.contiguous();
  if (B > 0) {
    // One device-to-host copy: out-of-range lengths must raise, as on CPU.
    const at::Tensor bad = lengths.lt(0).logical_or(lengths.gt(Tmax));
    if (bad.any().item<bool>()) {
      const int64_t b = bad.to(at::kInt).argmax().item<int64_t>();
      TORCH_CHECK(false, "cache_lengths: entry ", b, " is ", lengths[b].item<int64_t>(),
                  ", expected a value in [0, ", Tmax, "] (the cache's size 2)");
    }
  }
  auto out = at::empty({B, H, 1, D}, q.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention_decode_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ForwardParams p{q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), strides_of(q),
                    strides_of(k_cache), strides_of(v_cache), nullptr, lengths.data_ptr<int64_t>(),
                    out.data_ptr(), nullptr, H, 1, Tmax, D, 1, scale};
    launch_forward<scalar_t, acc_t>(p, B * H);
  });
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ryzen_llm, CUDA, m) {
  m.impl("causal_attention_forward", &cuda::causal_attention_forward_cuda);
  m.impl("causal_attention_backward", &cuda::causal_attention_backward_cuda);
  m.impl("causal_attention_decode", &cuda::causal_attention_decode_cuda);
}

}  // namespace ryzen_llm
