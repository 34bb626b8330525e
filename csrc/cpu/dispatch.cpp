// Picks the kernels' instruction set once, from what this CPU supports. Each kernels_<isa>.cpp
// compiles flash_impl.h into namespace ring_ext::cpu::<isa>. The levels, best first:
//   avx512    AVX-512F/BW/VL/DQ + AVX-512 BF16: bf16 inputs stay bf16 in the products (vdpbf16ps)
//   avx512f   AVX-512F/BW/VL/DQ without BF16 (Skylake-SP, Cascade Lake, Ice Lake): float32 tiles on
//             16 lanes, bf16 inputs converted to float32
//   avx2      AVX2 + FMA: float32 tiles on 8 lanes
//   baseline  the compiler's default for the host (x86-64 SSE2; aarch64 NEON)
// The AVX-512 and AVX2 builds exist only on x86-64, and not at all with RING_EXT_CPU_ISAS=portable
// (setup.py then defines RING_EXT_CPU_PORTABLE_ONLY and leaves their files out); elsewhere
// (aarch64: GH200, GB200) the portable baseline is the only build and needs no detection.
#include <algorithm>
#include <cstdlib>
#include <string>

#include "kernels.h"

// The same condition guards kernels_avx512.cpp, kernels_avx512f.cpp and kernels_avx2.cpp.
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(RING_EXT_CPU_PORTABLE_ONLY)
#define RING_EXT_CPU_X86_ISAS 1
#else
#define RING_EXT_CPU_X86_ISAS 0
#endif

namespace ring_ext::cpu {

#define RING_EXT_DECLARE_ISA(isa)                                 \
  namespace isa {                                                 \
  void flash_fwd(const FwdParams& p, ParallelFor parallel_for);   \
  void flash_bwd(const BwdParams& p, ParallelFor parallel_for);   \
  void lse_merge(const MergeParams& p, ParallelFor parallel_for); \
  }
#if RING_EXT_CPU_X86_ISAS
RING_EXT_DECLARE_ISA(avx512)
RING_EXT_DECLARE_ISA(avx512f)
RING_EXT_DECLARE_ISA(avx2)
#endif
RING_EXT_DECLARE_ISA(baseline)
#undef RING_EXT_DECLARE_ISA

namespace {

// Best first: a level runs on every CPU that runs the one before it.
enum class Isa { kAvx512, kAvx512f, kAvx2, kBaseline };

Isa best() {
#if RING_EXT_CPU_X86_ISAS
  __builtin_cpu_init();
  // A test build runs both AVX-512 levels on AVX2 (Note [Emulated AVX-512] in emulated_avx512.h).
#ifdef RING_EXT_EMULATE_AVX512
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx512;
#endif
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma"))
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512 : Isa::kAvx512f;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

// The best level this CPU has, or a lower one named by RING_EXT_CPU_ISA (avx512f, avx2, baseline:
// tests run the lower levels' kernels on a higher machine that way). A level the CPU lacks, or an
// unknown name, is ignored with the best one kept: the variable can slow the kernels, never break
// them.
Isa detect() {
  const Isa top = best();
  const char* wanted = std::getenv("RING_EXT_CPU_ISA");
  if (wanted == nullptr) return top;
  const std::string name(wanted);
  Isa level = top;
  if (name == "baseline") level = Isa::kBaseline;
  if (name == "avx2") level = Isa::kAvx2;
  if (name == "avx512f") level = Isa::kAvx512f;
  return std::max(level, top);  // the enum is best first: never above what the CPU has
}

const Isa kIsa = detect();

}  // namespace

const char* isa() {
  switch (kIsa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx512f:
      return "avx512f";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

#if RING_EXT_CPU_X86_ISAS
#define RING_EXT_DISPATCH(fn, ...)      \
  switch (kIsa) {                       \
    case Isa::kAvx512:                  \
      return avx512::fn(__VA_ARGS__);   \
    case Isa::kAvx512f:                 \
      return avx512f::fn(__VA_ARGS__);  \
    case Isa::kAvx2:                    \
      return avx2::fn(__VA_ARGS__);     \
    default:                            \
      return baseline::fn(__VA_ARGS__); \
  }
#else
#define RING_EXT_DISPATCH(fn, ...) return baseline::fn(__VA_ARGS__);
#endif

void flash_fwd(const FwdParams& p, ParallelFor pf) { RING_EXT_DISPATCH(flash_fwd, p, pf) }
void flash_bwd(const BwdParams& p, ParallelFor pf) { RING_EXT_DISPATCH(flash_bwd, p, pf) }
void lse_merge(const MergeParams& p, ParallelFor pf) { RING_EXT_DISPATCH(lse_merge, p, pf) }

}  // namespace ring_ext::cpu
