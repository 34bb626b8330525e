// Picks the kernels' instruction set once, from what this CPU supports. Each kernels_<isa>.cpp
// compiles flash_impl.h into namespace ring_ext::cpu::<isa>. The AVX-512 and AVX2 builds exist only
// on x86-64, and not at all with RING_EXT_CPU_ISAS=portable (setup.py then defines
// RING_EXT_CPU_PORTABLE_ONLY and leaves their files out); elsewhere (aarch64: GH200, GB200) the
// portable baseline is the only build and needs no detection.
#include <cstdlib>
#include <string>

#include "kernels.h"

// The same condition guards kernels_avx512.cpp and kernels_avx2.cpp.
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
RING_EXT_DECLARE_ISA(avx2)
#endif
RING_EXT_DECLARE_ISA(baseline)
#undef RING_EXT_DECLARE_ISA

namespace {

enum class Isa { kAvx512, kAvx2, kBaseline };

Isa best() {
#if RING_EXT_CPU_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bf16"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

// The best level this CPU has, or a lower one named by RING_EXT_CPU_ISA (avx2, baseline: tests run
// the lower levels' kernels on a higher machine that way). A level the CPU lacks, or an unknown
// name, is ignored with the best one kept: the variable can slow the kernels, never break them.
Isa detect() {
  const Isa top = best();
  const char* wanted = std::getenv("RING_EXT_CPU_ISA");
  if (wanted == nullptr) return top;
  const std::string name(wanted);
  if (name == "baseline") return Isa::kBaseline;
  if (name == "avx2" && top != Isa::kBaseline) return Isa::kAvx2;
  return top;
}

const Isa kIsa = detect();

}  // namespace

const char* isa() {
  switch (kIsa) {
    case Isa::kAvx512:
      return "avx512";
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
