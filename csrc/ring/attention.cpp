// torch.ops.ring_ext.attention / attention_bwd: context-parallel attention of this rank's shards,
// dispatched on --context-parallel-algo. One device-generic implementation; each backend's
// registration file registers it (attention.h).
//
//   megatron_cp_algo  ring / double ring over the ring groups                      (ring.h)
//   ulysses_cp_algo   all-to-all to head shards, the block kernel, all-to-all back  (ulysses.h)
//   hybrid_cp_algo    all-to-all inside the Ulysses group, the ring across groups  (both)
//
// Every check that can fail runs before the first transfer, on every rank alike (the shapes agree).
#include "attention.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../common/block_ops.h"
#include "block_calls.h"
#include "comm.h"
#include "ring.h"
#include "schedule.h"
#include "ulysses.h"

namespace ring_ext {
namespace {

struct Groups {
  std::string ring, inner, outer, ulysses;
  ring::GroupNames ring_names() const { return {ring, inner, outer}; }
};

// The op's own checks, before any transfer (ring_ext/validation.py makes them first, with the
// messages users see; these catch direct callers of torch.ops.ring_ext.attention).
void check_shards(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "ring_ext: attention takes 4-D [b, s, heads, d] shards, got q ", q.sizes(),
                    ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                    "ring_ext: k and v must have q's dtype ", q.scalar_type(), ", got ",
                    k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(),
                    "ring_ext: k and v must be on q's device ", q.device(), ", got ", k.device(),
                    ", ", v.device());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "ring_ext: v must have k's shape ", k.sizes(), ", got ",
                    v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
                    "ring_ext: k and v must match q's batch, length and head_dim ", q.sizes(),
                    ", got ", k.sizes());
  TORCH_CHECK_VALUE(k.size(2) >= 1 && q.size(2) % k.size(2) == 0, "ring_ext: kv heads (", k.size(2),
                    ") must divide q heads (", q.size(2), ")");
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale != 0.0,
                    "ring_ext: softmax_scale must be a finite non-zero number, got ", scale);
}

// Gloo's send/recv read host memory and NCCL's device memory: refuse tensors the group cannot move.
void check_backend(const std::string& name, const Tensor& q) {
  if (name.empty()) return;  // the ring or Ulysses code reports a missing group
  const ring::Group pg = ring::resolve_group(name, "context-parallel");
  const c10::DeviceType device = q.device().type();
  std::string backend = "none";
  if (pg->hasBackendForDeviceType(device)) backend = pg->getBackend(device)->getBackendName();
  const bool ok = backend != "none" && (backend != "gloo" || device == c10::DeviceType::CPU) &&
                  (backend != "nccl" || device == c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(ok, "ring_ext: q is on ", q.device(), " but the process group ", name,
                    " has backend ", backend, " for it (gloo serves cpu tensors, nccl cuda ones)");
}

// The Ulysses group's size, checked against the heads before any all-to-all.
int64_t ulysses_degree(const Groups& g, const Tensor& q, const Tensor& k) {
  const int64_t degree = ring::resolve_group(g.ulysses, "Ulysses")->getSize();
  ulysses::kv_replication(q.size(2), k.size(2), degree);  // throws if the heads cannot split
  return degree;
}

// Ulysses' kRows mask: one source, [1, 2, s], for the gathered sequence (ranks' shards in rank
// order, increasing global order: ring_ext/packing.py), or nullopt for the offset mask.
std::optional<Tensor> ulysses_visible(const std::optional<Tensor>& visible,
                                      const std::optional<Tensor>& needed, bool causal,
                                      int64_t rows, const Tensor& q) {
  TORCH_CHECK_VALUE(!needed.has_value(),
                    "ring_ext: needed is the ring's; ulysses_cp_algo takes needed=None");
  if (!visible.has_value()) return std::nullopt;
  TORCH_CHECK_VALUE(!causal,
                    "ring_ext: give causal=False with visible (the intervals hold the mask)");
  return ring::prepare_visible(visible, 1, rows, q.device())[0];
}

// acc in ref's dtype and strides (at::empty_like's): acc itself when it already is and owns its
// whole storage (so no output aliases another), else a copy.
Tensor like(const Tensor& acc, const Tensor& ref) {
  const bool owned = acc.storage().nbytes() == static_cast<size_t>(acc.nbytes());
  if (owned && acc.scalar_type() == ref.scalar_type() && ref.is_non_overlapping_and_dense() &&
      acc.strides() == ref.strides()) {
    return acc;
  }
  return at::empty_like(ref).copy_(acc);
}

// Note [Output contract]
// ----------------------
// attention's output is dense in the caller's layout (as if allocated in that layout and viewed as
// [b, s, h, d]), whatever the strides of q: Megatron-style code .view()s it, and the fake kernel
// (ring_ext/ops.py) promises exactly these strides to torch.compile. The memory order of each
// layout, outermost first, in dims of [b, s, h, d] (ring_ext/layouts.py, MEMORY_ORDER):
//   bshd 0 1 2 3    sbhd, sbh 1 0 2 3    bnsd 0 2 1 3
Tensor empty_in_layout(const Tensor& q, const std::string& layout) {
  std::vector<int64_t> order;
  if (layout == "bshd") {
    order = {0, 1, 2, 3};
  } else if (layout == "sbhd" || layout == "sbh") {
    order = {1, 0, 2, 3};
  } else if (layout == "bnsd") {
    order = {0, 2, 1, 3};
  } else {
    TORCH_CHECK_VALUE(false, "ring_ext: layout must be bshd, sbhd, bnsd or sbh, got ", layout);
  }
  std::vector<int64_t> sizes, back(4);
  for (int64_t i = 0; i < 4; ++i) {
    sizes.push_back(q.size(order[i]));
    back[order[i]] = i;
  }
  return at::empty(sizes, q.options()).permute(back);  // memory in layout order, viewed as bshd
}

std::tuple<Tensor, Tensor> attention_op(const Tensor& q, const Tensor& k, const Tensor& v,
                                        double scale, bool causal, const std::string& algo,
                                        const std::string& group, const std::string& inner,
                                        const std::string& outer, const std::string& ulysses_group,
                                        bool overlap, const std::string& layout,
                                        const std::optional<Tensor>& visible,
                                        const std::optional<Tensor>& needed) {
  check_shards(q, k, v, scale);
  const Tensor out = empty_in_layout(q, layout);  // Note [Output contract]
  const Groups g{group, inner, outer, ulysses_group};
  check_backend(ring::parse_algo(algo) == ring::Algo::kUlysses ? g.ulysses : g.ring, q);
  const ring::Options opt{scale, causal, overlap};
  switch (ring::parse_algo(algo)) {
    case ring::Algo::kRing: {
      const ring::RingSetup s =
          ring::make_setup(g.ring_names(), opt, q.size(1), visible, needed, q.device());
      auto [acc, lse] = ring::forward(q, k, v, s);
      return {out.copy_(acc), lse};
    }
    case ring::Algo::kUlysses: {
      const int64_t u = ulysses_degree(g, q, k);
      const std::optional<Tensor> rows = ulysses_visible(visible, needed, causal, q.size(1) * u, q);
      return ulysses::forward(
          q, k, v, g.ulysses,
          [&](const Tensor& qh, const Tensor& kh, const Tensor& vh) {
            return block_ops().fwd.call(qh, kh, vh, scale, causal, 0, 0, /*out_fp32=*/false, rows);
          },
          out);
    }
    case ring::Algo::kHybrid: {
      const int64_t u = ulysses_degree(g, q, k);
      const ring::RingSetup s =
          ring::make_setup(g.ring_names(), opt, q.size(1) * u, visible, needed, q.device());
      return ulysses::forward(
          q, k, v, g.ulysses,
          [&](const Tensor& qh, const Tensor& kh, const Tensor& vh) {
            return ring::forward(qh, kh, vh, s);
          },
          out);
    }
  }
  TORCH_CHECK(false, "unreachable");
}

// Plain Ulysses' inner backward: the block kernel adds into zeroed float32 accumulators.
std::tuple<Tensor, Tensor, Tensor> block_backward(const Tensor& dout, const Tensor& q,
                                                  const Tensor& k, const Tensor& v,
                                                  const Tensor& lse, const Tensor& delta,
                                                  double scale, bool causal,
                                                  const std::optional<Tensor>& rows) {
  Tensor dq = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  Tensor dk = at::zeros(k.sizes(), k.options().dtype(at::kFloat));
  Tensor dv = at::zeros(v.sizes(), v.options().dtype(at::kFloat));
  block_ops().bwd_acc.call(dout, q, k, v, lse, delta, scale, causal, 0, 0, dq, dk, dv, rows);
  return {dq, dk, dv};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_op(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, double scale, bool causal, const std::string& algo, const std::string& group,
    const std::string& inner, const std::string& outer, const std::string& ulysses_group,
    bool overlap, const std::optional<Tensor>& dlse, const std::optional<Tensor>& visible,
    const std::optional<Tensor>& needed) {
  check_shards(q, k, v, scale);
  const Groups g{group, inner, outer, ulysses_group};
  check_backend(ring::parse_algo(algo) == ring::Algo::kUlysses ? g.ulysses : g.ring, q);
  const ring::Options opt{scale, causal, overlap};
  const ring::Algo which = ring::parse_algo(algo);
  int64_t u = 1;
  if (which != ring::Algo::kRing) u = ulysses_degree(g, q, k);
  std::optional<ring::RingSetup> s;
  std::optional<Tensor> rows;
  if (which != ring::Algo::kUlysses) {
    s = ring::make_setup(g.ring_names(), opt, q.size(1) * u, visible, needed, q.device());
  } else {
    rows = ulysses_visible(visible, needed, causal, q.size(1) * u, q);
  }
  // delta of the final out; a gradient on lse folds in (d lse / d S = P).
  Tensor delta = row_delta(dout, out);
  if (dlse.has_value()) delta = delta - dlse->to(at::kFloat);
  auto [dq, dk, dv] =  // float32
      which == ring::Algo::kRing
          ? ring::backward(dout, q, k, v, lse, delta, *s)
          : ulysses::backward(dout, q, k, v, lse, delta, g.ulysses,
                              [&](const Tensor& d, const Tensor& qh, const Tensor& kh,
                                  const Tensor& vh, const Tensor& l, const Tensor& dl) {
                                if (which == ring::Algo::kUlysses)
                                  return block_backward(d, qh, kh, vh, l, dl, scale, causal, rows);
                                return ring::backward(d, qh, kh, vh, l, dl, *s);
                              });
  return {like(dq, q), like(dk, k), like(dv, v)};  // one rounding, in the inputs' strides
}

}  // namespace

void register_cp_ops(torch::Library& m) {
  m.impl("attention", &attention_op);
  m.impl("attention_bwd", &attention_bwd_op);
  m.impl("all_gather", &ring::all_gather_op);
  m.impl("all_reduce_", &ring::all_reduce_op);
}

}  // namespace ring_ext
