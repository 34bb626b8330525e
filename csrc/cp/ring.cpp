// The ring driver: forward and backward of megatron_cp_algo (ring and double ring) over c10d
// process groups passed by name. One device-generic loop (Note [Streams and waits] in comm.h);
// the schedule comes from schedule.h, the block maths from the registered ring_ext block ops.
//
// Note [K/V gradients]
// --------------------
// In backward each rank keeps Q, dO, O, LSE and dQ; K/V blocks travel exactly as in forward and
// the K/V gradient of a block travels with it along the inner ring, in float32: a rank adds its
// contribution to the partial from the previous rank and sends the sum on; the first holder of a
// block starts from zeros. At the end of each inner round the partial goes straight home to the
// block's owner, which adds it into its float32 dK/dV (the first partial home becomes dK/dV); the
// owner rounds to the input dtype once, at the end. Travelling in float32 keeps the error
// independent of the ring size (rounding to bf16 at every hop adds one bf16 rounding per rank);
// the cost is bytes: per backward step a rank sends K/V in the input dtype plus dK/dV in float32,
// i.e. 3x the bytes of a forward step for bf16 inputs and 2x for float32.
//
// When the partial is waited for is a choice between memory and overlap. On CPU a rank waits for
// it at the start of the step (it was sent at the end of the last one, while this rank posted the
// same) and computes into it: during a step's compute one float32 block exists, and the wait also
// frees the sum sent at the last step. The transfer then no longer hides behind compute (on Gloo it
// takes about 1-2% of a step's compute; the K/V blocks still arrive a step ahead). On CUDA the
// compute stream would idle for that transfer, so the step computes into a zeroed buffer while the
// partial arrives, and adds it after: three float32 blocks during compute (the contribution, the
// partial arriving, the sum on its way). Then the partial coming home (docs/design.md, Memory per
// rank). A double ring with overlap also keeps the previous round's trip home in flight until the
// next round ends, and its dK/dV from the second round on.
//
// Note [Per-source key intervals]
// -------------------------------
// Packed documents and sliding windows (ring_ext/placement.py) replace the zigzag offsets by a mask
// per (local rows, source block): every block that moves has the same number of rows (a shard
// shorter than that is padded at its end inside the K/V pack: Note [Shards of unequal length] in
// attention.cpp), each block lists its tokens in increasing global order, so the keys of src's
// block that local row i sees are one interval, visible[src][:, i]. The masked op's Python kernel
// computes all of them from cu_seqlens (ring_ext/masked.py; no communication: every rank knows
// every rank's tokens). Each step is then one item, all local rows x the held block, with the
// kernels' kRows mask; a step whose block no local row sees computes nothing.
//
// Note [Moving only what is seen]
// -------------------------------
// With key intervals the ring moves, of each block, only the rows its later holders see. Python
// passes `needed` [cp, cp, 2]: the hull of the rows of src's block that rank r's rows see (every
// rank computes the same from the token plan). A hop carries the hull of need[h][src] over the
// holders h it feeds: the rest of the round for an inner hop, every later round for an outer one.
// Both ends compute it from the schedule, and a hop with nothing to carry is not posted. The hulls
// only shrink along a block's path, so what a rank holds always contains what it sees; the step
// computes on those rows, its intervals shifted onto them. Contiguous shards under a causal window
// w <= S/cp: rank r sends rank r+1 the last w-1 rows of its block and nothing else moves (a halo
// exchange). In backward the K/V gradient does not travel with the block (it would have to carry
// every row the block set out with): each holder sends the float32 gradient of the rows it sees
// straight home to the block's owner, one transfer per step as in Note [K/V gradients], and the
// owner adds what comes home into its float32 dK/dV.
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

// A work item in rows; q/k offsets are positions for the causal mask.
struct Rows {
  int64_t q0, nq, k0, nk, q_offset, k_offset;
};

Rows rows_of(const RingSetup& s, const WorkItem& w) {
  if (s.masked()) return {0, s.q_rows, 0, s.rows, 0, 0};  // the one item: every local row
  const int64_t c = s.chunk;
  return {w.q_chunk * c,   w.q_chunks * c, w.kv_chunk * c,
          w.kv_chunks * c, w.q_offset * c, w.k_offset * c};
}

// K and V in one buffer, so each hop is one transfer: [b, rows, heads_kv, d + dv] contiguous, K in
// the first d of the last dim and V in the rest (their head dims may differ: MLA), the rows past
// k's zero (Note [Shards of unequal length] in attention.cpp). K/V gradients travel in the same
// shape, in float32.
Tensor pack_kv(const Tensor& k, const Tensor& v, int64_t rows) {
  if (rows == k.size(1)) return at::cat({k, v}, -1);
  Tensor packed = at::empty({k.size(0), rows, k.size(2), k.size(3) + v.size(3)}, k.options());
  packed.narrow(1, 0, k.size(1)).narrow(3, 0, k.size(3)).copy_(k);
  packed.narrow(1, 0, v.size(1)).narrow(3, k.size(3), v.size(3)).copy_(v);
  packed.narrow(1, k.size(1), rows - k.size(1)).zero_();
  return packed;
}

// K's and V's part of a K/V pack (or of its gradient), rows [k0, k0 + nk); d is K's head dim.
Tensor k_part(const Tensor& kv, int64_t d, int64_t k0, int64_t nk) {
  return kv.narrow(1, k0, nk).narrow(3, 0, d);
}
Tensor v_part(const Tensor& kv, int64_t d, int64_t k0, int64_t nk) {
  return kv.narrow(1, k0, nk).narrow(3, d, kv.size(3) - d);
}

// A block as a rank holds it: rows [base, base + kv.size(1)) of src's K/V pack (all of them
// without key intervals; Note [Moving only what is seen]). Undefined: no row of it is here.
struct Held {
  Tensor kv;
  int64_t base = 0;
};

// True when no local row sees src's block: the step computes nothing.
bool nothing_visible(const RingSetup& s, int64_t src) { return s.masked() && s.seen[src].empty(); }

// The keys one work item reads from the held block: its rows of the held K/V pack and the kRows
// mask shifted onto them (nullopt: the schedule's offsets).
struct Keys {
  int64_t k0, nk;  // rows of held.kv
  std::optional<Tensor> visible;
};

Keys keys_of(const RingSetup& s, const Held& held, int64_t src, const Rows& r) {
  if (!s.masked()) return {r.k0, r.nk, std::nullopt};
  const Span mine = s.seen[src];  // the masked schedule's one item: all local rows
  Tensor visible = s.visible[src];
  if (mine.lo != 0 || mine.size() != s.rows) visible = (visible - mine.lo).clamp(0, mine.size());
  return {mine.lo - held.base, mine.size(), visible};
}

Step step_at(const RingSetup& s, int64_t step) {
  return schedule_step(Algo::kRing, s.topo.cp_size, s.rank, step, s.topo.inner, s.causal);
}

const Hop* find_hop(const Step& st, Payload what) {
  for (const Hop& h : st.hops) {
    if (h.what == what) return &h;
  }
  return nullptr;
}

const Group& group_of(const RingSetup& s, Link link) {
  return link == Link::kInner ? s.inner : link == Link::kOuter ? s.outer : s.ring;
}

// The rows of src's block that a K/V hop posted at `step` carries: what the holders it feeds see
// (Note [Moving only what is seen]); every row without key intervals.
Span carried(const RingSetup& s, int64_t src, int64_t step, Payload what) {
  if (!s.masked()) return {0, s.rows};
  const int64_t round_end = (step / s.topo.inner + 1) * s.topo.inner;
  const int64_t from = what == Payload::kKv ? step + 1 : round_end;
  const int64_t to = what == Payload::kKv ? round_end : s.topo.cp_size;
  Span hull{s.rows, 0};
  for (int64_t t = from; t < to; ++t) {
    const Span n = s.need_of(holder(s.topo, src, t), src);
    if (n.empty()) continue;
    hull = {std::min(hull.lo, n.lo), std::max(hull.hi, n.hi)};
  }
  return hull.empty() ? Span{} : hull;
}

// The first `rows` rows' worth of buf as a contiguous [b, rows, hkv, d + dv] block.
Tensor rows_in(const Tensor& buf, int64_t rows) {
  std::vector<int64_t> sizes = buf.sizes().vec();
  sizes[1] = rows;
  return buf.view(-1).narrow(0, 0, c10::multiply_integers(sizes)).view(sizes);
}

// Rows `rows` of a held block (or of a gradient in its shape), contiguous for c10d.
Tensor held_rows(const Tensor& kv, int64_t base, Span rows) {
  if (rows.lo == base && rows.size() == kv.size(1)) return kv;
  return kv.narrow(1, rows.lo - base, rows.size()).contiguous();
}

// Posts a K/V hop of the schedule at `step`: sends what `held` (src's block) carries on, receives
// what the block next_src carries into buf; `next` is that block once the transfer is waited.
Transfer pass_on(const RingSetup& s, const Hop& h, int64_t step, const Held& held, int64_t src,
                 int64_t next_src, const Tensor& buf, Held& next) {
  const Span out = carried(s, src, step, h.what), in = carried(s, next_src, step, h.what);
  next = {in.empty() ? Tensor() : rows_in(buf, in.size()), in.lo};
  return exchange(group_of(s, h.link), out.empty() ? Tensor() : held_rows(held.kv, held.base, out),
                  h.send_to, next.kv, h.recv_from, tag_of(h.what));
}

// Runs visit(step, plan, held block) for every step, moving the blocks by the plan's K/V hops
// (Note [Double ring schedule]): a round's outer hop is posted before its inner steps, each inner
// hop before the step's compute (after it, and waited at once, without overlap).
template <typename Visit>
void for_each_block(const RingSetup& s, Tensor local_kv, Visit&& visit) {
  const int64_t w = s.topo.inner, n_out = s.topo.outer();
  Tensor inner_buf[2] = {w > 1 ? at::empty_like(local_kv) : Tensor(),
                         w > 2 ? at::empty_like(local_kv) : Tensor()};
  Tensor outer_buf = n_out > 1 ? at::empty_like(local_kv) : Tensor();
  Tensor start_buf = n_out > 1 ? local_kv : Tensor();
  Held round_start{std::move(local_kv), 0}, outer_next;  // a single ring drops it once passed on
  for (int64_t so = 0; so < n_out; ++so) {
    const Step first = step_at(s, so * w);
    const Hop* outer_hop = find_hop(first, Payload::kOuterKv);
    auto post_outer = [&] {
      return pass_on(s, *outer_hop, so * w, round_start, first.src,
                     source(s.topo, s.rank, (so + 1) * w), outer_buf, outer_next);
    };
    Transfer outer;
    if (outer_hop && s.overlap) outer = post_outer();
    Held held = n_out > 1 ? round_start : std::exchange(round_start, Held{});
    for (int64_t si = 0; si < w; ++si) {
      const int64_t step = so * w + si;
      const Step st = si == 0 ? first : step_at(s, step);
      const Hop* kv_hop = find_hop(st, Payload::kKv);
      Held next;
      auto post_inner = [&] {
        return pass_on(s, *kv_hop, step, held, st.src, source(s.topo, s.rank, step + 1),
                       inner_buf[si % 2], next);
      };
      Transfer inner;
      if (kv_hop && s.overlap) inner = post_inner();
      visit(step, st, held);
      if (kv_hop && !s.overlap) inner = post_inner();
      inner.wait();
      if (kv_hop) held = next;
    }
    if (outer_hop && !s.overlap) outer = post_outer();
    outer.wait();
    if (outer_hop) {
      round_start = outer_next;
      std::swap(start_buf, outer_buf);  // the old round start is sent: its buffer takes the next
    }
  }
}

}  // namespace

std::tuple<Tensor, Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const RingSetup& s, const std::optional<Tensor>& sinks) {
  const BlockOps& ops = block_ops();
  const int64_t d = k.size(3);
  // Running result in float32 whatever the input dtype (docs/design.md, Math): out [b, s, hq, dv],
  // lse [b, hq, s]. A block that covers every local row before anything else (the diagonal step)
  // *is* the running result: no zero-filled start and no merge into it.
  Tensor out_acc, lse;
  auto start_empty = [&] {  // out 0, lse -inf: no key seen yet
    out_acc =
        at::zeros({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options().dtype(at::kFloat));
    lse = at::full({q.size(0), q.size(2), q.size(1)}, -INFINITY, q.options().dtype(at::kFloat));
  };
  for_each_block(s, pack_kv(k, v, s.rows), [&](int64_t, const Step& st, const Held& held) {
    if (nothing_visible(s, st.src)) return;
    for (const WorkItem& item : st.items) {
      const Rows r = rows_of(s, item);
      const Keys keys = keys_of(s, held, st.src, r);
      auto [block_out, block_lse] = ops.fwd.call(
          q.narrow(1, r.q0, r.nq), k_part(held.kv, d, keys.k0, keys.nk),
          v_part(held.kv, d, keys.k0, keys.nk), s.scale, item.causal, r.q_offset, r.k_offset,
          /*out_fp32=*/true, keys.visible, s.softcap, std::nullopt);
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
  if (sinks.has_value()) fold_sinks(out_acc, lse, *sinks);  // once per row, after every block
  return {out_acc, lse};
}

namespace {

// Where this rank's own dK/dV come home to, float32 [b, rows, hkv, d + dv]: partials that arrive
// from the ranks that held its block are added into home_ (the first one becomes it: no zero-filled
// start). Both gradient strategies below end there. Every buffer lives while it is computed into or
// in flight, no longer (docs/design.md, Memory per rank).
class GradsHome {
 public:
  // dK/dV of this rank's own block.
  Tensor finish() {
    settle();
    return home_;
  }

 protected:
  GradsHome(const RingSetup& s, const Tensor& packed)
      : s_(s), sizes_(packed.sizes().vec()), f32_(packed.options().dtype(at::kFloat)) {}

  // Posts the send of `out` (may be undefined) to `dst` and the receive of the `rows` of our block
  // that rank `src` sends (none: empty).
  void post(const Tensor& out, int64_t dst, int64_t src, Span rows) {
    settle();
    std::vector<int64_t> sizes = sizes_;
    sizes[1] = rows.size();
    home_rows_ = rows;
    home_in_ = rows.empty() ? Tensor() : at::empty(sizes, f32_);
    home_xfer_ = exchange(s_.ring, out, dst, home_in_, src, tag_of(Payload::kGradHome));
    if (!s_.overlap) settle();
  }

  void settle() {
    if (!home_xfer_.pending()) return;
    home_xfer_.wait();
    if (!home_in_.defined()) return;
    if (home_.defined()) {
      home_.narrow(1, home_rows_.lo, home_rows_.size()).add_(home_in_);
    } else {
      home_ = std::exchange(home_in_, Tensor());
    }
  }

  const RingSetup& s_;
  std::vector<int64_t> sizes_;
  at::TensorOptions f32_;
  Tensor home_, home_in_;
  Span home_rows_;  // the rows of our block home_in_ brings
  Transfer home_xfer_;
};

// Dense: the partial of a block travels with it along the inner ring, and goes home at each round's
// end (Note [K/V gradients]).
class TravellingGrads : public GradsHome {
 public:
  TravellingGrads(const RingSetup& s, const Tensor& packed)
      : GradsHome(s, packed), into_partial_(packed.device().is_cpu()) {}

  // The buffer this step's contribution (src's block) is added into. On CPU, the partial of src's
  // block from the previous holder when one is due (waiting for it here also frees the sum this
  // rank sent at the last step); else, and on CUDA, a zeroed buffer.
  Tensor begin_step(int64_t /*src*/, const Held& /*held*/) {
    if (incoming_buf_.defined() && into_partial_) {
      incoming_.wait();
      return std::exchange(incoming_buf_, Tensor());
    }
    return at::zeros(sizes_, f32_);
  }

  // Adds the partial from the previous holder if it is still due (CUDA) and sends the sum on, or
  // home at a round's end, as the step's schedule says.
  void end_step(int64_t /*step*/, const Step& st, const Tensor& g, const Held& /*held*/) {
    if (incoming_buf_.defined()) {  // the partial posted at the previous step
      incoming_.wait();
      g.add_(std::exchange(incoming_buf_, Tensor()));
    }
    if (const Hop* on = find_hop(st, Payload::kKvGrad)) {
      incoming_buf_ = at::empty(sizes_, f32_);
      incoming_ = exchange(group_of(s_, on->link), g, on->send_to, incoming_buf_, on->recv_from,
                           tag_of(on->what));
      if (!s_.overlap) incoming_.wait();
      return;
    }
    const Hop* home = find_hop(st, Payload::kGradHome);
    if (!home) {  // cp_size 1: the block is our own, and this is its one step
      settle();
      home_ = g;
      return;
    }
    post(g, home->send_to, home->recv_from, {0, s_.rows});
  }

 private:
  const bool into_partial_;  // compute into the arriving partial (CPU), Note [K/V gradients]
  Tensor incoming_buf_;      // a partial due at the next step
  Transfer incoming_;
};

// Key intervals: each holder sends the gradient of the rows of a block it saw straight home (Note
// [Moving only what is seen]); nothing travels with the block.
class HomeGrads : public GradsHome {
 public:
  HomeGrads(const RingSetup& s, const Tensor& packed) : GradsHome(s, packed) {
    home_ = at::zeros(sizes_, f32_);
  }

  // A zeroed buffer in the held block's shape; undefined when this rank sees none of src's rows.
  Tensor begin_step(int64_t src, const Held& held) {
    return s_.need_of(s_.rank, src).empty() ? Tensor() : at::zeros(held.kv.sizes(), f32_);
  }

  // The gradient of the rows of src's block this rank saw goes to src; the rows the rank holding
  // our block saw come home. Posted after the step's compute, added at the next step.
  void end_step(int64_t step, const Step& st, const Tensor& g, const Held& held) {
    const Span mine = s_.need_of(s_.rank, st.src);
    if (st.src == s_.rank) {  // our own block, held whole
      settle();
      if (!mine.empty())
        home_.narrow(1, mine.lo, mine.size()).add_(g.narrow(1, mine.lo, mine.size()));
      return;
    }
    const int64_t from = holder(s_.topo, s_.rank, step);
    post(mine.empty() ? Tensor() : held_rows(g, held.base, mine), st.src, from,
         s_.need_of(from, s_.rank));
  }
};

// Backward over the ring with one of the gradient strategies above.
template <typename Grads>
std::tuple<Tensor, Tensor, Tensor> backward_with(const Tensor& dout, const Tensor& q,
                                                 const Tensor& k, const Tensor& v,
                                                 const Tensor& lse, const Tensor& delta,
                                                 const RingSetup& s) {
  const BlockOps& ops = block_ops();
  const int64_t d = k.size(3);
  Tensor dq = at::zeros(q.sizes(), q.options().dtype(at::kFloat));  // [b, s, hq, d]
  Tensor packed = pack_kv(k, v, s.rows);
  Grads grads(s, packed);
  for_each_block(s, std::move(packed), [&](int64_t step, const Step& st, const Held& held) {
    Tensor g = grads.begin_step(st.src, held);
    // A block nobody here sees adds nothing, but the gradients still move (end_step).
    const std::vector<WorkItem> none;
    for (const WorkItem& item : nothing_visible(s, st.src) ? none : st.items) {
      const Rows r = rows_of(s, item);
      const Keys keys = keys_of(s, held, st.src, r);
      ops.bwd_acc.call(dout.narrow(1, r.q0, r.nq), q.narrow(1, r.q0, r.nq),
                       k_part(held.kv, d, keys.k0, keys.nk), v_part(held.kv, d, keys.k0, keys.nk),
                       lse.narrow(2, r.q0, r.nq), delta.narrow(2, r.q0, r.nq), s.scale, item.causal,
                       r.q_offset, r.k_offset, dq.narrow(1, r.q0, r.nq),
                       k_part(g, d, keys.k0, keys.nk), v_part(g, d, keys.k0, keys.nk), keys.visible,
                       s.softcap);
    }
    grads.end_step(step, st, g, held);
  });
  const Tensor dkv = grads.finish();
  return {dq, k_part(dkv, d, 0, k.size(1)), v_part(dkv, d, 0, k.size(1))};  // the real rows
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& dout, const Tensor& q, const Tensor& k,
                                            const Tensor& v, const Tensor& lse, const Tensor& delta,
                                            const RingSetup& s) {
  if (s.masked()) return backward_with<HomeGrads>(dout, q, k, v, lse, delta, s);
  return backward_with<TravellingGrads>(dout, q, k, v, lse, delta, s);
}

}  // namespace ring
}  // namespace ring_ext
