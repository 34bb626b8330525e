// SIMT attention kernels for what the tensor-core path does not take: float32 inputs, head dims
// that are not a multiple of 8 or above 256, and tensors whose rows are not 16-byte aligned.
//
// Note [SIMT fallback tiling]
// One warp per query row; lane L holds dims L, L + 32, ... (at most kPerLane of them, so
// head_dim <= 32 * kPerLane). Keys are walked one at a time: a warp-wide shuffle reduction gives
// the score, and the row keeps an online softmax (forward) or accumulates dq in registers while
// adding dk/dv with float32 atomics (backward). Simple and exact in float32, not fast.
#include <cmath>
#include <stdexcept>

#include "kernels.h"
#include "launch.cuh"
#include "mma.cuh"

namespace ring_ext::cuda {
namespace {

constexpr int kPerLane = 8;  // head_dim <= 256
constexpr int kRowsPerBlock = 4;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

__device__ __forceinline__ void from_float(float x, float* out) { *out = x; }
__device__ __forceinline__ void from_float(float x, __nv_bfloat16* out) {
  *out = __float2bfloat16(x);
}
__device__ __forceinline__ void from_float(float x, __half* out) { *out = __float2half(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int m = 16; m > 0; m /= 2) x += __shfl_xor_sync(0xffffffff, x, m);
  return x;
}

// x[i] = row[lane + 32 i] as float, 0 past head_dim.
template <typename T>
__device__ __forceinline__ void load_row(float (&x)[kPerLane], const T* row, int head_dim) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    x[i] = d < head_dim ? to_float(row[d]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ float dot_row(const float (&x)[kPerLane], const T* row, int head_dim) {
  float y[kPerLane];
  load_row(y, row, head_dim);
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc += x[i] * y[i];
  return warp_sum(acc);
}

template <typename T>
__device__ __forceinline__ void store_value(void* base, int64_t idx, float x, DType dtype) {
  if (dtype == DType::kFloat32) {
    static_cast<float*>(base)[idx] = x;
  } else {
    from_float(x, static_cast<T*>(base) + idx);
  }
}

template <typename T>
__global__ void simt_fwd_kernel(const FwdParams p, const int diff) {
  const int lane = threadIdx.x % 32, b = blockIdx.z, h = blockIdx.y;
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
  const int hk = h / (p.shape.heads_q / p.shape.heads_kv), head_dim = p.shape.head_dim;
  if (row >= p.shape.seq_q) return;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head;
  float q[kPerLane], o[kPerLane] = {};
  load_row(q,
           static_cast<const T*>(p.q) + b * p.q_stride.batch + h * p.q_stride.head +
               row * p.q_stride.seq,
           head_dim);
  float max = -INFINITY, sum = 0.0f;
  const int last_key = min(static_cast<int>(p.shape.seq_k) - 1, row + diff);
  for (int j = 0; j <= last_key; ++j) {
    const float x = dot_row(q, k + j * p.k_stride.seq, head_dim) * p.scale;
    const float new_max = fmaxf(max, x);
    const float alpha = expf(max - new_max), prob = expf(x - new_max);
    float vj[kPerLane];
    load_row(vj, v + j * p.v_stride.seq, head_dim);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) o[i] = o[i] * alpha + prob * vj[i];
    sum = sum * alpha + prob;
    max = new_max;
  }
  const int64_t out_row = b * p.out_stride.batch + h * p.out_stride.head + row * p.out_stride.seq;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < head_dim)
      store_value<T>(p.out, out_row + d, sum > 0.0f ? o[i] / sum : 0.0f, p.out_dtype);
  }
  if (lane == 0) {
    p.lse[b * p.lse_stride.batch + h * p.lse_stride.head + row] =
        sum > 0.0f ? max + logf(sum) : -INFINITY;
  }
}

template <typename T>
__global__ void simt_bwd_kernel(const BwdParams p, const int diff) {
  const int lane = threadIdx.x % 32, b = blockIdx.z, h = blockIdx.y;
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
  const int hk = h / (p.shape.heads_q / p.shape.heads_kv), head_dim = p.shape.head_dim;
  if (row >= p.shape.seq_q) return;
  const float lse = p.lse[b * p.lse_stride.batch + h * p.lse_stride.head + row];
  const float delta = p.delta[b * p.delta_stride.batch + h * p.delta_stride.head + row];
  if (lse == -INFINITY) return;  // the row saw no key: no gradient flows through it
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head;
  float* dk = p.dk + b * p.dk_stride.batch + hk * p.dk_stride.head;
  float* dv = p.dv + b * p.dv_stride.batch + hk * p.dv_stride.head;
  float q[kPerLane], dout[kPerLane], dq[kPerLane] = {};
  load_row(q,
           static_cast<const T*>(p.q) + b * p.q_stride.batch + h * p.q_stride.head +
               row * p.q_stride.seq,
           head_dim);
  load_row(dout,
           static_cast<const T*>(p.dout) + b * p.dout_stride.batch + h * p.dout_stride.head +
               row * p.dout_stride.seq,
           head_dim);
  const int last_key = min(static_cast<int>(p.shape.seq_k) - 1, row + diff);
  for (int j = 0; j <= last_key; ++j) {
    const float prob = expf(dot_row(q, k + j * p.k_stride.seq, head_dim) * p.scale - lse);
    const float ds = prob * (dot_row(dout, v + j * p.v_stride.seq, head_dim) - delta);
    float kj[kPerLane];
    load_row(kj, k + j * p.k_stride.seq, head_dim);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      dq[i] += ds * kj[i];
      if (d < head_dim) {
        atomicAdd(dk + j * p.dk_stride.seq + d, p.scale * ds * q[i]);
        atomicAdd(dv + j * p.dv_stride.seq + d, prob * dout[i]);
      }
    }
  }
  float* dq_row = p.dq + b * p.dq_stride.batch + h * p.dq_stride.head + row * p.dq_stride.seq;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < head_dim) dq_row[d] += p.scale * dq[i];
  }
}

template <typename Params>
dim3 row_grid(const Params& p) {
  return dim3(static_cast<unsigned>((p.shape.seq_q + kRowsPerBlock - 1) / kRowsPerBlock),
              static_cast<unsigned>(p.shape.heads_q), static_cast<unsigned>(p.shape.batch));
}

void check_simt_head_dim(const Shape& s) {
  if (s.head_dim > 32 * kPerLane) {
    throw std::invalid_argument("ring_ext CUDA: head_dim must be <= 256");
  }
}

}  // namespace

void simt_fwd(const FwdParams& p, cudaStream_t stream) {
  check_simt_head_dim(p.shape);
  const int threads = 32 * kRowsPerBlock, diff = causal_diff(p.mask);
  switch (p.in_dtype) {
    case DType::kFloat32:
      return launch(simt_fwd_kernel<float>, "simt_fwd", row_grid(p), threads, 0, stream, p, diff);
    case DType::kBFloat16:
      return launch(simt_fwd_kernel<__nv_bfloat16>, "simt_fwd", row_grid(p), threads, 0, stream, p,
                    diff);
    case DType::kFloat16:
      return launch(simt_fwd_kernel<__half>, "simt_fwd", row_grid(p), threads, 0, stream, p, diff);
  }
}

void simt_bwd(const BwdParams& p, cudaStream_t stream) {
  check_simt_head_dim(p.shape);
  const int threads = 32 * kRowsPerBlock, diff = causal_diff(p.mask);
  switch (p.in_dtype) {
    case DType::kFloat32:
      return launch(simt_bwd_kernel<float>, "simt_bwd", row_grid(p), threads, 0, stream, p, diff);
    case DType::kBFloat16:
      return launch(simt_bwd_kernel<__nv_bfloat16>, "simt_bwd", row_grid(p), threads, 0, stream, p,
                    diff);
    case DType::kFloat16:
      return launch(simt_bwd_kernel<__half>, "simt_bwd", row_grid(p), threads, 0, stream, p, diff);
  }
}

}  // namespace ring_ext::cuda
