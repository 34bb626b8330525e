// The schedule's out-of-line parts (schedule.h): algorithm names and the flattened schedule that
// torch.ops.ring_ext.ring_schedule returns (tests, the planner).
#include "schedule.h"

#include <torch/library.h>

#include <string>
#include <vector>

#include "ring.h"

namespace ring_ext {
namespace ring {

// Flattened schedule for tests: per step [src, n_items, n_hops, then 7 fields per item, then 4 per
// hop (payload, link, send_to, recv_from)].
std::vector<int64_t> schedule_op(const std::string& algo, int64_t cp_size, int64_t rank,
                                 int64_t cp_window_size, bool causal) {
  TORCH_CHECK(cp_size >= 1 && rank >= 0 && rank < cp_size, "ring_ext: rank ", rank,
              " must be in [0, cp_size=", cp_size, ")");
  TORCH_CHECK(cp_window_size >= 1 && cp_size % cp_window_size == 0, "ring_ext: cp_window_size ",
              cp_window_size, " must divide cp_size ", cp_size);
  std::vector<int64_t> flat;
  for (int64_t step = 0; step < cp_size; ++step) {
    const Step st = schedule_step(parse_algo(algo), cp_size, rank, step, cp_window_size, causal);
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
