// Ring attention (megatron_cp_algo, plain and double ring) over c10d process groups by name:
// the driver of ring.cpp, also the ring part of hybrid_cp_algo (attention.cpp).
#pragma once

#include <ATen/core/Tensor.h>

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
  bool causal = false;  // zigzag-sharded causal mask, else full
  bool overlap = true;  // post each transfer before the compute it hides behind
};

// Everything the loop needs to know about this rank's place in the (double) ring.
struct RingSetup {
  Group ring, inner, outer;  // inner == ring for the plain ring; outer null with one window
  Topology topo;
  int64_t rank = 0, chunk = 0;  // chunk: rows per sharding chunk
  bool causal = false, overlap = true;
  double scale = 1.0;
  int64_t inner_rank() const { return rank % topo.window; }
  int64_t outer_rank() const { return rank / topo.window; }
};

// Resolves and checks the groups for shards of local_len rows; no communication.
RingSetup make_setup(const GroupNames& names, const Options& opt, int64_t local_len);

// q [b, s, hq, d], k/v [b, s, hkv, d] (this rank's shards, any strides) ->
// out float32 [b, s, hq, d], lse float32 [b, hq, s].
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const RingSetup& s);

// Float32 dq, dk, dv given the final lse and delta = rowsum(dout * out) (- dlse).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dout, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& lse,
                                                        const at::Tensor& delta,
                                                        const RingSetup& s);

// torch.ops.ring_ext.ring_schedule (tests): per step [src, n_items, n_hops, 7 fields per item,
// 4 per hop]; defined with its schema in csrc/ops.cpp.
std::vector<int64_t> schedule_op(const std::string& algo, int64_t cp_size, int64_t rank,
                                 int64_t window, bool causal);

}  // namespace ring
}  // namespace ring_ext
