// Tile primitives for the AVX-512 builds: register-blocked matrix products on packed tiles (float32
// FMA and bf16 pairs with vdpbf16ps), and the vectorised row operations of the softmax.
// flash_impl.h is written against this interface; tiles_generic.h gives the same one in plain loops
// for the other builds. See Note [CPU flash tiling] in flash_impl.h for the tile layouts.
//
// Included after the target pragma by kernels_avx512.cpp (RING_EXT_AVX512_BF16 1: AVX-512 BF16
// CPUs) and kernels_avx512f.cpp (RING_EXT_AVX512_BF16 0: AVX-512F/BW/VL/DQ without BF16, e.g. Ice
// Lake and Cascade Lake Xeons), so everything here lives in ring_ext::cpu::<isa> and is compiled
// for that target only. Without BF16 every bf16 intrinsic below is left out by the preprocessor
// (not merely unused), and bf16 inputs are converted to float32 tiles while packing.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "exp2_fit.h"
#include "tanh_fit.h"

#if !defined(RING_EXT_AVX512_BF16)
#error "define RING_EXT_AVX512_BF16 (1 or 0) before including tiles_avx512.h"
#endif

namespace ring_ext::cpu::RING_EXT_CPU_ISA {

// With BF16, bf16 inputs stay bf16 in the matrix products (vdpbf16ps, float32 accumulation);
// without, they are float32 tiles like every other dtype.
constexpr bool kHasBf16Dot = RING_EXT_AVX512_BF16 != 0;

// ---- register-blocked matrix products
// -------------------------------------------------------------
//
// Note [AVX-512 micro-kernel]
// C[m, n] (+)= sum_k A(m, k) B(k, n) with every operand in float32 accumulators:
//   A(i, k)  at a[i * sm + k * sk]      any strides, so A may be a tile or a transposed tile;
//   B(k, :)  at b[k * ldb ...]          packed, n contiguous and zero-padded to a multiple of 16;
//   C(i, :)  at c[i * ldc ...]          float32, n a multiple of 16.
// One k step is one element for float32 tiles, and one *pair* of elements for bf16 tiles: A(i, k)
// is then the pair (A[i, 2k], A[i, 2k+1]) read as 32 bits, B's row k holds pairs [n][2], and
// vdpbf16ps adds both products of a pair. A tile of kMR rows x NV*16 columns of C lives in
// kMR*NV <= 24 zmm registers for the whole k loop; per k step it loads NV vectors of B, broadcasts
// kMR values of A and issues kMR*NV fused multiply-adds:
//
//            B(k, 0:16) B(k, 16:32) ... (NV vectors)
//   A(0, k)  c00        c01
//   A(1, k)  c10        c11
//    ...     (kMR rows)
constexpr int64_t kMR = 6;
constexpr int kMaxNV = 4;

template <int MR, int NV>
void gemm_tile(const float* a, int64_t sm, int64_t sk, const float* b, int64_t ldb, int64_t k,
               float* c, int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[i][v] = _mm512_setzero_ps();  // C is added at the end: Note [Blocked accumulation]
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + kk * ldb + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i * sm + kk * sk]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(ai, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* cv = c + i * ldc + 16 * v;
      _mm512_storeu_ps(cv, accumulate ? _mm512_add_ps(_mm512_loadu_ps(cv), acc[i][v]) : acc[i][v]);
    }
}

#if RING_EXT_AVX512_BF16
template <int MR, int NV>
void gemm_tile(const uint16_t* a, int64_t sm, int64_t sk, const uint16_t* b, int64_t ldb, int64_t k,
               float* c, int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[i][v] = _mm512_setzero_ps();  // C is added at the end: Note [Blocked accumulation]
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + kk * ldb + 32 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, a + i * sm + kk * sk, sizeof(pair));
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], ai, bv[v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* cv = c + i * ldc + 16 * v;
      _mm512_storeu_ps(cv, accumulate ? _mm512_add_ps(_mm512_loadu_ps(cv), acc[i][v]) : acc[i][v]);
    }
}
#endif  // RING_EXT_AVX512_BF16

template <typename T>
using GemmTileFn = void (*)(const T*, int64_t, int64_t, const T*, int64_t, int64_t, float*, int64_t,
                            bool);

template <typename T, int NV>
GemmTileFn<T> gemm_tile_rows(int64_t mr) {
  switch (mr) {
    case 1:
      return &gemm_tile<1, NV>;
    case 2:
      return &gemm_tile<2, NV>;
    case 3:
      return &gemm_tile<3, NV>;
    case 4:
      return &gemm_tile<4, NV>;
    case 5:
      return &gemm_tile<5, NV>;
    default:
      return &gemm_tile<6, NV>;
  }
}

template <typename T>
GemmTileFn<T> gemm_tile_fn(int64_t mr, int64_t nv) {
  switch (nv) {
    case 1:
      return gemm_tile_rows<T, 1>(mr);
    case 2:
      return gemm_tile_rows<T, 2>(mr);
    case 3:
      return gemm_tile_rows<T, 3>(mr);
    default:
      return gemm_tile_rows<T, 4>(mr);
  }
}

// C[m, n] (+)= A B over k steps (Note [AVX-512 micro-kernel]); n is a multiple of 16.
template <typename T>
void gemm(const T* a, int64_t sm, int64_t sk, const T* b, int64_t ldb, int64_t m, int64_t n,
          int64_t k, float* c, int64_t ldc, bool accumulate) {
  constexpr int64_t step = sizeof(T) == 4 ? 1 : 2;  // elements per k step
  for (int64_t n0 = 0; n0 < n; n0 += 16 * kMaxNV) {
    const int64_t nv = std::min<int64_t>(kMaxNV, (n - n0) / 16);
    for (int64_t m0 = 0; m0 < m; m0 += kMR) {
      const int64_t mr = std::min(kMR, m - m0);
      gemm_tile_fn<T>(mr, nv)(a + m0 * sm, sm, sk, b + n0 * step, ldb, k, c + m0 * ldc + n0, ldc,
                              accumulate);
    }
  }
}

// ---- row operations (float32, 16 lanes; n_pad is a multiple of 16)
// --------------------------------

// exp on 16 lanes: 2^n P(f), as exp8 in tiles_generic.h (P and the two-part log2(e) from
// exp2_fit.h; x below -87 counts as -87, the callers zero the lanes outside a row's keys), 2^n
// applied by vscalefps. 11 instructions per vector, where the Taylor polynomial with a mask for
// -inf took 15 (the speed is measured at the AVX2 level only: docs/kernel_bench.md).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2eHi)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fmsub_ps(x, _mm512_set1_ps(kLog2eHi), n);  // x log2(e) - n, in [-1/2, 1/2]
  f = _mm512_fmadd_ps(x, _mm512_set1_ps(kLog2eLo), f);
  __m512 poly = _mm512_set1_ps(kExp2[6]);
  for (int i = 5; i >= 0; --i) poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(kExp2[i]));
  return _mm512_scalef_ps(poly, n);
}

// Lanes j0 + l < n of a 16-lane chunk starting at j0.
inline __mmask16 valid_lanes(int64_t j0, int64_t n) {
  const int64_t left = n - j0;
  return left >= 16 ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// Lanes begin <= j0 + l < end of a 16-lane chunk starting at j0.
inline __mmask16 valid_lanes(int64_t j0, int64_t begin, int64_t end) {
  return valid_lanes(j0, end) & __mmask16(~valid_lanes(j0, begin));
}

#if RING_EXT_AVX512_BF16
// 16 float32 -> 16 bf16 (round to nearest even).
inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }
#endif  // RING_EXT_AVX512_BF16

// max_j scale * s[j] over begin <= j < end; -inf when the range is empty.
inline float scaled_max(const float* s, int64_t begin, int64_t end, float scale) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 mx = neg_inf;
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t j = begin / 16 * 16; j < end; j += 16) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + j), sc);
    mx = _mm512_mask_max_ps(mx, valid_lanes(j, begin, end), mx, x);
  }
  return _mm512_reduce_max_ps(mx);
}

// p[j] = exp(scale * s[j] - shift) for begin <= j < end, 0 elsewhere in [0, n_pad); returns
// sum_j p[j] of the float32 values: a bf16 P is rounded as it is stored, after the sum, so the row
// sum and lse are float32-accurate at every level (the AVX2 and baseline levels keep P in float32)
// and P V alone sees the rounding, as in GPU flash attention.
inline float exp_row(const float* s, int64_t begin, int64_t end, int64_t n_pad, float scale,
                     float shift, float* p) {
  __m512 sum = _mm512_setzero_ps();
  const __m512 sc = _mm512_set1_ps(scale), sh = _mm512_set1_ps(shift);
  for (int64_t j = 0; j < n_pad; j += 16) {
    const __m512 e = _mm512_maskz_mov_ps(valid_lanes(j, begin, end),
                                         exp16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), sc, sh)));
    _mm512_storeu_ps(p + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

#if RING_EXT_AVX512_BF16
inline float exp_row(const float* s, int64_t begin, int64_t end, int64_t n_pad, float scale,
                     float shift, uint16_t* p) {
  __m512 sum = _mm512_setzero_ps();
  const __m512 sc = _mm512_set1_ps(scale), sh = _mm512_set1_ps(shift);
  for (int64_t j = 0; j < n_pad; j += 16) {
    const __m512 e = _mm512_maskz_mov_ps(valid_lanes(j, begin, end),
                                         exp16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), sc, sh)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), to_bf16(e));
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}
#endif  // RING_EXT_AVX512_BF16

inline void scale_row(float* x, int64_t n, float alpha) {
  const __m512 a = _mm512_set1_ps(alpha);
  for (int64_t j = 0; j < n; j += 16)
    _mm512_storeu_ps(x + j, _mm512_mul_ps(_mm512_loadu_ps(x + j), a));
}

// Backward softmax of one row, in place: s -> P = exp(scale * s - lse) (0 outside [begin, end)),
// dp -> dS = P * (dP - delta).
inline void bwd_row(float* s, float* dp, int64_t begin, int64_t end, int64_t n_pad, float scale,
                    float lse, float delta) {
  const __m512 sc = _mm512_set1_ps(scale), l = _mm512_set1_ps(lse), dl = _mm512_set1_ps(delta);
  for (int64_t j = 0; j < n_pad; j += 16) {
    const __m512 pj = _mm512_maskz_mov_ps(valid_lanes(j, begin, end),
                                          exp16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), sc, l)));
    _mm512_storeu_ps(s + j, pj);
    _mm512_storeu_ps(dp + j, _mm512_mul_ps(pj, _mm512_sub_ps(_mm512_loadu_ps(dp + j), dl)));
  }
}

// tanh on 16 lanes: the rational fit of tanh8 in tiles_generic.h (tanh_fit.h), the reciprocal from
// the 14-bit estimate and one Newton step.
inline __m512 tanh16(__m512 y) {
  const __m512 x = _mm512_max_ps(_mm512_min_ps(y, _mm512_set1_ps(9.0f)), _mm512_set1_ps(-9.0f));
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(kTanhP[4]), q = _mm512_set1_ps(kTanhQ[4]);
  for (int i = 3; i >= 0; --i) {
    p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(kTanhP[i]));
    q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(kTanhQ[i]));
  }
  __m512 r = _mm512_rcp14_ps(q);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.0f)));
  return _mm512_mul_ps(_mm512_mul_ps(x, p), r);
}

// Softcap of one row's scores, in place (Note [Softcap and sinks] in csrc/common/params.h), in the
// pass that takes their maximum: s[j] = cap * tanh(scale * s[j] / cap) for j < n_pad (a multiple
// of 16); returns max_j s[j] over begin <= j < end (-inf when empty).
inline float softcap_max_row(float* s, int64_t begin, int64_t end, int64_t n_pad, float scale,
                             float cap) {
  const __m512 in = _mm512_set1_ps(scale / cap), c = _mm512_set1_ps(cap);
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n_pad; j += 16) {
    const __m512 x = _mm512_mul_ps(c, tanh16(_mm512_mul_ps(_mm512_loadu_ps(s + j), in)));
    _mm512_storeu_ps(s + j, x);
    mx = _mm512_mask_max_ps(mx, valid_lanes(j, begin, end), mx, x);
  }
  return _mm512_reduce_max_ps(mx);
}

// bwd_row with a softcap: t = tanh(scale * s / cap), s -> P = exp(cap * t - lse),
// dp -> dS = P * (dP - delta) * (1 - t^2).
inline void bwd_row_softcap(float* s, float* dp, int64_t begin, int64_t end, int64_t n_pad,
                            float scale, float cap, float lse, float delta) {
  const __m512 in = _mm512_set1_ps(scale / cap), c = _mm512_set1_ps(cap);
  const __m512 l = _mm512_set1_ps(lse), dl = _mm512_set1_ps(delta), one = _mm512_set1_ps(1.0f);
  for (int64_t j = 0; j < n_pad; j += 16) {
    const __m512 t = tanh16(_mm512_mul_ps(_mm512_loadu_ps(s + j), in));
    const __m512 pj =
        _mm512_maskz_mov_ps(valid_lanes(j, begin, end), exp16(_mm512_fmsub_ps(t, c, l)));
    _mm512_storeu_ps(s + j, pj);
    const __m512 ds = _mm512_mul_ps(pj, _mm512_sub_ps(_mm512_loadu_ps(dp + j), dl));
    _mm512_storeu_ps(dp + j, _mm512_mul_ps(ds, _mm512_fnmadd_ps(t, t, one)));
  }
}

#if RING_EXT_AVX512_BF16
// dst[j] = bf16(x[j]) for j < n.
inline void store_bf16_row(const float* x, int64_t n, uint16_t* dst) {
  for (int64_t j = 0; j < n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), to_bf16(_mm512_loadu_ps(x + j)));
}

// Two rows interleaved into pairs: dst[2j] = bf16(r0[j]), dst[2j + 1] = bf16(r1[j]) for j < n.
inline void store_bf16_row_pairs(const float* r0, const float* r1, int64_t n, uint16_t* dst) {
  for (int64_t j = 0; j < n; j += 16) {
    const __m256i a = to_bf16(_mm512_loadu_ps(r0 + j)), b = to_bf16(_mm512_loadu_ps(r1 + j));
    const __m256i lo = _mm256_unpacklo_epi16(a, b);  // pairs 0-3 | 8-11
    const __m256i hi = _mm256_unpackhi_epi16(a, b);  // pairs 4-7 | 12-15
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * j),
                        _mm256_permute2x128_si256(lo, hi, 0x20));  // pairs 0-7
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * j + 16),
                        _mm256_permute2x128_si256(lo, hi, 0x31));  // pairs 8-15
  }
}
#endif  // RING_EXT_AVX512_BF16

}  // namespace ring_ext::cpu::RING_EXT_CPU_ISA
