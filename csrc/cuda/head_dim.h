// The head-dim buckets the CUDA kernels are compiled for, and the one switch from a runtime
// head dim to a bucket (flash-attention's HEADDIM_SWITCH): the tensor-core forward and backward
// (their candidate tilings, Note [Candidate tilings] in flash_fwd.cu) and the SIMT kernels
// (32 lanes x D / 32 dims each) are instantiated per bucket. Host code only, no CUDA headers
// (tilings.h, which ops.cpp includes, lists the buckets).
//
// Note [One bucket for q/k and v]
// q/k and v may have head dims of their own (params.h: head_dim, head_dim_v; multi-head latent
// attention). Every kernel takes one bucket D, that of max(head_dim, head_dim_v): its Q, K, V and
// dO tiles are D wide and zero past their own dim (so every dot product over D is exact), and what
// it stores stops at each tensor's own dim (out, dv at head_dim_v; dq, dk at head_dim). One bucket
// instead of a (q/k, v) pair keeps the number of kernels per dtype and arch at one per tiling; the
// price is work on zeros where the dims differ: DeepSeek-V3's 192/128 runs in the 256 bucket, its
// P V and dO V^T products 256 wide instead of 128.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../common/params.h"

namespace ring_ext::cuda {

// The largest head dim (q/k and v alike) of every CUDA kernel.
constexpr int64_t kMaxHeadDim = 512;

// A bucket as a type: HeadDim<D>::value == D.
template <int D>
using HeadDim = std::integral_constant<int, D>;

// The dim a kernel's bucket is chosen by (Note [One bucket for q/k and v]).
inline int64_t bucket_dim(const Shape& s) { return std::max(s.head_dim, s.head_dim_v); }

// fn(HeadDim<D>{}) for the bucket D of a head dim: 64 for head dims up to 64, 128 up to 128, 256
// up to 256, 512 above (the callers check <= kMaxHeadDim first). In fn, `decltype(d)::value` is the
// bucket.
template <typename Fn>
void head_dim_switch(int64_t head_dim, Fn&& fn) {
  if (head_dim <= 64) {
    fn(HeadDim<64>{});
  } else if (head_dim <= 128) {
    fn(HeadDim<128>{});
  } else if (head_dim <= 256) {
    fn(HeadDim<256>{});
  } else {
    fn(HeadDim<512>{});
  }
}

// fn(HeadDim<D>{}) for every bucket D, in increasing order.
template <typename Fn>
void for_each_head_dim(Fn&& fn) {
  fn(HeadDim<64>{});
  fn(HeadDim<128>{});
  fn(HeadDim<256>{});
  fn(HeadDim<512>{});
}

}  // namespace ring_ext::cuda
