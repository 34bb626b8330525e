// The ring driver: forward and backward of megatron_cp_algo (ring and double ring) over c10d
// process groups passed by name. One device-generic loop (Note [Streams and waits] in comm.h);
// the schedule comes from schedule.h, the block maths from the registered ring_ext block ops.
//
// Note [K/V gradients]
// --------------------
// In backward each rank keeps Q, dO, O, LSE and dQ; K/V blocks travel exactly as in forward and
// the K/V gradient of a block travels with it along the inner ring, in float32: a rank adds its
// contribution (computed into a zeroed float32 buffer while the partial from the previous rank is
// still in flight) to that partial and sends the sum on. At the end of each inner round the partial
// goes straight home to the block's owner, which adds it into its float32 dK/dV (the first partial
// home becomes dK/dV); the owner rounds to the input dtype once, at the end. Travelling in float32
// keeps the error independent of the ring size (rounding to bf16 at every hop adds one bf16
// rounding per rank); the cost is bytes: per backward step a rank sends K/V in the input dtype plus
// dK/dV in float32, i.e. 3x the bytes of a forward step for bf16 inputs and 2x for float32.
//
// Note [Per-source key intervals]
// -------------------------------
// Packed documents and sliding windows (ring_ext/packing.py) replace the zigzag offsets by a mask
// per (local rows, source block): every rank holds the same number of rows (padded at its end),
// each block lists its tokens in increasing global order, so the keys of src's block that local row
// i sees are one interval, visible[src][:, i]. The Python side computes all of them from
// cu_seqlens (no communication: every rank knows every rank's tokens). Each step is then one item,
// all local rows x the held block, with the kernels' kRows mask; a step whose block no local row
// sees computes nothing (the block still moves on: the ring's later ranks need it).
#include "ring.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/block_ops.h"
#include "block_calls.h"
#include "comm.h"
#include "schedule.h"

namespace ring_ext {
namespace ring {
namespace {

using at::Tensor;

void check_window_groups(const RingSetup& s) {
  TORCH_CHECK(s.topo.cp_size % s.topo.window == 0, "ring_ext: the inner ring size ", s.topo.window,
              " must divide the CP size ", s.topo.cp_size);
  TORCH_CHECK(s.inner->getRank() == s.inner_rank(), "ring_ext: rank ", s.rank,
              " of the ring group must be rank ", s.inner_rank(), " of its inner group, got ",
              s.inner->getRank());
  if (s.topo.outer() == 1) return;
  TORCH_CHECK(s.outer, "ring_ext: a double ring (window ", s.topo.window, " < CP size ",
              s.topo.cp_size, ") needs an outer group");
  TORCH_CHECK(s.outer->getSize() == s.topo.outer() && s.outer->getRank() == s.outer_rank(),
              "ring_ext: the outer group must have size ", s.topo.outer(), " and rank ",
              s.outer_rank(), " here, got size ", s.outer->getSize(), " and rank ",
              s.outer->getRank());
}

}  // namespace

std::vector<Tensor> prepare_visible(const std::optional<Tensor>& visible, int64_t count,
                                    int64_t rows, c10::Device device,
                                    std::vector<bool>* any_visible) {
  if (!visible.has_value()) return {};
  const Tensor& v = *visible;
  TORCH_CHECK_VALUE(v.scalar_type() == at::kLong && v.dim() == 3 && v.size(0) == count &&
                        v.size(1) == 2 && v.size(2) == rows,
                    "ring_ext: visible must be int64 [", count, " source blocks, 2, ", rows,
                    " rows], got ", v.scalar_type(), " ", v.sizes());
  // The one host copy of the intervals: checked here for every device (the kernels' tile skipping
  // relies on monotone intervals; the CUDA block ops do not check them, Note [Row key ranges on
  // the device] in csrc/cuda/launch.cuh).
  const Tensor host = v.cpu();
  TORCH_CHECK_VALUE(
      rows < 2 || (host.narrow(2, 1, rows - 1) >= host.narrow(2, 0, rows - 1)).all().item<bool>(),
      "ring_ext: visible's begins and ends must be non-decreasing along the rows");
  if (any_visible) {
    for (int64_t src = 0; src < count; ++src)
      any_visible->push_back((host[src][1] > host[src][0]).any().item<bool>());
  }
  const Tensor on_device = v.to(device).contiguous();
  std::vector<Tensor> out;
  for (int64_t src = 0; src < count; ++src) out.push_back(on_device[src]);
  return out;
}

RingSetup make_setup(const GroupNames& names, const Options& opt, int64_t local_len,
                     const std::optional<Tensor>& visible, c10::Device device) {
  RingSetup s;
  s.ring = resolve_group(names.ring, "ring");
  s.rank = s.ring->getRank();
  const bool plain = names.inner.empty() || names.inner == names.ring;
  s.inner = plain ? s.ring : resolve_group(names.inner, "inner ring");
  s.outer = names.outer.empty() ? Group() : resolve_group(names.outer, "outer ring");
  s.topo = Topology{s.ring->getSize(), s.inner->getSize()};
  check_window_groups(s);
  const int64_t chunks = chunks_per_rank(opt.causal);
  TORCH_CHECK_VALUE(local_len % chunks == 0,
                    "ring_ext: the sequence length the ring sees on a rank (", local_len,
                    ") must be a multiple of ", chunks, " (causal ring attention shards zigzag)");
  s.chunk = local_len / chunks;
  s.causal = opt.causal;
  s.overlap = opt.overlap;
  s.scale = opt.scale;
  TORCH_CHECK_VALUE(!visible.has_value() || !opt.causal,
                    "ring_ext: give causal=False with visible (the intervals hold the mask)");
  s.visible = prepare_visible(visible, s.topo.cp_size, local_len, device, &s.any_visible);
  return s;
}

namespace {

// A work item in rows; q/k offsets are positions for the causal mask.
struct Rows {
  int64_t q0, nq, k0, nk, q_offset, k_offset;
};

Rows rows_of(const WorkItem& w, int64_t chunk) {
  return {w.q_chunk * chunk,   w.q_chunks * chunk, w.kv_chunk * chunk,
          w.kv_chunks * chunk, w.q_offset * chunk, w.k_offset * chunk};
}

// K and V in one buffer, so each hop is one transfer: [2, b, s, heads_kv, d] contiguous.
Tensor pack_kv(const Tensor& k, const Tensor& v) { return at::stack({k, v}); }

// The kRows mask of src's block (Note [Per-source key intervals]); nullopt: the schedule's offsets.
std::optional<Tensor> visible_for(const RingSetup& s, int64_t src) {
  if (s.visible.empty()) return std::nullopt;
  return s.visible[src];
}

// True when no local row sees src's block: the step computes nothing.
bool nothing_visible(const RingSetup& s, int64_t src) {
  return !s.visible.empty() && !s.any_visible[src];
}

Step plan_at(const RingSetup& s, int64_t step) {
  return plan_step(Algo::kRing, s.topo.cp_size, s.rank, step, s.topo.window, s.causal);
}

const Hop* find_hop(const Step& st, Payload what) {
  for (const Hop& h : st.hops) {
    if (h.what == what) return &h;
  }
  return nullptr;
}

// Posts one hop of the schedule: send `out` and receive into `in` over the hop's group.
Transfer post(const RingSetup& s, const Hop& h, const Tensor& out, const Tensor& in) {
  const Group& group = h.link == Link::kInner ? s.inner : h.link == Link::kOuter ? s.outer : s.ring;
  return exchange(group, out, h.send_to, in, h.recv_from, tag_of(h.what));
}

// Runs visit(step, plan, held K/V block) for every step, moving the blocks by the plan's K/V hops
// (Note [Double ring schedule]): a round's outer hop is posted before its inner steps, each inner
// hop before the step's compute (after it, and waited at once, without overlap).
template <typename Visit>
void for_each_block(const RingSetup& s, const Tensor& local_kv, Visit&& visit) {
  const int64_t w = s.topo.window, n_out = s.topo.outer();
  Tensor round_start = local_kv;
  Tensor outer_next = n_out > 1 ? at::empty_like(local_kv) : Tensor();
  Tensor inner_buf[2] = {w > 1 ? at::empty_like(local_kv) : Tensor(),
                         w > 2 ? at::empty_like(local_kv) : Tensor()};
  for (int64_t so = 0; so < n_out; ++so) {
    const Step first = plan_at(s, so * w);
    const Hop* outer_hop = find_hop(first, Payload::kOuterKv);
    auto post_outer = [&] { return post(s, *outer_hop, round_start, outer_next); };
    Transfer outer;
    if (outer_hop && s.overlap) outer = post_outer();
    Tensor held = round_start;
    for (int64_t si = 0; si < w; ++si) {
      const int64_t step = so * w + si;
      const Step st = si == 0 ? first : plan_at(s, step);
      const Hop* kv_hop = find_hop(st, Payload::kKv);
      const Tensor next = kv_hop ? inner_buf[si % 2] : Tensor();
      auto post_inner = [&] { return post(s, *kv_hop, held, next); };
      Transfer inner;
      if (kv_hop && s.overlap) inner = post_inner();
      visit(step, st, held);
      if (kv_hop && !s.overlap) inner = post_inner();
      inner.wait();
      if (kv_hop) held = next;
    }
    if (outer_hop && !s.overlap) outer = post_outer();
    outer.wait();
    if (outer_hop) std::swap(round_start, outer_next);
  }
}

}  // namespace

std::tuple<Tensor, Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const RingSetup& s) {
  const BlockOps& ops = block_ops();
  // Running result in float32 whatever the input dtype (docs/design.md, Math): out [b, s, hq, d],
  // lse [b, hq, s]. A block that covers every local row before anything else (the diagonal step)
  // *is* the running result: no zero-filled start and no merge into it.
  Tensor out_acc, lse;
  auto start_empty = [&] {  // out 0, lse -inf: no key seen yet
    out_acc = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
    lse = at::full({q.size(0), q.size(2), q.size(1)}, -INFINITY, q.options().dtype(at::kFloat));
  };
  for_each_block(s, pack_kv(k, v), [&](int64_t, const Step& st, const Tensor& held) {
    if (nothing_visible(s, st.src)) return;
    for (const WorkItem& item : st.items) {
      const Rows r = rows_of(item, s.chunk);
      auto [block_out, block_lse] = ops.fwd.call(
          q.narrow(1, r.q0, r.nq), held[0].narrow(1, r.k0, r.nk), held[1].narrow(1, r.k0, r.nk),
          s.scale, item.causal, r.q_offset, r.k_offset, /*out_fp32=*/true, visible_for(s, st.src));
      if (!out_acc.defined() && r.q0 == 0 && r.nq == q.size(1)) {
        out_acc = block_out;
        lse = block_lse;
        continue;
      }
      if (!out_acc.defined()) start_empty();
      ops.merge.call(out_acc.narrow(1, r.q0, r.nq), lse.narrow(2, r.q0, r.nq), block_out,
                     block_lse);
    }
  });
  if (!out_acc.defined()) start_empty();  // no local row saw any key (a rank of padding only)
  return {out_acc, lse};
}

namespace {

// The float32 K/V gradients on their way round the ring: Note [K/V gradients].
class KvGrads {
 public:
  KvGrads(const RingSetup& s, const Tensor& packed)
      : s_(s), sizes_(packed.sizes().vec()), f32_(packed.options().dtype(at::kFloat)) {}

  // A zeroed buffer for this step's contribution.
  Tensor begin_step(int64_t step) {
    Tensor& g = bufs_[(step % s_.topo.window) % 2];
    if (!g.defined()) return g = at::zeros(sizes_, f32_);
    return g.zero_();
  }

  // Adds the partial from the previous holder and sends the sum on (or home at a round's end), as
  // the step's plan says.
  void end_step(int64_t step, const Step& st, Tensor& g) {
    if (has_incoming_) {
      incoming_.wait();
      g.add_(incoming_buf_);
      has_incoming_ = false;
    }
    if (const Hop* on = find_hop(st, Payload::kKvGrad)) {
      if (!incoming_buf_.defined()) incoming_buf_ = at::empty(sizes_, f32_);
      incoming_ = post(s_, *on, g, incoming_buf_);
      has_incoming_ = true;
      if (!s_.overlap) incoming_.wait();
      return;
    }
    settle_home();
    const Hop* home = find_hop(st, Payload::kGradHome);
    if (!home) {  // cp_size 1: the block is our own
      home_ = home_.defined() ? home_.add_(g) : g.clone();
      return;
    }
    // The first partial to come home becomes home_ itself; later ones (double ring) are added.
    if (!home_in_.defined()) home_in_ = at::empty(sizes_, f32_);
    home_xfer_ = post(s_, *home, g, home_in_);
    std::swap(bufs_[(step % s_.topo.window) % 2], spare_);  // keep the buffer in flight untouched
    if (!s_.overlap) settle_home();
  }

  // dK/dV of this rank's own block, float32 [2, b, s, hkv, d].
  Tensor finish() {
    settle_home();
    return home_;
  }

 private:
  void settle_home() {
    if (!home_xfer_.pending()) return;
    home_xfer_.wait();
    if (home_.defined()) {
      home_.add_(home_in_);
    } else {
      home_ = std::exchange(home_in_, Tensor());  // no zero-filled start, no add
    }
  }

  const RingSetup& s_;
  std::vector<int64_t> sizes_;
  at::TensorOptions f32_;
  Tensor home_, bufs_[2], spare_, incoming_buf_, home_in_;
  Transfer incoming_, home_xfer_;
  bool has_incoming_ = false;  // a partial from the previous holder is due at the next step
};

}  // namespace

std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& dout, const Tensor& q, const Tensor& k,
                                            const Tensor& v, const Tensor& lse, const Tensor& delta,
                                            const RingSetup& s) {
  const BlockOps& ops = block_ops();
  Tensor dq = at::zeros(q.sizes(), q.options().dtype(at::kFloat));  // [b, s, hq, d]
  const Tensor packed = pack_kv(k, v);
  KvGrads grads(s, packed);
  for_each_block(s, packed, [&](int64_t step, const Step& st, const Tensor& held) {
    Tensor g = grads.begin_step(step);
    // A block nobody here sees adds nothing, but its gradient partial still moves on (end_step).
    const std::vector<WorkItem> none;
    for (const WorkItem& item : nothing_visible(s, st.src) ? none : st.items) {
      const Rows r = rows_of(item, s.chunk);
      ops.bwd_acc.call(dout.narrow(1, r.q0, r.nq), q.narrow(1, r.q0, r.nq),
                       held[0].narrow(1, r.k0, r.nk), held[1].narrow(1, r.k0, r.nk),
                       lse.narrow(2, r.q0, r.nq), delta.narrow(2, r.q0, r.nq), s.scale, item.causal,
                       r.q_offset, r.k_offset, dq.narrow(1, r.q0, r.nq), g[0].narrow(1, r.k0, r.nk),
                       g[1].narrow(1, r.k0, r.nk), visible_for(s, st.src));
    }
    grads.end_step(step, st, g);
  });
  const Tensor dkv = grads.finish();
  return {dq, dkv[0], dkv[1]};
}

// Flattened schedule for tests: per step [src, n_items, n_hops, then 7 fields per item, then 4 per
// hop (payload, link, send_to, recv_from)].
std::vector<int64_t> schedule_op(const std::string& algo, int64_t cp_size, int64_t rank,
                                 int64_t window, bool causal) {
  TORCH_CHECK(cp_size >= 1 && rank >= 0 && rank < cp_size, "ring_ext: rank ", rank,
              " must be in [0, cp_size=", cp_size, ")");
  TORCH_CHECK(window >= 1 && cp_size % window == 0, "ring_ext: window ", window,
              " must divide cp_size ", cp_size);
  std::vector<int64_t> flat;
  for (int64_t step = 0; step < cp_size; ++step) {
    const Step st = plan_step(parse_algo(algo), cp_size, rank, step, window, causal);
    flat.insert(flat.end(), {st.src, static_cast<int64_t>(st.items.size()),
                             static_cast<int64_t>(st.hops.size())});
    for (const WorkItem& w : st.items) {
      flat.insert(flat.end(), {w.q_chunk, w.q_chunks, w.kv_chunk, w.kv_chunks,
                               static_cast<int64_t>(w.causal), w.q_offset, w.k_offset});
    }
    for (const Hop& h : st.hops) {
      flat.insert(flat.end(), {static_cast<int64_t>(h.what), static_cast<int64_t>(h.link),
                               h.send_to, h.recv_from});
    }
  }
  return flat;
}

Algo parse_algo(const std::string& name) {
  if (name == "megatron_cp_algo") return Algo::kRing;
  if (name == "ulysses_cp_algo") return Algo::kUlysses;
  if (name == "hybrid_cp_algo") return Algo::kHybrid;
  TORCH_CHECK_VALUE(false, "ring_ext: context_parallel_algo must be ulysses_cp_algo, ",
                    "megatron_cp_algo or hybrid_cp_algo, got ", name);
}

void check_ring_algo(Algo algo) {
  TORCH_CHECK_VALUE(algo == Algo::kRing || algo == Algo::kHybrid,
                    "ring_ext: only megatron_cp_algo and hybrid_cp_algo have a ring schedule; "
                    "ulysses_cp_algo moves data by all-to-all");
}

}  // namespace ring
}  // namespace ring_ext
