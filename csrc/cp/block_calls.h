// The registered block ops (ring_ext::fwd, merge_, bwd_acc) called through the dispatcher, so the
// same driver code runs the CPU or the CUDA kernels, whichever the tensors' device selects.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace ring_ext {

using at::Tensor;

// The registered block ops, called through the dispatcher (CPU or CUDA kernels alike).
struct BlockOps {
  using Fwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double, bool,
                                         int64_t, int64_t, bool, const std::optional<Tensor>&,
                                         double, const std::optional<Tensor>&);
  using BwdAcc = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&, double, bool, int64_t, int64_t, const Tensor&, const Tensor&,
                      const Tensor&, const std::optional<Tensor>&, double);
  c10::TypedOperatorHandle<Fwd> fwd =
      c10::Dispatcher::singleton().findSchemaOrThrow("ring_ext::fwd", "").typed<Fwd>();
  c10::TypedOperatorHandle<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&)> merge =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ring_ext::merge_", "")
          .typed<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
  c10::TypedOperatorHandle<BwdAcc> bwd_acc =
      c10::Dispatcher::singleton().findSchemaOrThrow("ring_ext::bwd_acc", "").typed<BwdAcc>();
};

inline const BlockOps& block_ops() {
  static const BlockOps ops;
  return ops;
}

}  // namespace ring_ext
