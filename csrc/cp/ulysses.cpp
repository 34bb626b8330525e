// Ulysses: sequence shards <-> head shards by all-to-all over a c10d process group (by name).
//
// Note [Ulysses all-to-all layout]
// Rank p of P holds x [b, sl, H, d] (its contiguous sequence shard, s = P * sl). It sends heads
// [j*H/P, (j+1)*H/P) of its shard to rank j and receives heads [p*H/P, ...) of every shard:
//
//     send [P(dst), sl, b, H/P, d]  --all-to-all-->  recv [P(src), sl, b, H/P, d]
//
// recv is [s, b, H/P, d] in sequence order, read as a view [b, P, sl, H/P, d] (Note [One all-to-all
// per direction] puts several tensors in one buffer, so P and sl are two strides). The way back
// sends sequence chunk j of the head-sharded result to rank j. Row statistics (lse, delta [b, H,
// sl]) travel the same way, as [P(dst), b, H/P, sl].
//
// Note [One all-to-all per direction]
// Every tensor that crosses in one direction shares one all-to-all: each is packed as bytes into
// its slot of one [P(dst), bytes] buffer (slots 8-byte aligned, so any dtype views its slot in
// place), whatever its dtype. Forward: q, k, v in; out and lse back. Backward: q, k, v, dout, lse,
// delta in; dq, dk, dv back, in the inputs' dtype (rounded once, by the kernel's caller), except
// dK/dV with GQA copies (r > 1), which travel in float32 and are rounded after their sum. Four
// collective launches per layer instead of fourteen, the same bytes, and the same values bit for
// bit.
//
// GQA/MQA: K/V with fewer heads than P repeat each head just enough (kv heads x r = P) to split,
// never up to the q heads; backward sums the r copies' gradients.
//
// Note [Ulysses head groups]
// On CPU (Note [Head groups] in attention.cpp) the heads a rank gathers travel one K/V head group
// at a time: each all-to-all of one direction moves group g of every destination's head shard (its
// K/V head with the q heads of its GQA group), the inner attention runs on it, and its result goes
// back before the next group comes in. A rank then holds one group's gathered sequence (inputs,
// float32 working set, the all-to-all's send and receive buffers) instead of all its H/P heads',
// for G times the collective launches (G = K/V heads per rank after the repeat below), the same
// bytes and the same values bit for bit. On CUDA G = 1: the all-to-alls of Note [One all-to-all per
// direction], whose launches cost NCCL latency.
#include "ulysses.h"

#include <ATen/ATen.h>

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <tuple>

#include "comm.h"

namespace ring_ext::ulysses {
namespace {

using c10d::ProcessGroup;

// What one tensor of an all-to-all is: x [P(dst), ...] and the dim along which its slot is
// `len` long (len >= x.size(dim); longer: x is padded there with zeros, Note [Shards of unequal
// length] in attention.cpp). The slot's shape is x's with size len at dim.
struct Part {
  at::Tensor x;
  int64_t dim = 1, len = -1;  // len -1: x's own size
  std::vector<int64_t> slot_sizes() const {
    std::vector<int64_t> sizes = x.sizes().vec();
    if (len >= 0) sizes[dim] = len;
    return sizes;
  }
  bool padded() const { return len >= 0 && len != x.size(dim); }
};

// The bytes [offset, offset + one destination's bytes of a [P, sizes...] tensor of `dtype`) of
// every row of buf [P, row], viewed as that dtype and shape.
at::Tensor slot(const at::Tensor& buf, int64_t offset, const std::vector<int64_t>& sizes,
                at::ScalarType dtype) {
  const int64_t bytes =
      c10::multiply_integers(sizes) / sizes[0] * static_cast<int64_t>(c10::elementSize(dtype));
  return buf.narrow(1, offset, bytes).view(dtype).view(sizes);
}

// Note [One all-to-all per direction]: parts[i].x [P(dst), ...] (any dtype and strides) ->
// [P(src), ...] of its slot's shape and x's dtype, views of one receive buffer (for a group of one
// without padding, the parts themselves, in their strides: the callers only read them).
std::vector<at::Tensor> all_to_all(const std::vector<Part>& parts, ProcessGroup& pg) {
  bool padded = false;
  for (const Part& p : parts) padded = padded || p.padded();
  if (pg.getSize() == 1 && !padded) {  // a group of one: nothing moves, nothing is copied
    std::vector<at::Tensor> out;
    for (const Part& p : parts) out.push_back(p.x);
    return out;
  }
  std::vector<int64_t> offsets;
  int64_t row = 0;
  for (const Part& p : parts) {
    offsets.push_back(row);
    const std::vector<int64_t> sizes = p.slot_sizes();
    row += (c10::multiply_integers(sizes) / sizes[0] * p.x.element_size() + 7) / 8 * 8;
  }
  at::Tensor send = at::empty({pg.getSize(), row}, parts[0].x.options().dtype(at::kByte));
  for (size_t i = 0; i < parts.size(); ++i) {
    const Part& p = parts[i];
    const at::Tensor dst = slot(send, offsets[i], p.slot_sizes(), p.x.scalar_type());
    const int64_t n = p.x.size(p.dim);
    dst.narrow(p.dim, 0, n).copy_(p.x);
    if (p.padded()) dst.narrow(p.dim, n, p.len - n).zero_();
  }
  at::Tensor recv = at::empty_like(send);
  std::vector<int64_t> equal_splits;
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  pg.alltoall_base(recv, send, equal_splits, equal_splits)
      ->wait();  // all_to_all_single in newer torch
#pragma GCC diagnostic pop
  ring::count_sent(static_cast<int64_t>(send.nbytes()) / pg.getSize() *
                   (pg.getSize() - 1));  // own row stays
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < parts.size(); ++i) {
    out.push_back(slot(recv, offsets[i], parts[i].slot_sizes(), parts[i].x.scalar_type()));
  }
  return out;
}

// What rank j gets of this rank's shards, and what becomes of what it receives (P = group size):
// heads_to_dst  [b, sl, H, d] -> [P(dst), sl, b, H/P, d]     (heads j*H/P ..)
// seq_to_dst    [b, s, h, d]  -> [P(dst), sl, b, h, d]       (sequence chunk j)
// rows_to_dst   [b, H, sl]    -> [P(dst), b, H/P, sl]        (heads j*H/P ..)
// rows_seq_to_dst [b, h, s]   -> [P(dst), b, h, sl]          (sequence chunk j)
at::Tensor heads_to_dst(const at::Tensor& x, int64_t P) {
  return x.unflatten(2, {P, x.size(2) / P}).permute({2, 1, 0, 3, 4});
}
at::Tensor seq_to_dst(const at::Tensor& x, int64_t P) {
  return x.unflatten(1, {P, x.size(1) / P}).permute({1, 2, 0, 3, 4});
}
at::Tensor rows_to_dst(const at::Tensor& x, int64_t P) {
  return x.unflatten(1, {P, x.size(1) / P}).permute({1, 0, 2, 3});
}
at::Tensor rows_seq_to_dst(const at::Tensor& x, int64_t P) {
  return x.unflatten(2, {P, x.size(2) / P}).permute({2, 0, 1, 3});
}

// Received [P(src), sl, b, h, d] (sequence chunks) -> [b, P, sl, h, d], a view: the parts share
// each source's row of the buffer, so the sequence is not one stride and flattening copies. The
// inner functions copy one head group at a time (Note [Head groups] in attention.cpp).
at::Tensor as_seq(const at::Tensor& recv) { return recv.permute({2, 0, 1, 3, 4}); }
// Received [P(src), b, h, sl] (sequence chunks) -> [b, h, s], contiguous along s.
at::Tensor as_rows_seq(const at::Tensor& recv) {
  return recv.permute({1, 2, 0, 3}).flatten(2, 3).contiguous();
}
// Head group g of G of what each destination gets ([P(dst), sl, b, H/P, d] from heads_to_dst, or
// [P(dst), b, H/P, sl] from rows_to_dst with dim 2): Note [Ulysses head groups].
at::Tensor group_of(const at::Tensor& x, int64_t g, int64_t G, int64_t dim = 3) {
  const int64_t n = x.size(dim) / G;
  return x.narrow(dim, g * n, n);
}
// Received [P(src), rows, b, n, d] (group g of every source's head shard) -> the heads of group g
// in dest [b, sl, H, d] (heads p*H/P + g*n .. of each source p; sl <= rows: the real rows),
// written in place: the un-permute is the one copy.
void store_heads(const at::Tensor& recv, const at::Tensor& dest, int64_t g) {
  const int64_t P = recv.size(0);
  dest.unflatten(2, {P, dest.size(2) / P})
      .narrow(3, g * recv.size(3), recv.size(3))
      .copy_(recv.narrow(1, 0, dest.size(1)).permute({2, 1, 0, 3, 4}));
}
// Received [P(src), b, n, rows] -> the rows of group g in dest [b, H, sl] (sl <= rows).
void store_rows_heads(const at::Tensor& recv, const at::Tensor& dest, int64_t g) {
  const int64_t P = recv.size(0);
  dest.unflatten(1, {P, dest.size(1) / P})
      .narrow(2, g * recv.size(2), recv.size(2))
      .copy_(recv.narrow(3, 0, dest.size(2)).permute({1, 0, 2, 3}));
}

// How many groups the heads travel in (Note [Ulysses head groups]): the K/V heads each rank gets.
int64_t head_group_count(int64_t heads_kv, int64_t r, int64_t P, bool by_head) {
  return by_head ? heads_kv * r / P : 1;
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
                                           const InnerFwd& inner, const at::Tensor& out,
                                           bool by_head, int64_t rows,
                                           const std::optional<at::Tensor>& sinks) {
  auto pg = c10d::resolve_process_group(group);
  const int64_t P = pg->getSize(), r = kv_replication(q.size(2), k.size(2), P);
  const int64_t G = head_group_count(k.size(2), r, P, by_head);
  const int64_t n = q.size(2) / P / G, first = pg->getRank() * q.size(2) / P;  // q heads here
  const at::Tensor qd = heads_to_dst(q, P), kd = heads_to_dst(repeat_kv(k, r), P),
                   vd = heads_to_dst(repeat_kv(v, r), P);
  const at::Tensor lse =
      at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  for (int64_t g = 0; g < G; ++g) {  // Note [Ulysses head groups]
    at::Tensor out_h, lse_h;         // [b, s, n, d], [b, n, s]
    {                                // the gathered q, k, v are freed before the trip back
      const auto in = all_to_all({{group_of(qd, g, G), 1, rows},
                                  {group_of(kd, g, G), 1, rows},
                                  {group_of(vd, g, G), 1, rows}},
                                 *pg);
      std::optional<at::Tensor> sinks_h;  // the sinks of the q heads of group g here
      if (sinks.has_value()) sinks_h = sinks->narrow(0, first + g * n, n);
      std::tie(out_h, lse_h) = inner(as_seq(in[0]), as_seq(in[1]), as_seq(in[2]), sinks_h);
    }
    // Rounded before the trip back: nothing is accumulated after this point.
    const auto back = all_to_all(
        {{seq_to_dst(out_h.to(out.scalar_type()), P)}, {rows_seq_to_dst(lse_h, P)}}, *pg);
    store_heads(back[0], out, g);  // out [b, sl, H, d]
    store_rows_heads(back[1], lse, g);
  }
  return {out, lse};  // lse [b, H, sl]
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& lse, const at::Tensor& delta, const std::string& group, const InnerBwd& inner,
    bool by_head, int64_t rows) {
  auto pg = c10d::resolve_process_group(group);
  const int64_t P = pg->getSize(), r = kv_replication(q.size(2), k.size(2), P);
  const int64_t G = head_group_count(k.size(2), r, P, by_head);
  const at::Tensor qd = heads_to_dst(q, P), kd = heads_to_dst(repeat_kv(k, r), P),
                   vd = heads_to_dst(repeat_kv(v, r), P),
                   dd = heads_to_dst(dout.to(q.scalar_type()), P), ld = rows_to_dst(lse, P),
                   deltad = rows_to_dst(delta, P);
  at::Tensor dq, dk, dv;  // [b, sl, heads, d] in the dtypes inner chose; dk, dv with r copies
  for (int64_t g = 0; g < G; ++g) {  // Note [Ulysses head groups]
    at::Tensor dqh, dkh, dvh;        // head-sharded
    {                                // the gathered inputs are freed before the trip back
      const auto in = all_to_all({{group_of(qd, g, G), 1, rows},
                                  {group_of(kd, g, G), 1, rows},
                                  {group_of(vd, g, G), 1, rows},
                                  {group_of(dd, g, G), 1, rows},
                                  {group_of(ld, g, G, 2), 3, rows},
                                  {group_of(deltad, g, G, 2), 3, rows}},
                                 *pg);
      std::tie(dqh, dkh, dvh) = inner(as_seq(in[3]), as_seq(in[0]), as_seq(in[1]), as_seq(in[2]),
                                      as_rows_seq(in[4]), as_rows_seq(in[5]));
    }
    const auto back =
        all_to_all({{seq_to_dst(dqh, P)}, {seq_to_dst(dkh, P)}, {seq_to_dst(dvh, P)}}, *pg);
    if (g == 0) {
      dq = at::empty(q.sizes(), dqh.options());
      dk = at::empty({k.size(0), k.size(1), k.size(2) * r, k.size(3)}, dkh.options());
      dv = at::empty({v.size(0), v.size(1), v.size(2) * r, v.size(3)}, dvh.options());
    }
    store_heads(back[0], dq, g);
    store_heads(back[1], dk, g);
    store_heads(back[2], dv, g);
  }
  return {dq, sum_kv_copies(dk, r), sum_kv_copies(dv, r)};
}

}  // namespace ring_ext::ulysses
