// torch.ops.ring_ext.attention / attention_bwd: one device-generic implementation (attention.cpp)
// that each backend's registration file (csrc/cpu/ops_cpu.cpp, csrc/cuda/ops_cuda.cpp) registers
// under its dispatch key, beside its block kernels.
#pragma once

#include <torch/library.h>

namespace ring_ext {

// m.impl()s attention and attention_bwd inside a backend's TORCH_LIBRARY_IMPL block.
void register_cp_ops(torch::Library& m);

}  // namespace ring_ext
