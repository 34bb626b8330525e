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

// C[i, j] (+)= sum_kk A(i, kk) B(kk, j), A(i, kk) = a[i * sm + kk * sk], B(kk, j) = b[kk * ldb +
// j].
inline void gemm(const float* a, int64_t sm, int64_t sk, const float* b, int64_t ldb, int64_t m,
                 int64_t n, int64_t k, float* c, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    float* crow = c + i * ldc;
    if (!accumulate) std::fill(crow, crow + n, 0.0f);
    for (int64_t kk = 0; kk < k; ++kk) {
      const float aik = a[i * sm + kk * sk];
      const float* brow = b + kk * ldb;
      for (int64_t j = 0; j < n; ++j) crow[j] += aik * brow[j];
    }
  }
}

// max_j scale * s[j] over begin <= j < end; -inf when the range is empty.
inline float scaled_max(const float* s, int64_t begin, int64_t end, float scale) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = begin; j < end; ++j) mx = std::max(mx, scale * s[j]);
  return mx;
}

// p[j] = exp(scale * s[j] - shift) for begin <= j < end, 0 elsewhere in [0, n_pad); returns
// sum_j p[j].
inline float exp_row(const float* s, int64_t begin, int64_t end, int64_t n_pad, float scale,
                     float shift, float* p) {
  float sum = 0.0f;
  for (int64_t j = 0; j < n_pad; ++j) {
    p[j] = j >= begin && j < end ? fast_exp(scale * s[j] - shift) : 0.0f;
    sum += p[j];
  }
  return sum;
}

inline void scale_row(float* x, int64_t n, float alpha) {
  for (int64_t j = 0; j < n; ++j) x[j] *= alpha;
}

// Backward softmax of one row, in place: s -> P = exp(scale * s - lse) (0 outside [begin, end)),
// dp -> dS = P * (dP - delta).
inline void bwd_row(float* s, float* dp, int64_t begin, int64_t end, int64_t n_pad, float scale,
                    float lse, float delta) {
  for (int64_t j = 0; j < n_pad; ++j) {
    const float pj = j >= begin && j < end ? fast_exp(scale * s[j] - lse) : 0.0f;
    s[j] = pj;
    dp[j] = pj * (dp[j] - delta);
  }
}

}  // namespace ring_ext::cpu::RING_EXT_CPU_ISA
