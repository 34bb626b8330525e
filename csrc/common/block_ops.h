// ATen glue shared by every backend: argument checks, output allocation, tensor -> params.
// A backend supplies only its three kernel launchers (BlockKernels); ops_cpu.cpp and ops_cuda.cpp
// register these functions under their dispatch key.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "params.h"

namespace ring_ext {

struct BlockKernels {
  void (*fwd)(const FwdParams&);
  void (*bwd)(const BwdParams&);
  void (*merge)(const MergeParams&);
  // How many kv heads (with their q heads) one bwd call of block_bwd takes, so that its float32
  // dq/dk/dv accumulators exist for one group at a time (Note [Bounded backward accumulators] in
  // block_ops.cpp); nullptr: every head in one call.
  int64_t (*bwd_kv_heads_per_call)(const Shape&) = nullptr;
};

std::tuple<at::Tensor, at::Tensor> block_fwd(const BlockKernels& kernels, const at::Tensor& q,
                                             const at::Tensor& k, const at::Tensor& v, double scale,
                                             bool causal, int64_t q_offset, int64_t k_offset,
                                             bool out_fp32,
                                             const std::optional<at::Tensor>& visible,
                                             double softcap,
                                             const std::optional<at::Tensor>& sinks);

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_bwd(
    const BlockKernels& kernels, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale, bool causal,
    int64_t q_offset, int64_t k_offset, const std::optional<at::Tensor>& dlse,
    const std::optional<at::Tensor>& visible, double softcap);

void block_bwd_acc(const BlockKernels& kernels, const at::Tensor& dout, const at::Tensor& q,
                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                   const at::Tensor& delta, double scale, bool causal, int64_t q_offset,
                   int64_t k_offset, const at::Tensor& dq, const at::Tensor& dk,
                   const at::Tensor& dv, const std::optional<at::Tensor>& visible, double softcap);

void block_merge(const BlockKernels& kernels, const at::Tensor& out, const at::Tensor& lse,
                 const at::Tensor& block_out, const at::Tensor& block_lse);

// Per row of visible key intervals with two intervals per row ([..., 4, rows]: begin, end, begin,
// end): true where the row's two intervals share no key (Note [Two key intervals per row] in
// block_ops.cpp). The block ops check it on CPU, the CP ops on their one host copy.
at::Tensor disjoint_intervals(const at::Tensor& visible);

// softcap: 0 (none) or a positive finite cap; sinks: none, or a float tensor [heads_q], returned
// as float32 contiguous on q's device (Note [Softcap and sinks] in params.h). Both raise
// ValueError naming the argument.
void check_softcap(double softcap);
std::optional<at::Tensor> check_sinks(const std::optional<at::Tensor>& sinks, int64_t heads_q,
                                      const at::Tensor& q);

// Folds each q head's sink into a final float32 result, in place: lse = logaddexp(lse, sink),
// out *= exp(old lse - lse) (Note [Softcap and sinks] in params.h). out [b, s, h, dv], lse
// [b, h, s], sinks float32 [h]. The context-parallel drivers call it once, after the last merge.
void fold_sinks(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& sinks);

// delta = rowsum(dout * out) in float32, [batch, heads, seq] contiguous.
at::Tensor row_delta(const at::Tensor& dout, const at::Tensor& out);

// Registers fwd, bwd, bwd_acc and merge_ for one backend inside its TORCH_LIBRARY_IMPL block.
// Backend::kKernels is that backend's BlockKernels.
template <typename Backend>
void register_block_ops(torch::Library& m) {
  using at::Tensor;
  m.impl("fwd",
         [](const Tensor& q, const Tensor& k, const Tensor& v, double scale, bool causal,
            int64_t q_offset, int64_t k_offset, bool out_fp32, const std::optional<Tensor>& visible,
            double softcap, const std::optional<Tensor>& sinks) {
           return block_fwd(Backend::kKernels, q, k, v, scale, causal, q_offset, k_offset, out_fp32,
                            visible, softcap, sinks);
         });
  m.impl("bwd", [](const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                   const Tensor& out, const Tensor& lse, double scale, bool causal,
                   int64_t q_offset, int64_t k_offset, const std::optional<Tensor>& dlse,
                   const std::optional<Tensor>& visible, double softcap) {
    return block_bwd(Backend::kKernels, dout, q, k, v, out, lse, scale, causal, q_offset, k_offset,
                     dlse, visible, softcap);
  });
  m.impl("bwd_acc", [](const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& lse, const Tensor& delta, double scale, bool causal,
                       int64_t q_offset, int64_t k_offset, const Tensor& dq, const Tensor& dk,
                       const Tensor& dv, const std::optional<Tensor>& visible, double softcap) {
    block_bwd_acc(Backend::kKernels, dout, q, k, v, lse, delta, scale, causal, q_offset, k_offset,
                  dq, dk, dv, visible, softcap);
  });
  m.impl("merge_", [](const Tensor& out, const Tensor& lse, const Tensor& block_out,
                      const Tensor& block_lse) {
    block_merge(Backend::kKernels, out, lse, block_out, block_lse);
  });
}

}  // namespace ring_ext
