// ATen glue shared by every backend (see block_ops.h). Checks name the argument and the rule.
#include "block_ops.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace ring_ext {
namespace {

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, "ring_ext: ", name, " must be float32, bfloat16 or float16, got ",
                  t.scalar_type());
  }
}

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

RowStrides row_strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }

// Kernels read head_dim with stride 1; anything else is copied once, here.
at::Tensor dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "ring_ext: ", name, " must be 4-D [batch, seq, heads, head_dim], got ",
              t.dim(), "-D");
}

// The largest head dim the kernels of q's device take: the CUDA kernels' buckets end at 512
// (csrc/cuda/head_dim.h); the CPU kernels take any.
int64_t max_head_dim(const at::Tensor& q) { return q.is_cuda() ? 512 : INT64_MAX; }

// q [b, sq, hq, d]; k [b, sk, hkv, d]; v [b, sk, hkv, dv] (dv may differ from d: MLA); same dtype
// and device.
Shape check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_4d(q, "q");
  check_4d(k, "k");
  check_4d(v, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "ring_ext: q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "ring_ext: q, k, v must be on one device, got ", q.device(), ", ", k.device(), ", ",
              v.device());
  TORCH_CHECK(k.sizes().slice(0, 3) == v.sizes().slice(0, 3),
              "ring_ext: v must have k's batch, length and heads (its head dim may differ), got k ",
              k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), "ring_ext: k must have batch ", q.size(0), " like q, got ",
              k.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), "ring_ext: k must have head_dim ", q.size(3), " like q, got ",
              k.size(3));
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= max_head_dim(q) && v.size(3) >= 1 &&
                  v.size(3) <= max_head_dim(q),
              "ring_ext: head dims must be in [1, ", max_head_dim(q), "] on ", q.device().type(),
              ", got q/k ", q.size(3), " and v ", v.size(3));
  TORCH_CHECK(k.size(2) >= 1 && q.size(2) % k.size(2) == 0,
              "ring_ext: kv heads must divide q heads (GQA/MQA), got q heads ", q.size(2),
              " and kv heads ", k.size(2));
  dtype_of(q, "q");
  return {q.size(0), q.size(2), k.size(2), q.size(1), k.size(1), q.size(3), v.size(3)};
}

// An empty [b, s, h, dv] tensor laid out in memory like q ([b, s, h, d], dv its own last dim).
at::Tensor empty_like_q(const at::Tensor& q, int64_t dv, at::ScalarType dtype) {
  if (dv == q.size(3)) return at::empty_like(q, dtype);
  std::vector<int64_t> order = {0, 1, 2};  // q's dims from outermost to innermost in memory
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return q.stride(a) > q.stride(b); });
  std::vector<int64_t> sizes, back(4);
  order.push_back(3);
  for (int64_t i = 0; i < 4; ++i) {
    sizes.push_back(i == 3 ? dv : q.size(order[i]));
    back[order[i]] = i;
  }
  return at::empty(sizes, q.options().dtype(dtype)).permute(back);
}

void check_rows(const at::Tensor& t, const char* name, const Shape& s, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "ring_ext: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "ring_ext: ", name, " must be on ", q.device(), ", got ",
              t.device());
  TORCH_CHECK(
      t.dim() == 3 && t.size(0) == s.batch && t.size(1) == s.heads_q && t.size(2) == s.seq_q,
      "ring_ext: ", name, " must have shape [", s.batch, ", ", s.heads_q, ", ", s.seq_q, "], got ",
      t.sizes());
}

at::Tensor seq_contiguous(const at::Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); }

// The number of key intervals per row of a checked visible: 1 or 2.
int64_t families_of(const std::optional<at::Tensor>& visible) {
  return visible.has_value() ? visible->size(0) / 2 : 1;
}

// Interval j of every row, [2, seq_q] (contiguous: a narrow of the first dim).
std::optional<at::Tensor> family(const std::optional<at::Tensor>& visible, int64_t j) {
  return visible->narrow(0, 2 * j, 2);
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                bool same_dtype) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "ring_ext: ", name, " must have the shape of ", ref_name,
              " ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), "ring_ext: ", name, " must be on ", ref.device(),
              ", got ", t.device());
  TORCH_CHECK(!same_dtype || t.scalar_type() == ref.scalar_type(), "ring_ext: ", name,
              " must have dtype ", ref.scalar_type(), ", got ", t.scalar_type());
}

// out or dout: [b, sq, hq, dv], on q's device (and in q's dtype if same_dtype).
void check_out_like(const at::Tensor& t, const char* name, const at::Tensor& q, const Shape& s,
                    bool same_dtype) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == s.batch && t.size(1) == s.seq_q &&
                  t.size(2) == s.heads_q && t.size(3) == s.head_dim_v,
              "ring_ext: ", name, " must have shape [", s.batch, ", ", s.seq_q, ", ", s.heads_q,
              ", ", s.head_dim_v, "] (q's with v's head dim), got ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), "ring_ext: ", name, " must be on ", q.device(), ", got ",
              t.device());
  TORCH_CHECK(!same_dtype || t.scalar_type() == q.scalar_type(), "ring_ext: ", name,
              " must have dtype ", q.scalar_type(), ", got ", t.scalar_type());
}

void check_accumulator(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  check_like(t, name, ref, ref_name, /*same_dtype=*/false);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.stride(-1) == 1, "ring_ext: ", name,
              " must be a float32 accumulator with contiguous head_dim, got ", t.scalar_type());
}

void check_scale(double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale != 0.0,
                    "ring_ext: scale must be a finite non-zero number, got ", scale);
}

// visible: int64 [2, seq_q] or [4, seq_q] (Note [Two key intervals per row]): row i sees keys
// [visible[0, i], visible[1, i]) and, with four rows, also [visible[2, i], visible[3, i]); every
// row of visible non-decreasing (MaskKind::kRows; ring_ext/masks.py builds them). It replaces the
// causal mask.
std::optional<at::Tensor> check_visible(const std::optional<at::Tensor>& visible, bool causal,
                                        const Shape& s, const at::Tensor& q) {
  if (!visible.has_value()) return std::nullopt;
  const at::Tensor& t = *visible;
  TORCH_CHECK_VALUE(!causal, "ring_ext: give causal=False with visible (the key intervals already ",
                    "hold the mask)");
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && t.dim() == 2 &&
                        (t.size(0) == 2 || t.size(0) == 4) && t.size(1) == s.seq_q,
                    "ring_ext: visible must be int64 [2, ", s.seq_q, "] (begin and end of each ",
                    "query row's visible keys) or [4, ", s.seq_q, "] (two intervals per row), got ",
                    t.scalar_type(), " ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == q.device(), "ring_ext: visible must be on ", q.device(), ", got ",
                    t.device());
  at::Tensor c = t.contiguous();
  // The kernels' tile skipping relies on monotone intervals. Checked on CPU; on CUDA the check
  // would synchronise the host at every ring step, so the CP ops check their one host copy instead
  // (ring::prepare_visible) and a direct CUDA block-op call is trusted (docs/design.md, Mask
  // model).
  if (c.is_cpu() && s.seq_q > 1) {
    TORCH_CHECK_VALUE(
        (c.narrow(1, 1, s.seq_q - 1) >= c.narrow(1, 0, s.seq_q - 1)).all().item<bool>(),
        "ring_ext: visible's begins and ends must be non-decreasing along the rows");
  }
  if (c.is_cpu() && c.size(0) == 4) {
    TORCH_CHECK_VALUE(
        disjoint_intervals(c).all().item<bool>(),
        "ring_ext: visible's two intervals of a row must not overlap (the first must ",
        "end where the second begins or before, or one of them be empty)");
  }
  return c;
}

Mask mask_of(bool causal, int64_t q_offset, int64_t k_offset,
             const std::optional<at::Tensor>& visible) {
  if (visible.has_value()) {
    const int64_t* rows = visible->data_ptr<int64_t>();
    return {MaskKind::kRows, 0, 0, rows, rows + visible->size(1)};
  }
  return {causal ? MaskKind::kCausal : MaskKind::kNone, q_offset, k_offset};
}

}  // namespace

at::Tensor disjoint_intervals(const at::Tensor& visible) {
  const auto row = [&](int64_t i) { return visible.select(-2, i); };
  return (row(1) <= row(2)) | (row(2) >= row(3)) | (row(0) >= row(1));
}

void check_softcap(double softcap) {
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0,
                    "ring_ext: softcap must be 0 (none) or a positive finite number, got ",
                    softcap);
}

std::optional<at::Tensor> check_sinks(const std::optional<at::Tensor>& sinks, int64_t heads_q,
                                      const at::Tensor& q) {
  if (!sinks.has_value()) return std::nullopt;
  TORCH_CHECK_VALUE(
      sinks->dim() == 1 && sinks->size(0) == heads_q && at::isFloatingType(sinks->scalar_type()),
      "ring_ext: sinks must be a float tensor [heads_q] = [", heads_q, "], got ",
      sinks->scalar_type(), " ", sinks->sizes());
  return sinks->to(q.device(), at::kFloat).contiguous();
}

void fold_sinks(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& sinks) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && lse.scalar_type() == at::kFloat &&
                  sinks.dim() == 1 && sinks.size(0) == lse.size(1),
              "ring_ext: fold_sinks takes float32 out and lse and sinks [", lse.size(1), "], got ",
              sinks.sizes());
  const at::Tensor folded = at::logaddexp(lse, sinks.to(lse.options()).view({1, -1, 1}));
  out.mul_(at::exp(lse - folded).transpose(1, 2).unsqueeze(-1));  // rows with no key stay 0
  lse.copy_(folded);
}

at::Tensor row_delta(const at::Tensor& dout, const at::Tensor& out) {
  // [b, s, h, d] -> [b, h, s], in at most 8 slices of heads: the float32 copies of dout and out
  // exist for one slice at a time, not for the whole block (docs/design.md, Memory per rank).
  const int64_t heads = out.size(2), step = (heads + 7) / 8;
  at::Tensor delta = at::empty({out.size(0), heads, out.size(1)}, out.options().dtype(at::kFloat));
  for (int64_t h = 0; h < heads; h += step) {
    const int64_t n = std::min(step, heads - h);
    delta.narrow(1, h, n).copy_(
        (dout.narrow(2, h, n).to(at::kFloat) * out.narrow(2, h, n).to(at::kFloat))
            .sum(-1)
            .transpose(1, 2));
  }
  return delta;
}

namespace {

// One forward kernel call on checked, head-dim-contiguous q/k/v; visible: none or [2, seq_q].
std::tuple<at::Tensor, at::Tensor> fwd_pass(const BlockKernels& kernels, const at::Tensor& q,
                                            const at::Tensor& k, const at::Tensor& v,
                                            const Shape& shape, double scale, bool causal,
                                            int64_t q_offset, int64_t k_offset, bool out_fp32,
                                            const std::optional<at::Tensor>& visible,
                                            double softcap, const float* sinks) {
  at::Tensor out = empty_like_q(q, shape.head_dim_v, out_fp32 ? at::kFloat : q.scalar_type());
  at::Tensor lse =
      at::empty({shape.batch, shape.heads_q, shape.seq_q}, q.options().dtype(at::kFloat));
  FwdParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_stride = strides_of(q);
  p.k_stride = strides_of(k);
  p.v_stride = strides_of(v);
  p.out_stride = strides_of(out);
  p.lse_stride = row_strides_of(lse);
  p.shape = shape;
  p.in_dtype = dtype_of(q, "q");
  p.out_dtype = dtype_of(out, "out");
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.sinks = sinks;
  p.mask = mask_of(causal, q_offset, k_offset, visible);
  if (shape.batch * shape.heads_q * shape.seq_q > 0) kernels.fwd(p);
  return {out, lse};
}

// One backward kernel call adding into dq/dk/dv, on checked, contiguous-enough inputs; visible:
// none or [2, seq_q].
void bwd_pass(const BlockKernels& kernels, const at::Tensor& dout, const at::Tensor& q,
              const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
              const at::Tensor& delta, const Shape& shape, double scale, bool causal,
              int64_t q_offset, int64_t k_offset, const at::Tensor& dq, const at::Tensor& dk,
              const at::Tensor& dv, const std::optional<at::Tensor>& visible, double softcap) {
  BwdParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dout = dout.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr<float>();
  p.dk = dk.data_ptr<float>();
  p.dv = dv.data_ptr<float>();
  p.q_stride = strides_of(q);
  p.k_stride = strides_of(k);
  p.v_stride = strides_of(v);
  p.dout_stride = strides_of(dout);
  p.dq_stride = strides_of(dq);
  p.dk_stride = strides_of(dk);
  p.dv_stride = strides_of(dv);
  p.lse_stride = row_strides_of(lse);
  p.delta_stride = row_strides_of(delta);
  p.shape = shape;
  p.in_dtype = dtype_of(q, "q");
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.mask = mask_of(causal, q_offset, k_offset, visible);
  if (shape.batch * shape.heads_q * shape.seq_q * shape.seq_k > 0) kernels.bwd(p);
}

}  // namespace

// Note [Two key intervals per row]
// A row may see two intervals of keys (visible [4, seq_q]): a shared prompt and the row's own
// answer (docs/design.md, "Two intervals per row"). Each of the two families of intervals is
// monotone on its own and the two intervals of a row are disjoint, so the row's softmax over their
// union is the merge of one kernel pass per family (the LSE merge the ring does across blocks, here
// across the two passes), and the backward is one pass per family adding into the same
// accumulators with the row's final lse and delta. Both passes skip the tiles their family does not
// see, so the work is the visible pairs (up to tile edges) plus one float32 merge of the rows; the
// same host code runs the CPU and the CUDA kernels, which keep one interval per row. Sinks fold in
// once, after the merge.
std::tuple<at::Tensor, at::Tensor> block_fwd(const BlockKernels& kernels, const at::Tensor& q_in,
                                             const at::Tensor& k_in, const at::Tensor& v_in,
                                             double scale, bool causal, int64_t q_offset,
                                             int64_t k_offset, bool out_fp32,
                                             const std::optional<at::Tensor>& visible_in,
                                             double softcap,
                                             const std::optional<at::Tensor>& sinks_in) {
  const Shape shape = check_qkv(q_in, k_in, v_in);
  check_scale(scale);
  check_softcap(softcap);
  const std::optional<at::Tensor> visible = check_visible(visible_in, causal, shape, q_in);
  const std::optional<at::Tensor> sinks = check_sinks(sinks_in, shape.heads_q, q_in);
  c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = dim_contiguous(q_in), k = dim_contiguous(k_in), v = dim_contiguous(v_in);
  if (families_of(visible) == 1) {
    return fwd_pass(kernels, q, k, v, shape, scale, causal, q_offset, k_offset, out_fp32, visible,
                    softcap, sinks.has_value() ? sinks->data_ptr<float>() : nullptr);
  }
  // Note [Two key intervals per row]: float32 partials, merged; the sinks once, at the end
  auto [out, lse] = fwd_pass(kernels, q, k, v, shape, scale, false, 0, 0, /*out_fp32=*/true,
                             family(visible, 0), softcap, nullptr);
  const auto [second_out, second_lse] = fwd_pass(kernels, q, k, v, shape, scale, false, 0, 0, true,
                                                 family(visible, 1), softcap, nullptr);
  block_merge(kernels, out, lse, second_out, second_lse);
  if (sinks.has_value()) fold_sinks(out, lse, *sinks);
  if (out_fp32) return {out, lse};
  return {empty_like_q(q, shape.head_dim_v, q.scalar_type()).copy_(out), lse};
}

void block_bwd_acc(const BlockKernels& kernels, const at::Tensor& dout_in, const at::Tensor& q_in,
                   const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& lse_in,
                   const at::Tensor& delta_in, double scale, bool causal, int64_t q_offset,
                   int64_t k_offset, const at::Tensor& dq, const at::Tensor& dk,
                   const at::Tensor& dv, const std::optional<at::Tensor>& visible_in,
                   double softcap) {
  const Shape shape = check_qkv(q_in, k_in, v_in);
  check_scale(scale);
  check_softcap(softcap);
  const std::optional<at::Tensor> visible = check_visible(visible_in, causal, shape, q_in);
  check_out_like(dout_in, "dout", q_in, shape, /*same_dtype=*/true);
  check_rows(lse_in, "lse", shape, q_in);
  check_rows(delta_in, "delta", shape, q_in);
  check_accumulator(dq, "dq", q_in, "q");
  check_accumulator(dk, "dk", k_in, "k");
  check_accumulator(dv, "dv", v_in, "v");
  c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = dim_contiguous(q_in), k = dim_contiguous(k_in), v = dim_contiguous(v_in);
  const at::Tensor dout = dim_contiguous(dout_in);
  const at::Tensor lse = seq_contiguous(lse_in), delta = seq_contiguous(delta_in);
  // Note [Two key intervals per row]: one pass per interval, each adding its part
  for (int64_t j = 0; j < families_of(visible); ++j) {
    bwd_pass(kernels, dout, q, k, v, lse, delta, shape, scale, causal, q_offset, k_offset, dq, dk,
             dv, families_of(visible) == 1 ? visible : family(visible, j), softcap);
  }
}

// Note [Bounded backward accumulators]
// The kernels add dq/dk/dv into float32 accumulators (one rounding at the end, as Note [K/V
// gradients] does across ranks). For float32 inputs the accumulators are the results. For 16-bit
// inputs, float32 copies of every head's dq/dk/dv would be twice the size of the results, so the
// heads go through the kernels in groups of kv heads (with their q heads): the group's float32
// accumulators are rounded into its slice of the results before the next group's are made. The
// backend sizes the groups (BlockKernels::bwd_kv_heads_per_call: on CPU as many heads as the
// threads need to stay busy); the result is the same for any grouping, since heads are independent.
//
//   results (input dtype)   [b, s, h, d]   every head, allocated once
//   accumulators (float32)  [b, s, g, d]   the g heads of one group at a time
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_bwd(
    const BlockKernels& kernels, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale, bool causal,
    int64_t q_offset, int64_t k_offset, const std::optional<at::Tensor>& dlse,
    const std::optional<at::Tensor>& visible, double softcap) {
  const Shape shape = check_qkv(q, k, v);
  check_scale(scale);
  check_out_like(out, "out", q, shape, /*same_dtype=*/false);
  check_out_like(dout, "dout", q, shape, /*same_dtype=*/true);
  c10::DeviceGuard guard(q.device());
  // d lse_i / d S_ij = P_ij, so a gradient on lse folds into delta: dS = P * (dP - (delta - dlse)).
  at::Tensor delta = row_delta(dout, out);
  if (dlse.has_value()) delta = delta - dlse->to(at::kFloat);
  // float32: accumulate into the results, every head at once. Else results in the input dtype
  // with the strides of q/k/v, and float32 accumulators per group of heads.
  const bool fp32 = q.scalar_type() == at::kFloat;
  const auto result = [&](const at::Tensor& t) {
    return fp32 ? at::zeros_like(t, at::kFloat) : at::empty_like(t);
  };
  const at::Tensor dq = result(q), dk = result(k), dv = result(v);
  const int64_t group = shape.heads_q / shape.heads_kv;
  int64_t step = shape.heads_kv;
  if (!fp32 && kernels.bwd_kv_heads_per_call != nullptr)
    step = std::clamp<int64_t>(kernels.bwd_kv_heads_per_call(shape), 1, shape.heads_kv);
  for (int64_t hk = 0; hk < shape.heads_kv; hk += step) {
    const int64_t n = std::min(step, shape.heads_kv - hk);
    // [b, s, h, d] -> the group's heads [b, s, n * group, d] (q, dout) and [b, s, n, d] (k, v)
    const auto qs = [&](const at::Tensor& t) { return t.narrow(2, hk * group, n * group); };
    const auto ks = [&](const at::Tensor& t) { return t.narrow(2, hk, n); };
    // [b, h, s] -> [b, n * group, s]
    const auto rows = [&](const at::Tensor& t) { return t.narrow(1, hk * group, n * group); };
    const auto acc = [&](const at::Tensor& t) {
      return fp32 ? t : at::zeros_like(t, at::kFloat, at::MemoryFormat::Contiguous);
    };
    const at::Tensor dq_acc = acc(qs(dq)), dk_acc = acc(ks(dk)), dv_acc = acc(ks(dv));
    block_bwd_acc(kernels, qs(dout), qs(q), ks(k), ks(v), rows(lse), rows(delta), scale, causal,
                  q_offset, k_offset, dq_acc, dk_acc, dv_acc, visible, softcap);
    if (fp32) continue;
    qs(dq).copy_(dq_acc);
    ks(dk).copy_(dk_acc);
    ks(dv).copy_(dv_acc);
  }
  return {dq, dk, dv};
}

void block_merge(const BlockKernels& kernels, const at::Tensor& out, const at::Tensor& lse,
                 const at::Tensor& block_out, const at::Tensor& block_lse) {
  check_4d(out, "out");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.stride(-1) == 1,
              "ring_ext: merge_ out must be a float32 accumulator with contiguous head_dim");
  check_like(block_out, "block_out", out, "out", /*same_dtype=*/false);
  const Shape shape{out.size(0), out.size(2), out.size(2), out.size(1),
                    0,           out.size(3), out.size(3)};
  check_rows(lse, "lse", shape, out);
  check_rows(block_lse, "block_lse", shape, out);
  TORCH_CHECK(lse.stride(2) == 1, "ring_ext: merge_ lse must be contiguous along seq");
  c10::DeviceGuard guard(out.device());
  const at::Tensor bo = dim_contiguous(block_out), bl = seq_contiguous(block_lse);
  MergeParams p;
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.block_out = bo.data_ptr();
  p.block_lse = bl.data_ptr<float>();
  p.out_stride = strides_of(out);
  p.block_out_stride = strides_of(bo);
  p.lse_stride = row_strides_of(lse);
  p.block_lse_stride = row_strides_of(bl);
  p.shape = shape;
  p.block_dtype = dtype_of(bo, "block_out");
  if (out.numel() > 0) kernels.merge(p);
}

}  // namespace ring_ext
