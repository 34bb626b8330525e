// CPU registrations, all of them: the shared ATen glue (common/block_ops.h) with the CPU kernels,
// threaded by at::parallel_for, and context-parallel attention (ring/attention.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/block_ops.h"
#include "../cp/attention.h"
#include "kernels.h"

namespace ring_ext {
namespace {

void parallel_for(int64_t n, const cpu::ChunkFn& fn) {
  at::parallel_for(0, n, /*grain_size=*/1, [&](int64_t begin, int64_t end) { fn(begin, end); });
}

struct CpuBackend {
  static constexpr BlockKernels kKernels{
      [](const FwdParams& p) { cpu::flash_fwd(p, parallel_for); },
      [](const BwdParams& p) { cpu::flash_bwd(p, parallel_for); },
      [](const MergeParams& p) { cpu::lse_merge(p, parallel_for); },
  };
};

}  // namespace
}  // namespace ring_ext

// Every CPU kernel of the ring_ext namespace: the block ops and context-parallel attention.
TORCH_LIBRARY_IMPL(ring_ext, CPU, m) {
  ring_ext::register_block_ops<ring_ext::CpuBackend>(m);
  ring_ext::register_cp_ops(m);
}
