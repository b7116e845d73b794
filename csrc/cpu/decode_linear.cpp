// y = x @ weight.T + bias (optionally GELU'd) for the few rows of a decode step, with a result
// per row that does not depend on how many rows run, which rows they are, or how many threads
// split the work. Every output element is one dot product over K in a fixed order (16 fp32
// lanes walking K, then one fixed horizontal sum), so a sequence decoded alone gets the same
// bits as inside a batch of 31 others and the engine needs no padding rows to stay exact.
//
// float32 weights: float32 x, FMA. bfloat16 weights (half the bytes a decode step reads): x is
// rounded to bfloat16 too, as autocast does, and on CPUs with AVX512-BF16 each vdpbf16ps takes
// 32 weights as they are stored (2 products per lane, fp32 sums); elsewhere both operands are
// widened to fp32 in registers. Accumulation is fp32.
//
// Each weight row is read from memory once per call and reused from L2 for every group of up to
// 4 input rows; with 1 or 2 rows a tile spans 8 weight rows, so that enough independent sums are
// in flight to hide the latency of the multiply-adds.
//
// bfloat16 weights packed by pack_decode_weight (a 4-D weight) take another kernel: outer
// products, each output summed over the K pairs in order in its own lane (see packed_tile) -
// another order than the dot products' but, again, the same whatever the batch. Bias and GELU
// run 16 outputs at a time in both. int8 and int4 weights (3-D, packed by
// ryzen_llm.ops.quantized_decode_linear) go to quantized_decode_linear.cpp. Inference only.
#include "common.h"
#include "fast_math.h"
#include "cpu/quantized_decode_linear.h"

#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <cstring>
#include <vector>

namespace ryzen_llm {
namespace {

constexpr int64_t kWeightTile = 8;  // weight rows per parallel task unit

struct Epilogue {
  const float* bias;  // (N,) or nullptr
  bool gelu;
  RYZEN_LLM_INLINE float operator()(float acc, int64_t n) const {
    const float v = bias != nullptr ? acc + bias[n] : acc;
    return gelu ? gelu_value(v) : v;
  }
};

#if defined(RYZEN_LLM_AVX512)
RYZEN_LLM_INLINE RYZEN_LLM_AVX512_TARGET __m512 load16(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}

RYZEN_LLM_INLINE RYZEN_LLM_AVX512_TARGET __m512 load16(const uint16_t* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Unmasked loads for the full vectors (masked loads cost several times more on Zen 4).
RYZEN_LLM_INLINE RYZEN_LLM_AVX512_TARGET __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

RYZEN_LLM_INLINE RYZEN_LLM_AVX512_TARGET __m512 load16(const uint16_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Writes a tile's R x NR sums through the epilogue. The bias add and GELU run on all 16 slots of
// one vector (unused slots hold zeros): every output of the kernel takes the same vector
// instructions, whatever tile it sat in, and GELU costs a vector per tile instead of ~15 ns per
// output (which at 32 rows was 4x the multiply-adds of fc1).
template <int R, int NR>
RYZEN_LLM_INLINE RYZEN_LLM_AVX512_TARGET void store_tile(const __m512 (&acc)[R][NR], int64_t n,
                                                         int64_t n1, float* y, int64_t N,
                                                         Epilogue ep) {
  static_assert(R * NR <= 16, "a tile is at most 16 sums");
  alignas(64) float v[16] = {};
  alignas(64) float b[16] = {};
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NR; ++j) {
      v[i * NR + j] = _mm512_reduce_add_ps(acc[i][j]);
      if (ep.bias != nullptr) b[i * NR + j] = ep.bias[std::min<int64_t>(n + j, n1 - 1)];
    }
  epilogue16(v, b, ep.gelu);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NR && n + j < n1; ++j) y[i * N + n + j] = v[i * NR + j];
}

// R input rows against NR weight rows, each of the R x NR dot products in its own register
// walking K in the same order: a row's result does not depend on the tile it ran in. Weight rows
// past the block are clamped copies whose results are dropped.
template <typename W, int R, int NR>
RYZEN_LLM_AVX512_TARGET void tile_avx512(const float* x, const W* w, int64_t K, int64_t n,
                                         int64_t n1, float* y, int64_t N, Epilogue ep) {
  const W* wr[NR];
  for (int j = 0; j < NR; ++j) wr[j] = w + std::min<int64_t>(n + j, n1 - 1) * K;
  __m512 acc[R][NR];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load16(wr[j] + k);
    for (int i = 0; i < R; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (k < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load16(wr[j] + k, m);
    for (int i = 0; i < R; ++i) {
      const __m512 xv = load16(x + i * K + k, m);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  store_tile<R, NR>(acc, n, n1, y, N, ep);
}

// Rows m0..m0+R-1 against weight rows n0..n1-1; fewer rows get more weight rows per tile so that
// enough independent sums hide the FMA latency.
template <typename W, int R>
RYZEN_LLM_AVX512_TARGET void rows_avx512(const float* x, const W* w, float* y, int64_t K,
                                         int64_t N, int64_t n0, int64_t n1, Epilogue ep) {
  constexpr int NR = R <= 2 ? 8 : 4;
  for (int64_t n = n0; n < n1; n += NR) tile_avx512<W, R, NR>(x, w, K, n, n1, y, N, ep);
}

// The same tiles on bfloat16 x and weights with vdpbf16ps: 32 values of K per instruction.
template <int R, int NR>
RYZEN_LLM_AVX512_BF16_TARGET void tile_bf16_dot(const uint16_t* x, const uint16_t* w, int64_t K,
                                             int64_t n, int64_t n1, float* y, int64_t N,
                                             Epilogue ep) {
  const uint16_t* wr[NR];
  for (int j = 0; j < NR; ++j) wr[j] = w + std::min<int64_t>(n + j, n1 - 1) * K;
  __m512 acc[R][NR];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(wr[j] + k);
    for (int i = 0; i < R; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  if (k < K) {
    const __mmask32 m = static_cast<__mmask32>((1u << (K - k)) - 1u);
    __m512bh wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(m, wr[j] + k);
    for (int i = 0; i < R; ++i) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + i * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  store_tile<R, NR>(acc, n, n1, y, N, ep);
}

template <int R>
RYZEN_LLM_AVX512_BF16_TARGET void rows_bf16_dot(const uint16_t* x, const uint16_t* w, float* y,
                                             int64_t K, int64_t N, int64_t n0, int64_t n1,
                                             Epilogue ep) {
  constexpr int NR = R <= 2 ? 8 : 4;
  for (int64_t n = n0; n < n1; n += NR) tile_bf16_dot<R, NR>(x, w, K, n, n1, y, N, ep);
}

// ---- packed bfloat16 weights (pack_decode_weight): outer products ---------------------------
// Block b of the packed weight holds outputs 16b..16b+15, K pairs in order: 32-bit word
// (kk, j) = (w[16b + j][2kk], w[16b + j][2kk + 1]). Each input pair is broadcast and one
// vdpbf16ps adds its products to 16 outputs at once: no sums across lanes, one contiguous stream
// per block, and fewer loads per multiply-add than the dot products above (~1.5x their speed at
// 32 rows). Every output is one sum over the K pairs in order, in its own lane, whatever M.
template <int R, int NV>
RYZEN_LLM_AVX512_BF16_TARGET void packed_tile(const uint16_t* x, int64_t ldx, const uint16_t* w,
                                           int64_t K2, int64_t b0, int64_t nblocks, float* y,
                                           int64_t N, Epilogue ep, const uint16_t* next,
                                           int64_t next_blocks, int64_t pf_first,
                                           int64_t pf_step) {
  __m512 acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
  const uint16_t* wb[NV];
  for (int j = 0; j < NV; ++j) wb[j] = w + std::min<int64_t>(b0 + j, nblocks - 1) * K2 * 32;
  int64_t pf = next != nullptr ? pf_first : K2;
  for (int64_t kk = 0; kk < K2; ++kk) {
    if (kk == pf) {  // this group's share of the next panel's lines, into L2
      for (int j = 0; j < NV && j < next_blocks; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(next + (j * K2 + kk) * 32), _MM_HINT_T1);
      pf += pf_step;
    }
    __m512bh wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(wb[j] + kk * 32);
    for (int i = 0; i < R; ++i) {
      uint32_t pair;
      std::memcpy(&pair, x + i * ldx + 2 * kk, sizeof(pair));
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  for (int j = 0; j < NV && b0 + j < nblocks; ++j) {
    const int64_t n = (b0 + j) * 16;
    const int valid = static_cast<int>(std::min<int64_t>(16, N - n));
    const __mmask16 m = static_cast<__mmask16>((1u << valid) - 1u);
    alignas(64) float b[16];
    _mm512_store_ps(b, ep.bias != nullptr ? _mm512_maskz_loadu_ps(m, ep.bias + n)
                                          : _mm512_setzero_ps());
    for (int i = 0; i < R; ++i) {
      alignas(64) float v[16];
      _mm512_store_ps(v, acc[i][j]);
      epilogue16(v, b, ep.gelu);
      _mm512_mask_storeu_ps(y + i * N + n, m, _mm512_load_ps(v));
    }
  }
}

// Blocks b0..b1-1 of every row: NV blocks at a time (their panel stays in L2) against groups of
// up to 4 rows (16 sums in flight). While one panel is worked on, its groups prefetch the next
// panel into L2 between them (group g the lines of every G-th k-pair from g): the weights then
// stream from memory under the multiply-adds of every group, not only under the first one's.
// Up to 4 rows (one group) leave it to the hardware prefetcher: the explicit one made them ~15%
// slower.
void packed_rows(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K2, int64_t M,
                 int64_t b0, int64_t b1, int64_t nblocks, float* y, int64_t N, Epilogue ep) {
  constexpr int NV = 4;
  const int64_t groups = (M + 3) / 4;
  for (int64_t b = b0; b < b1; b += NV) {
    const int64_t end = std::min(b1, nblocks);
    const uint16_t* next = groups > 1 && b + NV < nblocks ? w + (b + NV) * K2 * 32 : nullptr;
    const int64_t nn = nblocks - (b + NV);  // blocks of the next panel that exist
    int64_t m = 0, g = 0;
    for (; m + 4 <= M; m += 4, ++g)
      packed_tile<4, NV>(x + m * ldx, ldx, w, K2, b, end, y + m * N, N, ep, next, nn, g, groups);
    const uint16_t* xm = x + m * ldx;
    float* ym = y + m * N;
    switch (M - m) {
      case 3: packed_tile<3, NV>(xm, ldx, w, K2, b, end, ym, N, ep, next, nn, g, groups); break;
      case 2: packed_tile<2, NV>(xm, ldx, w, K2, b, end, ym, N, ep, next, nn, g, groups); break;
      case 1: packed_tile<1, NV>(xm, ldx, w, K2, b, end, ym, N, ep, next, nn, g, groups); break;
      default: break;
    }
  }
}
#endif

// One row of x rounded to bfloat16 (round to nearest even, as autocast), zero-padded to ldx.
RYZEN_LLM_TARGET_CLONES void round_row_bf16(const float* x, uint16_t* xb, int64_t K, int64_t ldx) {
  for (int64_t k = 0; k < K; ++k) xb[k] = Elem<c10::BFloat16>::store(x[k]);
  for (int64_t k = K; k < ldx; ++k) xb[k] = 0;
}

// x (M, K) float32 rounded to bfloat16 (to nearest even, as autocast rounds activations), rows
// zero-padded to ldx >= K. A tensor rather than a std::vector: torch's allocator aligns it to 64
// bytes, so the kernels' 64-byte loads of x never straddle two cache lines. Rows in parallel, each
// an auto-vectorised loop: a prefill's thousand rows would otherwise cost a serial pass.
at::Tensor rounded_bf16(const at::Tensor& x, int64_t ldx) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, ldx}, x.options().dtype(at::kBFloat16));
  uint16_t* xb = Elem<c10::BFloat16>::ptr(out);
  const float* xf = x.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K)),
                   [&](int64_t m0, int64_t m1) {
                     for (int64_t m = m0; m < m1; ++m)
                       round_row_bf16(xf + m * K, xb + m * ldx, K, ldx);
                   });
  return out;
}

// The portable path: the same 16-lane order in plain loops (auto-vectorised per clone).
RYZEN_LLM_INLINE float widen(float w) { return w; }
RYZEN_LLM_INLINE float widen(uint16_t w) { return Elem<c10::BFloat16>::load(w); }

template <typename W>
RYZEN_LLM_INLINE float dot_portable(const float* x, const W* w, int64_t K) {
  float lanes[16] = {0};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += x[k + l] * widen(w[k + l]);
  for (int l = 0; k + l < K; ++l) lanes[l] += x[k + l] * widen(w[k + l]);
  float s = 0.0f;
  for (int l = 0; l < 16; ++l) s += lanes[l];
  return s;
}

template <typename W>
RYZEN_LLM_TARGET_CLONES void rows_portable(const float* x, const W* w, float* y, int64_t M,
                                           int64_t K, int64_t N, int64_t n0, int64_t n1,
                                           Epilogue ep) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = ep(dot_portable(x + m * K, w + n * K, K), n);
}

// Packed weights without AVX512-BF16: each output's sum over the K pairs in order (both values
// widened to float32).
RYZEN_LLM_TARGET_CLONES void packed_rows_portable(const uint16_t* x, int64_t ldx,
                                                  const uint16_t* w, int64_t K2, int64_t M,
                                                  int64_t b0, int64_t b1, float* y, int64_t N,
                                                  Epilogue ep) {
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t m = 0; m < M; ++m) {
      float acc[16] = {0};
      const uint16_t* xr = x + m * ldx;
      for (int64_t kk = 0; kk < K2; ++kk) {
        const float x0 = widen(xr[2 * kk]), x1 = widen(xr[2 * kk + 1]);
        const uint16_t* wk = w + (b * K2 + kk) * 32;
        for (int j = 0; j < 16; ++j) acc[j] += x0 * widen(wk[2 * j]) + x1 * widen(wk[2 * j + 1]);
      }
      for (int j = 0; j < 16 && b * 16 + j < N; ++j) y[m * N + b * 16 + j] = ep(acc[j], b * 16 + j);
    }
}

// Outputs n0..n1 of every row: weight rows in chunks that stay in L2 while every group of up to
// 4 input rows passes over them; rows(r, m) runs input rows m..m+r-1 over a chunk.
template <typename Rows>
RYZEN_LLM_INLINE void chunked(int64_t M, int64_t K, int64_t n0, int64_t n1, size_t wbytes,
                              Rows rows) {
  const int64_t chunk = std::max<int64_t>(8, (64 * 1024 / (K * wbytes)) / 8 * 8);
  for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
    const int64_t c1 = std::min(n1, c0 + chunk);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) rows(std::integral_constant<int, 4>(), m, c0, c1);
    switch (M - m) {
      case 3: rows(std::integral_constant<int, 3>(), m, c0, c1); break;
      case 2: rows(std::integral_constant<int, 2>(), m, c0, c1); break;
      case 1: rows(std::integral_constant<int, 1>(), m, c0, c1); break;
      default: break;
    }
  }
}

template <typename W>
void rows_block(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0,
                int64_t n1, Epilogue ep) {
#if defined(RYZEN_LLM_AVX512)
  if (avx512_available()) {
    chunked(M, K, n0, n1, sizeof(W), [&](auto r, int64_t m, int64_t c0, int64_t c1) {
      rows_avx512<W, decltype(r)::value>(x + m * K, w, y + m * N, K, N, c0, c1, ep);
    });
    return;
  }
#endif
  rows_portable<W>(x, w, y, M, K, N, n0, n1, ep);
}

#if defined(RYZEN_LLM_AVX512)
void rows_block_bf16_dot(const uint16_t* x, const uint16_t* w, float* y, int64_t M, int64_t K,
                         int64_t N, int64_t n0, int64_t n1, Epilogue ep) {
  chunked(M, K, n0, n1, sizeof(uint16_t), [&](auto r, int64_t m, int64_t c0, int64_t c1) {
    rows_bf16_dot<decltype(r)::value>(x + m * K, w, y + m * N, K, N, c0, c1, ep);
  });
}
#endif

// x (M, K) against bfloat16 weights packed by pack_decode_weight: (ceil(N / 16), ceil(K / 2), 16, 2).
at::Tensor decode_linear_packed(const at::Tensor& x, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, bool gelu,
                                int64_t out_features) {
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.size(2) == 16 &&
                  weight.size(3) == 2,
              "weight: a packed (4-D) weight must be bfloat16 of sizes (ceil(N / 16), "
              "ceil(K / 2), 16, 2), got ", weight.scalar_type(), " ", weight.sizes());
  check_contiguous(weight, "weight");
  const int64_t M = x.size(0), K = x.size(1), K2 = (K + 1) / 2, nblocks = weight.size(0);
  TORCH_CHECK(weight.size(1) == K2, "weight: packed for ", 2 * weight.size(1),
              " input features, x has ", K);
  const int64_t N = out_features >= 0 ? out_features : (bias.has_value() ? bias->numel() : -1);
  TORCH_CHECK(N >= 0, "out_features: required with a packed weight and no bias");
  TORCH_CHECK((N + 15) / 16 == nblocks, "out_features: ", N, " outputs do not fit the packed "
              "weight's ", nblocks, " blocks of 16");
  const float* bias_ptr = checked_float_bias(bias, N);
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const Epilogue ep{bias_ptr, gelu};
  // x rounded to bfloat16, rows padded to an even length (the pad pairs with zero weights)
  const int64_t ldx = 2 * K2;
  const at::Tensor x_bf16 = rounded_bf16(x, ldx);
  const uint16_t* xb = Elem<c10::BFloat16>::ptr(x_bf16);
  const uint16_t* wp = Elem<c10::BFloat16>::ptr(weight);
  float* yp = y.data_ptr<float>();
  // Enough weight bytes per task to amortise its start, but never so many that a small layer
  // (512 x 512 at one row: 32 blocks) runs on one thread while the others wait.
  const int64_t threads = at::get_num_threads();
  const int64_t share = ((nblocks + threads - 1) / threads + 3) / 4 * 4;
  const int64_t grain = std::max<int64_t>(
      4, std::min(share, (16384 / std::max<int64_t>(1, K * M)) / 4 * 4));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
#if defined(RYZEN_LLM_AVX512)
    if (avx512_bf16_available()) {
      packed_rows(xb, ldx, wp, K2, M, b0, b1, nblocks, yp, N, ep);
      return;
    }
#endif
    packed_rows_portable(xb, ldx, wp, K2, M, b0, b1, yp, N, ep);
  });
  return y;
}

at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, bool gelu,
                             int64_t out_features) {
  check_decode_linear_input(x, weight);
  if (weight.dim() == 4) return decode_linear_packed(x, weight, bias, gelu, out_features);
  // int8 / int4 weights packed by ryzen_llm.ops.quantized_decode_linear: their own kernels
  if (weight.dim() == 3) return quantized_decode_linear_cpu(x, weight, bias, gelu, out_features);
  check_dim(weight, 2, "weight");
  TORCH_CHECK(out_features < 0 || out_features == weight.size(0), "out_features: ", out_features,
              " does not match the weight's ", weight.size(0), " rows");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "weight: expected float32 or bfloat16, got ", weight.scalar_type());
  check_contiguous(weight, "weight");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "weight: expected (N, ", K, ") to match x's ", K,
              " input features, got sizes ", weight.sizes());
  const float* bias_ptr = checked_float_bias(bias, N);
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const Epilogue ep{bias_ptr, gelu};
  float* yp = y.data_ptr<float>();
  // Chunks of weight rows: enough weight bytes per task to amortise a task's start.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * M));
  const int64_t tiles = (N + kWeightTile - 1) / kWeightTile;
  auto parallel = [&](auto&& block) {
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
      block(t0 * kWeightTile, std::min(N, t1 * kWeightTile));
    });
  };
  if (weight.scalar_type() == at::kFloat) {
    const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
    parallel([&](int64_t n0, int64_t n1) { rows_block<float>(xp, wp, yp, M, K, N, n0, n1, ep); });
    return y;
  }
  // bfloat16 weights: x rounded to bfloat16 as well
  const uint16_t* wp = Elem<c10::BFloat16>::ptr(weight);
  const at::Tensor x_bf16 = rounded_bf16(x, K);
  const uint16_t* xb = Elem<c10::BFloat16>::ptr(x_bf16);
#if defined(RYZEN_LLM_AVX512)
  if (avx512_bf16_available()) {
    parallel([&](int64_t n0, int64_t n1) {
      rows_block_bf16_dot(xb, wp, yp, M, K, N, n0, n1, ep);
    });
    return y;
  }
#endif
  std::vector<float> xr(static_cast<size_t>(M * K));
  for (size_t i = 0; i < xr.size(); ++i) xr[i] = Elem<c10::BFloat16>::load(xb[i]);
  parallel([&](int64_t n0, int64_t n1) {
    rows_block<uint16_t>(xr.data(), wp, yp, M, K, N, n0, n1, ep);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(ryzen_llm, CPU, m) { m.impl("decode_linear", &decode_linear_cpu); }

}  // namespace ryzen_llm
