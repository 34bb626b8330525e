// CPU kernels: blockwise flash attention forward/backward and the LSE merge. Torch-free: threads
// come from the ParallelFor the caller passes (at::parallel_for in ops_cpu.cpp). The instruction
// set (AVX-512 with BF16, AVX-512 without, AVX2, or baseline x86-64) is picked once at run time,
// see dispatch.cpp.
#pragma once

#include <cstdint>
#include <functional>

#include "../common/params.h"

namespace ring_ext::cpu {

// Runs fn(begin, end) over disjoint chunks covering [0, n), possibly on several threads.
using ChunkFn = std::function<void(int64_t begin, int64_t end)>;
using ParallelFor = void (*)(int64_t n, const ChunkFn& fn);

// Keys per backward task (one key block: flash_impl.h's kBlockK). ops_cpu.cpp sizes the head groups
// of the one-process backward by it (Note [Bounded backward accumulators] in block_ops.cpp).
constexpr int64_t kBwdKeysPerTask = 64;

void flash_fwd(const FwdParams& p, ParallelFor parallel_for);
void flash_bwd(const BwdParams& p, ParallelFor parallel_for);  // adds into p.dq, p.dk, p.dv
void lse_merge(const MergeParams& p, ParallelFor parallel_for);

// The instruction set the kernels run with on this machine: "avx512" (with BF16), "avx512f"
// (without), "avx2" or "baseline".
const char* isa();

}  // namespace ring_ext::cpu
