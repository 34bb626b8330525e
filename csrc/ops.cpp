// Every schema of the ring_ext namespace, in one place. Kernels are registered per backend, all of
// a backend's in one file: csrc/cpu/ops_cpu.cpp and csrc/cuda/ops_cuda.cpp; ring_schedule, which
// has no tensors, is defined here with its kernel. Fake kernels and autograd live in
// ring_ext/ops.py.
//
// Tensor convention of the block ops: q/out/dout [batch, seq_q, heads_q, head_dim],
// k/v [batch, seq_k, heads_kv, head_dim], any strides with head_dim contiguous;
// lse/delta float32 [batch, heads_q, seq_q]. See csrc/common/params.h.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cp/ring.h"
#include "cpu/kernels.h"
#ifdef RING_EXT_WITH_CUDA
#include "cuda/tilings.h"
#endif

namespace {

// The candidate tilings compiled into the CUDA kernels ("fwd/128/m128n64w8", ..., the default of
// each head-dim bucket first; Note [Candidate tilings] in csrc/cuda/flash_fwd.cu); none without
// CUDA.
std::vector<std::string> cuda_tilings() {
#ifdef RING_EXT_WITH_CUDA
  std::vector<std::string> names = ring_ext::cuda::fwd_tilings();
  for (std::string& name : ring_ext::cuda::bwd_tilings()) names.push_back(std::move(name));
  return names;
#else
  return {};
#endif
}

}  // namespace

// Importing ring_ext._C loads this library, which runs the registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(ring_ext, m) {
  // Blockwise flash attention of one (q block, kv block) pair: q [b, sq, hq, d], k [b, sk, hkv, d],
  // v [b, sk, hkv, dv] (dv may differ from d: MLA), out [b, sq, hq, dv]. softcap (0: none) and
  // sinks (a float [hq] or None): Note [Softcap and sinks] in csrc/common/params.h; every op
  // below takes softcap, the forward ones sinks (the backward ones need only the final lse).
  // Causal is at global offsets (key j visible to row i iff k_offset + j <= q_offset + i). out_fp32
  // keeps the partial output in float32 for the ring's merge. visible (int64 [2, seq_q], with
  // causal=False) replaces the mask by per-row key intervals [visible[0, i], visible[1, i]),
  // non-decreasing in i: packed documents and sliding windows (MaskKind::kRows in
  // csrc/common/params.h); [4, seq_q] adds a second interval per row [visible[2, i],
  // visible[3, i]) after the first (Note [Two key intervals per row] in csrc/common/block_ops.cpp).
  // clang-format off
  m.def("fwd("
        "Tensor q, "
        "Tensor k, "
        "Tensor v, "
        "float scale, "
        "bool causal, "
        "int q_offset=0, "
        "int k_offset=0, "
        "bool out_fp32=False, "
        "Tensor? visible=None, "
        "float softcap=0.0, "
        "Tensor? sinks=None"
        ") -> (Tensor out, Tensor lse)");
  // clang-format on
  // Gradients of fwd, given the final out and lse of each row (and the gradient of lse, if any).
  // Returns q/k/v's dtype.
  // clang-format off
  m.def("bwd("
        "Tensor dout, "
        "Tensor q, "
        "Tensor k, "
        "Tensor v, "
        "Tensor out, "
        "Tensor lse, "
        "float scale, "
        "bool causal, "
        "int q_offset=0, "
        "int k_offset=0, "
        "Tensor? dlse=None, "
        "Tensor? visible=None, "
        "float softcap=0.0"
        ") -> (Tensor dq, Tensor dk, Tensor dv)");
  // clang-format on
  // The ring's backward step: adds this block pair's gradients into float32 accumulators.
  // delta = rowsum(dout * out) of the final out, float32 [batch, heads_q, seq_q].
  // clang-format off
  m.def("bwd_acc("
        "Tensor dout, "
        "Tensor q, "
        "Tensor k, "
        "Tensor v, "
        "Tensor lse, "
        "Tensor delta, "
        "float scale, "
        "bool causal, "
        "int q_offset, "
        "int k_offset, "
        "Tensor(a!) dq, "
        "Tensor(b!) dk, "
        "Tensor(c!) dv, "
        "Tensor? visible=None, "
        "float softcap=0.0"
        ") -> ()");
  // clang-format on
  // Folds a partial (block_out, block_lse) into the running float32 (out, lse), in place.
  m.def("merge_(Tensor(a!) out, Tensor(b!) lse, Tensor block_out, Tensor block_lse) -> ()");
  // Context-parallel attention of this rank's shards q [b, s, hq, d], k/v [b, s, hkv, d] (any
  // strides), over process groups given by name (c10d::resolve_process_group). algo is the
  // --context-parallel-algo; ring_group is the ring's group, inner_group/outer_group the double
  // ring's ("" for the plain ring), ulysses_group Ulysses' (hybrid). Causal shards are zigzag
  // (ring_ext/placement.py). Returns out [b, s, hq, d] in q's dtype, dense in `layout` (bshd, sbhd,
  // bnsd, sbh: Note [Output contract] in csrc/cp/attention.cpp), lse float32 [b, hq, s].
  // visible (packed documents, sliding windows; with causal=False): the key intervals of every
  // source block, int64 [sources, 2 or 4, rows]: one source per ring rank for the ring and hybrid
  // (rows = the ring's block), one for Ulysses (rows = the gathered sequence); Note [Per-source key
  // intervals] in csrc/cp/ring.cpp, ring_ext/placement.py. needed (ring and hybrid, with visible;
  // int64 [ring ranks, sources, 2]): the rows [lo, hi) of each source block that each ring rank
  // sees, so the ring moves nothing else (Note [Moving only what is seen]); absent: every row.
  // rows: the length every rank's shard counts as in the blocks that move (a placement's longest
  // shard); a shorter q is this rank's real tokens, padded inside the buffers the op fills anyway
  // (Note [Shards of unequal length] in csrc/cp/attention.cpp); 0: q's length.
  // check_group (a group of every CP rank; "" skips the check) and signature (what the caller
  // adds to the call's description, e.g. a hash of cu_seqlens): Note [Cross-rank check] in
  // csrc/cp/consistency.h.
  // clang-format off
  m.def("attention("
        "Tensor q, "
        "Tensor k, "
        "Tensor v, "
        "float scale, "
        "bool causal, "
        "str algo, "
        "str ring_group, "
        "str inner_group=\"\", "
        "str outer_group=\"\", "
        "str ulysses_group=\"\", "
        "bool overlap=True, "
        "str layout=\"bshd\", "
        "Tensor? visible=None, "
        "Tensor? needed=None, "
        "int rows=0, "
        "str check_group=\"\", "
        "int signature=0, "
        "float softcap=0.0, "
        "Tensor? sinks=None"
        ") -> (Tensor out, Tensor lse)");
  // Gradients of attention given its final out and lse; dq/dk/dv in the dtype and strides of q/k/v.
  m.def("attention_bwd("
        "Tensor dout, "
        "Tensor q, "
        "Tensor k, "
        "Tensor v, "
        "Tensor out, "
        "Tensor lse, "
        "float scale, "
        "bool causal, "
        "str algo, "
        "str ring_group, "
        "str inner_group=\"\", "
        "str outer_group=\"\", "
        "str ulysses_group=\"\", "
        "bool overlap=True, "
        "Tensor? dlse=None, "
        "Tensor? visible=None, "
        "Tensor? needed=None, "
        "int rows=0, "
        "float softcap=0.0"
        ") -> (Tensor dq, Tensor dk, Tensor dv)");
  // Attention under a mask described by values: packed documents (cu_seqlens, int64 [n_docs + 1],
  // None: one document of the whole sequence), a sliding window (0: none) and/or chunked attention
  // (attention_chunk_size, 0: none), or the caller's key intervals of every token (key_bounds, int64
  // [2, S] or [4, S] for two per token, replacing the rest of the rule; ring_ext/masks.py). The placement and
  // the key intervals are computed inside the op from cu_seqlens' values, so torch.compile traces
  // a call without reading them (no graph break, no recompilation when only document lengths
  // change). Its kernel is Python (ring_ext/masked.py), for every device; it calls attention, or
  // fwd with algo "" (one process). rank, cp_size, ulysses_degree and cp_sliding_window (0: none)
  // describe the placement (ring_ext/placement.py); the rest is attention's.
  m.def("masked_attention("
        "Tensor q, "
        "Tensor k, "
        "Tensor v, "
        "Tensor? cu_seqlens, "
        "int sliding_window, "
        "float scale, "
        "bool causal, "
        "str algo, "
        "int rank, "
        "int cp_size, "
        "int ulysses_degree, "
        "int cp_sliding_window, "
        "str ring_group, "
        "str inner_group, "
        "str outer_group, "
        "str ulysses_group, "
        "bool overlap, "
        "str layout, "
        "str check_group, "
        "float softcap=0.0, "
        "Tensor? sinks=None, "
        "int attention_chunk_size=0, "
        "Tensor? key_bounds=None"
        ") -> (Tensor out, Tensor lse)");
  // Gradients of masked_attention, in the dtype and strides of q/k/v.
  m.def("masked_attention_bwd("
        "Tensor dout, "
        "Tensor q, "
        "Tensor k, "
        "Tensor v, "
        "Tensor out, "
        "Tensor lse, "
        "Tensor? dlse, "
        "Tensor? cu_seqlens, "
        "int sliding_window, "
        "float scale, "
        "bool causal, "
        "str algo, "
        "int rank, "
        "int cp_size, "
        "int ulysses_degree, "
        "int cp_sliding_window, "
        "str ring_group, "
        "str inner_group, "
        "str outer_group, "
        "str ulysses_group, "
        "bool overlap, "
        "float softcap=0.0, "
        "int attention_chunk_size=0, "
        "Tensor? key_bounds=None"
        ") -> (Tensor dq, Tensor dk, Tensor dv)");
  // clang-format on
  // The collectives of the Python API (unshard, the cross-rank check, the training-loop helpers),
  // over a group given by name; device-generic, registered with the attention kernels. Every
  // tensor they give c10d is theirs alone: Note [Tensors handed to c10d] in csrc/cp/comm.h.
  m.def("all_gather(Tensor x, str group) -> Tensor[]");
  m.def("all_reduce_(Tensor(a!)[] xs, str group, str op=\"sum\") -> ()");
  // Bytes the ring's point-to-point transfers have sent from this process (benchmarks, tests).
  m.def("sent_bytes() -> int", &ring_ext::ring::sent_bytes_op);
  // The ring schedule of one rank, flattened (tests): csrc/cp/ring.h, schedule_op.
  m.def("ring_schedule(str algo, int cp_size, int rank, int cp_window_size, bool causal) -> int[]",
        &ring_ext::ring::schedule_op);
  // The instruction set the CPU kernels dispatched to on this machine: avx512, avx512f, avx2 or
  // baseline (ring_ext.build_info()["cpu_isa"]; benchmarks print it, since it decides CPU speed).
  m.def("cpu_isa() -> str", [] { return std::string(ring_ext::cpu::isa()); });
  // The CUDA kernels' candidate tilings (ring_ext.build_info()["cuda_tilings"]); the environment
  // variables RING_EXT_CUDA_FWD_TILING / RING_EXT_CUDA_BWD_TILING pick one (docs/cuda.md).
  m.def("cuda_tilings() -> str[]", &cuda_tilings);
}
