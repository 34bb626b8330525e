// The CPU kernels compiled for the avx2 instruction set (dispatch.cpp picks one at run time).
// Every shared header comes before the target pragma, so only code in namespace
// ring_ext::cpu::avx2 is compiled for this target (no inline function differs between builds).
// x86-64 only: setup.py and CMakeLists.txt leave this file out elsewhere and with
// RING_EXT_CPU_ISAS=portable; the guard (the same as in dispatch.cpp) keeps it empty if it is
// compiled anyway.
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(RING_EXT_CPU_PORTABLE_ONLY)
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "../common/lse_math.h"
#include "../common/mask.h"
#include "convert.h"
#include "kernels.h"

#pragma GCC target("avx2,fma,f16c,bmi2")
#define RING_EXT_CPU_ISA avx2
#define RING_EXT_AVX2_TILES \
  1  // tiles_generic.h's AVX2 gemm and row operations (Note [AVX2 micro-kernel])
// clang-format off: the tile primitives come first, flash_impl.h is written against them
#include "tiles_generic.h"
#include "flash_impl.h"
// clang-format on
#endif
