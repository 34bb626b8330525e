// Note [Cross-rank check] in consistency.h.
#include "consistency.h"

#include <ATen/ATen.h>

#include <cstring>
#include <sstream>
#include <utility>
#include <vector>

#include "comm.h"

namespace ring_ext::cp {
namespace {

// A short string as one int64 (its first 8 bytes): algorithm and layout names differ there.
int64_t code_of(const std::string& s) {
  int64_t code = 0;
  std::memcpy(&code, s.data(), std::min<size_t>(s.size(), sizeof(code)));
  return code;
}

int64_t bits_of(double x) {
  int64_t bits = 0;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

// (name, value) of every field, in a fixed order and number on every rank.
std::vector<std::pair<const char*, int64_t>> describe(const CallDescription& c) {
  return {
      {"dtype", static_cast<int64_t>(c.q.scalar_type())},
      {"batch", c.q.size(0)},
      {"sequence length", c.rows},
      {"q heads", c.q.size(2)},
      {"q/k head_dim", c.q.size(3)},
      {"k/v heads", c.k.size(2)},
      {"v head_dim", c.v.size(3)},
      {"device type", static_cast<int64_t>(c.q.device().type())},
      {"softmax_scale", bits_of(c.scale)},
      {"causal", c.causal},
      {"algo", code_of(c.algo)},
      {"overlap", c.overlap},
      {"layout", code_of(c.layout)},
      {"packed documents or sliding window", c.masked},
      {"cu_seqlens / sliding_window", c.signature},
      {"softcap", bits_of(c.softcap)},
      {"sinks", c.sinks},
  };
}

}  // namespace

void check_across_ranks(const std::string& group, const CallDescription& call) {
  if (group.empty()) return;
  const auto fields = describe(call);
  const auto n = static_cast<int64_t>(fields.size());
  std::vector<int64_t> values;
  for (const auto& field : fields) values.push_back(field.second);
  const at::Tensor mine = at::tensor(values, at::kLong).to(call.q.device());
  // [ranks, n] on the host: one copy (one device-to-host sync on CUDA) for every rank's row.
  const at::Tensor all = at::stack(ring::all_gather_op(mine, group)).cpu().contiguous();
  const int64_t* rows = all.data_ptr<int64_t>();
  const int64_t ranks = all.size(0);
  std::ostringstream bad;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<int64_t> differ;
    for (int64_t r = 1; r < ranks; ++r) {
      if (rows[r * n + i] != rows[i]) differ.push_back(r);
    }
    if (differ.empty()) continue;
    bad << (bad.tellp() > 0 ? "; " : "") << fields[i].first << " (ranks";
    for (int64_t r : differ) bad << ' ' << r;
    bad << " differ from rank 0)";
  }
  TORCH_CHECK_VALUE(bad.tellp() == 0,
                    "ring_ext: the ranks of the context-parallel group passed different attention "
                    "calls: ",
                    bad.str(), ". This rank passed q ", call.q.sizes(), ", k ", call.k.sizes(),
                    ", v ", call.v.sizes(), " (as [b, s, h, d]) of ", call.q.scalar_type(),
                    ", layout ", call.layout,
                    ". Every rank must pass the same shapes, dtype and settings (did each rank "
                    "load a different batch?); check_consistency=False skips this check");
}

}  // namespace ring_ext::cp
