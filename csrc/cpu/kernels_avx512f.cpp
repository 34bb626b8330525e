// The CPU kernels compiled for the avx512f instruction set: AVX-512F/BW/VL/DQ without AVX-512 BF16
// (Skylake-SP, Cascade Lake, Ice Lake Xeons). The tiles of kernels_avx512.cpp on 16 float32 lanes,
// with bf16 inputs converted to float32 tiles while packing (kHasBf16Dot false): no bf16
// instruction is compiled here (tiles_avx512.h leaves them out with RING_EXT_AVX512_BF16 0), so
// these kernels run on any CPU with the four extensions dispatch.cpp checks. Named after AVX-512
// Foundation, the part every AVX-512 CPU has; BW/VL/DQ come with it on every server CPU since
// Skylake-SP. Every shared header comes before the target pragma, so only code in namespace
// ring_ext::cpu::avx512f is compiled for this target (no inline function differs between builds).
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

#ifndef RING_EXT_EMULATE_AVX512
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,bmi2")
#else  // a test build: the intrinsics on AVX2 (Note [Emulated AVX-512] in emulated_avx512.h)
#pragma GCC target("avx2,fma,f16c,bmi2")
#include "emulated_avx512.h"
#endif
#define RING_EXT_CPU_ISA avx512f
#define RING_EXT_AVX512_BF16 0  // bf16 inputs as float32 tiles (tiles_avx512.h)
// clang-format off: the tile primitives come first, flash_impl.h is written against them
#include "tiles_avx512.h"
#include "flash_impl.h"
// clang-format on
#endif
