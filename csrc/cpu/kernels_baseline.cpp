// The CPU kernels compiled for the baseline instruction set (dispatch.cpp picks one at run time).
// Every shared header comes before the target pragma, so only code in namespace
// ring_ext::cpu::baseline is compiled for this target (no inline function differs between builds).
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

// no target pragma: the compiler's default for the host (x86-64 SSE2; aarch64 NEON)
#define RING_EXT_CPU_ISA baseline
// clang-format off: the tile primitives come first, flash_impl.h is written against them
#include "tiles_generic.h"
#include "flash_impl.h"
// clang-format on
