// CUDA registrations of the block ops: the shared ATen glue (common/block_ops.h) with the CUDA
// kernel launchers plugged in. Kernels run on the current CUDA stream of the inputs' device.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/block_ops.h"
#include "cuda/kernels.h"

namespace ring_ext {
namespace {

const BlockKernels kCudaKernels{
    [](const FwdParams& p) { cuda::flash_fwd(p, at::cuda::getCurrentCUDAStream()); },
    [](const BwdParams& p) { cuda::flash_bwd(p, at::cuda::getCurrentCUDAStream()); },
    [](const MergeParams& p) { cuda::lse_merge(p, at::cuda::getCurrentCUDAStream()); },
};

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, double scale, bool causal,
                                            int64_t q_offset, int64_t k_offset, bool out_fp32) {
  const c10::cuda::CUDAGuard guard(q.device());
  return block_fwd(kCudaKernels, q, k, v, scale, causal, q_offset, k_offset, out_fp32);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(const at::Tensor& dout,
                                                        const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const at::Tensor& out,
                                                        const at::Tensor& lse, double scale,
                                                        bool causal, int64_t q_offset,
                                                        int64_t k_offset) {
  const c10::cuda::CUDAGuard guard(q.device());
  return block_bwd(kCudaKernels, dout, q, k, v, out, lse, scale, causal, q_offset, k_offset);
}

void bwd_acc_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta, double scale,
                  bool causal, int64_t q_offset, int64_t k_offset, const at::Tensor& dq,
                  const at::Tensor& dk, const at::Tensor& dv) {
  const c10::cuda::CUDAGuard guard(q.device());
  block_bwd_acc(kCudaKernels, dout, q, k, v, lse, delta, scale, causal, q_offset, k_offset, dq, dk,
                dv);
}

void merge_cuda(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& block_out,
                const at::Tensor& block_lse) {
  const c10::cuda::CUDAGuard guard(out.device());
  block_merge(kCudaKernels, out, lse, block_out, block_lse);
}

}  // namespace
}  // namespace ring_ext

TORCH_LIBRARY_IMPL(ring_ext, CUDA, m) {
  m.impl("fwd", &ring_ext::fwd_cuda);
  m.impl("bwd", &ring_ext::bwd_cuda);
  m.impl("bwd_acc", &ring_ext::bwd_acc_cuda);
  m.impl("merge_", &ring_ext::merge_cuda);
}
