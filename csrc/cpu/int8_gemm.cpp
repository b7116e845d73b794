// int8 x int8 -> int32 GEMMs, C = A @ B, for the level-4 linear: at::_int_mm (oneDNN) or the
// own kernel below, chosen per shape (int8_gemm.h).
//
// The own kernel: B is packed once per call into blocks of 16 output columns, each row of a block
// 16 lanes of 4 consecutive reduction codes (lane j: b[4kk..4kk+3][16 blk + j]) stored as u8
// (b + 128, a flip of the sign bit), padded with b = 0. AVX512-VNNI's vpdpbusd multiplies those u8 by
// A's s8 codes, 4 at a time broadcast to every lane, so each sum is sum_k (b + 128) a =
// sum_k a b + 128 sum_k a, and 128 times the row's sum of A comes off: exact. Each task takes
// blocks of kRowBlock rows of A (read in place when contiguous, else copied: the weight
// gradient's A is a transposed view), runs tiles of 4 rows x 4 column blocks (16 int32 sums in
// registers) over the whole reduction, panel by panel (4 x 16 columns of B, kept in L1/L2 across
// the block's rows), and hands the block's int32 rows, still in cache, to the caller's epilogue:
// the dequantization never reads a separate int32 result back from memory. Memory traffic: A and
// B read once from memory (B's packing writes and reads its N x K bytes once more), each B panel
// re-read from L1/L2 by the 12 tiles of a block, the result written once by the epilogue.
// Without AVX512-VNNI the same packing runs through plain loops (the sanitizer build tests those).
#include "cpu/int8_gemm.h"

#include "common.h"
#include "fast_math.h"

#include <torch/library.h>

#include <algorithm>
#include <chrono>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>

namespace ryzen_llm {
namespace {

constexpr int64_t kRowBlock = 48;  // rows of A per task: 12 tiles share each B panel
constexpr int64_t kTileRows = 4;
constexpr int64_t kPanelBlocks = 4;  // column blocks of 16 per panel
// Every partial u8 x s8 sum stays below 2^31 while K * 255 * 128 does: longer reductions go to
// oneDNN.
constexpr int64_t kMaxOwnK = (int64_t{1} << 31) / (255 * 128);
// auto keeps the own kernel unless oneDNN is faster by more than this many percent: within
// timing noise the own kernel wins, because oneDNN's buffers come from malloc's heap, where
// they fragment it and the trainer's peak memory creeps up over a run (docs/memory.md). On a
// shared machine one timing moved by up to 7% (a shape where the own kernel is otherwise the
// faster one went to oneDNN and the full preset's peak RSS rose past 500 MiB); where oneDNN has
// a faster instruction set (AMX) it wins by far more than this.
constexpr int64_t kOwnTieMargin = 15;
constexpr int kTimedRounds = 3;  // timed calls of each GEMM when auto meets a shape
// oneDNN: rows per at::_int_mm call, so that its int32 buffer stays at most kOneDnnRows x N.
constexpr int64_t kOneDnnRows = 512;

struct PackedB {
  at::Tensor codes;  // uint8 (nblocks, K4, 64): b + 128, the padding 128 (b = 0)
  int64_t K4, nblocks;
};

// One block of 16 columns: quadruples [kk0, K4) in plain loops (all of them, or the tail the
// fast paths below leave); the missing columns are left as pack_b padded them.
void pack_block_plain(const int8_t* src, int64_t sk, int64_t sn, int64_t K, int64_t kk0,
                      int64_t width, uint8_t* out) {
  for (int64_t k = 4 * kk0; k < K; ++k) {
    const int8_t* row = src + k * sk;
    uint8_t* o = out + (k / 4) * 64 + (k % 4);
    for (int64_t j = 0; j < width; ++j) o[4 * j] = static_cast<uint8_t>(row[j * sn]) ^ 0x80u;
  }
}

// The whole quadruples of a full block of 16 columns, returning how many were packed: from
// 4 bytes of each column at a time where b's columns are contiguous along the reduction (the
// forward's W.T), from 4 x 16 bytes interleaved (SSE2) where its rows are (the backward's).
int64_t pack_block_fast(const int8_t* src, int64_t sk, int64_t sn, int64_t K, uint8_t* out) {
  const int64_t quads = K / 4;
  if (sk == 1) {
    for (int64_t j = 0; j < 16; ++j) {
      const int8_t* col = src + j * sn;
      for (int64_t kk = 0; kk < quads; ++kk) {
        uint32_t word;
        std::memcpy(&word, col + 4 * kk, sizeof(word));
        word ^= 0x80808080u;
        std::memcpy(out + kk * 64 + 4 * j, &word, sizeof(word));
      }
    }
    return quads;
  }
#if defined(__SSE2__)
  if (sn == 1) {
    const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
    for (int64_t kk = 0; kk < quads; ++kk) {
      __m128i r[4];
      for (int t = 0; t < 4; ++t)
        r[t] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (4 * kk + t) * sk));
      const __m128i lo01 = _mm_unpacklo_epi8(r[0], r[1]), hi01 = _mm_unpackhi_epi8(r[0], r[1]);
      const __m128i lo23 = _mm_unpacklo_epi8(r[2], r[3]), hi23 = _mm_unpackhi_epi8(r[2], r[3]);
      const __m128i lanes[4] = {_mm_unpacklo_epi16(lo01, lo23), _mm_unpackhi_epi16(lo01, lo23),
                                _mm_unpacklo_epi16(hi01, hi23), _mm_unpackhi_epi16(hi01, hi23)};
      for (int q = 0; q < 4; ++q)  // lanes 4q..4q+3, each its column's 4 codes in order
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + kk * 64 + 16 * q),
                         _mm_xor_si128(lanes[q], flip));
    }
    return quads;
  }
#endif
  return 0;
}

PackedB pack_b(const at::Tensor& b) {
  const int64_t K = b.size(0), N = b.size(1), K4 = (K + 3) / 4, nblocks = (N + 15) / 16;
  PackedB p{at::empty({nblocks, K4, 64}, b.options().dtype(at::kByte)), K4, nblocks};
  const int8_t* src = b.data_ptr<int8_t>();
  const int64_t sk = b.stride(0), sn = b.stride(1);
  uint8_t* dst = p.codes.data_ptr<uint8_t>();
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t width = std::min<int64_t>(16, N - blk * 16);
      const int8_t* cols = src + blk * 16 * sn;
      uint8_t* out = dst + blk * K4 * 64;
      // the padding (missing columns, a last partial quadruple) holds b = 0; every other byte is
      // written below
      if (width < 16) std::memset(out, 128, K4 * 64);
      else if (K % 4 != 0) std::memset(out + (K4 - 1) * 64, 128, 64);
      const int64_t done = width == 16 ? pack_block_fast(cols, sk, sn, K, out) : 0;
      pack_block_plain(cols, sk, sn, K, done, width, out);
    }
  });
  return p;
}

#if defined(__SSE2__)
// dst[j * ds + i] = src[i * ss + j] for a 16 x 16 tile of bytes: four rounds of interleaving
// leave column bitreverse4(i) in register i.
inline void transpose16(const int8_t* src, int64_t ss, int8_t* dst, int64_t ds) {
  __m128i a[16], b[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * ss));
  for (int i = 0; i < 8; ++i) {
    b[i] = _mm_unpacklo_epi8(a[2 * i], a[2 * i + 1]);
    b[i + 8] = _mm_unpackhi_epi8(a[2 * i], a[2 * i + 1]);
  }
  for (int i = 0; i < 8; ++i) {
    a[i] = _mm_unpacklo_epi16(b[2 * i], b[2 * i + 1]);
    a[i + 8] = _mm_unpackhi_epi16(b[2 * i], b[2 * i + 1]);
  }
  for (int i = 0; i < 8; ++i) {
    b[i] = _mm_unpacklo_epi32(a[2 * i], a[2 * i + 1]);
    b[i + 8] = _mm_unpackhi_epi32(a[2 * i], a[2 * i + 1]);
  }
  for (int i = 0; i < 8; ++i) {
    a[i] = _mm_unpacklo_epi64(b[2 * i], b[2 * i + 1]);
    a[i + 8] = _mm_unpackhi_epi64(b[2 * i], b[2 * i + 1]);
  }
  static constexpr int kColumn[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  for (int i = 0; i < 16; ++i)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + kColumn[i] * ds), a[i]);
}
#endif

// out[r * ld + k] = src[r + k * sk] for r < rows, k < K: a transposed view's rows (the weight
// gradient's A) copied out, 16 x 16 tiles at a time where SSE2 is there.
void copy_transposed(const int8_t* src, int64_t sk, int64_t rows, int64_t K, int8_t* out,
                     int64_t ld) {
  int64_t r = 0;
#if defined(__SSE2__)
  for (; r + 16 <= rows; r += 16) {
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) transpose16(src + r + k * sk, sk, out + r * ld + k, ld);
    for (; k < K; ++k)
      for (int64_t i = r; i < r + 16; ++i) out[i * ld + k] = src[i + k * sk];
  }
#endif
  for (; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) out[r * ld + k] = src[r + k * sk];
}

// Rows [r0, r1) of a: a pointer to them (row r at *rows + (r - r0) * *ld, 4 * K4 codes each,
// zero-padded). Contiguous rows of a whole number of quadruples are read in place; others are
// copied into buf (kRowBlock x 4 * K4 bytes).
void block_rows(const at::Tensor& a, int64_t r0, int64_t r1, int64_t K4, int8_t* buf,
                const int8_t** rows, int64_t* ld) {
  const int8_t* src = a.data_ptr<int8_t>();
  const int64_t K = a.size(1), sm = a.stride(0), sk = a.stride(1);
  if (sk == 1 && K == 4 * K4) {
    *rows = src + r0 * sm;
    *ld = sm;
  } else {
    for (int64_t r = 0; r < r1 - r0; ++r) std::memset(buf + r * 4 * K4 + K, 0, 4 * K4 - K);
    if (sm == 1) {
      copy_transposed(src + r0, sk, r1 - r0, K, buf, 4 * K4);
    } else {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t k = 0; k < K; ++k) buf[(r - r0) * 4 * K4 + k] = src[r * sm + k * sk];
    }
    *rows = buf;
    *ld = 4 * K4;
  }
}

// 128 * the sum of each of n rows of K codes (row r at a + r * lda) into corr.
void row_corrections(const int8_t* a, int64_t lda, int64_t n, int64_t K, int32_t* corr) {
  for (int64_t r = 0; r < n; ++r) {
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += a[r * lda + k];
    corr[r] = 128 * s;
  }
}

#if defined(RYZEN_LLM_AVX512)
// acc += w (u8) . x (s8), accumulating in place: through the intrinsic GCC copies every
// accumulator to another register (and spills some) on each step of the loop. (The form with
// the broadcast as the instruction's memory operand ran at half the speed on Zen 4.)
RYZEN_LLM_INLINE RYZEN_LLM_VNNI_TARGET __m512i dpbusd(__m512i acc, __m512i w, __m512i x) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
  return acc;
}

// row_corrections with 64 codes per step: vpdpbusd of all-ones u8 bytes with the s8 codes sums
// them four at a time per lane (the plain loop above ran as SSE2 sign extensions).
RYZEN_LLM_VNNI_TARGET void row_corrections_vnni(const int8_t* a, int64_t lda, int64_t n,
                                                int64_t K, int32_t* corr) {
  const __m512i ones = _mm512_set1_epi8(1);
  const __mmask64 tail = K % 64 == 0 ? 0 : ~0ull >> (64 - K % 64);
  for (int64_t r = 0; r < n; ++r) {
    const int8_t* x = a + r * lda;
    __m512i s = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(x + k));
    if (tail) s = _mm512_dpbusd_epi32(s, ones, _mm512_maskz_loadu_epi8(tail, x + k));
    corr[r] = 128 * _mm512_reduce_add_epi32(s);
  }
}

// R rows of A against NV column blocks from block b0 (clamped to the last block; only blocks
// below nblocks are stored): acc rows (ldc apart) receive the exact int32 sums, the rows'
// corrections taken off.
template <int R, int NV>
RYZEN_LLM_VNNI_TARGET void vnni_tile(const int8_t* a, int64_t lda, const int32_t* corr,
                                     const PackedB& p, const uint8_t* codes, int64_t b0,
                                     int64_t N, int32_t* acc, int64_t ldc) {
  const int64_t K4 = p.K4;
  const uint8_t* wb[NV];
  for (int j = 0; j < NV; ++j) wb[j] = codes + std::min(b0 + j, p.nblocks - 1) * K4 * 64;
  __m512i s[R][NV];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) s[i][j] = _mm512_setzero_si512();
  for (int64_t kk = 0; kk < K4; ++kk) {
    __m512i w[NV];
    for (int j = 0; j < NV; ++j) w[j] = _mm512_loadu_si512(wb[j] + kk * 64);
    for (int i = 0; i < R; ++i) {
      int32_t word;
      std::memcpy(&word, a + i * lda + 4 * kk, sizeof(word));
      const __m512i x = _mm512_set1_epi32(word);
      for (int j = 0; j < NV; ++j) s[i][j] = dpbusd(s[i][j], w[j], x);
    }
  }
  for (int j = 0; j < NV && b0 + j < p.nblocks; ++j) {
    const int64_t n = (b0 + j) * 16;
    const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, N - n)) - 1u);
    for (int i = 0; i < R; ++i)
      _mm512_mask_storeu_epi32(acc + i * ldc + n, m,
                               _mm512_sub_epi32(s[i][j], _mm512_set1_epi32(corr[i])));
  }
}

// Rows [0, rows) of a block against every column: panel by panel, tiles of 4 rows (then single
// rows). (Chunking the reduction, so that a panel's 4 x 16 KB stay in L1, measured no faster at
// the seed's shapes; neither did tiles of 8 x 2, 6 x 4, 8 x 3 or 2 x 8.)
RYZEN_LLM_VNNI_TARGET void vnni_block(const int8_t* a, int64_t lda, const int32_t* corr,
                                        int64_t rows, const PackedB& p, int64_t N, int32_t* acc) {
  const uint8_t* codes = p.codes.data_ptr<uint8_t>();
  constexpr int R = kTileRows, NV = kPanelBlocks;
  for (int64_t b0 = 0; b0 < p.nblocks; b0 += NV) {
    int64_t r = 0;
    for (; r + R <= rows; r += R)
      vnni_tile<R, NV>(a + r * lda, lda, corr + r, p, codes, b0, N, acc + r * N, N);
    for (; r < rows; ++r)
      vnni_tile<1, NV>(a + r * lda, lda, corr + r, p, codes, b0, N, acc + r * N, N);
  }
}
#endif

// The same sums in plain loops over the same packing.
void portable_block(const int8_t* a, int64_t lda, const int32_t* corr, int64_t rows,
                    const PackedB& p, int64_t N, int32_t* acc) {
  const uint8_t* codes = p.codes.data_ptr<uint8_t>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* w = codes + (n / 16) * p.K4 * 64 + 4 * (n % 16);
      int32_t s = 0;
      for (int64_t kk = 0; kk < p.K4; ++kk)
        for (int t = 0; t < 4; ++t) s += int32_t{w[kk * 64 + t]} * a[r * lda + 4 * kk + t];
      acc[r * N + n] = s - corr[r];
    }
  }
}

void own_gemm(const at::Tensor& a, const at::Tensor& b, const Int8RowsFn& rows) {
  const int64_t M = a.size(0), N = b.size(1), K = a.size(1);
  const PackedB p = pack_b(b);
  // One part of the rows per thread, as equal as whole tiles allow, walked in blocks of
  // kRowBlock. (Split by whole blocks, 2 threads got 6 and 5 blocks at M = 256 or 512, one
  // thread 22% more rows than the other, and at M = 2048 22 and 20.7.)
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (M + kTileRows - 1) / kTileRows));
  auto part_start = [&](int64_t t) {
    return std::min(M, (t * M / parts + kTileRows - 1) / kTileRows * kTileRows);
  };
  const bool vnni = avx512_vnni_available();
  at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
    // through ATen's allocator (the trainer's block cache), not malloc: buffers of a few
    // hundred KB from malloc's heap fragment it between steps
    at::Tensor buf = at::empty({kRowBlock * 4 * p.K4}, a.options()),
               acc = at::empty({kRowBlock * N}, a.options().dtype(at::kInt));
    std::vector<int32_t> corr(kRowBlock);
    const int64_t end = part_start(t1);
    for (int64_t r0 = part_start(t0); r0 < end; r0 += kRowBlock) {
      const int64_t r1 = std::min(end, r0 + kRowBlock);
      const int8_t* ap;
      int64_t lda;
      block_rows(a, r0, r1, p.K4, buf.data_ptr<int8_t>(), &ap, &lda);
#if defined(RYZEN_LLM_AVX512)
      if (vnni) {
        row_corrections_vnni(ap, lda, r1 - r0, K, corr.data());
        vnni_block(ap, lda, corr.data(), r1 - r0, p, N, acc.data_ptr<int32_t>());
        rows(acc.data_ptr<int32_t>(), r0, r1);
        continue;
      }
#endif
      row_corrections(ap, lda, r1 - r0, K, corr.data());
      portable_block(ap, lda, corr.data(), r1 - r0, p, N, acc.data_ptr<int32_t>());
      rows(acc.data_ptr<int32_t>(), r0, r1);
    }
  });
}

void onednn_gemm(const at::Tensor& a, const at::Tensor& b, const Int8RowsFn& rows) {
  const int64_t M = a.size(0), N = b.size(1);
  at::Tensor acc = at::empty({std::min(M, kOneDnnRows), N}, a.options().dtype(at::kInt));
  for (int64_t r0 = 0; r0 < M; r0 += kOneDnnRows) {
    const int64_t n = std::min(kOneDnnRows, M - r0);
    at::Tensor part = acc.narrow(0, 0, n);
    at::_int_mm_out(part, a.narrow(0, r0, n), b);
    rows(part.data_ptr<int32_t>(), r0, r0 + n);
  }
}

// ---- the choice per shape ----
struct Choice {
  Int8GemmMode impl;            // what the shape's last call ran
  Int8GemmMode timed_choice;    // auto's choice once timed (kAuto: not timed yet)
  int64_t own_us = 0, onednn_us = 0, own_calls = 0, onednn_calls = 0;
};
using ShapeKey = std::tuple<int64_t, int64_t, int64_t, int64_t>;  // M, N, K, threads

std::mutex choice_mutex;
std::map<ShapeKey, Choice> choices;
Int8GemmMode mode = Int8GemmMode::kAuto;

template <typename F>
int64_t time_us(F f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0)
      .count();
}

}  // namespace

void int8_gemm(const at::Tensor& a, const at::Tensor& b, const Int8RowsFn& rows) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) &&
                  a.scalar_type() == at::kChar && b.scalar_type() == at::kChar,
              "int8 GEMM: expected int8 (M, K) @ (K, N), got ", a.scalar_type(), a.sizes(), " @ ",
              b.scalar_type(), b.sizes());
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (M == 0 || N == 0) return;
  const ShapeKey key{M, N, K, at::get_num_threads()};
  const bool own_ok = K <= kMaxOwnK;
  Int8GemmMode impl;
  bool timed = false;
  {
    std::lock_guard<std::mutex> lock(choice_mutex);
    auto it = choices.find(key);
    if (mode != Int8GemmMode::kAuto) {
      impl = own_ok ? mode : Int8GemmMode::kOneDnn;
    } else if (it != choices.end() && it->second.timed_choice != Int8GemmMode::kAuto) {
      impl = it->second.timed_choice;
    } else if (!own_ok || !avx512_vnni_available()) {
      impl = Int8GemmMode::kOneDnn;  // the plain loops never beat oneDNN: not timed
    } else {
      impl = Int8GemmMode::kAuto;  // to be timed below
    }
  }
  Choice timing{Int8GemmMode::kOneDnn};
  if (impl == Int8GemmMode::kAuto) {
    // Each four times, alternating, the later three timed and the fastest kept: the first call
    // pays oneDNN's primitive creation and the first touch of buffers, and on a shared machine
    // one or two slow samples must not decide for the rest of the run. The results are the same
    // bits, so the rows may be written again.
    onednn_gemm(a, b, rows);
    own_gemm(a, b, rows);
    timing.onednn_us = timing.own_us = std::numeric_limits<int64_t>::max();
    for (int round = 0; round < kTimedRounds; ++round) {
      timing.onednn_us = std::min(timing.onednn_us, time_us([&] { onednn_gemm(a, b, rows); }));
      timing.own_us = std::min(timing.own_us, time_us([&] { own_gemm(a, b, rows); }));
    }
    impl = timing.own_us * 100 <= timing.onednn_us * (100 + kOwnTieMargin) ? Int8GemmMode::kOwn
                                                                          : Int8GemmMode::kOneDnn;
    timed = true;
  } else if (impl == Int8GemmMode::kOwn) {
    own_gemm(a, b, rows);
  } else {
    onednn_gemm(a, b, rows);
  }
  std::lock_guard<std::mutex> lock(choice_mutex);
  Choice& c = choices.try_emplace(key, Choice{impl, Int8GemmMode::kAuto}).first->second;
  c.impl = impl;
  if (timed) {
    c.timed_choice = impl;
    c.own_us = timing.own_us;
    c.onednn_us = timing.onednn_us;
  }
  (impl == Int8GemmMode::kOwn ? c.own_calls : c.onednn_calls) += 1;
}

Int8GemmMode set_int8_gemm_mode(Int8GemmMode m) {
  std::lock_guard<std::mutex> lock(choice_mutex);
  const Int8GemmMode old = mode;
  mode = m;
  return old;
}

std::vector<int64_t> int8_gemm_choices() {
  std::lock_guard<std::mutex> lock(choice_mutex);
  std::vector<int64_t> out;
  for (const auto& [key, c] : choices) {
    const auto [M, N, K, threads] = key;
    for (int64_t v : {M, N, K, threads, static_cast<int64_t>(c.impl), c.own_us, c.onednn_us,
                      c.own_calls, c.onednn_calls})
      out.push_back(v);
  }
  return out;
}

namespace {

// ---- ops: the GEMM alone (tests, benchmarks), the mode, the choices ----
at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_cpu(a, "a");
  check_cpu(b, "b");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "int8_mm: expected 2-D a and b, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == at::kChar && b.scalar_type() == at::kChar,
              "int8_mm: expected int8 a and b, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.size(1) == b.size(0), "int8_mm: a (M, K) @ b (K, N): K ", a.size(1), " != ",
              b.size(0));
  const int64_t N = b.size(1);
  at::Tensor c = at::empty({a.size(0), N}, a.options().dtype(at::kInt));
  int32_t* cp = c.data_ptr<int32_t>();
  int8_gemm(a, b, [&](const int32_t* acc, int64_t r0, int64_t r1) {
    std::memcpy(cp + r0 * N, acc, sizeof(int32_t) * (r1 - r0) * N);
  });
  return c;
}

int64_t int8_gemm_mode_cpu(int64_t m) {
  TORCH_CHECK(m >= 0 && m <= 2, "int8_gemm_mode: expected 0 (auto), 1 (own) or 2 (oneDNN), got ",
              m);
  return static_cast<int64_t>(set_int8_gemm_mode(static_cast<Int8GemmMode>(m)));
}

}  // namespace

TORCH_LIBRARY_IMPL(ryzen_llm, CPU, m) { m.impl("int8_mm", &int8_mm_cpu); }

TORCH_LIBRARY_IMPL(ryzen_llm, CompositeExplicitAutograd, m) {
  m.impl("int8_gemm_mode", TORCH_FN(int8_gemm_mode_cpu));
  m.impl("int8_gemm_choices", TORCH_FN(int8_gemm_choices));
}

}  // namespace ryzen_llm
