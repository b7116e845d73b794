// Causal softmax attention, flash style: per (batch, head, query tile) the keys are walked in
// tiles with an online softmax, so the (T, T) score matrix is never stored; tiles above the
// diagonal are skipped and only out and the per-row log-sum-exp are written. Backward
// (flash-attention-2) recomputes P = exp(S - lse) tile by tile, one task per (batch, head) so no
// two threads write the same dQ/dK/dV rows. Traffic: q, k, v read once per query tile, out once.
// Tile products: fp32/fp64 in a register-blocked GEMM (auto-vectorised, multiversioned); bf16 on
// CPUs with AVX512-BF16 in a vdpbf16ps kernel on the bf16 operands (P and dS rounded to bf16,
// fp32 accumulation), else widened to fp32. Softmax and masking run in auto-vectorised loops with
// a polynomial exp; products stop at the diagonal in 4-row groups.
// Decode (one query per sequence) streams each cache row once. An int8 cache (one float32 scale
// per cached vector) is widened in registers with the scale folded into the row's score or
// probability: hs + 4 bytes read per cached key or value instead of 4 * hs.
#include "common.h"
#include "fast_math.h"
#include "op_checks.h"

#include <torch/library.h>

#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>
#include <type_traits>
#include <vector>

namespace ryzen_llm {
namespace {

constexpr int64_t kMinHeadDim = 8;
constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kForwardBlockQ = 64;   // query rows per forward task
constexpr int64_t kForwardBlockK = 256;  // keys per online-softmax step
constexpr int64_t kBackwardBlockQ = 64;
constexpr int64_t kBackwardBlockK = 64;
constexpr int64_t kPad = 16;  // score rows are padded to this many columns (one 512-bit vector)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C (M x N, ldc) = / += A (M x K; element (r, k) at A[r * ars + k * acs]) * B (K x N, ldb).
// A is read one scalar at a time (so a transposed A costs nothing), B row by row as vectors;
// R rows x NC columns of C stay in registers for the whole K loop.
template <typename T, int R, int NC>
RYZEN_LLM_INLINE void gemm_block(const T* A, int64_t ars, int64_t acs, const T* B,
                                        int64_t ldb, T* C, int64_t ldc, int64_t K,
                                        bool accumulate) {
  T c[R][NC];
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int j = 0; j < NC; ++j) c[r][j] = accumulate ? C[r * ldc + j] : T(0);
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    for (int r = 0; r < R; ++r) {
      const T a = A[r * ars + k * acs];
#pragma omp simd
      for (int j = 0; j < NC; ++j) c[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int j = 0; j < NC; ++j) C[r * ldc + j] = c[r][j];
  }
}

// The column tail (N % 16 columns): same loop with a run-time width.
template <typename T>
RYZEN_LLM_INLINE void gemm_tail(const T* A, int64_t ars, int64_t acs, const T* B,
                                       int64_t ldb, T* C, int64_t ldc, int64_t M, int64_t N,
                                       int64_t K, bool accumulate) {
  for (int64_t r = 0; r < M; ++r) {
    T c[kPad];
    for (int64_t j = 0; j < N; ++j) c[j] = accumulate ? C[r * ldc + j] : T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[r * ars + k * acs];
      const T* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
    for (int64_t j = 0; j < N; ++j) C[r * ldc + j] = c[j];
  }
}

template <typename T, int R>
RYZEN_LLM_INLINE void gemm_rows(const T* A, int64_t ars, int64_t acs, const T* B,
                                       int64_t ldb, T* C, int64_t ldc, int64_t N, int64_t K,
                                       bool accumulate) {
  int64_t j = 0;
  for (; j + 32 <= N; j += 32)
    gemm_block<T, R, 32>(A, ars, acs, B + j, ldb, C + j, ldc, K, accumulate);
  for (; j + 16 <= N; j += 16)
    gemm_block<T, R, 16>(A, ars, acs, B + j, ldb, C + j, ldc, K, accumulate);
  if (j < N) gemm_tail<T>(A, ars, acs, B + j, ldb, C + j, ldc, R, N - j, K, accumulate);
}

template <typename T>
RYZEN_LLM_INLINE void gemm(const T* A, int64_t ars, int64_t acs, const T* B, int64_t ldb,
                                  T* C, int64_t ldc, int64_t M, int64_t N, int64_t K,
                                  bool accumulate) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4)
    gemm_rows<T, 4>(A + r * ars, ars, acs, B, ldb, C + r * ldc, ldc, N, K, accumulate);
  for (; r < M; ++r)
    gemm_rows<T, 1>(A + r * ars, ars, acs, B, ldb, C + r * ldc, ldc, N, K, accumulate);
}

// The same product where each group of rows only needs part of it: bounds(r, rows) gives
// {n_end, k_begin, k_end} for C rows [r, r + rows). Columns past n_end are left unwritten (the
// callers mask them); this is how the causal triangle inside a diagonal tile is skipped.
template <typename T, int R, typename Bounds>
RYZEN_LLM_INLINE void gemm_bounded_rows(const T* A, int64_t ars, int64_t acs, const T* B,
                                               int64_t ldb, T* C, int64_t ldc, int64_t r,
                                               bool accumulate, const Bounds& bounds) {
  const auto bd = bounds(r, R);
  const int64_t n_end = bd[0], k0 = bd[1], k1 = std::max(bd[1], bd[2]);
  gemm_rows<T, R>(A + r * ars + k0 * acs, ars, acs, B + k0 * ldb, ldb, C + r * ldc, ldc, n_end,
                  k1 - k0, accumulate);
}

template <typename T, typename Bounds>
RYZEN_LLM_INLINE void gemm_bounded(const T* A, int64_t ars, int64_t acs, const T* B,
                                          int64_t ldb, T* C, int64_t ldc, int64_t M,
                                          bool accumulate, const Bounds& bounds) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4)
    gemm_bounded_rows<T, 4>(A, ars, acs, B, ldb, C, ldc, r, accumulate, bounds);
  for (; r < M; ++r) gemm_bounded_rows<T, 1>(A, ars, acs, B, ldb, C, ldc, r, accumulate, bounds);
}

// Rows [r, r + rows) of a tile whose row i is query q0 + i, over keys j0 + c: the columns (or
// reduction indices) a causal mask allows, rounded up to whole vectors and clamped to [0, lim].
RYZEN_LLM_INLINE int64_t causal_end(int64_t q0, int64_t j0, int64_t r, int64_t rows,
                                           int64_t round, int64_t lim) {
  const int64_t e = q0 + r + rows - j0;  // keys < q0 + r + rows are allowed for some row
  return std::max<int64_t>(0, std::min(lim, round_up(e, round)));
}

// Columns of a score row that must hold valid P / dS values: the row's allowed keys (limit) and
// the zeros that the row-group products still read (up to 3 past limit, one more when the
// reduction runs over key pairs), in whole vectors.
RYZEN_LLM_INLINE int64_t row_columns(int64_t limit, int64_t npad) {
  return std::min(npad, round_up(std::max<int64_t>(limit, 0) + 4, kPad));
}

// rows x cols of src (row stride ld) as acc_t: the tensor itself when it already is acc_t,
// otherwise widened into buf (row stride cols).
template <typename scalar_t, typename acc_t>
RYZEN_LLM_INLINE const acc_t* rows_as_acc(const scalar_t* src, int64_t ld, int64_t rows,
                                                 int64_t cols, acc_t* buf, int64_t* ld_out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    *ld_out = ld;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) buf[r * cols + c] = static_cast<acc_t>(src[r * ld + c]);
    }
    *ld_out = cols;
    return buf;
  }
}

// dst (cols x npad) = transpose of src rows (rows x cols, row stride ld), zero columns past rows.
template <typename scalar_t, typename acc_t>
RYZEN_LLM_INLINE void pack_transposed(const scalar_t* src, int64_t ld, int64_t rows,
                                             int64_t cols, int64_t npad, acc_t* dst) {
  // 16 source rows at a time: their lines stay in L1 while each destination row gets 16
  // contiguous values (one scalar store per element was the bottleneck).
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t rn = std::min<int64_t>(16, rows - r0);
    const scalar_t* s = src + r0 * ld;
    for (int64_t c = 0; c < cols; ++c) {
      acc_t* d = dst + c * npad + r0;
#pragma omp simd
      for (int64_t rr = 0; rr < rn; ++rr) d[rr] = static_cast<acc_t>(s[rr * ld + c]);
    }
  }
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = rows; r < npad; ++r) dst[c * npad + r] = acc_t(0);
}

// ---- bf16 scores with AVX512-BF16 dot products ---------------------------------------------
// For bf16 inputs the products along the head dim (S = Q K^T, dP = dO V^T) take bf16 operands as
// they are and accumulate in fp32 with vdpbf16ps (2 products per lane per instruction), where the
// CPU has it; elsewhere the fp32 path above runs. B is packed "VNNI" style: 32-bit word
// (kk, c) holds the pair (row c, dims 2kk and 2kk+1).
#if defined(RYZEN_LLM_AVX512)

// A's bf16 pair (r, kk) is the 4 bytes at byte offset r * ars + kk * acs: rows of a tensor
// (ars = 2 * row stride, acs = 4) or a grid of packed pairs.
template <int R, int NV, bool kAccumulate = false>
inline __attribute__((always_inline)) RYZEN_LLM_AVX512_BF16_TARGET void bf16_dot_block(
    const char* A, int64_t ars, int64_t acs, const uint32_t* B, int64_t ldb, float* C,
    int64_t ldc, int64_t K2) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = kAccumulate ? _mm512_loadu_ps(C + r * ldc + v * 16) : _mm512_setzero_ps();
  for (int64_t kk = 0; kk < K2; ++kk) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v)
      b[v] = (__m512bh)_mm512_loadu_si512(static_cast<const void*>(B + kk * ldb + v * 16));
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, A + r * ars + kk * acs, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + v * 16, acc[r][v]);
}

template <int R, bool kAccumulate = false>
inline __attribute__((always_inline)) RYZEN_LLM_AVX512_BF16_TARGET void bf16_dot_rows(
    const char* A, int64_t ars, int64_t acs, const uint32_t* B, int64_t ldb, float* C,
    int64_t ldc, int64_t N, int64_t K2) {
  int64_t j = 0;
  for (; j + 32 <= N; j += 32)
    bf16_dot_block<R, 2, kAccumulate>(A, ars, acs, B + j, ldb, C + j, ldc, K2);
  for (; j < N; j += 16)
    bf16_dot_block<R, 1, kAccumulate>(A, ars, acs, B + j, ldb, C + j, ldc, K2);
}

// Rows of a bf16 matrix with row stride ld (elements), as an A operand.
inline const char* bf16_rows(const c10::BFloat16* A, int64_t r, int64_t ld) {
  return reinterpret_cast<const char*>(A + r * ld);
}

// O (M x D, fp32) += P (M x N as bf16, row stride ldp) * V (pair-packed along keys, D words per
// key pair); row r only reads the key pairs up to its diagonal. D is a multiple of 16.
RYZEN_LLM_AVX512_BF16_TARGET void bf16_probs_values(const c10::BFloat16* P, int64_t ldp,
                                             const uint32_t* Vp, int64_t D, float* O, int64_t M,
                                             int64_t N, int64_t q0, int64_t j0) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4)
    bf16_dot_rows<4, true>(bf16_rows(P, r, ldp), 2 * ldp, 4, Vp, D, O + r * D, D, D,
                           (causal_end(q0, j0, r, 4, 1, N) + 1) / 2);
  for (; r < M; ++r)
    bf16_dot_rows<1, true>(bf16_rows(P, r, ldp), 2 * ldp, 4, Vp, D, O + r * D, D, D,
                           (causal_end(q0, j0, r, 1, 1, N) + 1) / 2);
}

// S (M x npad) = A (M x 2*K2, bf16 rows, row stride lda) * packed B, causally trimmed: row r
// (query q0 + r) needs columns (keys j0 + c) up to the diagonal only, rounded to 16.
RYZEN_LLM_AVX512_BF16_TARGET void bf16_scores(const c10::BFloat16* A, int64_t lda, const uint32_t* B,
                                       int64_t npad, float* S, int64_t M, int64_t K2, int64_t q0,
                                       int64_t j0) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4)
    bf16_dot_rows<4>(bf16_rows(A, r, lda), 2 * lda, 4, B, npad, S + r * npad, npad,
                     causal_end(q0, j0, r, 4, kPad, npad), K2);
  for (; r < M; ++r)
    bf16_dot_rows<1>(bf16_rows(A, r, lda), 2 * lda, 4, B, npad, S + r * npad, npad,
                     causal_end(q0, j0, r, 1, kPad, npad), K2);
}
// C (N key rows x D, fp32) += X^T Y for dK / dV: X (M query rows x N keys) given as query-row
// pairs, word (qq, c) = (X[2qq][c], X[2qq+1][c]) at Xp[qq * ldx + c]; Bp (query-row pairs x D
// words). Key row c only sees query rows at or below the diagonal, so its reduction starts at
// the pair holding query row j0 + c.
RYZEN_LLM_AVX512_BF16_TARGET void bf16_key_grads(const uint32_t* Xp, int64_t ldx,
                                          const uint32_t* Bp, int64_t D, float* C, int64_t N,
                                          int64_t M, int64_t q0, int64_t j0) {
  const char* X = reinterpret_cast<const char*>(Xp);
  const int64_t pairs = (M + 1) / 2;
  auto kk0_of = [&](int64_t c) {
    return std::max<int64_t>(0, std::min<int64_t>(M, j0 + c - q0)) / 2;
  };
  int64_t c = 0;
  for (; c + 4 <= N; c += 4) {
    const int64_t kk0 = kk0_of(c);
    bf16_dot_rows<4, true>(X + 4 * (kk0 * ldx + c), 4, 4 * ldx, Bp + kk0 * D, D, C + c * D, D,
                           D, pairs - kk0);
  }
  for (; c < N; ++c) {
    const int64_t kk0 = kk0_of(c);
    bf16_dot_rows<1, true>(X + 4 * (kk0 * ldx + c), 4, 4 * ldx, Bp + kk0 * D, D, C + c * D, D,
                           D, pairs - kk0);
  }
}
#endif

// Query-row pairs of an M x N fp32 tile (row stride lds) as bf16: word (qq, c) of dst (row
// stride ldw) = (src[2qq][c], src[2qq+1][c]), zero past each row's causal limit (key j0 + c
// later than query q0 + r) and for the missing row when M is odd.
inline void interleave_rows_bf16(const float* src, int64_t lds, int64_t M, int64_t N, int64_t q0,
                                 int64_t j0, uint32_t* dst, int64_t ldw) {
  for (int64_t qq = 0; qq < (M + 1) / 2; ++qq) {
    const int64_t r = 2 * qq;
    const float* s0 = src + r * lds;
    const float* s1 = src + (r + 1) * lds;
    const int64_t lim0 = std::min(N, q0 + r + 1 - j0);
    const int64_t lim1 = r + 1 < M ? std::min(N, q0 + r + 2 - j0) : 0;
    uint32_t* d = dst + qq * ldw;
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) {
      const float v0 = c < lim0 ? s0[c] : 0.0f;
      const float v1 = c < lim1 ? s1[c] : 0.0f;
      const uint16_t b0 = to_storage<c10::BFloat16>(v0).x;
      const uint16_t b1 = to_storage<c10::BFloat16>(v1).x;
      d[c] = uint32_t(b0) | (uint32_t(b1) << 16);
    }
  }
}

// rows x D bf16 (row stride ld) into the pair-packed B layout (D/2 x npad words), zero columns
// past rows.
inline void pack_pairs_transposed(const c10::BFloat16* src, int64_t ld, int64_t rows, int64_t D,
                                  int64_t npad, uint32_t* dst) {
  const int64_t K2 = D / 2;
  for (int64_t c0 = 0; c0 < rows; c0 += 16) {  // blocked as in pack_transposed
    const int64_t cn = std::min<int64_t>(16, rows - c0);
    const c10::BFloat16* s = src + c0 * ld;
    for (int64_t kk = 0; kk < K2; ++kk) {
      uint32_t* d = dst + kk * npad + c0;
      for (int64_t cc = 0; cc < cn; ++cc) std::memcpy(d + cc, s + cc * ld + 2 * kk, 4);
    }
  }
  for (int64_t kk = 0; kk < K2; ++kk)
    for (int64_t c = rows; c < npad; ++c) dst[kk * npad + c] = 0;
}

// rows x D bf16 (row stride ld) into pairs along the rows: word (cc, d) = (row 2cc, row 2cc+1)
// at column d; an odd last row is paired with zero.
inline void pack_row_pairs(const c10::BFloat16* src, int64_t ld, int64_t rows, int64_t D,
                           uint32_t* dst) {
  for (int64_t cc = 0; cc < (rows + 1) / 2; ++cc) {
    const uint16_t* r0 = reinterpret_cast<const uint16_t*>(src + 2 * cc * ld);
    const uint16_t* r1 = reinterpret_cast<const uint16_t*>(src + (2 * cc + 1) * ld);
    uint32_t* d = dst + cc * D;
    if (2 * cc + 1 < rows) {
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) d[j] = uint32_t(r0[j]) | (uint32_t(r1[j]) << 16);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) d[j] = uint32_t(r0[j]);
    }
  }
}

// Element (b, h, t, d) of a (B, nh, T, hs) tensor with unit stride in d.
struct Strides4 {
  int64_t b, h, t;
  explicit Strides4(const at::Tensor& x) : b(x.stride(0)), h(x.stride(1)), t(x.stride(2)) {}
  int64_t at(int64_t bi, int64_t hi) const { return bi * b + hi * h; }
};

template <typename scalar_t, typename acc_t>
struct AttentionArgs {
  const scalar_t *q, *k, *v;
  Strides4 sq, sk, sv;
  const acc_t* key_bias;  // (B, T): 0 for a real key, -inf for padding; nullptr without a mask
  int64_t B, H, T, D;
  acc_t scale;
};

template <typename acc_t>
struct ForwardScratch {
  std::vector<acc_t> q, kt, s, v, o, m, l;
  std::vector<uint32_t> kt_pairs, v_pairs;
  std::vector<c10::BFloat16> p_bf16;
  bool bf16_dot;  // bf16 inputs, even head dim and a CPU with AVX512-BF16
  bool bf16_pv;   // ... and a head dim that is a multiple of 16: P V in bf16 too
  ForwardScratch(int64_t D, bool bf16_dot_) : bf16_dot(bf16_dot_), bf16_pv(bf16_dot_ && D % 16 == 0) {
    if (bf16_dot) kt_pairs.resize(D / 2 * kForwardBlockK);
    if (bf16_pv) {
      v_pairs.resize(kForwardBlockK / 2 * D);
      p_bf16.resize(kForwardBlockQ * kForwardBlockK);
    }
    q.resize(kForwardBlockQ * D);
    kt.resize(D * kForwardBlockK);
    s.resize(kForwardBlockQ * kForwardBlockK);
    v.resize(kForwardBlockK * D);
    o.resize(kForwardBlockQ * D);
    m.resize(kForwardBlockQ);
    l.resize(kForwardBlockQ);
  }
};

// One query tile of one (batch, head): out rows [i0, i1) and their log-sum-exp.
template <typename scalar_t, typename acc_t>
RYZEN_LLM_TARGET_CLONES void causal_attention_forward_tile(
    const AttentionArgs<scalar_t, acc_t>& a, int64_t task, scalar_t* out, Strides4 so,
    acc_t* lse, ForwardScratch<acc_t>& w) {
  const int64_t D = a.D, T = a.T;
  const int64_t n_qt = (T + kForwardBlockQ - 1) / kForwardBlockQ;
  const int64_t bh = task / n_qt, qt = task % n_qt;
  const int64_t bi = bh / a.H, hi = bh % a.H;
  const int64_t i0 = qt * kForwardBlockQ, i1 = std::min(T, i0 + kForwardBlockQ), M = i1 - i0;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t* kbias = a.key_bias ? a.key_bias + bi * T : nullptr;

  int64_t ldq = 0;  // Q as acc_t only for the path without bf16 score products
  const acc_t* Q = w.bf16_dot ? nullptr
                              : rows_as_acc(a.q + a.sq.at(bi, hi) + i0 * a.sq.t, a.sq.t, M, D,
                                            w.q.data(), &ldq);
  acc_t* O = w.o.data();
  acc_t* m = w.m.data();
  acc_t* l = w.l.data();
  for (int64_t r = 0; r < M; ++r) {
    m[r] = neg_inf;
    l[r] = 0;
  }
  std::fill(O, O + M * D, acc_t(0));

  for (int64_t j0 = 0; j0 < i1; j0 += kForwardBlockK) {
    const int64_t j1 = std::min(i1, j0 + kForwardBlockK), N = j1 - j0, npad = round_up(N, kPad);
    const scalar_t* k = a.k + a.sk.at(bi, hi) + j0 * a.sk.t;
    acc_t* S = w.s.data();
#ifdef RYZEN_LLM_AVX512
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (w.bf16_dot) {
        pack_pairs_transposed(k, a.sk.t, N, D, npad, w.kt_pairs.data());
        bf16_scores(a.q + a.sq.at(bi, hi) + i0 * a.sq.t, a.sq.t, w.kt_pairs.data(), npad, S, M,
                    D / 2, i0, j0);
      }
    }
#endif
    if (!w.bf16_dot) {
      pack_transposed(k, a.sk.t, N, D, npad, w.kt.data());
      gemm_bounded<acc_t>(Q, ldq, 1, w.kt.data(), npad, S, npad, M, false,  // S = Q K^T
                          [&](int64_t r, int64_t rows) {
                            return std::array<int64_t, 3>{causal_end(i0, j0, r, rows, kPad, npad), 0, D};
                          });
    }
    for (int64_t r = 0; r < M; ++r) {
      acc_t* s = S + r * npad;
      const int64_t limit = std::min(N, i0 + r + 1 - j0);  // keys j0 .. i0+r are allowed
      const int64_t cend = row_columns(limit, npad);
      const acc_t sc = a.scale;
      acc_t mx = neg_inf;
      if (kbias) {
        const acc_t* kb = kbias + j0;
#pragma omp simd reduction(max : mx)
        for (int64_t c = 0; c < cend; ++c) {
          acc_t x = c < limit ? s[c] * sc + kb[c] : neg_inf;
          s[c] = x;
          mx = std::max(mx, x);
        }
      } else {
#pragma omp simd reduction(max : mx)
        for (int64_t c = 0; c < cend; ++c) {
          acc_t x = c < limit ? s[c] * sc : neg_inf;
          s[c] = x;
          mx = std::max(mx, x);
        }
      }
      const acc_t m_new = std::max(m[r], mx);
      if (m_new == neg_inf) {  // no allowed key yet: this row's P is all zero
        std::fill(s, s + cend, acc_t(0));
        if (w.bf16_pv) {
          c10::BFloat16* pb = w.p_bf16.data() + r * npad;
          std::fill(pb, pb + cend, c10::BFloat16(0.0f));
        }
        continue;
      }
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < cend; ++c) {
        acc_t p = softmax_exp(s[c] - m_new);
        s[c] = p;
        sum += p;
      }
      if (w.bf16_pv) {  // P for the bf16 product (the normaliser keeps the unrounded sum)
        c10::BFloat16* pb = w.p_bf16.data() + r * npad;
#pragma omp simd
        for (int64_t c = 0; c < cend; ++c) pb[c] = to_storage<c10::BFloat16>(s[c]);
      }
      const acc_t alpha = softmax_exp(m[r] - m_new);  // 0 when m[r] was -inf
      if (alpha != acc_t(1)) {
        acc_t* o = O + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
      }
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
    }
#ifdef RYZEN_LLM_AVX512
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (w.bf16_pv) {
        pack_row_pairs(a.v + a.sv.at(bi, hi) + j0 * a.sv.t, a.sv.t, N, D, w.v_pairs.data());
        bf16_probs_values(w.p_bf16.data(), npad, w.v_pairs.data(), D, O, M, N, i0, j0);
        continue;
      }
    }
#endif
    int64_t ldv;
    const acc_t* V = rows_as_acc(a.v + a.sv.at(bi, hi) + j0 * a.sv.t, a.sv.t, N, D, w.v.data(), &ldv);
    gemm_bounded<acc_t>(S, npad, 1, V, ldv, O, D, M, true,  // O += P V
                        [&](int64_t r, int64_t rows) {
                          return std::array<int64_t, 3>{D, 0, causal_end(i0, j0, r, rows, 1, N)};
                        });
  }

  scalar_t* o_out = out + so.at(bi, hi) + i0 * so.t;
  acc_t* lse_out = lse + bh * T + i0;
  for (int64_t r = 0; r < M; ++r) {
    const acc_t inv = l[r] > 0 ? acc_t(1) / l[r] : acc_t(0);  // rows with no key give zeros
    const acc_t* o = O + r * D;
    scalar_t* dst = o_out + r * so.t;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = to_storage<scalar_t>(o[d] * inv);
    lse_out[r] = l[r] > 0 ? m[r] + std::log(l[r]) : neg_inf;
  }
}

template <typename acc_t>
struct BackwardScratch {
  std::vector<acc_t> q, go, k, v, kt, vt, s, dp, dq, dk, dv, delta;
  std::vector<uint32_t> kt_pairs, vt_pairs, q_pairs, go_pairs, k_pairs;
  std::vector<uint32_t> interleaved;
  std::vector<c10::BFloat16> ds_bf16;
  bool bf16_dot;  // bf16 score products (S, dP)
  bool bf16_all;  // ... and bf16 dV, dK, dQ products (head dim a multiple of 16)
  BackwardScratch(int64_t T, int64_t D, bool widen, bool bf16_dot_)
      : bf16_dot(bf16_dot_), bf16_all(bf16_dot_ && D % 16 == 0) {
    if (bf16_dot) {
      kt_pairs.resize(D / 2 * kBackwardBlockK);
      vt_pairs.resize(D / 2 * kBackwardBlockK);
    }
    if (bf16_all) {
      q_pairs.resize((T + 1) / 2 * D);
      go_pairs.resize((T + 1) / 2 * D);
      k_pairs.resize((T + 1) / 2 * D);
      interleaved.resize((kBackwardBlockQ + 1) / 2 * kBackwardBlockK);
      ds_bf16.resize(kBackwardBlockQ * kBackwardBlockK);
    }
    if (widen && !bf16_all) {  // the acc_t copies only the paths without bf16 products read
      q.resize(T * D);
      go.resize(T * D);
      k.resize(T * D);
    }
    if (widen && !bf16_dot) v.resize(T * D);
    kt.resize(D * kBackwardBlockK);
    vt.resize(D * kBackwardBlockK);
    s.resize(kBackwardBlockQ * kBackwardBlockK);
    dp.resize(kBackwardBlockQ * kBackwardBlockK);
    dq.resize(T * D);
    dk.resize(kBackwardBlockK * D);
    dv.resize(kBackwardBlockK * D);
    delta.resize(T);
  }
};

// All of one (batch, head): dQ, dK, dV (flash-attention-2 backward, key tiles outer).
template <typename scalar_t, typename acc_t>
RYZEN_LLM_TARGET_CLONES void causal_attention_backward_head(
    const AttentionArgs<scalar_t, acc_t>& a, int64_t bh, const scalar_t* grad_out, Strides4 sgo,
    const scalar_t* out, Strides4 so, const acc_t* lse, scalar_t* grad_q, scalar_t* grad_k,
    scalar_t* grad_v, Strides4 sg, BackwardScratch<acc_t>& w) {
  const int64_t D = a.D, T = a.T;
  const int64_t bi = bh / a.H, hi = bh % a.H;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t* kbias = a.key_bias ? a.key_bias + bi * T : nullptr;
  const acc_t sc = a.scale;
  const acc_t* L = lse + bh * T;

  // Q, dO, K, V as acc_t rows, each only where a product without bf16 operands reads it (the
  // bf16 products read the tensors themselves, or their pair-packed copies).
  int64_t ldq = 0, ldgo = 0, ldk = 0, ldv = 0;
  const bool widen_qk = !w.bf16_all, widen_v = !w.bf16_dot;
  const acc_t* Q =
      widen_qk ? rows_as_acc(a.q + a.sq.at(bi, hi), a.sq.t, T, D, w.q.data(), &ldq) : nullptr;
  const acc_t* GO = widen_qk ? rows_as_acc(grad_out + sgo.at(bi, hi), sgo.t, T, D, w.go.data(),
                                           &ldgo)
                             : nullptr;
  const acc_t* K =
      widen_qk ? rows_as_acc(a.k + a.sk.at(bi, hi), a.sk.t, T, D, w.k.data(), &ldk) : nullptr;
  const acc_t* V =
      widen_v ? rows_as_acc(a.v + a.sv.at(bi, hi), a.sv.t, T, D, w.v.data(), &ldv) : nullptr;

  // delta_i = rowsum(dO_i * O_i), from the stored (rounded) output as autograd would see it.
  const scalar_t* O = out + so.at(bi, hi);
  const scalar_t* G = grad_out + sgo.at(bi, hi);
  acc_t* delta = w.delta.data();
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* g = G + t * sgo.t;
    const scalar_t* o = O + t * so.t;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < D; ++d) sum += static_cast<acc_t>(g[d]) * static_cast<acc_t>(o[d]);
    delta[t] = sum;
  }
  acc_t* dQ = w.dq.data();
  std::fill(dQ, dQ + T * D, acc_t(0));
#ifdef RYZEN_LLM_AVX512
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (w.bf16_all) {  // pairs along T; tiles start at even rows, so one packing serves all
      pack_row_pairs(a.q + a.sq.at(bi, hi), a.sq.t, T, D, w.q_pairs.data());
      pack_row_pairs(grad_out + sgo.at(bi, hi), sgo.t, T, D, w.go_pairs.data());
      pack_row_pairs(a.k + a.sk.at(bi, hi), a.sk.t, T, D, w.k_pairs.data());
    }
  }
#endif

  for (int64_t j0 = 0; j0 < T; j0 += kBackwardBlockK) {
    const int64_t j1 = std::min(T, j0 + kBackwardBlockK), N = j1 - j0, npad = round_up(N, kPad);
    if (w.bf16_dot) {
#ifdef RYZEN_LLM_AVX512
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        pack_pairs_transposed(a.k + a.sk.at(bi, hi) + j0 * a.sk.t, a.sk.t, N, D, npad,
                              w.kt_pairs.data());
        pack_pairs_transposed(a.v + a.sv.at(bi, hi) + j0 * a.sv.t, a.sv.t, N, D, npad,
                              w.vt_pairs.data());
      }
#endif
    } else {
      pack_transposed(K + j0 * ldk, ldk, N, D, npad, w.kt.data());
      pack_transposed(V + j0 * ldv, ldv, N, D, npad, w.vt.data());
    }
    acc_t* dK = w.dk.data();
    acc_t* dV = w.dv.data();
    std::fill(dK, dK + N * D, acc_t(0));
    std::fill(dV, dV + N * D, acc_t(0));
    for (int64_t i0 = j0; i0 < T; i0 += kBackwardBlockQ) {  // query rows that see these keys
      const int64_t i1 = std::min(T, i0 + kBackwardBlockQ), M = i1 - i0;
      acc_t* P = w.s.data();
      acc_t* dP = w.dp.data();
      // Row groups of the query tile (P, dP, dQ): keys up to the diagonal only.
      const acc_t* GOi = GO ? GO + i0 * ldgo : nullptr;
      auto by_query = [&](int64_t r, int64_t rows) {
        return std::array<int64_t, 3>{causal_end(i0, j0, r, rows, kPad, npad), 0, D};
      };
#ifdef RYZEN_LLM_AVX512
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (w.bf16_dot)
          bf16_scores(a.q + a.sq.at(bi, hi) + i0 * a.sq.t, a.sq.t, w.kt_pairs.data(), npad, P, M,
                      D / 2, i0, j0);
      }
#endif
      if (!w.bf16_dot)
        gemm_bounded<acc_t>(Q + i0 * ldq, ldq, 1, w.kt.data(), npad, P, npad, M, false, by_query);
      for (int64_t r = 0; r < M; ++r) {
        acc_t* p = P + r * npad;
        const int64_t limit = std::min(N, i0 + r + 1 - j0);
        const int64_t cend = row_columns(limit, npad);
        const acc_t lr = L[i0 + r];
        if (lr == neg_inf) {  // fully masked row: P = 0
          std::fill(p, p + cend, acc_t(0));
          continue;
        }
        if (kbias) {
          const acc_t* kb = kbias + j0;
#pragma omp simd
          for (int64_t c = 0; c < cend; ++c)
            p[c] = c < limit ? softmax_exp(p[c] * sc + kb[c] - lr) : acc_t(0);
        } else {
#pragma omp simd
          for (int64_t c = 0; c < cend; ++c)
            p[c] = c < limit ? softmax_exp(p[c] * sc - lr) : acc_t(0);
        }
      }
      // Row groups of the key tile (dK, dV): only query rows at or below the diagonal.
      auto by_key = [&](int64_t c, int64_t) {
        return std::array<int64_t, 3>{D, std::max<int64_t>(0, std::min(M, j0 + c - i0)), M};
      };
      auto by_query_k = [&](int64_t r, int64_t rows) {
        return std::array<int64_t, 3>{D, 0, causal_end(i0, j0, r, rows, 1, N)};
      };
#ifdef RYZEN_LLM_AVX512
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (w.bf16_all) {  // dV += P^T dO
          interleave_rows_bf16(P, npad, M, N, i0, j0, w.interleaved.data(), npad);
          bf16_key_grads(w.interleaved.data(), npad, w.go_pairs.data() + i0 / 2 * D, D, dV, N,
                         M, i0, j0);
        }
      }
#endif
      if (!w.bf16_all)
        gemm_bounded<acc_t>(P, 1, npad, GOi, ldgo, dV, D, N, true, by_key);  // dV += P^T dO
#ifdef RYZEN_LLM_AVX512
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (w.bf16_dot)
          bf16_scores(grad_out + sgo.at(bi, hi) + i0 * sgo.t, sgo.t, w.vt_pairs.data(), npad, dP,
                      M, D / 2, i0, j0);
      }
#endif
      if (!w.bf16_dot)  // dP = dO V^T
        gemm_bounded<acc_t>(GOi, ldgo, 1, w.vt.data(), npad, dP, npad, M, false, by_query);
      for (int64_t r = 0; r < M; ++r) {
        acc_t* dp = dP + r * npad;
        const acc_t* p = P + r * npad;
        const acc_t dr = delta[i0 + r];
        const int64_t limit = std::min(N, i0 + r + 1 - j0);  // dP past it was never written
        const int64_t cend = row_columns(limit, npad);
#pragma omp simd
        for (int64_t c = 0; c < cend; ++c) dp[c] = c < limit ? p[c] * (dp[c] - dr) : acc_t(0);
      }
#ifdef RYZEN_LLM_AVX512
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (w.bf16_all) {
          interleave_rows_bf16(dP, npad, M, N, i0, j0, w.interleaved.data(), npad);  // dS^T Q
          bf16_key_grads(w.interleaved.data(), npad, w.q_pairs.data() + i0 / 2 * D, D, dK, N,
                         M, i0, j0);
          c10::BFloat16* dsb = w.ds_bf16.data();  // dQ += dS K
          for (int64_t r = 0; r < M; ++r) {
            const int64_t cend = row_columns(std::min(N, i0 + r + 1 - j0), npad);
            const acc_t* dp = dP + r * npad;
            c10::BFloat16* d = dsb + r * npad;
#pragma omp simd
            for (int64_t c = 0; c < cend; ++c) d[c] = to_storage<c10::BFloat16>(dp[c]);
          }
          bf16_probs_values(dsb, npad, w.k_pairs.data() + j0 / 2 * D, D, dQ + i0 * D, M, N, i0,
                            j0);
        }
      }
#endif
      if (!w.bf16_all) {
        gemm_bounded<acc_t>(dP, 1, npad, Q + i0 * ldq, ldq, dK, D, N, true, by_key);  // dS^T Q
        gemm_bounded<acc_t>(dP, npad, 1, K + j0 * ldk, ldk, dQ + i0 * D, D, M, true,  // dS K
                            by_query_k);
      }
    }
    scalar_t* gk = grad_k + sg.at(bi, hi) + j0 * sg.t;
    scalar_t* gv = grad_v + sg.at(bi, hi) + j0 * sg.t;
    for (int64_t r = 0; r < N; ++r) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        gk[r * sg.t + d] = to_storage<scalar_t>(dK[r * D + d] * sc);
        gv[r * sg.t + d] = to_storage<scalar_t>(dV[r * D + d]);
      }
    }
  }
  scalar_t* gq = grad_q + sg.at(bi, hi);
  for (int64_t t = 0; t < T; ++t) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) gq[t * sg.t + d] = to_storage<scalar_t>(dQ[t * D + d] * sc);
  }
}

// One new query per (batch, head) against the first cache_lengths[b] cache rows (the portable
// path; decode_head_avx512 below runs instead where it applies), streamed key
// row by key row (scores, softmax, then the probability-weighted value rows). An int8 cache
// (cache_t int8_t) is dequantized on the fly: each code row is widened in registers and its
// float32 scale multiplies the row's score (keys) or probability (values), so no dequantized
// copy of the cache is ever written. k_scale, v_scale: this (batch, head)'s Tmax scales, null
// for float caches.
template <typename scalar_t, typename cache_t, typename acc_t>
RYZEN_LLM_TARGET_CLONES void causal_attention_decode_head(
    const scalar_t* q, Strides4 sq, const cache_t* kc, Strides4 sk, const cache_t* vc,
    Strides4 sv, const float* k_scale, const float* v_scale, int64_t len, int64_t bi, int64_t hi,
    int64_t D, acc_t scale, scalar_t* out, Strides4 so, acc_t* s, acc_t* qa, acc_t* o) {
  constexpr bool kQuantized = std::is_same_v<cache_t, int8_t>;
  const scalar_t* qr = q + sq.at(bi, hi);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) qa[d] = static_cast<acc_t>(qr[d]) * scale;
  const cache_t* k = kc + sk.at(bi, hi);
  const cache_t* v = vc + sv.at(bi, hi);
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < len; ++j) {
    const cache_t* kr = k + j * sk.t;
    acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += qa[d] * static_cast<acc_t>(kr[d]);
    if constexpr (kQuantized) dot *= static_cast<acc_t>(k_scale[j]);
    s[j] = dot;
    mx = std::max(mx, dot);
  }
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) {
    acc_t p = softmax_exp(s[j] - mx);
    s[j] = p;
    sum += p;
  }
  std::fill(o, o + D, acc_t(0));
  for (int64_t j = 0; j < len; ++j) {
    const cache_t* vr = v + j * sv.t;
    acc_t p = s[j];
    if constexpr (kQuantized) p *= static_cast<acc_t>(v_scale[j]);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] += p * static_cast<acc_t>(vr[d]);
  }
  const acc_t inv = len > 0 ? acc_t(1) / sum : acc_t(0);
  scalar_t* dst = out + so.at(bi, hi);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) dst[d] = to_storage<scalar_t>(o[d] * inv);
}

#if defined(RYZEN_LLM_AVX512)
// The decode head on AVX-512 for float32 queries with float32 or int8 caches and a head dim that
// is a multiple of 16 (NV vectors): q stays in registers, 16 keys' dot products are summed
// across lanes at once (a transposed tree: 45 shuffles and adds instead of 16 horizontal sums),
// and the output row accumulates in registers instead of memory. The same per-row arithmetic
// whatever the batch, so a row's result does not depend on the rows beside it.
RYZEN_LLM_INLINE RYZEN_LLM_AVX512_TARGET __m512 load16(const float* p) {
  return _mm512_loadu_ps(p);
}

RYZEN_LLM_INLINE RYZEN_LLM_AVX512_TARGET __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Lane j of the result is the sum of the lanes of v[j] (v[n..15] count as zeros).
RYZEN_LLM_INLINE RYZEN_LLM_AVX512_TARGET __m512 sum_lanes16(const __m512* v) {
  __m512 w[8], z[4], s[2];
  for (int p = 0; p < 8; ++p)  // lanes i + i+8: keys 2p, 2p+1 in the low, high halves
    w[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int q = 0; q < 4; ++q)  // lanes i + i+4: 128-bit block k holds key 4q+k
    z[q] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * q], w[2 * q + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w[2 * q], w[2 * q + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int h = 0; h < 2; ++h)  // lanes i + i+2 within each block
    s[h] = _mm512_add_ps(_mm512_shuffle_ps(z[2 * h], z[2 * h + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(z[2 * h], z[2 * h + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(s[0], s[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(s[0], s[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // lane 4k + m holds key 4m + k: back to key order
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}

// Into L2: the row of D values at p (one line per 64 bytes).
template <int NV, typename cache_t>
RYZEN_LLM_INLINE void prefetch_row(const cache_t* p) {
  constexpr int kBytes = 16 * NV * static_cast<int>(sizeof(cache_t));
  for (int b = 0; b < kBytes; b += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T1);
}

// next_k, next_v, next_len: the next (batch, head)'s rows, prefetched key row j while key row j
// is read here and value row j with value row j. The heads' rows are short runs (~10 KB) at
// scattered places of a cache much larger than the CPU's caches: without it the hardware
// prefetcher ramps up again on every run.
template <int NV, typename cache_t>
RYZEN_LLM_AVX512_TARGET void decode_head_avx512(const float* qr, const cache_t* k, int64_t skt,
                                                const cache_t* v, int64_t svt,
                                                const float* k_scale, const float* v_scale,
                                                int64_t len, float scale, float* dst, float* s,
                                                const cache_t* next_k, const cache_t* next_v,
                                                int64_t next_len) {
  constexpr bool kQuantized = std::is_same_v<cache_t, int8_t>;
  __m512 qv[NV];
  for (int c = 0; c < NV; ++c) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(qr + 16 * c), _mm512_set1_ps(scale));
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j0 = 0; j0 < len; j0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, len - j0));
    __m512 dots[16];
    for (int jj = 0; jj < 16; ++jj) {
      if (jj >= n) {
        dots[jj] = _mm512_setzero_ps();
        continue;
      }
      const cache_t* kr = k + (j0 + jj) * skt;
      if (j0 + jj < next_len) prefetch_row<NV>(next_k + (j0 + jj) * skt);
      __m512 acc = _mm512_mul_ps(qv[0], load16(kr));
      for (int c = 1; c < NV; ++c) acc = _mm512_fmadd_ps(qv[c], load16(kr + 16 * c), acc);
      dots[jj] = acc;
    }
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
    __m512 sc = sum_lanes16(dots);
    if constexpr (kQuantized) sc = _mm512_mul_ps(sc, _mm512_maskz_loadu_ps(m, k_scale + j0));
    _mm512_mask_storeu_ps(s + j0, m, sc);
    mx = _mm512_mask_max_ps(mx, m, mx, sc);
  }
  const float row_max = _mm512_reduce_max_ps(mx);
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) {
    const float p = softmax_exp(s[j] - row_max);
    s[j] = p;
    sum += p;
  }
  __m512 o[NV];
  for (int c = 0; c < NV; ++c) o[c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; ++j) {
    const cache_t* vr = v + j * svt;
    if (j < next_len) prefetch_row<NV>(next_v + j * svt);
    const __m512 p = _mm512_set1_ps(kQuantized ? s[j] * v_scale[j] : s[j]);
    for (int c = 0; c < NV; ++c) o[c] = _mm512_fmadd_ps(p, load16(vr + 16 * c), o[c]);
  }
  const __m512 inv = _mm512_set1_ps(len > 0 ? 1.0f / sum : 0.0f);
  for (int c = 0; c < NV; ++c) _mm512_storeu_ps(dst + 16 * c, _mm512_mul_ps(o[c], inv));
}

// The AVX-512 head for this head dim, or null where the portable one runs.
template <typename cache_t>
auto decode_head_avx512_for(int64_t D) -> decltype(&decode_head_avx512<2, cache_t>) {
  if (!avx512_available() || D % 16 != 0) return nullptr;
  switch (D / 16) {
    case 2: return &decode_head_avx512<2, cache_t>;
    case 3: return &decode_head_avx512<3, cache_t>;
    case 4: return &decode_head_avx512<4, cache_t>;
    case 5: return &decode_head_avx512<5, cache_t>;
    case 6: return &decode_head_avx512<6, cache_t>;
    case 7: return &decode_head_avx512<7, cache_t>;
    case 8: return &decode_head_avx512<8, cache_t>;
    default: return nullptr;
  }
}
#endif

// Every (batch, head) of a decode step; scales are (B, H, Tmax) contiguous, null for float caches.
template <typename scalar_t, typename cache_t, typename acc_t>
void causal_attention_decode_all(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const float* k_scale,
                                 const float* v_scale, const int64_t* len, double scale,
                                 at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Tmax = k_cache.size(2);
  const Strides4 sq(q), sk(k_cache), sv(v_cache), so(out);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const cache_t* kp = k_cache.data_ptr<cache_t>();
  const cache_t* vp = v_cache.data_ptr<cache_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, Tmax * D));
#if defined(RYZEN_LLM_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    // Query rows must be contiguous along the head dim (they are: checked_operand).
    if (auto head = decode_head_avx512_for<cache_t>(D)) {
      at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> s(std::max<int64_t>(Tmax, 1) + 16);
        for (int64_t bh = begin; bh < end; ++bh) {
          const int64_t bi = bh / H, hi = bh % H;
          const int64_t nb = (bh + 1) / H, nh = (bh + 1) % H;  // the next head of this task
          const int64_t next_len = bh + 1 < end ? len[nb] : 0;
          head(qp + sq.at(bi, hi), kp + sk.at(bi, hi), sk.t, vp + sv.at(bi, hi), sv.t,
               k_scale != nullptr ? k_scale + bh * Tmax : nullptr,
               v_scale != nullptr ? v_scale + bh * Tmax : nullptr, len[bi],
               static_cast<float>(scale), op + so.at(bi, hi), s.data(),
               kp + sk.at(next_len > 0 ? nb : bi, next_len > 0 ? nh : hi),
               vp + sv.at(next_len > 0 ? nb : bi, next_len > 0 ? nh : hi), next_len);
        }
      });
      return;
    }
  }
#endif
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(std::max<int64_t>(Tmax, 1)), qa(D), o(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / H, hi = bh % H;
      causal_attention_decode_head<scalar_t, cache_t, acc_t>(
          qp, sq, kp, sk, vp, sv, k_scale != nullptr ? k_scale + bh * Tmax : nullptr,
          v_scale != nullptr ? v_scale + bh * Tmax : nullptr, len[bi], bi, hi, D,
          static_cast<acc_t>(scale), op, so, s.data(), qa.data(), o.data());
    }
  });
}

// The AVX512-BF16 score products apply to bf16 inputs with an even head dim; RYZEN_LLM_BF16_DOT=0
// in the environment turns them off (for comparing against the widened fp32 path).
template <typename scalar_t>
bool bf16_dot_path(int64_t D) {
  if constexpr (!std::is_same_v<scalar_t, c10::BFloat16>) {
    return false;
  } else {
    static const bool allowed = [] {
      const char* env = std::getenv("RYZEN_LLM_BF16_DOT");
      return env == nullptr || std::string(env) != "0";
    }();
    return allowed && D % 2 == 0 && avx512_bf16_available();
  }
}

// Tasks handed out one at a time from a shared counter: causal tasks differ in cost, and on a
// shared machine one thread may be descheduled, so a static split would leave the other idle.
template <typename MakeScratch, typename Body>
void run_tasks(int64_t n, const MakeScratch& make_scratch, const Body& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) body(t, scratch);
  });
}

// ---- argument checks ----------------------------------------------------------------------

// A (B, nh, T, hs) operand on the CPU in a float dtype (see attention_operand).
at::Tensor checked_operand(const at::Tensor& t, const char* name, const at::Tensor* like,
                           const char* like_name) {
  check_cpu(t, name);
  check_float_dtype(t, name);
  return attention_operand(t, name, like, like_name);
}

void check_cpu_head_dim(const at::Tensor& q) { check_head_dim(q, kMinHeadDim, kMaxHeadDim, ""); }

// (B, T) key bias in acc_t: 0 for a real key, -inf for padding.
at::Tensor key_bias_from_mask(const c10::optional<at::Tensor>& mask, const at::Tensor& q,
                              at::ScalarType acc_type) {
  const int64_t B = q.size(0), T = q.size(2);
  if (mask.has_value()) check_key_padding_mask(*mask, q);
  if (!mask.has_value()) return at::Tensor();
  const at::Tensor& m = *mask;
  auto bias = at::zeros({B, T}, m.options().dtype(acc_type));
  return bias.masked_fill_(m.logical_not(), -std::numeric_limits<double>::infinity());
}

std::tuple<at::Tensor, at::Tensor> causal_attention_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& key_padding_mask, double scale) {
  at::Tensor q = checked_operand(q_in, "q", nullptr, nullptr);
  at::Tensor k = checked_operand(k_in, "k", &q_in, "q");
  at::Tensor v = checked_operand(v_in, "v", &q_in, "q");
  check_cpu_head_dim(q);
  check_attention_scale(scale);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const auto acc_type = at::toOpMathType(q.scalar_type());
  at::Tensor key_bias = key_bias_from_mask(key_padding_mask, q, acc_type);
  // out (B, H, T, D) laid out as (B, T, H, D): the model's merge of the heads,
  // out.transpose(1, 2).reshape(B, T, C), is then a view, not a copy
  auto out = at::empty({B, T, H, D}, q.options()).transpose(1, 2);
  auto lse = at::empty({B, H, T}, q.options().dtype(acc_type));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "causal_attention_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AttentionArgs<scalar_t, acc_t> a{q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                     v.data_ptr<scalar_t>(), Strides4(q), Strides4(k),
                                     Strides4(v),
                                     key_bias.defined() ? key_bias.data_ptr<acc_t>() : nullptr,
                                     B, H, T, D, static_cast<acc_t>(scale)};
    const int64_t tasks = B * H * ((T + kForwardBlockQ - 1) / kForwardBlockQ);
    const bool use_bf16_dot = bf16_dot_path<scalar_t>(D);
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    acc_t* lse_ptr = lse.data_ptr<acc_t>();
    const Strides4 so(out);
    run_tasks(
        tasks, [&] { return ForwardScratch<acc_t>(D, use_bf16_dot); },
        [&](int64_t t, ForwardScratch<acc_t>& w) {
          causal_attention_forward_tile<scalar_t, acc_t>(a, t, out_ptr, so, lse_ptr, w);
        });
  });
  return {out, lse};
}

// The three gradients (B, H, T, D): contiguous tensors of their own, or with packed (non-null)
// views of one (B, T, 3, H, D) tensor written into *packed (one set of strides serves all three).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const c10::optional<at::Tensor>& key_padding_mask, double scale, at::Tensor* packed) {
  at::Tensor q = checked_operand(q_in, "q", nullptr, nullptr);
  at::Tensor k = checked_operand(k_in, "k", &q_in, "q");
  at::Tensor v = checked_operand(v_in, "v", &q_in, "q");
  at::Tensor grad_out = checked_operand(grad_out_in, "grad_out", &q_in, "q");
  at::Tensor out = checked_operand(out_in, "out", &q_in, "q");
  check_cpu_head_dim(q);
  check_attention_scale(scale);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const auto acc_type = at::toOpMathType(q.scalar_type());
  check_attention_lse(lse_in, q);
  at::Tensor lse = lse_in.contiguous();
  at::Tensor key_bias = key_bias_from_mask(key_padding_mask, q, acc_type);
  at::Tensor grad_q, grad_k, grad_v;
  if (packed != nullptr) {
    *packed = at::empty({B, T, 3, H, D}, q.options());
    grad_q = packed->select(2, 0).transpose(1, 2);
    grad_k = packed->select(2, 1).transpose(1, 2);
    grad_v = packed->select(2, 2).transpose(1, 2);
  } else {
    grad_q = at::empty({B, H, T, D}, q.options());
    grad_k = at::empty({B, H, T, D}, q.options());
    grad_v = at::empty({B, H, T, D}, q.options());
  }
  if (grad_q.numel() == 0) return {grad_q, grad_k, grad_v};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "causal_attention_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AttentionArgs<scalar_t, acc_t> a{q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                     v.data_ptr<scalar_t>(), Strides4(q), Strides4(k),
                                     Strides4(v),
                                     key_bias.defined() ? key_bias.data_ptr<acc_t>() : nullptr,
                                     B, H, T, D, static_cast<acc_t>(scale)};
    const Strides4 sgo(grad_out), so(out), sg(grad_q);
    const scalar_t* go_ptr = grad_out.data_ptr<scalar_t>();
    const scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const acc_t* lse_ptr = lse.data_ptr<acc_t>();
    scalar_t *gq = grad_q.data_ptr<scalar_t>(), *gk = grad_k.data_ptr<scalar_t>(),
             *gv = grad_v.data_ptr<scalar_t>();
    run_tasks(
        B * H,
        [&] {
          return BackwardScratch<acc_t>(T, D, !std::is_same_v<scalar_t, acc_t>,
                                        bf16_dot_path<scalar_t>(D));
        },
        [&](int64_t bh, BackwardScratch<acc_t>& w) {
          causal_attention_backward_head<scalar_t, acc_t>(a, bh, go_ptr, sgo, out_ptr, so,
                                                          lse_ptr, gq, gk, gv, sg, w);
        });
  });
  return {grad_q, grad_k, grad_v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& key_padding_mask, double scale) {
  return attention_backward(grad_out, q, k, v, out, lse, key_padding_mask, scale, nullptr);
}

// The three gradients as one (B, T, 3, H, D) tensor, the model's qkv layout: the gradient of
// its split into q, k, v is then that tensor, not a concatenation (causal_attention.split_heads).
at::Tensor causal_attention_backward_packed_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& key_padding_mask, double scale) {
  at::Tensor packed;
  attention_backward(grad_out, q, k, v, out, lse, key_padding_mask, scale, &packed);
  return packed;
}

// A (B, nh, Tmax, hs) cache: q's dtype or int8 codes, unit stride in the head dim (another
// last-dim stride is copied once; all other strides are used as they are).
at::Tensor checked_cache(const at::Tensor& t, const char* name, const at::Tensor& q) {
  check_cpu(t, name);
  check_dim(t, 4, name);
  TORCH_CHECK(t.scalar_type() == q.scalar_type() || t.scalar_type() == at::kChar, name,
              ": expected dtype ", q.scalar_type(), " (the dtype of q) or int8, got ",
              t.scalar_type());
  return t.stride(3) == 1 ? t : t.contiguous();
}

at::Tensor causal_attention_decode_cpu(const at::Tensor& q_in, const at::Tensor& k_cache_in,
                                       const at::Tensor& v_cache_in,
                                       const at::Tensor& cache_lengths, double scale,
                                       const c10::optional<at::Tensor>& k_scale_in,
                                       const c10::optional<at::Tensor>& v_scale_in) {
  at::Tensor q = checked_operand(q_in, "q", nullptr, nullptr);
  check_cpu_head_dim(q);
  check_attention_scale(scale);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  TORCH_CHECK(q.size(2) == 1, "q: expected one query per sequence (size 2 == 1), got sizes ",
              q.sizes());
  at::Tensor k_cache = checked_cache(k_cache_in, "k_cache", q);
  at::Tensor v_cache = checked_cache(v_cache_in, "v_cache", q);
  const int64_t Tmax = check_decode_shapes(q, k_cache, v_cache, cache_lengths);
  const bool quantized = check_decode_cache_scales(k_cache, v_cache, k_scale_in, v_scale_in);
  at::Tensor k_scale = quantized ? k_scale_in->contiguous() : at::Tensor();
  at::Tensor v_scale = quantized ? v_scale_in->contiguous() : at::Tensor();
  at::Tensor lengths = cache_lengths.contiguous();
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 0 && len[b] <= Tmax, "cache_lengths: entry ", b, " is ", len[b],
                ", expected a value in [0, ", Tmax, "] (the cache's size 2)");
  }
  auto out = at::empty({B, H, 1, D}, q.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "causal_attention_decode", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (quantized) {
      causal_attention_decode_all<scalar_t, int8_t, acc_t>(
          q, k_cache, v_cache, k_scale.data_ptr<float>(), v_scale.data_ptr<float>(), len, scale,
          out);
    } else {
      causal_attention_decode_all<scalar_t, scalar_t, acc_t>(q, k_cache, v_cache, nullptr,
                                                             nullptr, len, scale, out);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ryzen_llm, CPU, m) {
  m.impl("causal_attention_forward", &causal_attention_forward_cpu);
  m.impl("causal_attention_backward", &causal_attention_backward_cpu);
  m.impl("causal_attention_backward_packed", &causal_attention_backward_packed_cpu);
  m.impl("causal_attention_decode", &causal_attention_decode_cpu);
}

}  // namespace ryzen_llm
