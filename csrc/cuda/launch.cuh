// Host-side helpers shared by the launchers: error checks, the tensor-core eligibility test and the
// mask limits every kernel uses.
#pragma once

#include <cuda_runtime_api.h>

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

// Raises the dynamic shared-memory limit of `kernel` (needed above 48 KiB) and launches it.
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), const char* name, dim3 grid, int threads, int smem_bytes,
            cudaStream_t stream, const Args&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  if (smem_bytes > 48 * 1024) {
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
// below 2^30 (check_shape) `key <= row + diff` then never overflows an int and keeps its truth
// value. Without a causal mask every key is visible, which the upper clamp value expresses.
inline int causal_diff(const Mask& m) {
  constexpr int64_t kLim = int64_t{1} << 30;
  if (m.kind != MaskKind::kCausal) return static_cast<int>(kLim);
  const int64_t diff = m.q_offset - m.k_offset;
  return static_cast<int>(diff > kLim ? kLim : (diff < -kLim ? -kLim : diff));
}

}  // namespace ring_ext::cuda
