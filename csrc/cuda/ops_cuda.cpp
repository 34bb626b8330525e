// CUDA registrations, all of them (block ops and context-parallel attention): the shared ATen glue
// (common/block_ops.h) with the CUDA kernel launchers. The glue holds a DeviceGuard for the inputs'
// device, so each launcher queues its kernel on that device's current stream; nothing here
// synchronises the host.
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include "../common/block_ops.h"
#include "../cp/attention.h"
#include "kernels.h"

namespace ring_ext {
namespace {

struct CudaBackend {
  static constexpr BlockKernels kKernels{
      [](const FwdParams& p) { cuda::flash_fwd(p, at::cuda::getCurrentCUDAStream()); },
      [](const BwdParams& p) { cuda::flash_bwd(p, at::cuda::getCurrentCUDAStream()); },
      [](const MergeParams& p) { cuda::lse_merge(p, at::cuda::getCurrentCUDAStream()); },
  };
};

}  // namespace
}  // namespace ring_ext

// Every CUDA kernel of the ring_ext namespace: the block ops and context-parallel attention.
TORCH_LIBRARY_IMPL(ring_ext, CUDA, m) {
  ring_ext::register_block_ops<ring_ext::CudaBackend>(m);
  ring_ext::register_cp_ops(m);
}
