// CPU registrations, all of them: the shared ATen glue (common/block_ops.h) with the CPU kernels,
// threaded by at::parallel_for, and context-parallel attention (ring/attention.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../common/block_ops.h"
#include "../cp/attention.h"
#include "kernels.h"

namespace ring_ext {
namespace {

void parallel_for(int64_t n, const cpu::ChunkFn& fn) {
  at::parallel_for(0, n, /*grain_size=*/1, [&](int64_t begin, int64_t end) { fn(begin, end); });
}

// Note [Bounded backward accumulators] (block_ops.cpp): the fewest kv heads per backward call that
// give every thread at least 8 tasks (key blocks of a (batch, kv head)) to balance. Long sequences
// need one head (16k tokens: 256 tasks per head), short ones take several (their accumulators are
// small).
int64_t bwd_kv_heads_per_call(const Shape& s) {
  const auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / std::max<int64_t>(b, 1); };
  const int64_t tasks_per_head = s.batch * ceil_div(s.seq_k, cpu::kBwdKeysPerTask);
  return ceil_div(8 * int64_t(at::get_num_threads()), tasks_per_head);
}

struct CpuBackend {
  static constexpr BlockKernels kKernels{
      [](const FwdParams& p) { cpu::flash_fwd(p, parallel_for); },
      [](const BwdParams& p) { cpu::flash_bwd(p, parallel_for); },
      [](const MergeParams& p) { cpu::lse_merge(p, parallel_for); },
      bwd_kv_heads_per_call,
  };
};

}  // namespace
}  // namespace ring_ext

// Every CPU kernel of the ring_ext namespace: the block ops and context-parallel attention.
TORCH_LIBRARY_IMPL(ring_ext, CPU, m) {
  ring_ext::register_block_ops<ring_ext::CpuBackend>(m);
  ring_ext::register_cp_ops(m);
}
