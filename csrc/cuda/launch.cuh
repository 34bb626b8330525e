// Host-side helpers shared by the launchers: error checks, the device's shared-memory limit, grid
// limits, the tensor-core eligibility test and the mask limits every kernel uses.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common/params.h"

namespace ring_ext::cuda {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("ring_ext CUDA ") + what + ": " + cudaGetErrorString(err));
  }
}

// Dynamic shared memory one block of the current device may use (opt-in limit,
// cudaDevAttrMaxSharedMemoryPerBlockOptin): 227 KiB on sm_90, 163 KiB on sm_80/87, 99 KiB on
// sm_86/89/120. Queried once per device.
inline int max_smem_per_block() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];  // 0: not queried yet
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  if (device < kMaxDevices) {
    if (const int bytes = cached[device].load(std::memory_order_relaxed)) return bytes;
  }
  int bytes = 0;
  check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  if (device < kMaxDevices) cached[device].store(bytes, std::memory_order_relaxed);
  return bytes;
}

// A launch grid from 64-bit extents, or an error naming the limit (x < 2^31, y and z <= 65535).
inline dim3 make_grid(int64_t x, int64_t y, int64_t z, const char* name) {
  if (x > 0x7fffffff || y > 65535 || z > 65535) {
    throw std::invalid_argument(std::string("ring_ext CUDA ") + name + ": launch grid (" +
                                std::to_string(x) + ", " + std::to_string(y) + ", " +
                                std::to_string(z) + ") exceeds CUDA's (2^31 - 1, 65535, 65535)");
  }
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z));
}

// Launches `kernel` with `smem_bytes` of dynamic shared memory, raising the kernel's limit above
// the default 48 KiB first. A tile that needs more than this device allows is an error that names
// both numbers (callers pick a tiling that fits first; this is the last line of defence).
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), const char* name, dim3 grid, int threads, int smem_bytes,
            cudaStream_t stream, const Args&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  if (smem_bytes > 48 * 1024) {
    const int limit = max_smem_per_block();
    if (smem_bytes > limit) {
      throw std::runtime_error(std::string("ring_ext CUDA ") + name + ": the kernel needs " +
                               std::to_string(smem_bytes) +
                               " bytes of shared memory per block, this device allows " +
                               std::to_string(limit));
    }
    check_cuda(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes),
        name);
  }
  kernel<<<grid, threads, smem_bytes, stream>>>(args...);
  check_cuda(cudaGetLastError(), name);
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// cp.async moves 16-byte chunks and the epilogues store pairs, so the tensor-core path needs every
// row start 16-byte aligned: an aligned base and strides that are multiples of 8 elements (the
// stride of a dim of size 1 is never used, so it may be anything).
inline bool rows_aligned(const void* ptr, const Strides& s, int64_t batch, int64_t seq,
                         int64_t heads) {
  const auto ok = [](int64_t stride, int64_t size) { return size <= 1 || stride % 8 == 0; };
  return aligned16(ptr) && ok(s.batch, batch) && ok(s.seq, seq) && ok(s.head, heads);
}

inline bool tensor_core_dims(const Shape& s) {
  return s.head_dim > 0 && s.head_dim <= 256 && s.head_dim % 8 == 0;
}

inline void check_shape(const Shape& s) {
  if (s.heads_kv <= 0 || s.heads_q % s.heads_kv != 0) {
    throw std::invalid_argument("ring_ext CUDA: heads_q must be a multiple of heads_kv");
  }
  if (s.seq_q >= (int64_t{1} << 30) || s.seq_k >= (int64_t{1} << 30)) {
    throw std::invalid_argument("ring_ext CUDA: seq_q and seq_k must be < 2^30");
  }
  if (s.batch > 65535 || s.heads_q > 65535) {
    throw std::invalid_argument("ring_ext CUDA: batch and heads must be <= 65535");
  }
}

// Causal offset difference q_offset - k_offset, clamped to [-2^30, 2^30]: with rows and keys
// below 2^30 (check_shape) `key <= row + diff` keeps its truth value, and for a row that exists
// `row + diff` fits an int. Bounds of a whole tile (whose last row may lie past seq_q) are
// computed in int64 (key_bound). Without a causal mask every key is visible, which the upper
// clamp value expresses.
inline int causal_diff(const Mask& m) {
  constexpr int64_t kLim = int64_t{1} << 30;
  if (m.kind != MaskKind::kCausal) return static_cast<int>(kLim);
  const int64_t diff = m.q_offset - m.k_offset;
  return static_cast<int>(diff > kLim ? kLim : (diff < -kLim ? -kLim : diff));
}

// min(limit, row + diff), the last key visible to `row`, for a tile row that may lie past seq_q
// (0 <= row < 2^31): the sum is taken in int64 and the result, >= -2^30, fits an int.
__device__ __forceinline__ int key_bound(int64_t row, int diff, int limit) {
  const int64_t bound = row + diff;
  return bound < limit ? static_cast<int>(bound) : limit;
}

__device__ __forceinline__ int clamp_key(int64_t key, int seq_k) {
  return key < 0 ? 0 : (key > seq_k ? seq_k : static_cast<int>(key));
}

// Note [Row key ranges on the device]
// Every mask kind, as the kernels read it: row r sees the keys first(r) <= key <= last(r) (empty
// when last < first), both ends non-decreasing in r (docs/design.md, "Mask model"). So a tile of
// rows [r0, r1] sees no key outside [first(r0), last(r1)] and needs no per-pair mask for keys in
// [first(r1), last(r0)]; the keys [k0, k1) are seen by one contiguous range of rows (rows_seeing).
// The offset masks (kNone, kCausal) are computed from diff; kRows reads the per-row intervals,
// rows past seq_q (tile padding) taking the last row's (the forward never stores them; the backward
// gives its padding rows no key at all). The intervals are trusted to be monotone here: the host
// checks them where they enter (block ops on CPU tensors, the CP ops always).
struct RowKeys {
  bool rows = false;               // kRows: read begin/end; else the offset mask of diff
  const int64_t* begin = nullptr;  // kRows: [seq_q] each, on the device
  const int64_t* end = nullptr;
  int diff = 0;  // offset masks: first(r) = 0, last(r) = min(r + diff, seq_k - 1)
  int seq_q = 0, seq_k = 0;

  __device__ __forceinline__ int first(int64_t row) const {
    if (!rows) return 0;
    return clamp_key(begin[row < seq_q ? row : seq_q - 1], seq_k);
  }
  __device__ __forceinline__ int last(int64_t row) const {
    if (!rows) return key_bound(row, diff, seq_k - 1);
    return clamp_key(end[row < seq_q ? row : seq_q - 1], seq_k) - 1;
  }
  // The rows [x, y) of [0, seq_q) that see some key of [k0, k1) (0 <= k0 < k1 <= seq_k):
  // last(r) >= k0 and first(r) < k1. Every thread searches alike (the loads are broadcasts).
  __device__ int2 rows_seeing(int k0, int k1) const {
    if (!rows) return make_int2(min(max(0, k0 - diff), seq_q), seq_q);
    const int x = first_row(0, [&](int r) { return last(r) >= k0; });
    return make_int2(x, first_row(x, [&](int r) { return first(r) >= k1; }));
  }

  // The first row of [lo, seq_q) with pred(row), seq_q if none (pred false, then true, along rows).
  template <typename Pred>
  __device__ int first_row(int lo, Pred pred) const {
    int hi = seq_q;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (pred(mid)) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    return lo;
  }
};

inline RowKeys row_keys(const Mask& m, const Shape& s) {
  RowKeys keys;
  if (m.kind == MaskKind::kRows) {
    keys.rows = true;
    keys.begin = m.row_begin;
    keys.end = m.row_end;
  }
  keys.diff = causal_diff(m);
  keys.seq_q = static_cast<int>(s.seq_q);
  keys.seq_k = static_cast<int>(s.seq_k);
  return keys;
}

}  // namespace ring_ext::cuda
