// The CPU kernels compiled for the avx2 instruction set (dispatch.cpp picks one at run time).
// Every shared header comes before the target pragma, so only code in namespace
// ring_ext::cpu::avx2 is compiled for this target (no inline function differs between builds).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <vector>

#include "../common/lse_math.h"
#include "convert.h"
#include "kernels.h"

#pragma GCC target("avx2,fma,f16c,bmi2")
#define RING_EXT_CPU_ISA avx2
// clang-format off: the tile primitives come first, flash_impl.h is written against them
#include "tiles_generic.h"
#include "flash_impl.h"
// clang-format on
