// Host-side helpers shared by the launchers: error checks, the device's shared-memory limit, grid
// limits, the tensor-core eligibility test and the size limits every kernel relies on (the mask
// rule, csrc/common/mask.h, indexes keys and rows in int; head dims up to kMaxHeadDim).
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common/mask.h"
#include "../common/params.h"
#include "head_dim.h"

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

// Both head dims (q/k's and v's) multiples of 8 up to kMaxHeadDim: whole 16-byte chunks.
inline bool tensor_core_dims(const Shape& s) {
  const auto ok = [](int64_t d) { return d > 0 && d <= kMaxHeadDim && d % 8 == 0; };
  return ok(s.head_dim) && ok(s.head_dim_v);
}

// The sizes every kernel takes: whole GQA groups, sequences below 2^30 (the device's mask rule
// indexes them in int, Note [Mask rule] in csrc/common/mask.h) and launch grids within CUDA's.
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
  if (s.head_dim < 1 || s.head_dim > kMaxHeadDim || s.head_dim_v < 1 ||
      s.head_dim_v > kMaxHeadDim) {
    throw std::invalid_argument(
        "ring_ext CUDA: head_dim and head_dim_v must be in [1, " + std::to_string(kMaxHeadDim) +
        "], got " + std::to_string(s.head_dim) + " and " + std::to_string(s.head_dim_v));
  }
}

}  // namespace ring_ext::cuda
