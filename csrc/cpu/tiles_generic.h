// Tile primitives for the builds without AVX-512 (avx2, baseline): the interface of tiles_avx512.h
// in plain loops that the compiler vectorises. Only float32 tiles: bf16 and fp16 inputs are
// converted to float32 when packed. See Note [CPU flash tiling] in flash_impl.h for the tile
// layouts.
//
// Included by kernels_<isa>.cpp after its target pragma, so everything here lives in
// ring_ext::cpu::<isa>.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "convert.h"
#include "exp2_fit.h"
#include "tanh_fit.h"

#if defined(RING_EXT_AVX2_TILES)
#include <immintrin.h>
#endif

namespace ring_ext::cpu::RING_EXT_CPU_ISA {

constexpr bool kHasBf16Dot = false;

// exp(x) for float32 with ~2 ulp error; exp(-inf) = 0. Branch-free so loops over it vectorise.
inline float fast_exp(float x) {
  const float clamped = std::max(x, -87.0f);
  const float n = std::nearbyint(clamped * 1.44269504088896341f);
  float r = clamped - n * 0.693359375f;  // Cody-Waite: ln2 in two parts
  r = r + n * 2.12194440e-4f;
  float poly = 1.0f / 5040;
  poly = poly * r + 1.0f / 720;
  poly = poly * r + 1.0f / 120;
  poly = poly * r + 1.0f / 24;
  poly = poly * r + 1.0f / 6;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const float scale = bits_to_float(uint32_t(int32_t(n) + 127) << 23);
  return x < -87.0f ? 0.0f : poly * scale;
}

#if defined(RING_EXT_AVX2_TILES)
// Note [AVX2 micro-kernel]
// The scheme of Note [AVX-512 micro-kernel] (tiles_avx512.h) with 8-lane float32 vectors: a tile of
// MR <= 6 rows x 16 columns of C stays in 2 * MR ymm registers for the whole k loop; per k step it
// loads two vectors of B, broadcasts MR values of A and issues 2 * MR fused multiply-adds. The
// plain loop below instead loads and stores its row of C at every k step (about 4x slower measured
// on an AVX2-only EPYC, benchmarks/bench_kernels.py).
// With kPrefetch (A rows contiguous along k: sk = 1) it also prefetches the rows of the next tile
// of A, a_next, one 64-byte line per row every 16 k steps, a whole tile ahead of their use. The
// left operands of S = Q K^T and dP = dO V^T are a query block's rows of Q and dO, which come
// from L3 at the first panel of C: without this the backward's S and dP took 15-20% longer than
// dK and dV (same FLOPs; rdtsc around each product, d = 128, s = 4096, one thread). A prefetch is
// a hint that never faults, so rows past the end of A (a_next's tile may have fewer) are harmless.
// With accumulate it prefetches its tile of C before the k loop: the backward's dQ += dS K adds
// into a dQ partial that comes from L3 (2 MiB at s = 4096, d = 128), and without the prefetch
// the load of C after the k loop stalled each tile (dQ took 10-25% longer than dK and dV with the
// same FLOPs; 2-10% with it, rdtsc as above).
//
// Note [AVX2 k loop]
// The k loop runs in chunks of 16 steps, the prefetch of a_next at the start of each chunk and the
// steps of a chunk unrolled by 4. Written as one loop with `kk % 16 == 0` inside, GCC kept the
// test, the branch and the loop counter in every step, about 30 instructions around 12 FMAs (`perf
// annotate` of a one-thread forward). In chunks the same kernels ran 3-10% faster, with identical
// results (benchmarks/ab_kernels.py; docs/kernel_bench.md, 2026-12-06 night).
template <int MR, bool kPrefetch>
void gemm_tile(const float* a, int64_t sm, int64_t sk, const float* b, int64_t ldb, int64_t k,
               float* c, int64_t ldc, bool accumulate, const float* a_next) {
  __m256 acc[MR][2];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {  // C is added at the end: Note [Blocked accumulation]
    acc[i][0] = _mm256_setzero_ps();
    acc[i][1] = _mm256_setzero_ps();
    if (accumulate) {  // the tile of C read after the k loop, fetched during it
      _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 15), _MM_HINT_T0);
    }
  }
  for (int64_t k0 = 0; k0 < k; k0 += 16) {  // in chunks of 16 k steps: Note [AVX2 k loop]
    if (kPrefetch) {
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(a_next + i * sm + k0), _MM_HINT_T0);
    }
    const int64_t k1 = std::min<int64_t>(k, k0 + 16);
#pragma GCC unroll 4
    for (int64_t kk = k0; kk < k1; ++kk) {
      const __m256 b0 = _mm256_loadu_ps(b + kk * ldb), b1 = _mm256_loadu_ps(b + kk * ldb + 8);
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i) {
        const __m256 ai = _mm256_broadcast_ss(a + i * sm + kk * sk);
        acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
      }
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    _mm256_storeu_ps(ci, accumulate ? _mm256_add_ps(_mm256_loadu_ps(ci), acc[i][0]) : acc[i][0]);
    _mm256_storeu_ps(ci + 8,
                     accumulate ? _mm256_add_ps(_mm256_loadu_ps(ci + 8), acc[i][1]) : acc[i][1]);
  }
}

using GemmTileFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*,
                            int64_t, bool, const float*);

inline GemmTileFn gemm_tile_fn(int64_t mr, bool prefetch) {
  static constexpr GemmTileFn kTiles[2][6] = {
      {&gemm_tile<1, false>, &gemm_tile<2, false>, &gemm_tile<3, false>, &gemm_tile<4, false>,
       &gemm_tile<5, false>, &gemm_tile<6, false>},
      {&gemm_tile<1, true>, &gemm_tile<2, true>, &gemm_tile<3, true>, &gemm_tile<4, true>,
       &gemm_tile<5, true>, &gemm_tile<6, true>}};
  return kTiles[prefetch][std::min<int64_t>(mr, 6) - 1];
}
#endif

// Note [Blocked accumulation]
// ---------------------------
// With accumulate, C += A B: the k products are summed from zero and that sum is added to C once,
// never onto C's running value one product at a time. The kernels call gemm once per tile of k
// (query rows for dK/dV, keys for O and dQ) into an accumulator that lives across tiles, so a long
// sequence's sums become blocked sums. That is one rounding at C's magnitude per tile instead of
// one per term, which keeps the float32 error of O, dK and dV from growing with the sequence
// (measured before the change: dK/dV 2.6x the error of PyTorch's CPU attention at S = 2048).
// It costs nothing: the load of C moves from before the k loop to after it.
//
// C[i, j] (+)= sum_kk A(i, kk) B(kk, j), A(i, kk) = a[i * sm + kk * sk], B(kk, j) = b[kk * ldb +
// j]. With RING_EXT_AVX2_TILES the columns in whole 16-column tiles go through the micro-kernel.
inline void gemm(const float* a, int64_t sm, int64_t sk, const float* b, int64_t ldb, int64_t m,
                 int64_t n, int64_t k, float* c, int64_t ldc, bool accumulate) {
  int64_t done = 0;  // columns [0, done) computed by the micro-kernel
#if defined(RING_EXT_AVX2_TILES)
  const bool prefetch = sk == 1;  // Note [AVX2 micro-kernel]
  for (; done + 16 <= n; done += 16)
    for (int64_t m0 = 0; m0 < m; m0 += 6) {
      const float* a_next = a + (m0 + 6 < m ? m0 + 6 : 0) * sm;
      gemm_tile_fn(std::min<int64_t>(6, m - m0), prefetch)(
          a + m0 * sm, sm, sk, b + done, ldb, k, c + m0 * ldc + done, ldc, accumulate, a_next);
    }
#endif
  constexpr int64_t kCols = 64;  // the rest in chunks of columns summed from zero, then added
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j0 = done; j0 < n; j0 += kCols) {
      const int64_t nj = std::min(kCols, n - j0);
      float sum[kCols] = {};
      for (int64_t kk = 0; kk < k; ++kk) {
        const float aik = a[i * sm + kk * sk];
        const float* brow = b + kk * ldb + j0;
        for (int64_t j = 0; j < nj; ++j) sum[j] += aik * brow[j];
      }
      float* crow = c + i * ldc + j0;
      for (int64_t j = 0; j < nj; ++j) crow[j] = accumulate ? crow[j] + sum[j] : sum[j];
    }
  }
}

#if defined(RING_EXT_AVX2_TILES)
// Row operations on 8-lane vectors (the AVX2 build; Note [AVX2 micro-kernel]). The plain loops
// in the #else branch are what the compiler does not vectorise (float reductions, a branch in exp).
inline __m256 lanes_in(int64_t j, int64_t begin, int64_t end) {  // lanes begin <= j + l < end
  const __m256 idx =
      _mm256_add_ps(_mm256_set1_ps(float(j)), _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_and_ps(_mm256_cmp_ps(idx, _mm256_set1_ps(float(begin)), _CMP_GE_OQ),
                       _mm256_cmp_ps(idx, _mm256_set1_ps(float(end)), _CMP_LT_OQ));
}

// Whether the 8 lanes from j are not all inside [begin, end): only those vectors need lanes_in's
// mask (its compares and blend are about a fifth of the row's work; a row sees whole vectors but
// at the edges of its interval).
inline bool edge(int64_t j, int64_t begin, int64_t end) { return j < begin || j + 8 > end; }

// exp on 8 lanes: 2^n P(f), P and the two-part log2(e) from exp2_fit.h, 2^n added to P's exponent
// bits. x below -87 counts as -87 (exp(-87) = 1.6e-38, the smallest normal floats): every caller
// zeroes the lanes outside a row's keys itself, and a backward row that saw no key is zeroed whole
// (bwd_pair), so no -inf needs to come out as 0 here. 13 instructions per vector; the Taylor
// polynomial of fast_exp with a mask for -inf took 17.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2eHi)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fmsub_ps(x, _mm256_set1_ps(kLog2eHi), n);  // x log2(e) - n, in [-1/2, 1/2]
  f = _mm256_fmadd_ps(x, _mm256_set1_ps(kLog2eLo), f);
  __m256 poly = _mm256_set1_ps(kExp2[6]);
  for (int i = 5; i >= 0; --i) poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(kExp2[i]));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);  // n >= -126: no underflow
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(poly), pow2));
}

inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

// max_j scale * s[j] over begin <= j < end; -inf when the range is empty.
inline float scaled_max(const float* s, int64_t begin, int64_t end, float scale) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 sc = _mm256_set1_ps(scale);
  __m256 mx = neg_inf;
  for (int64_t j = begin / 8 * 8; j < end; j += 8) {
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + j), sc);
    if (edge(j, begin, end)) x = _mm256_blendv_ps(neg_inf, x, lanes_in(j, begin, end));
    mx = _mm256_max_ps(mx, x);
  }
  return hmax(mx);
}

// p[j] = exp(scale * s[j] - shift) for begin <= j < end, 0 elsewhere in [0, n_pad) (a multiple of
// 8); returns sum_j p[j].
inline float exp_row(const float* s, int64_t begin, int64_t end, int64_t n_pad, float scale,
                     float shift, float* p) {
  const __m256 sc = _mm256_set1_ps(scale), sh = _mm256_set1_ps(shift);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < n_pad; j += 8) {
    __m256 e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(s + j), sc, sh));
    if (edge(j, begin, end)) e = _mm256_and_ps(e, lanes_in(j, begin, end));
    _mm256_storeu_ps(p + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  return hsum(sum);
}

// Backward softmax of one row, in place: s -> P = exp(scale * s - lse) (0 outside [begin, end)),
// dp -> dS = P * (dP - delta).
inline void bwd_row(float* s, float* dp, int64_t begin, int64_t end, int64_t n_pad, float scale,
                    float lse, float delta) {
  const __m256 sc = _mm256_set1_ps(scale), l = _mm256_set1_ps(lse), dl = _mm256_set1_ps(delta);
  for (int64_t j = 0; j < n_pad; j += 8) {
    __m256 pj = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(s + j), sc, l));
    if (edge(j, begin, end)) pj = _mm256_and_ps(pj, lanes_in(j, begin, end));
    _mm256_storeu_ps(s + j, pj);
    _mm256_storeu_ps(dp + j, _mm256_mul_ps(pj, _mm256_sub_ps(_mm256_loadu_ps(dp + j), dl)));
  }
}

// tanh on 8 lanes: x P(x^2) / Q(x^2) with P, Q of degree 4 in x^2, our fit of tanh on [-9, 9] (|x|
// clamped to 9, where tanh rounds to 1 in float32), within 4e-7 of tanh in float32: no exp, 8 FMAs
// and a reciprocal (the 12-bit estimate and one Newton step), half the cost of 1 - 2 / (exp(2x) +
// 1). The coefficients (kTanhP, kTanhQ) are in tanh_fit.h, with how they were fitted.
inline __m256 tanh8(__m256 y) {
  const __m256 x = _mm256_max_ps(_mm256_min_ps(y, _mm256_set1_ps(9.0f)), _mm256_set1_ps(-9.0f));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(kTanhP[4]), q = _mm256_set1_ps(kTanhQ[4]);
  for (int i = 3; i >= 0; --i) {
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(kTanhP[i]));
    q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(kTanhQ[i]));
  }
  __m256 r = _mm256_rcp_ps(q);
  r = _mm256_mul_ps(r, _mm256_fnmadd_ps(q, r, _mm256_set1_ps(2.0f)));
  return _mm256_mul_ps(_mm256_mul_ps(x, p), r);
}

// Softcap of one row's scores, in place (Note [Softcap and sinks] in csrc/common/params.h), in the
// pass that takes their maximum: s[j] = cap * tanh(scale * s[j] / cap) for j < n_pad (a multiple of
// 8); returns max_j s[j] over begin <= j < end (-inf when empty), scaled_max's job.
inline float softcap_max_row(float* s, int64_t begin, int64_t end, int64_t n_pad, float scale,
                             float cap) {
  const __m256 in = _mm256_set1_ps(scale / cap), c = _mm256_set1_ps(cap);
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 mx = neg_inf;
  for (int64_t j = 0; j < n_pad; j += 8) {
    const __m256 x = _mm256_mul_ps(c, tanh8(_mm256_mul_ps(_mm256_loadu_ps(s + j), in)));
    _mm256_storeu_ps(s + j, x);
    mx = _mm256_max_ps(mx, _mm256_blendv_ps(neg_inf, x, lanes_in(j, begin, end)));
  }
  return hmax(mx);
}

// bwd_row with a softcap: t = tanh(scale * s / cap), s -> P = exp(cap * t - lse),
// dp -> dS = P * (dP - delta) * (1 - t^2) (the derivative of the cap; dS is by the uncapped
// scaled score, as the caller's dq/dk scale by `scale` expects).
inline void bwd_row_softcap(float* s, float* dp, int64_t begin, int64_t end, int64_t n_pad,
                            float scale, float cap, float lse, float delta) {
  const __m256 in = _mm256_set1_ps(scale / cap), c = _mm256_set1_ps(cap);
  const __m256 l = _mm256_set1_ps(lse), dl = _mm256_set1_ps(delta), one = _mm256_set1_ps(1.0f);
  for (int64_t j = 0; j < n_pad; j += 8) {
    const __m256 t = tanh8(_mm256_mul_ps(_mm256_loadu_ps(s + j), in));
    const __m256 pj = _mm256_and_ps(exp8(_mm256_fmsub_ps(t, c, l)), lanes_in(j, begin, end));
    _mm256_storeu_ps(s + j, pj);
    const __m256 ds = _mm256_mul_ps(pj, _mm256_sub_ps(_mm256_loadu_ps(dp + j), dl));
    _mm256_storeu_ps(dp + j, _mm256_mul_ps(ds, _mm256_fnmadd_ps(t, t, one)));
  }
}
#else
// Reductions keep 8 partial results (one per lane of a vector) so that the compiler vectorises them
// without reassociating float sums on its own (which it may not do without -ffast-math).
constexpr int64_t kLanes = 8;

// max_j scale * s[j] over begin <= j < end; -inf when the range is empty.
inline float scaled_max(const float* s, int64_t begin, int64_t end, float scale) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float lane[kLanes];
  std::fill(lane, lane + kLanes, kNegInf);
  int64_t j = begin;
  for (; j + kLanes <= end; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = std::max(lane[l], scale * s[j + l]);
  for (; j < end; ++j) lane[0] = std::max(lane[0], scale * s[j]);
  return *std::max_element(lane, lane + kLanes);
}

// p[j] = exp(scale * s[j] - shift) for begin <= j < end, 0 elsewhere in [0, n_pad) (n_pad a
// multiple of 8); returns sum_j p[j].
inline float exp_row(const float* s, int64_t begin, int64_t end, int64_t n_pad, float scale,
                     float shift, float* p) {
  for (int64_t j = 0; j < n_pad; ++j) {
    const float e = fast_exp(scale * s[j] - shift);
    p[j] = j >= begin && j < end ? e : 0.0f;
  }
  float lane[kLanes] = {};
  for (int64_t j = 0; j < n_pad; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += p[j + l];
  float sum = 0.0f;
  for (float x : lane) sum += x;
  return sum;
}

// Backward softmax of one row, in place: s -> P = exp(scale * s - lse) (0 outside [begin, end)),
// dp -> dS = P * (dP - delta).
inline void bwd_row(float* s, float* dp, int64_t begin, int64_t end, int64_t n_pad, float scale,
                    float lse, float delta) {
  for (int64_t j = 0; j < n_pad; ++j) {
    const float e = fast_exp(scale * s[j] - lse);
    const float pj = j >= begin && j < end ? e : 0.0f;
    s[j] = pj;
    dp[j] = pj * (dp[j] - delta);
  }
}

// Softcap of one row's scores, in place (Note [Softcap and sinks] in csrc/common/params.h):
// s[j] = cap * tanh(scale * s[j] / cap) for j < n_pad; returns their max over [begin, end).
inline float softcap_max_row(float* s, int64_t begin, int64_t end, int64_t n_pad, float scale,
                             float cap) {
  for (int64_t j = 0; j < n_pad; ++j) s[j] = cap * std::tanh(s[j] * (scale / cap));
  return scaled_max(s, begin, end, 1.0f);
}

// bwd_row with a softcap: t = tanh(scale * s / cap), s -> P = exp(cap * t - lse),
// dp -> dS = P * (dP - delta) * (1 - t^2).
inline void bwd_row_softcap(float* s, float* dp, int64_t begin, int64_t end, int64_t n_pad,
                            float scale, float cap, float lse, float delta) {
  for (int64_t j = 0; j < n_pad; ++j) {
    const float t = std::tanh(s[j] * (scale / cap));
    const float e = fast_exp(cap * t - lse);
    const float pj = j >= begin && j < end ? e : 0.0f;
    s[j] = pj;
    dp[j] = pj * (dp[j] - delta) * (1.0f - t * t);
  }
}
#endif

inline void scale_row(float* x, int64_t n, float alpha) {
  for (int64_t j = 0; j < n; ++j) x[j] *= alpha;
}

}  // namespace ring_ext::cpu::RING_EXT_CPU_ISA
