// Ulysses: sequence shards <-> head shards by all-to-all over a c10d process group (by name).
//
// Note [Ulysses all-to-all layout]
// Rank p of P holds x [b, sl, H, d] (its contiguous sequence shard, s = P * sl). It sends rank j
// the q heads [q_begin(j), q_begin(j + 1)) of its shard (Note [Ulysses head split]) and receives
// its own heads of every shard:
//
//     send [P(dst), sl, b, Hmax, d]  --all-to-all-->  recv [P(src), sl, b, Hmax, d]
//
// (Hmax: the most heads any rank gets; a rank with fewer pads its slot with zeros.) recv is
// [s, b, Hmax, d] in sequence order, read as a view [b, P, sl, h, d] of its first h heads (Note
// [One all-to-all per direction] puts several tensors in one buffer, so P and sl are two strides).
// The way back sends sequence chunk j of the head-sharded result to rank j. Row statistics (lse,
// delta [b, H, sl]) travel the same way, as [P(dst), b, Hmax, sl].
//
// Note [Ulysses head split]
// Rank j gets the q heads [j H / P, (j + 1) H / P) (rounded down: counts differ by at most one when
// P does not divide H) and the K/V heads those q heads read, [first q head / g, last / g] with
// g = H / Hkv. When P divides H and Hkv, that is H/P and Hkv/P heads per rank, as in DeepSpeed's
// Ulysses; when Hkv < P each K/V head goes to the P/Hkv ranks that share it (GQA/MQA: a K/V head
// is sent to every rank that reads it, never more, so nothing is repeated beyond what GQA needs);
// when P divides neither, slots are as wide as the widest rank's heads and the rest is zero
// padding. Bytes per rank and direction, in heads of d elements per token of its shard:
// forward in: P * (max q heads + 2 * max K/V heads), back: P * max q heads (+ lse); even splits
// send exactly H + 2 Hkv (or H + 2 P with shared K/V heads). A rank whose q heads do not map onto
// its K/V heads in equal consecutive groups (e.g. q heads 1-3 of g = 3: two read K/V head 0, one
// K/V head 1) runs its attention once per K/V head. K/V gradients of a head shared by several
// ranks travel back in float32 and are summed (rounded once, after the sum).
//
// Note [One all-to-all per direction]
// Every tensor that crosses in one direction shares one all-to-all: each is packed as bytes into
// its slot of one [P(dst), bytes] buffer (slots 8-byte aligned, so any dtype views its slot in
// place), whatever its dtype. Forward: q, k, v in; out and lse back. Backward: q, k, v, dout, lse,
// delta in; dq, dk, dv back, in the inputs' dtype, except dK/dV of shared K/V heads, which travel
// in float32 and are rounded after their sum. The way back rounds while it packs: the inner
// attention's float32 results are copied into the send buffer in the wire dtype, rounded once, and
// no rounded copy of them exists. Four collective launches per layer instead of fourteen, the same
// bytes, and the same values bit for bit.
//
// Note [Ulysses head groups]
// On CPU (Note [Head groups] in attention.cpp) the heads a rank gathers travel one K/V head group
// at a time: each all-to-all of one direction moves group g of every destination's head shard (its
// K/V head with the q heads of its GQA group), the inner attention runs on it, and its result goes
// back before the next group comes in. A rank then holds one group's gathered sequence (inputs,
// float32 working set, the all-to-all's send and receive buffers) instead of all its heads', the
// same bytes and the same values bit for bit. That needs every rank to get the same K/V heads
// count with equal q groups; an uneven split (Note [Ulysses head split]) travels in one group.
// On CPU each tensor also travels in an all-to-all of its own, not fused: its receive buffer
// [P(src), sl, b, heads, d] is then contiguous along the sequence, a [b, s, heads, d] view the
// kernels read in place, where a fused buffer's q would have to be copied out of its slots first
// (one more copy of every gathered input). So a layer makes G times as many all-to-alls per
// tensor (G = K/V heads per rank), which cost Gloo little. On CUDA G = 1 and the all-to-alls are
// fused (Note [One all-to-all per direction]): each launch costs NCCL latency.
#include "ulysses.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <tuple>
#include <vector>

#include "comm.h"

namespace ring_ext::ulysses {
namespace {

using at::Tensor;
using c10d::ProcessGroup;

// What one tensor of an all-to-all is: to[j], what goes to rank j (any strides), and the slot
// every rank's part gets in the buffer: at least as large as every to[j] in every dim; what a
// to[j] does not fill is zero (Note [Ulysses all-to-all layout], Note [Shards of unequal length]
// in attention.cpp).
struct Part {
  std::vector<Tensor> to;
  std::vector<int64_t> slot;
  at::ScalarType dtype;  // on the wire: to[j] is rounded to it while packed
  int64_t slot_bytes() const {
    return c10::multiply_integers(slot) * static_cast<int64_t>(c10::elementSize(dtype));
  }
  bool padded() const {
    for (const Tensor& t : to)
      if (t.sizes().vec() != slot) return true;
    return false;
  }
};

// Bytes [offset, offset + slot bytes) of every row of buf [P, row], viewed as [P, slot...].
Tensor slot_view(const Tensor& buf, int64_t offset, const Part& p) {
  std::vector<int64_t> sizes = p.slot;
  sizes.insert(sizes.begin(), buf.size(0));
  return buf.narrow(1, offset, p.slot_bytes()).view(p.dtype).view(sizes);
}

// The leading corner of dst that has src's sizes.
Tensor corner(Tensor dst, const Tensor& src) {
  for (int64_t d = 0; d < src.dim(); ++d) dst = dst.narrow(d, 0, src.size(d));
  return dst;
}

// Note [One all-to-all per direction]: parts -> for each part, [P(src), slot...] in its dtype,
// views of one receive buffer (for a group of one without padding, the part itself, unsqueezed:
// the callers only read it).
std::vector<Tensor> fused_all_to_all(const std::vector<Part>& parts, ProcessGroup& pg) {
  bool padded = false;
  for (const Part& p : parts) padded = padded || p.padded();
  if (pg.getSize() == 1 && !padded) {  // a group of one: nothing moves, nothing is copied
    std::vector<Tensor> out;
    for (const Part& p : parts) out.push_back(p.to[0].to(p.dtype).unsqueeze(0));
    return out;
  }
  std::vector<int64_t> offsets;
  int64_t row = 0;
  for (const Part& p : parts) {
    offsets.push_back(row);
    row += (p.slot_bytes() + 7) / 8 * 8;
  }
  Tensor send = at::empty({pg.getSize(), row}, parts[0].to[0].options().dtype(at::kByte));
  for (size_t i = 0; i < parts.size(); ++i) {
    const Tensor dst = slot_view(send, offsets[i], parts[i]);
    for (int64_t j = 0; j < pg.getSize(); ++j) {
      const Tensor& src = parts[i].to[j];
      if (src.sizes().vec() != parts[i].slot) dst[j].zero_();
      corner(dst[j], src).copy_(src);
    }
  }
  Tensor recv = at::empty_like(send);
  std::vector<int64_t> equal_splits;
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  pg.alltoall_base(recv, send, equal_splits, equal_splits)
      ->wait();  // all_to_all_single in newer torch
#pragma GCC diagnostic pop
  ring::count_sent(static_cast<int64_t>(send.nbytes()) / pg.getSize() *
                   (pg.getSize() - 1));  // own row stays
  std::vector<Tensor> out;
  for (size_t i = 0; i < parts.size(); ++i) out.push_back(slot_view(recv, offsets[i], parts[i]));
  return out;
}

// The parts in one all-to-all (fused), or one each (Note [Ulysses head groups]: each received part
// then has a buffer of its own, contiguous along the sequence, which the kernels read in place).
std::vector<Tensor> all_to_all(const std::vector<Part>& parts, ProcessGroup& pg, bool fused) {
  if (fused) return fused_all_to_all(parts, pg);
  std::vector<Tensor> out;
  for (const Part& p : parts) out.push_back(fused_all_to_all({p}, pg)[0]);
  return out;
}

// Note [Ulysses head split]: which q and K/V heads rank j gets, and in how many groups they travel
// (Note [Ulysses head groups]).
struct HeadSplit {
  int64_t P, hq, hkv, g;  // g: q heads per K/V head
  int64_t q_begin(int64_t j) const { return j * hq / P; }
  int64_t q_count(int64_t j) const { return q_begin(j + 1) - q_begin(j); }
  int64_t kv_begin(int64_t j) const { return q_begin(j) / g; }
  int64_t kv_count(int64_t j) const { return (q_begin(j + 1) - 1) / g + 1 - kv_begin(j); }
  int64_t q_max() const { return (hq + P - 1) / P; }
  int64_t kv_max() const {
    int64_t m = 0;
    for (int64_t j = 0; j < P; ++j) m = std::max(m, kv_count(j));
    return m;
  }
  // Rank j's q heads read its K/V heads in equal consecutive groups: one kernel call with GQA.
  bool uniform(int64_t j) const {
    const int64_t n = q_count(j), m = kv_count(j);
    if (n % m != 0) return false;
    for (int64_t h = 0; h < n; ++h)
      if ((q_begin(j) + h) / g - kv_begin(j) != h / (n / m)) return false;
    return true;
  }
  bool even() const {
    for (int64_t j = 0; j < P; ++j)
      if (q_count(j) != q_count(0) || kv_count(j) != kv_count(0) || !uniform(j)) return false;
    return true;
  }
  // Some K/V head goes to more than one rank: its gradients are summed on the way back.
  bool shares_kv() const {
    for (int64_t j = 0; j + 1 < P; ++j)
      if (kv_begin(j) + kv_count(j) > kv_begin(j + 1)) return true;
    return false;
  }
  int64_t groups(bool by_head) const { return by_head && even() ? kv_count(0) : 1; }
};

HeadSplit split_of(int64_t hq, int64_t hkv, int64_t P) {
  check_heads(hq, hkv, P);
  return {P, hq, hkv, hq / hkv};
}

// Group gi of G of `count` heads starting at `begin` of x's dim `dim`.
Tensor heads_of(const Tensor& x, int64_t dim, int64_t begin, int64_t count, int64_t gi, int64_t G) {
  return x.narrow(dim, begin + gi * (count / G), count / G);
}

// What each rank gets of this rank's shards, group gi of G (Note [Ulysses all-to-all layout]):
// q_to  x [b, sl, H, d]   -> to[j] [sl, b, its q heads, d]     slot [rows, b, q_max / G, d]
// kv_to x [b, sl, Hkv, d] -> to[j] [sl, b, its K/V heads, d]   slot [rows, b, kv_max / G, d]
// rows_to x [b, H, sl]    -> to[j] [b, its q heads, sl]        slot [b, q_max / G, rows]
Part q_to(const Tensor& x, const HeadSplit& sp, int64_t gi, int64_t G, int64_t rows) {
  Part p{{}, {rows, x.size(0), sp.q_max() / G, x.size(3)}, x.scalar_type()};
  for (int64_t j = 0; j < sp.P; ++j)
    p.to.push_back(heads_of(x, 2, sp.q_begin(j), sp.q_count(j), gi, G).transpose(0, 1));
  return p;
}
Part kv_to(const Tensor& x, const HeadSplit& sp, int64_t gi, int64_t G, int64_t rows) {
  Part p{{}, {rows, x.size(0), sp.kv_max() / G, x.size(3)}, x.scalar_type()};
  for (int64_t j = 0; j < sp.P; ++j)
    p.to.push_back(heads_of(x, 2, sp.kv_begin(j), sp.kv_count(j), gi, G).transpose(0, 1));
  return p;
}
Part rows_to(const Tensor& x, const HeadSplit& sp, int64_t gi, int64_t G, int64_t rows) {
  Part p{{}, {x.size(0), sp.q_max() / G, rows}, x.scalar_type()};
  for (int64_t j = 0; j < sp.P; ++j)
    p.to.push_back(heads_of(x, 1, sp.q_begin(j), sp.q_count(j), gi, G));
  return p;
}
// The way back: sequence chunk j of a head-sharded result to rank j, rounded to `dtype` as it is
// packed (the results are float32 accumulators: no rounded copy of them is made).
// seq_to  x [b, s, h, d] -> to[j] [sl, b, h, d]   slot [sl, b, width, d]
// rows_seq_to x [b, h, s] -> to[j] [b, h, sl]     slot [b, width, sl]
Part seq_to(const Tensor& x, int64_t P, int64_t width, at::ScalarType dtype) {
  const int64_t sl = x.size(1) / P;
  Part p{{}, {sl, x.size(0), width, x.size(3)}, dtype};
  for (int64_t j = 0; j < P; ++j) p.to.push_back(x.narrow(1, j * sl, sl).transpose(0, 1));
  return p;
}
Part rows_seq_to(const Tensor& x, int64_t P, int64_t width) {
  const int64_t sl = x.size(2) / P;
  Part p{{}, {x.size(0), width, sl}, x.scalar_type()};
  for (int64_t j = 0; j < P; ++j) p.to.push_back(x.narrow(2, j * sl, sl));
  return p;
}

// Received [P(src), rows, b, slot heads, d] -> [b, P, rows, n, d], a view of the first n heads: the
// parts share each source's row of the buffer, so the sequence is not one stride and flattening
// copies. The inner functions copy one head group at a time (Note [Head groups] in attention.cpp).
Tensor as_seq(const Tensor& recv, int64_t n) {
  return recv.narrow(3, 0, n).permute({2, 0, 1, 3, 4});
}
// Received [P(src), b, slot heads, rows] -> [b, n, s], contiguous along s.
Tensor as_rows_seq(const Tensor& recv, int64_t n) {
  return recv.narrow(2, 0, n).permute({1, 2, 0, 3}).flatten(2, 3).contiguous();
}

// Received [P(src), rows, b, slot, d] (what each source computed for its heads: group gi of G) ->
// those heads of dest [b, sl, heads, d] (sl <= rows: the real rows), written in place (the
// un-permute is the copy); add: summed into dest (K/V heads several ranks computed).
void store_heads(const Tensor& recv, const Tensor& dest, const HeadSplit& sp, bool kv, int64_t gi,
                 int64_t G, bool add = false) {
  for (int64_t j = 0; j < sp.P; ++j) {
    const int64_t begin = kv ? sp.kv_begin(j) : sp.q_begin(j);
    const int64_t count = kv ? sp.kv_count(j) : sp.q_count(j);
    const Tensor to = heads_of(dest, 2, begin, count, gi, G);
    const Tensor from = recv[j].narrow(0, 0, dest.size(1)).narrow(2, 0, count / G).transpose(0, 1);
    if (add) {
      to.add_(from);
    } else {
      to.copy_(from);
    }
  }
}
// Received [P(src), b, slot, rows] -> the rows of those q heads in dest [b, H, sl].
void store_rows_heads(const Tensor& recv, const Tensor& dest, const HeadSplit& sp, int64_t gi,
                      int64_t G) {
  for (int64_t j = 0; j < sp.P; ++j)
    heads_of(dest, 1, sp.q_begin(j), sp.q_count(j), gi, G)
        .copy_(recv[j].narrow(1, 0, sp.q_count(j) / G).narrow(2, 0, dest.size(2)));
}

// Runs fn(q heads [qa, qa + qn), K/V head kv) for each K/V head of a rank whose q heads do not map
// onto its K/V heads in equal groups (Note [Ulysses head split]); local head indices.
template <typename Fn>
void for_each_kv_run(const HeadSplit& sp, int64_t j, Fn&& fn) {
  for (int64_t kv = 0; kv < sp.kv_count(j); ++kv) {
    const int64_t first = std::max(sp.q_begin(j), (sp.kv_begin(j) + kv) * sp.g);
    const int64_t last = std::min(sp.q_begin(j + 1), (sp.kv_begin(j) + kv + 1) * sp.g);
    fn(first - sp.q_begin(j), last - first, kv);
  }
}

}  // namespace

void check_heads(int64_t heads_q, int64_t heads_kv, int64_t degree) {
  TORCH_CHECK_VALUE(heads_q >= degree, "ring_ext: q heads (", heads_q,
                    ") must be at least the Ulysses degree (", degree,
                    "): a rank without heads would idle");
  TORCH_CHECK_VALUE(heads_kv >= 1 && heads_q % heads_kv == 0, "ring_ext: kv heads (", heads_kv,
                    ") must divide q heads (", heads_q, ")");
}

bool shares_kv_heads(int64_t heads_q, int64_t heads_kv, int64_t degree) {
  return split_of(heads_q, heads_kv, degree).shares_kv();
}

std::tuple<Tensor, Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const std::string& group, const InnerFwd& inner,
                                   const Tensor& out, bool by_head, int64_t rows,
                                   const std::optional<Tensor>& sinks) {
  auto pg = c10d::resolve_process_group(group);
  const HeadSplit sp = split_of(q.size(2), k.size(2), pg->getSize());
  const int64_t me = pg->getRank(), G = sp.groups(by_head);
  const int64_t n = sp.q_count(me) / G, m = sp.kv_count(me) / G;  // heads here, per group
  const Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  for (int64_t gi = 0; gi < G; ++gi) {  // Note [Ulysses head groups]
    Tensor out_h, lse_h;                // [b, s, n, dv], [b, n, s]
    {                                   // the gathered q, k, v are freed before the trip back
      const auto in = all_to_all(
          {q_to(q, sp, gi, G, rows), kv_to(k, sp, gi, G, rows), kv_to(v, sp, gi, G, rows)}, *pg,
          !by_head);
      const Tensor qh = as_seq(in[0], n), kh = as_seq(in[1], m), vh = as_seq(in[2], m);
      std::optional<Tensor> sinks_h;  // the sinks of the q heads of group gi here
      if (sinks.has_value()) sinks_h = sinks->narrow(0, sp.q_begin(me) + gi * n, n);
      if (sp.uniform(me)) {
        std::tie(out_h, lse_h) = inner(qh, kh, vh, sinks_h);
      } else {  // one call per K/V head (Note [Ulysses head split])
        out_h = at::empty({q.size(0), qh.size(1) * qh.size(2), n, v.size(3)}, q.options());
        lse_h = at::empty({q.size(0), n, qh.size(1) * qh.size(2)}, q.options().dtype(at::kFloat));
        for_each_kv_run(sp, me, [&](int64_t qa, int64_t qn, int64_t kv) {
          std::optional<Tensor> run_sinks;
          if (sinks_h.has_value()) run_sinks = sinks_h->narrow(0, qa, qn);
          auto [o, l] =
              inner(qh.narrow(3, qa, qn), kh.narrow(3, kv, 1), vh.narrow(3, kv, 1), run_sinks);
          out_h.narrow(2, qa, qn).copy_(o);
          lse_h.narrow(1, qa, qn).copy_(l);
        });
      }
    }
    // Rounded on the way back: nothing is accumulated after this point.
    const int64_t width = sp.q_max() / G;
    const auto back =
        all_to_all({seq_to(out_h, sp.P, width, out.scalar_type()), rows_seq_to(lse_h, sp.P, width)},
                   *pg, !by_head);
    store_heads(back[0], out, sp, /*kv=*/false, gi, G);  // out [b, sl, H, dv]
    store_rows_heads(back[1], lse, sp, gi, G);
  }
  return {out, lse};  // lse [b, H, sl]
}

std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& dout, const Tensor& q, const Tensor& k,
                                            const Tensor& v, const Tensor& lse, const Tensor& delta,
                                            const std::string& group, const InnerBwd& inner,
                                            bool by_head, int64_t rows) {
  auto pg = c10d::resolve_process_group(group);
  const HeadSplit sp = split_of(q.size(2), k.size(2), pg->getSize());
  const int64_t me = pg->getRank(), G = sp.groups(by_head);
  const int64_t n = sp.q_count(me) / G, m = sp.kv_count(me) / G;
  const Tensor d = dout.to(q.scalar_type());
  Tensor dq, dk, dv;                    // [b, sl, heads, d] in the wire dtypes
  for (int64_t gi = 0; gi < G; ++gi) {  // Note [Ulysses head groups]
    Tensor dqh, dkh, dvh;               // head-sharded
    {                                   // the gathered inputs are freed before the trip back
      const auto in = all_to_all({q_to(q, sp, gi, G, rows), kv_to(k, sp, gi, G, rows),
                                  kv_to(v, sp, gi, G, rows), q_to(d, sp, gi, G, rows),
                                  rows_to(lse, sp, gi, G, rows), rows_to(delta, sp, gi, G, rows)},
                                 *pg, !by_head);
      const Tensor qh = as_seq(in[0], n), kh = as_seq(in[1], m), vh = as_seq(in[2], m);
      const Tensor doh = as_seq(in[3], n), lh = as_rows_seq(in[4], n), dh = as_rows_seq(in[5], n);
      if (sp.uniform(me)) {
        std::tie(dqh, dkh, dvh) = inner(doh, qh, kh, vh, lh, dh);
      } else {  // one call per K/V head (Note [Ulysses head split])
        std::vector<Tensor> dqs, dks, dvs;
        for_each_kv_run(sp, me, [&](int64_t qa, int64_t qn, int64_t kv) {
          auto [a, b, c] = inner(doh.narrow(3, qa, qn), qh.narrow(3, qa, qn), kh.narrow(3, kv, 1),
                                 vh.narrow(3, kv, 1), lh.narrow(1, qa, qn), dh.narrow(1, qa, qn));
          dqs.push_back(a);
          dks.push_back(b);
          dvs.push_back(c);
        });
        dqh = at::cat(dqs, 2);
        dkh = at::cat(dks, 2);
        dvh = at::cat(dvs, 2);
      }
    }
    // Rounded on the way back (Note [One all-to-all per direction]).
    const bool shared = sp.shares_kv();  // several ranks' parts of a K/V head are summed
    const at::ScalarType kv_wire = shared ? at::kFloat : k.scalar_type();
    const auto back = all_to_all(
        {seq_to(dqh, sp.P, sp.q_max() / G, q.scalar_type()),
         seq_to(dkh, sp.P, sp.kv_max() / G, kv_wire), seq_to(dvh, sp.P, sp.kv_max() / G, kv_wire)},
        *pg, !by_head);
    if (gi == 0) {
      dq = at::empty_like(q);  // in q's strides where dense: the caller keeps it as it is
      dk = shared ? at::zeros_like(k, k.options().dtype(kv_wire)) : at::empty_like(k);
      dv = shared ? at::zeros_like(v, v.options().dtype(kv_wire)) : at::empty_like(v);
    }
    store_heads(back[0], dq, sp, /*kv=*/false, gi, G);
    store_heads(back[1], dk, sp, /*kv=*/true, gi, G, /*add=*/sp.shares_kv());
    store_heads(back[2], dv, sp, /*kv=*/true, gi, G, /*add=*/sp.shares_kv());
  }
  return {dq, dk, dv};
}

}  // namespace ring_ext::ulysses
