// SIMT attention kernels for what the tensor-core path does not take: float32 inputs, head dims
// that are not a multiple of 8, tensors whose rows are not 16-byte aligned, and devices whose
// shared memory fits no tensor-core backward tiling (Note [Head dim 512 in the backward] in
// flash_bwd.cu).
//
// Note [SIMT fallback tiling]
// Both kernels are instantiated per head-dim bucket D (head_dim.h; D of max(head_dim,
// head_dim_v), Note [One bucket for q/k and v]): lane L holds dims L, L + 32, ..., P = D / 32 of
// them, zero past each tensor's own dim.
//
// Forward: one warp per query row. Keys are walked one at a time: a warp-wide shuffle reduction
// gives the score and the row keeps an online softmax, which finish_row (scores.cuh) ends with the
// sink, if any.
//
// Backward: one CTA owns kBlockN consecutive keys of one (batch, kv head), like the tensor-core
// backward. Warp w holds kKeysPerWarp of them in registers (rows of K and V, and their dK and dV
// accumulators; lane L holds dims L, L + 32, ..., P of them) and the CTA walks every row of every
// q head of its GQA group that can see one of its keys:
//
//   per row i (all warps, staggered):  s_j = q_i . k_j, dp_j = dout_i . v_j   (warp reductions)
//                                      p_j = exp(x(s_j) - lse_i),
//                                      ds_j = p_j (dp_j - delta_i) x'(s_j)
//                                      (x: scale and softcap, x' its slope; Scores, scores.cuh)
//                                      dV_j += p_j dout_i, dK_j += ds_j q_i   (registers)
//                                      dq_tile[i] += sum_j ds_j k_j    (shared-memory atomics)
//   per kRows rows:                    dq[rows] += scale dq_tile       (one global atomic per
//                                                                       (row, dim) per CTA)
//   at the end:                        dk, dv[keys] += dK, dV          (plain stores, no atomics)
//
// dK and dV are therefore deterministic (one CTA owns its keys for every q head of the group);
// dq's last bits depend on the order of the atomics, as in the tensor-core backward.
//
// Accuracy: float32 accumulation with IEEE expf, logf and division (the CUDA build does not use
// --use_fast_math), so float32 inputs get float32-accurate results; not fast.
#include <cmath>

#include "head_dim.h"
#include "kernels.h"
#include "launch.cuh"
#include "mma.cuh"
#include "scores.cuh"

namespace ring_ext::cuda {
namespace {

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

// x[i] = row[lane + 32 i] as float, 0 past `dims` (element loads: any alignment).
template <typename T, int P>
__device__ __forceinline__ void load_row(float (&x)[P], const T* row, int dims) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int d = lane + 32 * i;
    x[i] = d < dims ? to_float(row[d]) : 0.0f;
  }
}

template <typename T, int P>
__device__ __forceinline__ float dot_row(const float (&x)[P], const T* row, int dims) {
  float y[P];
  load_row(y, row, dims);
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < P; ++i) acc += x[i] * y[i];
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

// P dims per lane: head_dim, head_dim_v <= 32 P.
template <typename T, int P>
__global__ void simt_fwd_kernel(const FwdParams p, const RowKeys<int> keys) {
  const int lane = threadIdx.x % 32, b = blockIdx.z, h = blockIdx.y;
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
  const int hk = h / (p.shape.heads_q / p.shape.heads_kv);
  const int head_dim = p.shape.head_dim, head_dim_v = p.shape.head_dim_v;
  if (row >= p.shape.seq_q) return;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head;
  float q[P], o[P] = {};
  load_row(q,
           static_cast<const T*>(p.q) + b * p.q_stride.batch + h * p.q_stride.head +
               row * p.q_stride.seq,
           head_dim);
  const Scores score = Scores::make(p.scale, p.softcap, 1.0f);
  float max = -INFINITY, sum = 0.0f;
  const Interval<int> seen = keys.keys(row);
  for (int j = seen.begin; j < seen.end; ++j) {
    const float x = score(dot_row(q, k + j * p.k_stride.seq, head_dim));
    const float new_max = fmaxf(max, x);
    const float alpha = expf(max - new_max), prob = expf(x - new_max);
    float vj[P];
    load_row(vj, v + j * p.v_stride.seq, head_dim_v);
#pragma unroll
    for (int i = 0; i < P; ++i) o[i] = o[i] * alpha + prob * vj[i];
    sum = sum * alpha + prob;
    max = new_max;
  }
  const RowEnd end = finish_row<false>(max, sum, sink_of(p, h, 1.0f));
  const int64_t out_row = b * p.out_stride.batch + h * p.out_stride.head + row * p.out_stride.seq;
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int d = lane + 32 * i;
    if (d < head_dim_v) store_value<T>(p.out, out_row + d, o[i] * end.out_scale, p.out_dtype);
  }
  if (lane == 0) p.lse[b * p.lse_stride.batch + h * p.lse_stride.head + row] = end.lse;
}

// P dims per lane (head_dim, head_dim_v <= 32 P); kKeysPerWarp keys per warp keep K, V, dK, dV at
// 64 registers.
template <int P>
struct SimtBwdConfig {
  static constexpr int kWarps = 8, kThreads = 32 * kWarps;
  static constexpr int kKeysPerWarp = 16 / P;
  static constexpr int kBlockN = kWarps * kKeysPerWarp;  // 64, 32, 16, 8 keys for P = 2, 4, 8, 16
  static constexpr int kRows = 16;                       // rows per dq flush (32 KiB at P = 16)
};

// dq[rows r0.., :] += scale * tile, then zeroes the tile; every thread of the CTA takes part.
template <int P, int kRows>
__device__ __forceinline__ void flush_dq(float (&tile)[kRows][32 * P], float* dq, int64_t ld,
                                         int r0, int rows, int head_dim, float scale) {
  for (int i = threadIdx.x; i < rows * 32 * P; i += blockDim.x) {
    const int r = i / (32 * P), d = i % (32 * P);
    const float x = tile[r][d];
    if (x != 0.0f && d < head_dim) atomicAdd(dq + (r0 + r) * ld + d, scale * x);
    tile[r][d] = 0.0f;
  }
}

template <typename T, int P>
__global__ void __launch_bounds__(SimtBwdConfig<P>::kThreads)
    simt_bwd_kernel(const BwdParams p, const RowKeys<int> keys) {
  using Cfg = SimtBwdConfig<P>;
  constexpr int KPW = Cfg::kKeysPerWarp, kRows = Cfg::kRows;
  __shared__ float dq_tile[kRows][32 * P];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int b = blockIdx.z, hk = blockIdx.y, n0 = blockIdx.x * Cfg::kBlockN;
  const int group = static_cast<int>(p.shape.heads_q / p.shape.heads_kv);
  const int seq_k = static_cast<int>(p.shape.seq_k);
  const int head_dim = static_cast<int>(p.shape.head_dim);
  const int head_dim_v = static_cast<int>(p.shape.head_dim_v);
  const Scores score = Scores::make(p.scale, p.softcap, 1.0f);
  // Only rows_seen see one of this CTA's keys (Note [Mask rule] in csrc/common/mask.h).
  const Interval<int> rows_seen = keys.rows_seeing(n0, min(n0 + Cfg::kBlockN, seq_k));
  if (rows_seen.empty()) return;  // the whole CTA: no barrier is skipped by part of it

  // This warp's keys: key0 + j for j < KPW; keys past seq_k stay zero and are never visible.
  const int key0 = n0 + warp * KPW;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head;
  float kr[KPW][P], vr[KPW][P], dk[KPW][P] = {}, dv[KPW][P] = {};
#pragma unroll
  for (int j = 0; j < KPW; ++j) {
    const bool valid = key0 + j < seq_k;
    load_row(kr[j], k + (valid ? key0 + j : 0) * p.k_stride.seq, valid ? head_dim : 0);
    load_row(vr[j], v + (valid ? key0 + j : 0) * p.v_stride.seq, valid ? head_dim_v : 0);
  }
  for (int i = threadIdx.x; i < kRows * 32 * P; i += blockDim.x) (&dq_tile[0][0])[i] = 0.0f;
  __syncthreads();

  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride.batch + h * p.q_stride.head;
    const T* dout =
        static_cast<const T*>(p.dout) + b * p.dout_stride.batch + h * p.dout_stride.head;
    const float* lse = p.lse + b * p.lse_stride.batch + h * p.lse_stride.head;
    const float* delta = p.delta + b * p.delta_stride.batch + h * p.delta_stride.head;
    float* dq = p.dq + b * p.dq_stride.batch + h * p.dq_stride.head;
    for (int r0 = rows_seen.begin; r0 < rows_seen.end; r0 += kRows) {
      const int rows = min(kRows, rows_seen.end - r0);
      for (int i = 0; i < rows; ++i) {
        // Warps start on different rows so that fewer shared-memory atomics hit one address.
        const int r = (i + warp) % rows, row = r0 + r;
        const float row_lse = lse[row];
        // A row that saw no key has no gradient; one that sees none of this warp's keys (a tile
        // of one row, kEmpty) adds nothing. Both are warp-uniform.
        const Interval<int> seen = keys.keys(row);
        if (row_lse == -INFINITY ||
            block_visibility(seen, seen, key0, key0 + KPW) == BlockVisibility::kEmpty)
          continue;
        const float row_delta = delta[row];
        float qr[P], dor[P];
        load_row(qr, q + row * p.q_stride.seq, head_dim);
        load_row(dor, dout + row * p.dout_stride.seq, head_dim_v);
        float s[KPW], dp[KPW];
#pragma unroll
        for (int j = 0; j < KPW; ++j) {
          s[j] = 0.0f;
          dp[j] = 0.0f;
#pragma unroll
          for (int e = 0; e < P; ++e) {
            s[j] += qr[e] * kr[j][e];
            dp[j] += dor[e] * vr[j][e];
          }
        }
#pragma unroll
        for (int m = 16; m > 0; m /= 2) {
#pragma unroll
          for (int j = 0; j < KPW; ++j) {
            s[j] += __shfl_xor_sync(0xffffffff, s[j], m);
            dp[j] += __shfl_xor_sync(0xffffffff, dp[j], m);
          }
        }
        float dq_part[P] = {};
#pragma unroll
        for (int j = 0; j < KPW; ++j) {
          const bool visible = seen.contains(key0 + j);
          float slope;
          const float x = score(s[j], slope);
          const float prob = visible ? expf(x - row_lse) : 0.0f;
          const float ds = prob * (dp[j] - row_delta) * slope;
#pragma unroll
          for (int e = 0; e < P; ++e) {
            dv[j][e] += prob * dor[e];
            dk[j][e] += ds * qr[e];
            dq_part[e] += ds * kr[j][e];
          }
        }
#pragma unroll
        for (int e = 0; e < P; ++e) {
          if (lane + 32 * e < head_dim) atomicAdd(&dq_tile[r][lane + 32 * e], dq_part[e]);
        }
      }
      __syncthreads();  // dq_tile complete for rows [r0, r0 + rows)
      flush_dq<P, kRows>(dq_tile, dq, p.dq_stride.seq, r0, rows, head_dim, p.scale);
      __syncthreads();  // dq_tile zero again
    }
  }

  // The CTA owns its keys: add dK (scaled) and dV once, without atomics.
  float* dk_out = p.dk + b * p.dk_stride.batch + hk * p.dk_stride.head;
  float* dv_out = p.dv + b * p.dv_stride.batch + hk * p.dv_stride.head;
#pragma unroll
  for (int j = 0; j < KPW; ++j) {
    if (key0 + j >= seq_k) break;
#pragma unroll
    for (int e = 0; e < P; ++e) {
      const int d = lane + 32 * e;
      if (d < head_dim) dk_out[(key0 + j) * p.dk_stride.seq + d] += p.scale * dk[j][e];
      if (d < head_dim_v) dv_out[(key0 + j) * p.dv_stride.seq + d] += dv[j][e];
    }
  }
}

template <typename T, int P>
void launch_simt_fwd(const FwdParams& p, cudaStream_t stream) {
  const dim3 grid = make_grid((p.shape.seq_q + kRowsPerBlock - 1) / kRowsPerBlock, p.shape.heads_q,
                              p.shape.batch, "simt_fwd");
  launch(simt_fwd_kernel<T, P>, "simt_fwd", grid, 32 * kRowsPerBlock, 0, stream, p,
         row_keys<int>(p.mask, p.shape));
}

// P = D / 32 dims per lane for the head-dim bucket D.
template <typename T>
void dispatch_simt_fwd(const FwdParams& p, cudaStream_t stream) {
  head_dim_switch(bucket_dim(p.shape),
                  [&](auto d) { launch_simt_fwd<T, decltype(d)::value / 32>(p, stream); });
}

template <typename T, int P>
void launch_simt_bwd(const BwdParams& p, cudaStream_t stream) {
  using Cfg = SimtBwdConfig<P>;
  const dim3 grid = make_grid((p.shape.seq_k + Cfg::kBlockN - 1) / Cfg::kBlockN, p.shape.heads_kv,
                              p.shape.batch, "simt_bwd");
  launch(simt_bwd_kernel<T, P>, "simt_bwd", grid, Cfg::kThreads, 0, stream, p,
         row_keys<int>(p.mask, p.shape));
}

// P = D / 32 dims per lane for the head-dim bucket D.
template <typename T>
void dispatch_simt_bwd(const BwdParams& p, cudaStream_t stream) {
  head_dim_switch(bucket_dim(p.shape),
                  [&](auto d) { launch_simt_bwd<T, decltype(d)::value / 32>(p, stream); });
}

}  // namespace

// The callers (flash_fwd, flash_bwd) have checked the shape (check_shape in launch.cuh).
void simt_fwd(const FwdParams& p, cudaStream_t stream) {
  switch (p.in_dtype) {
    case DType::kFloat32:
      return dispatch_simt_fwd<float>(p, stream);
    case DType::kBFloat16:
      return dispatch_simt_fwd<__nv_bfloat16>(p, stream);
    case DType::kFloat16:
      return dispatch_simt_fwd<__half>(p, stream);
  }
}

void simt_bwd(const BwdParams& p, cudaStream_t stream) {
  switch (p.in_dtype) {
    case DType::kFloat32:
      return dispatch_simt_bwd<float>(p, stream);
    case DType::kBFloat16:
      return dispatch_simt_bwd<__nv_bfloat16>(p, stream);
    case DType::kFloat16:
      return dispatch_simt_bwd<__half>(p, stream);
  }
}

}  // namespace ring_ext::cuda
