// Launchers of the CUDA kernels, callable from torch-free and ATen code alike.
// Each launcher picks the tensor-core path (bf16/fp16, head_dim and head_dim_v multiples of 8 up to
// 512, 16-byte aligned rows) or the SIMT fallback (float32, other head dims up to 512, odd
// alignments), and throws std::runtime_error on a launch failure or unsupported input. All work is
// queued on `stream`; nothing synchronises the host.
#pragma once

#include <cuda_runtime_api.h>

#include "../common/params.h"

namespace ring_ext::cuda {

// out, lse = attention(q, k, v) for one (q block, kv block) pair; out in p.out_dtype, lse float32.
void flash_fwd(const FwdParams& p, cudaStream_t stream);

// Adds this block pair's gradients into the float32 dq/dk/dv accumulators (the caller zeroes them),
// using the final lse of each row and p.delta = rowsum(dout * out) of the final out.
void flash_bwd(const BwdParams& p, cudaStream_t stream);

// Folds (block_out, block_lse) into the running float32 (out, lse), in place.
void lse_merge(const MergeParams& p, cudaStream_t stream);

}  // namespace ring_ext::cuda
