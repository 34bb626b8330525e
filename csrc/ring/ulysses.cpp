// Ulysses: sequence shards <-> head shards by all-to-all over a c10d process group (by name).
//
// Note [Ulysses all-to-all layout]
// Rank p of P holds x [b, sl, H, d] (its contiguous sequence shard, s = P * sl). It sends heads
// [j*H/P, (j+1)*H/P) of its shard to rank j and receives heads [p*H/P, ...) of every shard:
//
//     send [P(dst), sl, b, H/P, d]  --all-to-all-->  recv [P(src), sl, b, H/P, d]
//
// recv is [s, b, H/P, d] in sequence order, i.e. a strided view of [b, s, H/P, d] that the kernels
// read in place. The way back sends sequence chunk j of the head-sharded result to rank j.
//
// GQA/MQA: K/V with fewer heads than P repeat each head just enough (kv heads x r = P) to split,
// never up to the q heads; backward sums the r copies' gradients.
#include "ulysses.h"

#include <ATen/ATen.h>

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace ring_ext::ulysses {
namespace {

using c10d::ProcessGroup;

// Equal-split all-to-all along dim 0 of send [P, ...]; returns recv [P(src), ...].
at::Tensor all_to_all(const at::Tensor& send, ProcessGroup& pg) {
  at::Tensor in = send.contiguous();
  at::Tensor out = at::empty_like(in);
  std::vector<int64_t> equal_splits;
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  pg.alltoall_base(out, in, equal_splits, equal_splits)
      ->wait();  // all_to_all_single in newer torch
#pragma GCC diagnostic pop
  return out;
}

// [b, sl, H, d] -> [b, s, H/P, d] (a view of [s, b, H/P, d] memory).
at::Tensor seq_to_heads(const at::Tensor& x, ProcessGroup& pg) {
  const int64_t P = pg.getSize(), b = x.size(0), sl = x.size(1), h = x.size(2) / P, d = x.size(3);
  at::Tensor send = x.unflatten(2, {P, h}).permute({2, 1, 0, 3, 4});  // [P, sl, b, h, d]
  at::Tensor recv = all_to_all(send, pg);                             // [P(src), sl, b, h, d]
  return recv.view({P * sl, b, h, d}).permute({1, 0, 2, 3});          // [b, s, h, d]
}

// [b, s, H/P, d] -> [b, sl, H, d], written into `dest` (any strides, x's dtype) when given, else
// into a new contiguous tensor: the one copy out of the receive buffer is the un-permute itself.
at::Tensor heads_to_seq(const at::Tensor& x, ProcessGroup& pg, at::Tensor dest = {}) {
  const int64_t P = pg.getSize(), b = x.size(0), sl = x.size(1) / P, h = x.size(2), d = x.size(3);
  at::Tensor send = x.unflatten(1, {P, sl}).permute({1, 2, 0, 3, 4});  // [P(dst), sl, b, h, d]
  at::Tensor recv = all_to_all(send, pg);                              // [P(src), sl, b, h, d]
  if (!dest.defined()) dest = at::empty({b, sl, P * h, d}, x.options());
  dest.unflatten(2, {P, h}).copy_(recv.permute({2, 1, 0, 3, 4}));  // [b, sl, P, h, d]
  return dest;                                                     // [b, sl, H, d]
}

// Row statistics: [b, H, sl] -> [b, H/P, s] (contiguous along s, as the kernels read them).
at::Tensor rows_to_heads(const at::Tensor& x, ProcessGroup& pg) {
  at::Tensor as_seq = x.transpose(1, 2).unsqueeze(-1);                       // [b, sl, H, 1]
  return seq_to_heads(as_seq, pg).squeeze(-1).transpose(1, 2).contiguous();  // [b, H/P, s]
}

// Row statistics: [b, H/P, s] -> [b, H, sl].
at::Tensor rows_to_seq(const at::Tensor& x, ProcessGroup& pg) {
  at::Tensor as_seq = x.transpose(1, 2).unsqueeze(-1);                       // [b, s, H/P, 1]
  return heads_to_seq(as_seq, pg).squeeze(-1).transpose(1, 2).contiguous();  // [b, H, sl]
}

at::Tensor repeat_kv(const at::Tensor& x, int64_t r) {
  return r == 1 ? x : x.repeat_interleave(r, /*dim=*/2);  // [b, sl, hkv, d] -> [b, sl, hkv*r, d]
}

at::Tensor sum_kv_copies(const at::Tensor& dx, int64_t r) {
  return r == 1 ? dx
                : dx.unflatten(2, {dx.size(2) / r, r}).sum(3);  // [b, sl, hkv*r, d] -> [.., hkv, d]
}

}  // namespace

int64_t kv_replication(int64_t heads_q, int64_t heads_kv, int64_t degree) {
  TORCH_CHECK_VALUE(heads_q % degree == 0, "ring_ext: q heads (", heads_q,
                    ") must be divisible by the Ulysses degree (", degree, ")");
  if (heads_kv % degree == 0) return 1;
  TORCH_CHECK_VALUE(degree % heads_kv == 0, "ring_ext: kv heads (", heads_kv,
                    ") and the Ulysses degree (", degree,
                    ") must divide one another to split K/V heads over the ranks");
  return degree / heads_kv;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const std::string& group,
                                           const InnerFwd& inner, const at::Tensor& out) {
  auto pg = c10d::resolve_process_group(group);
  const int64_t r = kv_replication(q.size(2), k.size(2), pg->getSize());
  at::Tensor qh = seq_to_heads(q, *pg);
  at::Tensor kh = seq_to_heads(repeat_kv(k, r), *pg);
  at::Tensor vh = seq_to_heads(repeat_kv(v, r), *pg);
  auto [out_h, lse_h] = inner(qh, kh, vh);  // [b, s, H/P, d], [b, H/P, s]
  // Rounded before the trip back: nothing is accumulated after this point.
  return {heads_to_seq(out_h.to(out.scalar_type()), *pg, out), rows_to_seq(lse_h, *pg)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dout, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& lse,
                                                        const at::Tensor& delta,
                                                        const std::string& group,
                                                        const InnerBwd& inner) {
  auto pg = c10d::resolve_process_group(group);
  const int64_t r = kv_replication(q.size(2), k.size(2), pg->getSize());
  at::Tensor qh = seq_to_heads(q, *pg);
  at::Tensor kh = seq_to_heads(repeat_kv(k, r), *pg);
  at::Tensor vh = seq_to_heads(repeat_kv(v, r), *pg);
  at::Tensor douth = seq_to_heads(dout.to(q.scalar_type()), *pg);
  at::Tensor lse_h = rows_to_heads(lse, *pg);
  at::Tensor delta_h = rows_to_heads(delta, *pg);
  auto [dqh, dkh, dvh] = inner(douth, qh, kh, vh, lse_h, delta_h);  // float32, head-sharded
  // Gradients travel back in float32; the caller rounds them once, after the GQA copies are summed.
  return {heads_to_seq(dqh, *pg), sum_kv_copies(heads_to_seq(dkh, *pg), r),
          sum_kv_copies(heads_to_seq(dvh, *pg), r)};
}

}  // namespace ring_ext::ulysses
