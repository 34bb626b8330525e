// The head-dim buckets the CUDA kernels are compiled for, and the one switch from a runtime
// head_dim to a bucket (flash-attention's HEADDIM_SWITCH): the tensor-core forward and backward
// (their candidate tilings, Note [Candidate tilings] in flash_fwd.cu) and the SIMT backward
// (32 lanes x D / 32 dims each) are instantiated per bucket. Host code only, no CUDA headers
// (tilings.h, which ops.cpp includes, lists the buckets).
#pragma once

#include <cstdint>
#include <type_traits>

namespace ring_ext::cuda {

// A bucket as a type: HeadDim<D>::value == D.
template <int D>
using HeadDim = std::integral_constant<int, D>;

// fn(HeadDim<D>{}) for the bucket D of head_dim: 64 for head dims up to 64, 128 up to 128, 256
// above (the callers check head_dim <= 256 first). In fn, `decltype(d)::value` is the bucket.
template <typename Fn>
void head_dim_switch(int64_t head_dim, Fn&& fn) {
  if (head_dim <= 64) {
    fn(HeadDim<64>{});
  } else if (head_dim <= 128) {
    fn(HeadDim<128>{});
  } else {
    fn(HeadDim<256>{});
  }
}

// fn(HeadDim<D>{}) for every bucket D, in increasing order.
template <typename Fn>
void for_each_head_dim(Fn&& fn) {
  fn(HeadDim<64>{});
  fn(HeadDim<128>{});
  fn(HeadDim<256>{});
}

}  // namespace ring_ext::cuda
