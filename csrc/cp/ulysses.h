// Ulysses context parallelism: all-to-all from sequence shards to head shards, attention over the
// whole sequence for heads/P heads, all-to-all back (docs/design.md, Algorithms).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>

namespace ring_ext::ulysses {

// Attention of head-sharded tensors over the whole (Ulysses-gathered) sequence. Plain Ulysses runs
// the block kernel; hybrid runs the ring over the ring group. q, k, v (and dout) come as views
// [b, P, sl, h, d] of the receive buffer (of the inputs themselves when P = 1): the sequence s = P
// * sl in P chunks; lse and delta as [b, h, s]; results are [b, s, h, d] (v's head dim for out).
//   fwd(q, k, v, sinks) -> (out [b, s, h, dv] in q's dtype or float32, lse float32 [b, h, s]);
//     sinks: float32 [h], the sinks of these q heads, or none
//   bwd(dout, q, k, v, lse, delta) -> (dq, dk, dv), delta = rowsum(dout * out); float32 (or any
//     dtype: the trip back rounds them to the inputs' dtype, or keeps float32 where more is summed
//     after it, dK/dV of replicated GQA heads)
using InnerFwd = std::function<std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>;
using InnerBwd = std::function<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&)>;

// Throws ValueError (naming the rule) when the heads cannot split over `degree` ranks: q heads
// fewer than the degree, or K/V heads not dividing q heads. Any other count splits (Note [Ulysses
// head split] in ulysses.cpp).
void check_heads(int64_t heads_q, int64_t heads_kv, int64_t degree);

// Some K/V head goes to more than one rank (GQA with fewer K/V heads than ranks, or an uneven
// split): its gradients come back from each and are summed, so the inner backward keeps them in
// float32.
bool shares_kv_heads(int64_t heads_q, int64_t heads_kv, int64_t degree);

// q [b, s_local, hq, d], k [b, s_local, hkv, d], v [b, s_local, hkv, dv] -> (out, lse float32
// [b, hq, s_local]), the output written into `out` [b, s_local, hq, dv] (any strides and dtype,
// e.g. dense in the caller's layout) and returned. sinks: float32 [hq] or none; inner gets its
// heads'. by_head: one K/V head group at a time (CPU; Note [Ulysses head groups] in ulysses.cpp).
// rows >= s_local: the length every rank's shard counts as in the gathered sequence (Note [Shards
// of unequal length] in attention.cpp).
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const std::string& group,
                                           const InnerFwd& inner, const at::Tensor& out,
                                           bool by_head, int64_t rows,
                                           const std::optional<at::Tensor>& sinks);

// Gradients of forward (the inputs' dtypes and, where dense, strides; float32 dK/dV where
// shares_kv_heads), [b, s_local, heads, d], given forward's lse and
// delta = rowsum(dout * out) (minus any gradient on lse), both float32 [b, hq, s_local].
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& lse, const at::Tensor& delta, const std::string& group, const InnerBwd& inner,
    bool by_head, int64_t rows);

}  // namespace ring_ext::ulysses
