// The exp of the CPU kernels' softmax (exp8 in tiles_generic.h, exp16 in tiles_avx512.h):
// exp(x) = 2^n 2^f with n = round(x log2(e)) and f = x log2(e) - n in [-1/2, 1/2], 2^f ~ P(f) of
// degree 6 (Horner, highest first), fitted by tools/fit_exp2.py (least squares reweighted towards
// the minimax fit; it prints these and the error). The fit is within 1.9e-9 of 2^f; evaluated in
// float32 with fused multiply-adds, within 7.9e-8 (relative). f itself comes from x log2(e) with
// log2(e) in two parts (kLog2eHi + kLog2eLo), so a large |x| does not round it away. Constants
// only: safe to include after an instruction-set target pragma.
#pragma once

namespace ring_ext::cpu {

inline constexpr float kExp2[7] = {1.0000000000e+00f, 6.9314720574e-01f, 2.4022646891e-01f,
                                   5.5503287770e-02f, 9.6184889587e-03f, 1.3399931216e-03f,
                                   1.5345811583e-04f};
// log2(e) = kLog2eHi + kLog2eLo: the float nearest it, and the float nearest the rest
inline constexpr float kLog2eHi = 1.44269502162933349609375f;
inline constexpr float kLog2eLo = 1.925963033500011e-08f;

}  // namespace ring_ext::cpu
