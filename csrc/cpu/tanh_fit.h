// The rational tanh of the CPU kernels' softcap (tanh8 in tiles_generic.h, tanh16 in
// tiles_avx512.h): tanh(x) ~ x P(x^2) / Q(x^2) for |x| <= 9, P and Q of degree 4 in x^2 (Horner,
// highest first), fitted by tools/fit_tanh.py (least squares reweighted towards the minimax fit;
// it prints these and the error). Evaluated in float32 it stays within 3.5e-7 of tanh on [-9, 9];
// beyond, tanh rounds to 1 and the kernels clamp x. Constants only: safe to include after an
// instruction-set target pragma.
#pragma once

namespace ring_ext::cpu {

inline constexpr float kTanhP[5] = {9.9999990639e-01f, 1.3373238082e-01f, 3.4866296305e-03f,
                                    2.0472607461e-05f, 1.3185284670e-08f};
inline constexpr float kTanhQ[5] = {1.0000000000e+00f, 4.6706534967e-01f, 2.5842161380e-02f,
                                    3.2714630802e-04f, 7.7031009676e-07f};

}  // namespace ring_ext::cpu
