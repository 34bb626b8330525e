// Test builds only: the AVX-512 intrinsics of kernels_avx512.cpp and kernels_avx512f.cpp emulated
// on AVX2, so their kernels run (and are tested) on a CPU without AVX-512.
//
// Note [Emulated AVX-512]
// The AVX-512 levels (dispatch.cpp) run only on CPUs that have AVX-512, and a build machine may
// not: then the kernel suite never runs them there. Built with RING_EXT_EMULATE_AVX512=<dir>
// (setup.py; <dir> holds SIMDe's simde/ headers, e.g. Debian's libsimde-dev), the two AVX-512 files
// take their intrinsics from SIMDe, which computes each 512-bit operation with AVX2 ones, and are
// compiled for AVX2; the dispatcher then counts an AVX2 CPU as an AVX-512 one (RING_EXT_CPU_ISA
// still forces the lower levels). The same tiling, masks, softmax rows and bf16 pairs run as on
// AVX-512 hardware, so the suite checks their logic against the oracle; what it cannot check is the
// hardware's own rounding of vdpbf16ps and vrcp14ps (emulated exactly, within the tolerances the
// oracle allows). Speed means nothing in such a build: build_info()["emulated_avx512"] says so, and
// benchmarks/bench_kernels.py refuses it. .ci/emulated_avx512.sh builds and runs it.
//
// Included after the file's AVX2 target pragma, so SIMDe (its functions are static) uses AVX2.
#pragma once

#include <immintrin.h>  // first: the native declarations, which SIMDe's aliases then shadow

#include <cstdint>
#include <cstring>

#include "convert.h"

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

// What older SIMDe releases (Debian bookworm's 0.7.4) lack, from Intel's definitions of the
// instructions. A SIMDe that has one defines its alias, and that one is used.
#ifndef _mm512_reduce_max_ps
static inline float ring_ext_emulated_reduce_max_ps(simde__m512 v) {
  float x[16];
  simde_mm512_storeu_ps(x, v);
  float m = x[0];
  for (int i = 1; i < 16; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
#define _mm512_reduce_max_ps ring_ext_emulated_reduce_max_ps
#endif

#ifndef _mm512_reduce_add_ps
// A tree of pairwise sums, halving the width (as the compilers' sequence does).
static inline float ring_ext_emulated_reduce_add_ps(simde__m512 v) {
  float x[16];
  simde_mm512_storeu_ps(x, v);
  for (int width = 8; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) x[i] += x[i + width];
  return x[0];
}
#define _mm512_reduce_add_ps ring_ext_emulated_reduce_add_ps
#endif

#ifndef _mm512_rcp14_ps
// vrcp14ps approximates 1 / x within 2^-14; exact is within that.
static inline simde__m512 ring_ext_emulated_rcp14_ps(simde__m512 v) {
  float x[16];
  simde_mm512_storeu_ps(x, v);
  for (float& f : x) f = 1.0f / f;
  return simde_mm512_loadu_ps(x);
}
#define _mm512_rcp14_ps ring_ext_emulated_rcp14_ps
#endif

#ifndef _mm512_cvtneps_pbh
// 16 float32 -> 16 bf16, rounded to nearest even (as float_to_bf16).
static inline simde__m256i ring_ext_emulated_cvtneps_pbh(simde__m512 v) {
  float x[16];
  uint16_t h[16];
  simde_mm512_storeu_ps(x, v);
  for (int i = 0; i < 16; ++i) h[i] = ring_ext::cpu::float_to_bf16(x[i]);
  return simde_mm256_loadu_si256(h);
}
#define _mm512_cvtneps_pbh ring_ext_emulated_cvtneps_pbh
#endif
