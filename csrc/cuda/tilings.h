// The candidate tilings of the tensor-core kernels (Note [Candidate tilings] in flash_fwd.cu):
// their names, and which one the environment asks for. Host code only, no CUDA headers (ops.cpp
// lists the names through the cuda_tilings op).
#pragma once

#include <cstdlib>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "head_dim.h"

namespace ring_ext::cuda {

enum class TiledKernel { kFwd, kBwd };

// "fwd/<D>/<name>" and "bwd/<D>/<name>" for every compiled tiling, the default of each head-dim
// bucket D first (flash_fwd.cu, flash_bwd.cu).
std::vector<std::string> fwd_tilings();
std::vector<std::string> bwd_tilings();

// m<rows>n<keys>w<warps>, then p for double-buffered k-loop fragments, d for double-buffered Q/dO.
inline std::string tiling_name(int rows, int keys, int warps, bool pipelined, bool double_qdo) {
  return "m" + std::to_string(rows) + "n" + std::to_string(keys) + "w" + std::to_string(warps) +
         (pipelined ? "p" : "") + (double_qdo ? "d" : "");
}

// The names of a bucket's tilings (a std::tuple of configs, each with D and name()), in order.
template <typename... Cfgs>
std::vector<std::string> names_of(std::tuple<Cfgs...>*) {
  return {Cfgs::name()...};
}

// "<kernel>/<D>/<name>" for every tiling of Candidates<D> (each with a List of configs) of every
// head-dim bucket D (head_dim.h), in order: what fwd_tilings and bwd_tilings return.
template <template <int> class Candidates>
std::vector<std::string> bucket_tilings(const std::string& kernel) {
  std::vector<std::string> out;
  for_each_head_dim([&](auto d) {
    constexpr int D = decltype(d)::value;
    for (const std::string& name : names_of(static_cast<typename Candidates<D>::List*>(nullptr)))
      out.push_back(kernel + "/" + std::to_string(D) + "/" + name);
  });
  return out;
}

// The index in `names` (the tilings of head-dim bucket `head_dim`) of the tiling named by
// RING_EXT_CUDA_FWD_TILING / RING_EXT_CUDA_BWD_TILING, -1 when the variable is unset or empty; a
// name that is not among them is an error naming the variable and the choices. Read at every
// launch (a getenv and a few string compares, next to a kernel launch), not once per process:
// ring_ext.cuda_tilings.chosen switches the tiling within a process by setting the variable, which
// benchmarks/bench_cuda.py and tests/test_cuda.py rely on to run every candidate in one process.
inline int chosen_tiling(TiledKernel kernel, int head_dim, const std::vector<std::string>& names) {
  const char* var =
      kernel == TiledKernel::kFwd ? "RING_EXT_CUDA_FWD_TILING" : "RING_EXT_CUDA_BWD_TILING";
  const char* value = std::getenv(var);
  if (value == nullptr || *value == '\0') return -1;
  std::string choices;
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i] == value) return static_cast<int>(i);
    choices += (i ? ", " : "") + names[i];
  }
  throw std::invalid_argument(std::string("ring_ext CUDA: ") + var + "=" + value +
                              " is not a tiling of the head-dim bucket " +
                              std::to_string(head_dim) + "; its tilings are " + choices +
                              " (unset it for the default)");
}

}  // namespace ring_ext::cuda
