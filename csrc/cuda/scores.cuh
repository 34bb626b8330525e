// The two rules of Note [Softcap and sinks] (csrc/common/params.h) as the kernels apply them: a
// score from a dot product (softcap), and a row's final (out, lse) from its running softmax state
// (sinks). Written once for the tensor-core kernels (log2 units, so that exponentials are one ex2)
// and the SIMT kernels (natural units, IEEE expf and logf).
#pragma once

#include <cmath>

#include "../common/params.h"

namespace ring_ext::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x to about 2^-22 relative error (the tensor-core softmax's exponential).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// qk (a raw dot product q . k) -> the score x = scale * qk, capped to c * tanh(x / c) when the
// softcap c > 0, in the units of `unit` (log2 e for log2 units, 1 for natural ones). The backward
// also takes the slope d(capped)/dx = 1 - tanh^2 (1 without a cap), by which dS is multiplied.
struct Scores {
  float scale_unit;  // no cap: scale * unit
  float cap_in;      // cap: scale / c
  float cap_out;     // cap: c * unit; 0 means no cap

  __host__ __device__ static Scores make(float scale, float softcap, float unit) {
    if (softcap > 0.0f) return {0.0f, scale / softcap, softcap * unit};
    return {scale * unit, 0.0f, 0.0f};
  }
  __device__ __forceinline__ float operator()(float qk) const {
    return cap_out == 0.0f ? qk * scale_unit : cap_out * tanhf(qk * cap_in);
  }
  __device__ __forceinline__ float operator()(float qk, float& slope) const {
    if (cap_out == 0.0f) {
      slope = 1.0f;
      return qk * scale_unit;
    }
    const float t = tanhf(qk * cap_in);
    slope = 1.0f - t * t;
    return cap_out * t;
  }
};

// A row's end: out = O * out_scale, lse in natural units.
struct RowEnd {
  float out_scale;
  float lse;
};

// The row's final (out, lse) from its running max m, sum l (of exp(x - m) over the keys it saw)
// and unnormalised output O, with the sink's logit (-inf: no sink), all in log2 units (kLog2) or
// natural ones. The denominator is l e^m + e^sink, taken relative to top = max(m, sink) so that no
// exponential overflows: lse = top + log(l e^(m - top) + e^(sink - top)), out = O e^(m - top) /
// (that sum). Without a sink this is out = O / l, lse = m + log l; a row that saw no key (m = -inf,
// l = 0, O = 0) ends with out = 0 and lse = sink (-inf without one).
template <bool kLog2>
__device__ __forceinline__ RowEnd finish_row(float m, float l, float sink) {
  const float top = fmaxf(m, sink);
  if (top == -INFINITY) return {0.0f, -INFINITY};
  const float a = kLog2 ? exp2f(m - top) : expf(m - top);  // 0 when m = -inf
  const float denom = l * a + (kLog2 ? exp2f(sink - top) : expf(sink - top));
  return {a / denom, kLog2 ? (top + log2f(denom)) * kLn2 : top + logf(denom)};
}

// The sink of q head h in the units of finish_row (-inf when the call has none).
__device__ __forceinline__ float sink_of(const FwdParams& p, int h, float unit) {
  return p.sinks == nullptr ? -INFINITY : p.sinks[h] * unit;
}

}  // namespace ring_ext::cuda
