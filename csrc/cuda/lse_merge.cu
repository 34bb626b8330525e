// Fused LSE merge: (out, lse) <- merge((out, lse), (block_out, block_lse)), in place.
//
// Note [Merge tiling]
// One warp per (batch, head, row): every lane reads both LSEs and computes the weights with
// merge_weights (lse_math.h, shared with the CPU kernels), lanes stride over head_dim to update
// out, and lane 0 writes the merged LSE after the warp has read the old one. Elementwise and
// memory-bound; rows with both LSEs -inf stay (out = 0, lse = -inf).
#include <cmath>

#include "../common/lse_math.h"
#include "kernels.h"
#include "launch.cuh"
#include "mma.cuh"

namespace ring_ext::cuda {
namespace {

constexpr int kRowsPerBlock = 8;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__global__ void lse_merge_kernel(const MergeParams p) {
  const int lane = threadIdx.x % 32, b = blockIdx.z, h = blockIdx.y;
  const int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / 32;
  if (row >= p.shape.seq_q) return;
  float* lse = p.lse + b * p.lse_stride.batch + h * p.lse_stride.head + row;
  const float block_lse =
      p.block_lse[b * p.block_lse_stride.batch + h * p.block_lse_stride.head + row];
  const MergeWeights w = merge_weights(*lse, block_lse);
  float* out = p.out + b * p.out_stride.batch + h * p.out_stride.head + row * p.out_stride.seq;
  const T* block_out = static_cast<const T*>(p.block_out) + b * p.block_out_stride.batch +
                       h * p.block_out_stride.head + row * p.block_out_stride.seq;
  for (int d = lane; d < p.shape.head_dim; d += 32) {
    // A side with weight 0 is skipped so that its (unused) values cannot turn the sum into NaN.
    const float o1 = w.w1 != 0.0f ? w.w1 * out[d] : 0.0f;
    const float o2 = w.w2 != 0.0f ? w.w2 * to_float(block_out[d]) : 0.0f;
    out[d] = o1 + o2;
  }
  __syncwarp();
  if (lane == 0) *lse = w.lse;
}

}  // namespace

void lse_merge(const MergeParams& p, cudaStream_t stream) {
  // Batch and heads above 65535 (grid y, z) are an error naming the limit, not a failed launch.
  const dim3 grid = make_grid((p.shape.seq_q + kRowsPerBlock - 1) / kRowsPerBlock, p.shape.heads_q,
                              p.shape.batch, "lse_merge");
  const int threads = 32 * kRowsPerBlock;
  switch (p.block_dtype) {
    case DType::kFloat32:
      return launch(lse_merge_kernel<float>, "lse_merge", grid, threads, 0, stream, p);
    case DType::kBFloat16:
      return launch(lse_merge_kernel<__nv_bfloat16>, "lse_merge", grid, threads, 0, stream, p);
    case DType::kFloat16:
      return launch(lse_merge_kernel<__half>, "lse_merge", grid, threads, 0, stream, p);
  }
}

}  // namespace ring_ext::cuda
