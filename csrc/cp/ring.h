// Ring attention (megatron_cp_algo, plain and double ring) over c10d process groups by name:
// the driver of ring.cpp (its setup in setup.cpp), also the ring part of hybrid_cp_algo
// (attention.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "comm.h"
#include "schedule.h"

namespace ring_ext {
namespace ring {

struct GroupNames {
  std::string ring, inner, outer;  // inner/outer empty for the plain ring
};

struct Options {
  double scale = 1.0;
  double softcap = 0.0;  // Note [Softcap and sinks] in csrc/common/params.h; 0: none
  bool causal = false;   // zigzag-sharded causal mask, else full
  bool overlap = true;   // post each transfer before the compute it hides behind
};

// Rows [lo, hi) of a block.
struct Span {
  int64_t lo = 0, hi = 0;
  int64_t size() const { return hi - lo; }
  bool empty() const { return hi <= lo; }
};

// Everything the loop needs to know about this rank's place in the (double) ring.
struct RingSetup {
  Group ring, inner, outer;  // inner == ring for the plain ring; outer null with one window
  Topology topo;
  int64_t rank = 0, chunk = 0;  // chunk: rows per sharding chunk
  bool causal = false, overlap = true;
  double scale = 1.0, softcap = 0.0;
  // Packed documents / sliding windows (Note [Per-source key intervals] in ring.cpp): visible[src]
  // is int64 [2, local rows] on the inputs' device, the keys of src's block each local row sees;
  // seen[src] is the hull of those keys (empty when no row sees any). Empty vectors: the offset
  // masks of the schedule.
  std::vector<at::Tensor> visible;
  std::vector<Span> seen;
  // need[r * cp + src]: the rows of src's block that ring rank r's rows see (their hull), which
  // is all the masked ring moves (Note [Moving only what is seen] in ring.cpp). Every row of every
  // block without `needed`; empty without visible.
  std::vector<Span> need;
  int64_t rows = 0;    // rows of every block that moves
  int64_t q_rows = 0;  // local query rows: rows, or fewer (Note [Shards of unequal length])
  bool masked() const { return !visible.empty(); }
  Span need_of(int64_t r, int64_t src) const { return need[r * topo.cp_size + src]; }
  int64_t inner_rank() const { return rank % topo.inner; }
  int64_t outer_rank() const { return rank / topo.inner; }
};

// Resolves and checks the groups for blocks of local_len rows on `device` and q_rows local query
// rows (local_len, or fewer with key intervals: Note [Shards of unequal length] in attention.cpp),
// the per-source key intervals (empty, or one per ring rank) and the rows every rank needs of every
// block (needed, int64 [cp, cp, 2]; optional with visible); no communication.
RingSetup make_setup(const GroupNames& names, const Options& opt, int64_t local_len, int64_t q_rows,
                     const std::optional<at::Tensor>& visible = std::nullopt,
                     const std::optional<at::Tensor>& needed = std::nullopt,
                     c10::Device device = c10::Device(c10::kCPU));

// visible [count, 2, q_rows] int64 (checked) as `count` [2, q_rows] tensors on `device`; fills
// seen (the hull of each source's visible keys among a block's k_rows, computed on the host copy)
// when given. Empty without visible.
std::vector<at::Tensor> prepare_visible(const std::optional<at::Tensor>& visible, int64_t count,
                                        int64_t q_rows, int64_t k_rows, c10::Device device,
                                        std::vector<Span>* seen = nullptr);

// q [b, s, hq, d], k [b, s, hkv, d], v [b, s, hkv, dv] (this rank's shards, any strides) ->
// out float32 [b, s, hq, dv], lse float32 [b, hq, s]. sinks (float32 [hq], the sinks of these q
// heads) are folded in once, after the last block (fold_sinks in csrc/common/block_ops.h).
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const RingSetup& s,
                                           const std::optional<at::Tensor>& sinks);

// Float32 dq, dk, dv given the final lse and delta = rowsum(dout * out) (- dlse).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dout, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& lse,
                                                        const at::Tensor& delta,
                                                        const RingSetup& s);

// torch.ops.ring_ext.ring_schedule (tests, the planner): per step [src, n_items, n_hops, 7 fields
// per item, 4 per hop]; schedule.cpp, defined with its schema in csrc/ops.cpp.
std::vector<int64_t> schedule_op(const std::string& algo, int64_t cp_size, int64_t rank,
                                 int64_t cp_window_size, bool causal);

}  // namespace ring
}  // namespace ring_ext
