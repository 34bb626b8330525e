// The cross-rank check of context-parallel attention (torch.ops.ring_ext.attention's check_group).
//
// Note [Cross-rank check]
// -----------------------
// Every rank of a CP group must make the same call: the same shapes (bar the sequence length of
// a placement's shards, which differ by design: then the placement's padded length stands in), the
// same dtype, layout, scale, mask and algorithm settings. A data loader that hands each rank its
// own batch breaks that, and without a check the ranks post transfers of different sizes (Gloo
// aborts the process, NCCL hangs or reads the wrong bytes) or, worse, compute with different masks
// and return without an error. So, unless the caller opts out, the op's first act is one
// all-gather of a fixed-size description of its call (a few dozen int64 values, Describe() below;
// the caller adds a signature of what the op cannot see, e.g. a hash of cu_seqlens) over a group
// holding every CP rank, before any other transfer. Every rank compares the same gathered rows, so
// every rank reaches the same verdict and raises the same ValueError naming the fields and the
// ranks that differ. The check runs inside the op so that a compiled graph runs it too, on every
// call alike (no rank skips it while another waits). Cost: one small collective per attention
// forward (docs/design.md, Cross-rank check, for the measurement); the backward is not checked (it
// replays the checked forward's arguments).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace ring_ext::cp {

// The call's description, checked across `group` (a no-op for an empty name).
struct CallDescription {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  int64_t rows;  // the sequence length that must agree: q's, or the placement's padded length
  double scale;
  bool causal;
  const std::string& algo;
  bool overlap;
  const std::string& layout;
  bool masked;        // key intervals given
  int64_t signature;  // the caller's (0: none)
  double softcap;     // 0: none
  bool sinks;         // sinks given (their values are parameters, alike by construction)
};

void check_across_ranks(const std::string& group, const CallDescription& call);

}  // namespace ring_ext::cp
