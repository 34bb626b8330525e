// The ring's setup (ring.h, make_setup): resolving and checking the groups, the per-source key
// intervals and the rows each rank needs (Note [Per-source key intervals], Note [Moving only what
// is seen] in ring.cpp), before any transfer.
#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "../common/block_ops.h"
#include "comm.h"
#include "ring.h"
#include "schedule.h"

namespace ring_ext {
namespace ring {
namespace {

using at::Tensor;

void check_window_groups(const RingSetup& s) {
  TORCH_CHECK(s.topo.cp_size % s.topo.inner == 0, "ring_ext: the inner ring size ", s.topo.inner,
              " must divide the CP size ", s.topo.cp_size);
  TORCH_CHECK(s.inner->getRank() == s.inner_rank(), "ring_ext: rank ", s.rank,
              " of the ring group must be rank ", s.inner_rank(), " of its inner group, got ",
              s.inner->getRank());
  if (s.topo.outer() == 1) return;
  TORCH_CHECK(s.outer, "ring_ext: a double ring (window ", s.topo.inner, " < CP size ",
              s.topo.cp_size, ") needs an outer group");
  TORCH_CHECK(s.outer->getSize() == s.topo.outer() && s.outer->getRank() == s.outer_rank(),
              "ring_ext: the outer group must have size ", s.topo.outer(), " and rank ",
              s.outer_rank(), " here, got size ", s.outer->getSize(), " and rank ",
              s.outer->getRank());
}

}  // namespace

std::vector<Tensor> prepare_visible(const std::optional<Tensor>& visible, int64_t count,
                                    int64_t q_rows, int64_t k_rows, c10::Device device,
                                    std::vector<Span>* seen) {
  if (!visible.has_value()) return {};
  const Tensor& v = *visible;
  const int64_t rows = q_rows;
  TORCH_CHECK_VALUE(v.scalar_type() == at::kLong && v.dim() == 3 && v.size(0) == count &&
                        (v.size(1) == 2 || v.size(1) == 4) && v.size(2) == rows,
                    "ring_ext: visible must be int64 [", count, " source blocks, 2 (or 4: two ",
                    "intervals per row), ", rows, " rows], got ", v.scalar_type(), " ", v.sizes());
  // The one host copy of the intervals: checked here for every device (the kernels' tile skipping
  // relies on monotone intervals; the CUDA block ops do not check them, Note [Mask rule] in
  // csrc/common/mask.h).
  const Tensor host = v.cpu();
  TORCH_CHECK_VALUE(
      rows < 2 || (host.narrow(2, 1, rows - 1) >= host.narrow(2, 0, rows - 1)).all().item<bool>(),
      "ring_ext: visible's begins and ends must be non-decreasing along the rows");
  TORCH_CHECK_VALUE(v.size(1) == 2 || disjoint_intervals(host).all().item<bool>(),
                    "ring_ext: visible's two intervals of a row must not overlap");
  if (seen) {  // blocks hold k_rows keys: intervals past them are clamped, as the kernels do
    for (int64_t src = 0; src < count; ++src) {
      // every interval of every row (two per row: Note [Two key intervals per row] in
      // csrc/common/block_ops.cpp)
      const Tensor pairs = host[src].view({v.size(1) / 2, 2, rows});
      const Tensor begin = pairs.select(1, 0).clamp(0, k_rows),
                   end = pairs.select(1, 1).clamp(0, k_rows);
      const Tensor rows_seeing = end > begin;
      if (!rows_seeing.any().item<bool>()) {
        seen->push_back({});
        continue;
      }
      seen->push_back({begin.masked_select(rows_seeing).min().item<int64_t>(),
                       end.masked_select(rows_seeing).max().item<int64_t>()});
    }
  }
  const Tensor on_device = v.to(device).contiguous();
  std::vector<Tensor> out;
  for (int64_t src = 0; src < count; ++src) out.push_back(on_device[src]);
  return out;
}

namespace {

// need for make_setup (Note [Moving only what is seen]): checked against the rows this rank's own
// intervals see; every row of every block without `needed`.
std::vector<Span> prepare_needed(const std::optional<Tensor>& needed, const RingSetup& s) {
  const int64_t cp = s.topo.cp_size;
  if (!needed.has_value()) return std::vector<Span>(cp * cp, Span{0, s.rows});
  const Tensor& n = *needed;
  TORCH_CHECK_VALUE(n.scalar_type() == at::kLong && n.dim() == 3 && n.size(0) == cp &&
                        n.size(1) == cp && n.size(2) == 2,
                    "ring_ext: needed must be int64 [", cp, " ranks, ", cp, " sources, 2], got ",
                    n.scalar_type(), " ", n.sizes());
  const Tensor host = n.cpu().contiguous();
  const int64_t* p = host.data_ptr<int64_t>();
  std::vector<Span> out;
  for (int64_t i = 0; i < cp * cp; ++i) {
    const Span sp{p[2 * i], p[2 * i + 1]};
    TORCH_CHECK_VALUE(sp.empty() || (sp.lo >= 0 && sp.hi <= s.rows),
                      "ring_ext: needed's rows must lie in [0, ", s.rows, "), got [", sp.lo, ", ",
                      sp.hi, ")");
    out.push_back(sp.empty() ? Span{} : sp);
  }
  for (int64_t src = 0; src < cp; ++src) {  // our own rows: what the kernels will read
    const Span mine = out[s.rank * cp + src], seen = s.seen[src];
    TORCH_CHECK_VALUE(seen.empty() || (mine.lo <= seen.lo && seen.hi <= mine.hi),
                      "ring_ext: needed[", s.rank, "][", src, "] = [", mine.lo, ", ", mine.hi,
                      ") must hold the rows visible sees, [", seen.lo, ", ", seen.hi, ")");
  }
  return out;
}

}  // namespace

RingSetup make_setup(const GroupNames& names, const Options& opt, int64_t local_len, int64_t q_rows,
                     const std::optional<Tensor>& visible, const std::optional<Tensor>& needed,
                     c10::Device device) {
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
  s.softcap = opt.softcap;
  TORCH_CHECK_VALUE(!visible.has_value() || !opt.causal,
                    "ring_ext: give causal=False with visible (the intervals hold the mask)");
  TORCH_CHECK_VALUE(q_rows == local_len || (visible.has_value() && q_rows < local_len),
                    "ring_ext: q holds ", q_rows, " rows but the ring's blocks ", local_len,
                    "; shards of unequal length need key intervals (visible)");
  s.visible = prepare_visible(visible, s.topo.cp_size, q_rows, local_len, device, &s.seen);
  s.rows = local_len;
  s.q_rows = q_rows;
  if (s.masked()) {
    s.need = prepare_needed(needed, s);
  } else {
    TORCH_CHECK_VALUE(!needed.has_value(), "ring_ext: needed comes with visible");
  }
  return s;
}

}  // namespace ring
}  // namespace ring_ext
