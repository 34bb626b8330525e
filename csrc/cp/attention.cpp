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

#include <algorithm>
#include <cmath>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../common/block_ops.h"
#include "block_calls.h"
#include "comm.h"
#include "consistency.h"
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
  TORCH_CHECK_VALUE(k.sizes().slice(0, 3) == v.sizes().slice(0, 3),
                    "ring_ext: v must have k's batch, length and heads ", k.sizes(),
                    " (its head dim may differ), got ", v.sizes());
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
  ulysses::check_heads(q.size(2), k.size(2), degree);  // throws if the heads cannot split
  return degree;
}

// Ulysses' kRows mask: one source, [1, 2, s], for the gathered sequence (ranks' shards in rank
// order, increasing global order: ring_ext/placement.py), or nullopt for the offset mask.
std::optional<Tensor> ulysses_visible(const std::optional<Tensor>& visible,
                                      const std::optional<Tensor>& needed, bool causal,
                                      int64_t rows, const Tensor& q) {
  TORCH_CHECK_VALUE(!needed.has_value(),
                    "ring_ext: needed is the ring's; ulysses_cp_algo takes needed=None");
  if (!visible.has_value()) return std::nullopt;
  TORCH_CHECK_VALUE(!causal,
                    "ring_ext: give causal=False with visible (the intervals hold the mask)");
  return ring::prepare_visible(visible, 1, rows, rows, q.device())[0];
}

// Note [Head groups]
// ------------------
// Attention is independent per K/V head (with the q heads of its GQA group), so a call may run its
// heads in groups, one after the other. On CPU every context-parallel call runs one K/V head at a
// time: the float32 accumulators (out, dq, dK/dV), the ring's blocks and gradients in flight and
// the kernels' packed copies then exist for one head only, and what a rank holds beyond its inputs
// and outputs is a small fraction of them (docs/design.md, Memory per rank). The ring then moves
// each group's blocks separately: the same bytes in G times the messages, each still a whole
// block of one head (S/cp x d elements). Ulysses moves its heads one group at a time as well
// (Note [Ulysses head groups] in ulysses.cpp), so a rank gathers one head's sequence at a time. On
// CUDA a call takes every head at once: one launch per block must fill the GPU, and each message
// costs NCCL a launch (measuring a grouped CUDA ring awaits a GPU).
int64_t head_groups(const Tensor& k) { return k.device().is_cpu() ? k.size(-2) : 1; }

// Group g of G of x's heads: [b, s, h, d], or [b, P, sl, h, d] (Ulysses' received chunks, as
// [b, s, h / G, d]: a view where each tensor has a receive buffer of its own (CPU), a copy of one
// group at a time out of a fused one); lse and delta [b, h, s] with dim 1.
Tensor heads(const Tensor& x, int64_t g, int64_t G, int64_t dim = 2) {
  if (x.dim() == 5) dim = 3;
  const int64_t n = x.size(dim) / G;
  const Tensor group = x.narrow(dim, g * n, n);
  return x.dim() == 5 ? group.flatten(1, 2) : group;
}

// The [b, s, h, d] shape of x ([b, s, h, d] or [b, P, sl, h, d]).
std::vector<int64_t> seq_shape(const Tensor& x) {
  if (x.dim() == 4) return x.sizes().vec();
  return {x.size(0), x.size(1) * x.size(2), x.size(3), x.size(4)};
}

// fwd(q, k, v, sinks of these q heads or none) on one head group.
using GroupFwd = std::function<std::tuple<Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&)>;
using GroupBwd = std::function<std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>;

// Runs fwd on each head group (Note [Head groups]), writing its output into dest's heads (rounded
// to dest's dtype); returns lse, float32 [b, hq, s]. sinks: float32 [hq] or none.
Tensor forward_by_heads(const Tensor& q, const Tensor& k, const Tensor& v, const GroupFwd& fwd,
                        const Tensor& dest, const std::optional<Tensor>& sinks) {
  const int64_t G = head_groups(k);
  Tensor lse;
  for (int64_t g = 0; g < G; ++g) {
    std::optional<Tensor> group_sinks;
    if (sinks.has_value()) group_sinks = heads(*sinks, g, G, 0);
    auto [out, group_lse] = fwd(heads(q, g, G), heads(k, g, G), heads(v, g, G), group_sinks);
    heads(dest, g, G).copy_(out);
    if (G == 1) return group_lse;
    if (!lse.defined()) {
      const std::vector<int64_t> shape = seq_shape(q);
      lse = at::empty({shape[0], shape[2], shape[1]}, group_lse.options());
    }
    heads(lse, g, G, 1).copy_(group_lse);
  }
  return lse;
}

// Ulysses' inner forward: fwd on each head group of the gathered heads, into a new [b, s, h, d]
// (one group: fwd's own output, which ulysses::forward rounds).
ulysses::InnerFwd gathered_by_heads(GroupFwd fwd) {
  return [fwd = std::move(fwd)](const Tensor& qh, const Tensor& kh, const Tensor& vh,
                                const std::optional<Tensor>& sinks) {
    if (head_groups(kh) == 1) return fwd(heads(qh, 0, 1), heads(kh, 0, 1), heads(vh, 0, 1), sinks);
    std::vector<int64_t> shape = seq_shape(qh);
    shape[3] = seq_shape(vh)[3];  // out has v's head dim
    Tensor out_h = at::empty(shape, qh.options());
    Tensor lse_h = forward_by_heads(qh, kh, vh, fwd, out_h, sinks);
    return std::make_tuple(out_h, lse_h);
  };
}

// Runs bwd (float32 gradients) on each head group, writing them into dq, dk, dv (rounded to their
// dtypes).
void backward_by_heads(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& lse, const Tensor& delta, const GroupBwd& bwd,
                       const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  const int64_t G = head_groups(k);
  for (int64_t g = 0; g < G; ++g) {
    auto [dq_g, dk_g, dv_g] = bwd(heads(dout, g, G), heads(q, g, G), heads(k, g, G), heads(v, g, G),
                                  heads(lse, g, G, 1), heads(delta, g, G, 1));
    heads(dq, g, G).copy_(dq_g);
    heads(dk, g, G).copy_(dk_g);
    heads(dv, g, G).copy_(dv_g);
  }
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
//   bshd, thd 0 1 2 3    sbhd, sbh 1 0 2 3    bnsd 0 2 1 3
Tensor empty_in_layout(const Tensor& q, int64_t dv, const std::string& layout) {
  std::vector<int64_t> order;
  if (layout == "bshd" || layout == "thd") {  // thd: [1, t, h, d], the memory of bshd
    order = {0, 1, 2, 3};
  } else if (layout == "sbhd" || layout == "sbh") {
    order = {1, 0, 2, 3};
  } else if (layout == "bnsd") {
    order = {0, 2, 1, 3};
  } else {
    TORCH_CHECK_VALUE(false, "ring_ext: layout must be bshd, sbhd, bnsd, sbh or thd, got ", layout);
  }
  std::vector<int64_t> sizes, back(4);
  for (int64_t i = 0; i < 4; ++i) {
    sizes.push_back(order[i] == 3 ? dv : q.size(order[i]));  // the output has v's head dim
    back[order[i]] = i;
  }
  return at::empty(sizes, q.options()).permute(back);  // memory in layout order, viewed as bshd
}

// Note [Shards of unequal length]
// -------------------------------
// A placement of packed documents or of a sliding window (ring_ext/placement.py) gives ranks a few
// tokens more or fewer. The blocks that move are all `rows` long (the longest shard; rows = 0:
// q's length), but q, k, v, the output and the gradients hold only this rank's real tokens: the
// padding lives in buffers the op fills anyway, as zero rows at their end that no key interval
// reaches: the ring's K/V pack (ring.cpp, pack_kv), Ulysses' all-to-all send buffers (ulysses.cpp)
// and the rows that come back are cut to the real ones as they are stored. So the output is
// dense in the caller's layout on every rank and no input is copied to be padded.
int64_t block_rows(int64_t rows, const Tensor& q) {
  if (rows == 0) return q.size(1);
  TORCH_CHECK_VALUE(rows >= q.size(1), "ring_ext: rows (", rows,
                    ") must be at least q's sequence length ", q.size(1));
  return rows;
}

std::tuple<Tensor, Tensor> attention_op(const Tensor& q, const Tensor& k, const Tensor& v,
                                        double scale, bool causal, const std::string& algo,
                                        const std::string& group, const std::string& inner,
                                        const std::string& outer, const std::string& ulysses_group,
                                        bool overlap, const std::string& layout,
                                        const std::optional<Tensor>& visible,
                                        const std::optional<Tensor>& needed, int64_t rows,
                                        const std::string& check_group, int64_t signature,
                                        double softcap, const std::optional<Tensor>& sinks_in) {
  check_shards(q, k, v, scale);
  check_softcap(softcap);
  const std::optional<Tensor> sinks = check_sinks(sinks_in, q.size(2), q);
  const int64_t local_len = block_rows(rows, q);
  const Tensor out = empty_in_layout(q, v.size(3), layout);  // Note [Output contract]
  const Groups g{group, inner, outer, ulysses_group};
  check_backend(ring::parse_algo(algo) == ring::Algo::kUlysses ? g.ulysses : g.ring, q);
  cp::check_across_ranks(check_group, {q, k, v, local_len, scale, causal, algo, overlap, layout,
                                       visible.has_value(), signature, softcap, sinks.has_value()});
  const ring::Options opt{scale, softcap, causal, overlap};
  switch (ring::parse_algo(algo)) {
    case ring::Algo::kRing: {
      const ring::RingSetup s =
          ring::make_setup(g.ring_names(), opt, local_len, q.size(1), visible, needed, q.device());
      const Tensor lse = forward_by_heads(
          q, k, v,
          [&](const Tensor& qg, const Tensor& kg, const Tensor& vg,
              const std::optional<Tensor>& sg) { return ring::forward(qg, kg, vg, s, sg); },
          out, sinks);
      return {out, lse};
    }
    case ring::Algo::kUlysses: {
      const int64_t u = ulysses_degree(g, q, k);
      const std::optional<Tensor> rows_mask =
          ulysses_visible(visible, needed, causal, local_len * u, q);
      const GroupFwd kernel = [&](const Tensor& qg, const Tensor& kg, const Tensor& vg,
                                  const std::optional<Tensor>& sg) {
        return block_ops().fwd.call(qg, kg, vg, scale, causal, 0, 0, /*out_fp32=*/false, rows_mask,
                                    softcap, sg);
      };
      return ulysses::forward(q, k, v, g.ulysses, gathered_by_heads(kernel), out,
                              head_groups(k) > 1, local_len, sinks);
    }
    case ring::Algo::kHybrid: {
      const int64_t u = ulysses_degree(g, q, k);
      const ring::RingSetup s = ring::make_setup(g.ring_names(), opt, local_len * u, local_len * u,
                                                 visible, needed, q.device());
      const GroupFwd ring_fwd = [&](const Tensor& qg, const Tensor& kg, const Tensor& vg,
                                    const std::optional<Tensor>& sg) {
        return ring::forward(qg, kg, vg, s, sg);
      };
      return ulysses::forward(q, k, v, g.ulysses, gathered_by_heads(ring_fwd), out,
                              head_groups(k) > 1, local_len, sinks);
    }
  }
  TORCH_CHECK(false, "unreachable");
}

// Note [Ulysses row chunks]
// -------------------------
// Plain Ulysses' inner backward runs one gathered head group over the whole sequence, so the
// kernels' working set (Q and dO packed in float32, a float32 dQ partial per thread) would be the
// whole sequence's: P times what a ring step packs, and on CPU, where a rank holds one head group
// at a time (Note [Head groups]), the largest part of what a Ulysses rank holds beyond its shards.
// On CPU the backward therefore runs the gathered rows in chunks of kUlyssesRowChunk: each chunk is
// one bwd_acc over every key (its causal offset or its rows of the visible intervals), adding into
// the same float32 dK/dV and into float32 dQ rows of its own, which are rounded into dq at once (a
// chunk's rows see all their keys in it, so their dQ is final). The working set is then a chunk's,
// for one more packing of K/V per chunk (s * d values, against chunk * s * d multiply-adds). On
// CUDA one call takes every row: a launch must fill the GPU.
constexpr int64_t kUlyssesRowChunk = 1024;

// Plain Ulysses' inner backward: the block kernel adds into zeroed float32 accumulators, in row
// chunks on CPU (Note [Ulysses row chunks]; dq then comes back in q's dtype).
std::tuple<Tensor, Tensor, Tensor> block_backward(const Tensor& dout, const Tensor& q,
                                                  const Tensor& k, const Tensor& v,
                                                  const Tensor& lse, const Tensor& delta,
                                                  double scale, bool causal,
                                                  const std::optional<Tensor>& rows,
                                                  double softcap) {
  Tensor dk = at::zeros(k.sizes(), k.options().dtype(at::kFloat));
  Tensor dv = at::zeros(v.sizes(), v.options().dtype(at::kFloat));
  const int64_t s = q.size(1), chunk = q.is_cpu() ? kUlyssesRowChunk : s;
  if (chunk >= s) {
    Tensor dq = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
    block_ops().bwd_acc.call(dout, q, k, v, lse, delta, scale, causal, 0, 0, dq, dk, dv, rows,
                             softcap);
    return {dq, dk, dv};
  }
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dq_rows = at::empty({q.size(0), chunk, q.size(2), q.size(3)}, dk.options());
  for (int64_t r = 0; r < s; r += chunk) {
    const int64_t n = std::min(chunk, s - r);
    const Tensor acc = dq_rows.narrow(1, 0, n).zero_();
    std::optional<Tensor> chunk_rows;  // [2 or 4, n], contiguous as the kernels read it
    if (rows.has_value()) chunk_rows = rows->narrow(1, r, n).contiguous();
    block_ops().bwd_acc.call(dout.narrow(1, r, n), q.narrow(1, r, n), k, v, lse.narrow(2, r, n),
                             delta.narrow(2, r, n), scale, causal, /*q_offset=*/r, 0, acc, dk, dv,
                             chunk_rows, softcap);
    dq.narrow(1, r, n).copy_(acc);
  }
  return {dq, dk, dv};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_op(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, double scale, bool causal, const std::string& algo, const std::string& group,
    const std::string& inner, const std::string& outer, const std::string& ulysses_group,
    bool overlap, const std::optional<Tensor>& dlse, const std::optional<Tensor>& visible,
    const std::optional<Tensor>& needed, int64_t rows, double softcap) {
  check_shards(q, k, v, scale);
  check_softcap(softcap);
  const int64_t local_len = block_rows(rows, q);
  const Groups g{group, inner, outer, ulysses_group};
  check_backend(ring::parse_algo(algo) == ring::Algo::kUlysses ? g.ulysses : g.ring, q);
  const ring::Options opt{scale, softcap, causal, overlap};
  const ring::Algo which = ring::parse_algo(algo);
  int64_t u = 1;
  if (which != ring::Algo::kRing) u = ulysses_degree(g, q, k);
  std::optional<ring::RingSetup> s;
  std::optional<Tensor> rows_mask;
  if (which == ring::Algo::kRing) {
    s = ring::make_setup(g.ring_names(), opt, local_len, q.size(1), visible, needed, q.device());
  } else if (which == ring::Algo::kHybrid) {
    s = ring::make_setup(g.ring_names(), opt, local_len * u, local_len * u, visible, needed,
                         q.device());
  } else {
    rows_mask = ulysses_visible(visible, needed, causal, local_len * u, q);
  }
  // delta of the final out; a gradient on lse folds in (d lse / d S = P).
  Tensor delta = row_delta(dout, out);
  if (dlse.has_value()) delta = delta - dlse->to(at::kFloat);
  const GroupBwd group_bwd = [&](const Tensor& d, const Tensor& qg, const Tensor& kg,
                                 const Tensor& vg, const Tensor& l, const Tensor& dl) {
    if (which == ring::Algo::kUlysses)
      return block_backward(d, qg, kg, vg, l, dl, scale, causal, rows_mask, softcap);
    return ring::backward(d, qg, kg, vg, l, dl, *s);
  };
  if (which == ring::Algo::kRing) {  // one rounding per group, into the inputs' strides
    Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
    backward_by_heads(dout, q, k, v, lse, delta, group_bwd, dq, dk, dv);
    return {dq, dk, dv};
  }
  // Ulysses' head shards: one head group returns its float32 gradients, which the trip back
  // rounds as it packs them; several round each group here, except gradients of K/V heads that
  // several ranks read, summed after the trip back (those travel in float32): Note [One
  // all-to-all per direction].
  const bool shared = ulysses::shares_kv_heads(q.size(2), k.size(2), u);
  auto [dq, dk, dv] = ulysses::backward(
      dout, q, k, v, lse, delta, g.ulysses,
      [&](const Tensor& d, const Tensor& qh, const Tensor& kh, const Tensor& vh, const Tensor& l,
          const Tensor& dl) {
        if (head_groups(kh) == 1)
          return group_bwd(heads(d, 0, 1), heads(qh, 0, 1), heads(kh, 0, 1), heads(vh, 0, 1), l,
                           dl);
        const at::TensorOptions kv = kh.options().dtype(shared ? at::kFloat : kh.scalar_type());
        Tensor dqh = at::empty(seq_shape(qh), qh.options()), dkh = at::empty(seq_shape(kh), kv),
               dvh = at::empty(seq_shape(vh), kv);
        backward_by_heads(d, qh, kh, vh, l, dl, group_bwd, dqh, dkh, dvh);
        return std::make_tuple(dqh, dkh, dvh);
      },
      head_groups(k) > 1, local_len);
  return {like(dq, q), like(dk, k), like(dv, v)};  // in the inputs' dtype and strides
}

}  // namespace

void register_cp_ops(torch::Library& m) {
  m.impl("attention", &attention_op);
  m.impl("attention_bwd", &attention_bwd_op);
  m.impl("all_gather", &ring::all_gather_op);
  m.impl("all_reduce_", &ring::all_reduce_op);
}

}  // namespace ring_ext
