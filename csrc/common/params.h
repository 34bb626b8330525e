// The one contract between host glue and kernels, shared by the CPU (.cpp) and CUDA (.cu) code.
// Torch-free on purpose: nvcc compiles the kernels without torch headers.
//
// Every tensor is seen as [batch, seq, heads, head_dim] with arbitrary strides (in elements) for
// the first three dims and stride 1 for head_dim. The four public layouts (bshd, sbhd, bnsd, sbh)
// are all views of this shape, so no layout is ever copied. Row statistics (lse, delta) are float32
// [batch, heads_q, seq_q] with strides for batch and heads and stride 1 for seq.
#pragma once

#include <cstdint>

namespace ring_ext {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Which keys a query row may see (docs/design.md, "Mask model"). Positions are global: query row i
// sits at position q_offset + i, key column j at k_offset + j.
//   kNone:   every key.
//   kCausal: key j is visible to row i iff k_offset + j <= q_offset + i.
//   kRows:   key j is visible to row i iff row_begin[i] <= j < row_end[i]; both arrays are
//            non-decreasing in i (packed documents and sliding windows: the host derives them from
//            each token's document and position, ring_ext/masks.py).
// With q_offset == k_offset, kCausal is the usual (top-left aligned) causal mask of
// F.scaled_dot_product_attention(is_causal=True). A row that sees no key gets out = 0, lse = -inf.
enum class MaskKind : int32_t { kNone = 0, kCausal = 1, kRows = 2 };

struct Strides {
  int64_t batch = 0, seq = 0, head = 0;  // head_dim stride is always 1
};

struct RowStrides {
  int64_t batch = 0, head = 0;  // seq stride is always 1
};

// head_dim is q's and k's, head_dim_v v's and the output's (they differ in multi-head latent
// attention, e.g. 192 and 128 in DeepSeek-V3; block_ops.cpp always sets both).
struct Shape {
  int64_t batch = 0, heads_q = 0, heads_kv = 0, seq_q = 0, seq_k = 0, head_dim = 0, head_dim_v = 0;
};

// Note [Softcap and sinks]
// The score of query row i and key j is x = scale * q_i . k_j, then, with softcap c > 0 (Gemma 2's
// attn_logit_softcapping), x = c * tanh(x / c); c = 0 means none. The backward multiplies dS by
// the derivative 1 - tanh^2 = 1 - (x / c)^2. A sink (gpt-oss) is a per-q-head logit with no value:
// the softmax denominator of every row of head h adds exp(sinks[h]), once per row. Only the forward
// kernel reads sinks, in its last step: with the row's (m, l) over every key,
//   lse = logaddexp(m + log l, sink), out = O / exp(lse - m)   (a row that saw no key: lse = sink,
// out = 0). The backward needs nothing more: given the final lse (with the sink) and
// delta = rowsum(dout * out), the key gradients are unchanged; the sink's own gradient,
// -sum_i exp(sink - lse_i) * delta_i, is taken by autograd (ring_ext/ops.py). Under context
// parallelism the driver folds the sink in once, after the last merge (docs/design.md, Softcap and
// sinks).

struct Mask {
  MaskKind kind = MaskKind::kNone;
  int64_t q_offset = 0, k_offset = 0;
  const int64_t* row_begin = nullptr;  // kRows: [seq_q] each, on the kernel's device
  const int64_t* row_end = nullptr;
};

// out, lse = attention(q, k, v). out is written (not accumulated) in out_dtype; lse in float32.
struct FwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  Strides q_stride, k_stride, v_stride, out_stride;
  RowStrides lse_stride;
  Shape shape;
  DType in_dtype = DType::kFloat32;   // dtype of q, k, v
  DType out_dtype = DType::kFloat32;  // in_dtype, or kFloat32 for ring partials
  float scale = 1.0f;
  float softcap = 0.0f;          // Note [Softcap and sinks]; 0: none
  const float* sinks = nullptr;  // [heads_q] float32 on the kernel's device, or none
  Mask mask;
};

// dq += ..., dk += ..., dv += ... for one (q block, kv block) pair, given the *final* lse of each
// query row and delta = rowsum(dout * out) of the final out (docs/design.md, Math).
// dq, dk, dv are float32 accumulators that the kernel adds to; the caller zeroes them.
struct BwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* dout = nullptr;
  const float* lse = nullptr;
  const float* delta = nullptr;
  float* dq = nullptr;
  float* dk = nullptr;
  float* dv = nullptr;
  Strides q_stride, k_stride, v_stride, dout_stride, dq_stride, dk_stride, dv_stride;
  RowStrides lse_stride, delta_stride;
  Shape shape;
  DType in_dtype = DType::kFloat32;  // dtype of q, k, v, dout
  float scale = 1.0f;
  float softcap = 0.0f;  // Note [Softcap and sinks]; 0: none
  Mask mask;
};

// Fold a partial (block_out, block_lse) over a disjoint key set into the running float32
// (out, lse), in place. Shapes: [batch, seq_q, heads_q, head_dim] and [batch, heads_q, seq_q].
struct MergeParams {
  float* out = nullptr;
  float* lse = nullptr;
  const void* block_out = nullptr;
  const float* block_lse = nullptr;
  Strides out_stride, block_out_stride;
  RowStrides lse_stride, block_lse_stride;
  Shape shape;  // uses batch, heads_q, seq_q, head_dim (here the outputs' last dim, v's)
  DType block_dtype = DType::kFloat32;
};

}  // namespace ring_ext
