// The binary of benchmarks/ab_kernels.py: two revisions of the CPU kernels, "base" and "new", timed
// interleaved on the same inputs in one process, and checked against each other. Torch-free.
//
//   ab_kernels THREADS REPEATS HEADS CASE...
//   CASE  dtype:d:s:mask, dtype fp32 or bf16, mask full or causal, or dtype:d:s:docs:L1,L2,...
//         (packed documents of lengths L1, L2, ... summing to s, causal within each, as kRows), or
//         dtype:d:s:loop:L1,L2,... (the same documents: new's per-document loop against new's
//         packed call, in the places of base and new)
//
// For every case and pass (fwd, bwd): one warm-up call of each revision, then REPEATS rounds of
// base, new. Prints one tab-separated line to stdout: case, pass, base's and new's times in ms
// (comma-separated, in run order), the largest relative difference between their results per
// tensor, and "ok" or "MISMATCH"; ab_kernels.py makes the table. Exits 1 if any case mismatches.
//
// A loop case times what issue 27 compares packed documents with: one causal call per document of
// the same kernels (new's), each on its rows of the same tensors, one after the other. Both give
// the same attention, so their results are checked against each other as two revisions' are.
//
// Note [Two revisions in one binary]
// ab_kernels.py compiles each revision's kernels_<isa>.cpp as its own translation unit, against its
// own headers, with RING_EXT_CPU_ISA renamed to ab_base or ab_new and -Dring_ext=ring_ext_ab_base
// or ring_ext_ab_new. The second renames every namespace ring_ext of that unit, so the inline
// helpers outside the ISA namespace (convert.h, mask.h, lse_math.h) are the revision's own symbols
// too: the linker cannot keep one revision's copy of a helper for both. Only the params structs
// cross between the units: this file fills ring_ext::FwdParams / BwdParams (from new's params.h)
// and passes them as the revision's own type, which has the same layout because ab_kernels.py
// refuses two revisions whose params.h differ.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "common/params.h"
#include "cpu/kernels.h"

using ring_ext::BwdParams;
using ring_ext::DType;
using ring_ext::FwdParams;
using ring_ext::MaskKind;
using ring_ext::cpu::ChunkFn;
using ring_ext::cpu::ParallelFor;

// The entry points of one revision, and a Revision calling them with our params (Note [Two
// revisions in one binary]).
#define AB_REVISION(rev)                                                                           \
  namespace ring_ext_##rev {                                                                       \
    struct FwdParams;                                                                              \
    struct BwdParams;                                                                              \
    namespace cpu::rev {                                                                           \
    void flash_fwd(const FwdParams& p, ParallelFor parallel_for);                                  \
    void flash_bwd(const BwdParams& p, ParallelFor parallel_for);                                  \
    }                                                                                              \
  }                                                                                                \
  const Revision k_##rev{                                                                          \
      [](const FwdParams& p, ParallelFor pf) {                                                     \
        ring_ext_##rev::cpu::rev::flash_fwd(reinterpret_cast<const ring_ext_##rev::FwdParams&>(p), \
                                            pf);                                                   \
      },                                                                                           \
      [](const BwdParams& p, ParallelFor pf) {                                                     \
        ring_ext_##rev::cpu::rev::flash_bwd(reinterpret_cast<const ring_ext_##rev::BwdParams&>(p), \
                                            pf);                                                   \
      },                                                                                           \
  };

namespace {

struct Revision {
  void (*fwd)(const FwdParams&, ParallelFor);
  void (*bwd)(const BwdParams&, ParallelFor);  // adds into dq, dk, dv
};

}  // namespace

AB_REVISION(ab_base)
AB_REVISION(ab_new)

namespace {

const Revision kRevisions[2] = {k_ab_base, k_ab_new};  // run in this order in every round

// fn over min(n, threads) disjoint chunks covering [0, n), one per OpenMP thread (the thread count
// is set once in main), as at::parallel_for with grain size 1.
void parallel_for(int64_t n, const ChunkFn& fn) {
  const int64_t chunks = std::min<int64_t>(n, omp_get_max_threads());
  if (chunks <= 0) return;
#pragma omp parallel for num_threads(chunks) schedule(static, 1)
  for (int64_t c = 0; c < chunks; ++c) fn(n * c / chunks, n * (c + 1) / chunks);
}

uint16_t to_bf16(float x) {  // round to nearest even (the inputs are finite)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

float from_bf16(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// A tensor of n elements in float32 or bf16 bits.
struct Buffer {
  DType dtype = DType::kFloat32;
  std::vector<float> f32;
  std::vector<uint16_t> bf16;

  Buffer(DType t, int64_t n) : dtype(t) {
    if (t == DType::kBFloat16) {
      bf16.resize(n);
    } else {
      f32.resize(n);
    }
  }
  void* data() { return dtype == DType::kBFloat16 ? static_cast<void*>(bf16.data()) : f32.data(); }
  std::vector<float> to_float() const {
    if (dtype != DType::kBFloat16) return f32;
    std::vector<float> out(bf16.size());
    for (size_t i = 0; i < out.size(); ++i) out[i] = from_bf16(bf16[i]);
    return out;
  }
};

Buffer random_buffer(DType dtype, int64_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> normal;
  Buffer buf(dtype, n);
  for (int64_t i = 0; i < n; ++i) {
    const float x = normal(rng);
    if (dtype == DType::kBFloat16) {
      buf.bf16[i] = to_bf16(x);
    } else {
      buf.f32[i] = x;
    }
  }
  return buf;
}

struct Case {
  std::string spec;
  DType dtype = DType::kFloat32;
  int64_t d = 0, s = 0;
  MaskKind mask = MaskKind::kNone;
  std::vector<int64_t> docs;  // kRows: document lengths summing to s
  bool loop = false;          // new's per-document loop against new's packed call
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr, "ab_kernels: %s\nusage: ab_kernels THREADS REPEATS HEADS CASE...\n",
               why.c_str());
  std::exit(2);
}

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::stringstream in(text);
  for (std::string part; std::getline(in, part, sep);) parts.push_back(part);
  return parts;
}

Case parse_case(const std::string& spec) {
  const std::vector<std::string> f = split(spec, ':');
  if (f.size() < 4 || (f[0] != "fp32" && f[0] != "bf16")) usage("bad case " + spec);
  Case c;
  c.spec = spec;
  c.dtype = f[0] == "bf16" ? DType::kBFloat16 : DType::kFloat32;
  c.d = std::stoll(f[1]);
  c.s = std::stoll(f[2]);
  if (f[3] == "causal") c.mask = MaskKind::kCausal;
  if ((f[3] == "docs" || f[3] == "loop") && f.size() == 5) {
    c.mask = MaskKind::kRows;
    c.loop = f[3] == "loop";
    int64_t total = 0;
    for (const std::string& n : split(f[4], ',')) total += c.docs.emplace_back(std::stoll(n));
    if (total != c.s) usage("document lengths do not sum to s in " + spec);
  } else if (f.size() != 4 || (f[3] != "full" && f[3] != "causal")) {
    usage("bad case " + spec);
  }
  return c;
}

// The inputs of one case, [1, s, heads, d] (lse and delta [1, heads, s]), shared by both revisions.
struct Problem {
  Case c;
  int64_t heads;
  Buffer q, k, v, dout;
  std::vector<int64_t> row_begin, row_end;  // kRows: each row sees [its document's start, row]
  std::vector<float> lse, delta;            // of base's forward, for the backward

  Problem(const Case& cs, int64_t h, std::mt19937_64& rng)
      : c(cs),
        heads(h),
        q(random_buffer(cs.dtype, elements(), rng)),
        k(random_buffer(cs.dtype, elements(), rng)),
        v(random_buffer(cs.dtype, elements(), rng)),
        dout(random_buffer(cs.dtype, elements(), rng)) {
    int64_t start = 0;
    for (int64_t len : c.docs) {
      for (int64_t r = start; r < start + len; ++r) {
        row_begin.push_back(start);
        row_end.push_back(r + 1);
      }
      start += len;
    }
  }
  int64_t elements() const { return c.s * heads * c.d; }
  ring_ext::Strides strides() const { return {c.s * heads * c.d, heads * c.d, c.d}; }
  ring_ext::RowStrides row_strides() const { return {heads * c.s, c.s}; }
  ring_ext::Shape shape() const { return {1, heads, heads, c.s, c.s, c.d, c.d}; }
  ring_ext::Mask mask() const {
    ring_ext::Mask m;
    m.kind = c.mask;
    m.row_begin = row_begin.empty() ? nullptr : row_begin.data();
    m.row_end = row_end.empty() ? nullptr : row_end.data();
    return m;
  }
};

// What one revision's forward writes.
struct FwdOut {
  Buffer out;
  std::vector<float> lse;
  FwdParams params;

  explicit FwdOut(Problem& pb) : out(pb.c.dtype, pb.elements()), lse(pb.heads * pb.c.s) {
    FwdParams& p = params;
    p.q = pb.q.data();
    p.k = pb.k.data();
    p.v = pb.v.data();
    p.out = out.data();
    p.lse = lse.data();
    p.q_stride = p.k_stride = p.v_stride = p.out_stride = pb.strides();
    p.lse_stride = pb.row_strides();
    p.shape = pb.shape();
    p.in_dtype = p.out_dtype = pb.c.dtype;
    p.scale = 1.0f / std::sqrt(float(pb.c.d));
    p.mask = pb.mask();
  }
};

// What one revision's backward adds into (float32, zeroed before every call).
struct BwdOut {
  std::vector<float> dq, dk, dv;
  BwdParams params;

  explicit BwdOut(Problem& pb) : dq(pb.elements()), dk(pb.elements()), dv(pb.elements()) {
    BwdParams& p = params;
    p.q = pb.q.data();
    p.k = pb.k.data();
    p.v = pb.v.data();
    p.dout = pb.dout.data();
    p.lse = pb.lse.data();
    p.delta = pb.delta.data();
    p.dq = dq.data();
    p.dk = dk.data();
    p.dv = dv.data();
    p.q_stride = p.k_stride = p.v_stride = p.dout_stride = pb.strides();
    p.dq_stride = p.dk_stride = p.dv_stride = pb.strides();
    p.lse_stride = p.delta_stride = pb.row_strides();
    p.shape = pb.shape();
    p.in_dtype = pb.c.dtype;
    p.scale = 1.0f / std::sqrt(float(pb.c.d));
    p.mask = pb.mask();
  }
  void zero() {
    for (std::vector<float>* g : {&dq, &dk, &dv}) std::fill(g->begin(), g->end(), 0.0f);
  }
};

// A pointer to row `row` of a [1, s, heads, d] tensor of `dtype` (bshd strides, as Problem's).
template <typename P>
P* at_row(P* base, DType dtype, const Problem& pb, int64_t row) {
  using Byte = std::conditional_t<std::is_const_v<P>, const char, char>;
  const int64_t bytes = dtype == DType::kBFloat16 ? 2 : 4;
  return reinterpret_cast<P*>(reinterpret_cast<Byte*>(base) + row * pb.heads * pb.c.d * bytes);
}

// The params of the document at rows [start, start + len) of a packed call's params (forward or
// backward): every tensor from the document's first row, its own length, causal.
template <typename Params>
Params document_of(const Params& packed, const Problem& pb, int64_t start, int64_t len) {
  Params p = packed;
  const DType t = pb.c.dtype;
  p.q = at_row(p.q, t, pb, start);
  p.k = at_row(p.k, t, pb, start);
  p.v = at_row(p.v, t, pb, start);
  p.lse += start;
  if constexpr (std::is_same_v<Params, FwdParams>) {
    p.out = at_row(p.out, t, pb, start);
  } else {
    p.dout = at_row(p.dout, t, pb, start);
    p.dq = at_row(p.dq, DType::kFloat32, pb, start);
    p.dk = at_row(p.dk, DType::kFloat32, pb, start);
    p.dv = at_row(p.dv, DType::kFloat32, pb, start);
    p.delta += start;
  }
  p.shape.seq_q = p.shape.seq_k = len;
  p.mask = ring_ext::Mask{};
  p.mask.kind = MaskKind::kCausal;
  return p;
}

// delta = rowsum(dout * out) per (head, row), [1, heads, s], from out as stored in its dtype.
std::vector<float> row_delta(const Problem& pb, const Buffer& out) {
  const std::vector<float> o = out.to_float(), g = pb.dout.to_float();
  std::vector<float> delta(pb.heads * pb.c.s);
  for (int64_t i = 0; i < pb.c.s; ++i) {
    for (int64_t h = 0; h < pb.heads; ++h) {
      const int64_t at = (i * pb.heads + h) * pb.c.d;
      double sum = 0;
      for (int64_t c = 0; c < pb.c.d; ++c) sum += double(o[at + c]) * g[at + c];
      delta[h * pb.c.s + i] = float(sum);
    }
  }
  return delta;
}

// max |a - b| over max |a|, over the entries finite in a; infinite when a NaN appears, b is not
// finite where a is, or the infinities differ (rows that see no key have lse = -inf in both).
double relative_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(a[i]) && a[i] == b[i]) continue;
    if (!std::isfinite(a[i]) || !std::isfinite(b[i]))
      return std::numeric_limits<double>::infinity();
    diff = std::max(diff, std::fabs(double(a[i]) - b[i]));
    scale = std::max(scale, std::fabs(double(a[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// run(r) runs revision r (0 base, 1 new) once and returns its time in ms: one warm-up each, then
// `repeats` rounds of base, new.
void interleaved(int repeats, const std::function<double(int)>& run,
                 std::vector<double> (&times)[2]) {
  run(0);
  run(1);
  for (int i = 0; i < repeats; ++i) {
    for (int r = 0; r < 2; ++r) times[r].push_back(run(r));
  }
}

std::string joined(const std::vector<double>& values) {
  std::string text;
  for (double x : values) {
    char item[32];
    std::snprintf(item, sizeof(item), "%s%.4f", text.empty() ? "" : ",", x);
    text += item;
  }
  return text;
}

// One result line (see the top of this file); true if every tensor agrees within the tolerance.
bool report(const Case& c, const char* pass, const std::vector<double> (&times)[2],
            const std::vector<std::pair<const char*, double>>& diffs) {
  const double tolerance = c.dtype == DType::kBFloat16 ? 1e-2 : 1e-4;
  std::string diff_text;
  bool ok = true;
  for (const auto& [name, diff] : diffs) {
    ok = ok && diff <= tolerance;
    char item[64];
    std::snprintf(item, sizeof(item), "%s%s=%.3g", diff_text.empty() ? "" : ",", name, diff);
    diff_text += item;
  }
  std::printf("%s\t%s\t%s\t%s\t%s\t%s\n", c.spec.c_str(), pass, joined(times[0]).c_str(),
              joined(times[1]).c_str(), diff_text.c_str(), ok ? "ok" : "MISMATCH");
  std::fflush(stdout);
  return ok;
}

// Both passes of one case; true if base and new agree on both. In a loop case, the places of base
// and new hold new's per-document loop and new's packed call.
bool run_case(const Case& c, int64_t heads, int repeats) {
  std::mt19937_64 rng(0);
  Problem pb(c, heads, rng);
  const Revision& base = c.loop ? kRevisions[1] : kRevisions[0];
  const auto each_document = [&](const auto& fn) {
    int64_t start = 0;
    for (int64_t len : c.docs) {
      fn(start, len);
      start += len;
    }
  };
  FwdOut fwd[2] = {FwdOut(pb), FwdOut(pb)};  // base's, new's (params point into each)
  std::vector<double> fwd_times[2];
  interleaved(
      repeats,
      [&](int r) {
        const Clock::time_point start = Clock::now();
        if (r == 1) {
          kRevisions[1].fwd(fwd[1].params, parallel_for);
        } else if (!c.loop) {
          base.fwd(fwd[0].params, parallel_for);
        } else {
          each_document([&](int64_t row, int64_t len) {
            base.fwd(document_of(fwd[0].params, pb, row, len), parallel_for);
          });
        }
        return ms_since(start);
      },
      fwd_times);
  const bool fwd_ok = report(c, "fwd", fwd_times,
                             {{"out", relative_diff(fwd[0].out.to_float(), fwd[1].out.to_float())},
                              {"lse", relative_diff(fwd[0].lse, fwd[1].lse)}});

  pb.lse = fwd[0].lse;
  pb.delta = row_delta(pb, fwd[0].out);
  BwdOut bwd[2] = {BwdOut(pb), BwdOut(pb)};
  std::vector<double> bwd_times[2];
  interleaved(
      repeats,
      [&](int r) {
        bwd[r].zero();
        const Clock::time_point start = Clock::now();
        if (r == 1) {
          kRevisions[1].bwd(bwd[1].params, parallel_for);
        } else if (!c.loop) {
          base.bwd(bwd[0].params, parallel_for);
        } else {
          each_document([&](int64_t row, int64_t len) {
            base.bwd(document_of(bwd[0].params, pb, row, len), parallel_for);
          });
        }
        return ms_since(start);
      },
      bwd_times);
  const bool bwd_ok = report(c, "bwd", bwd_times,
                             {{"dq", relative_diff(bwd[0].dq, bwd[1].dq)},
                              {"dk", relative_diff(bwd[0].dk, bwd[1].dk)},
                              {"dv", relative_diff(bwd[0].dv, bwd[1].dv)}});
  return fwd_ok && bwd_ok;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) usage("too few arguments");
  const int threads = std::atoi(argv[1]), repeats = std::atoi(argv[2]);
  const int64_t heads = std::atoll(argv[3]);
  if (threads < 1 || repeats < 1 || heads < 1) usage("THREADS, REPEATS and HEADS must be >= 1");
  std::vector<Case> cases;
  for (int i = 4; i < argc; ++i) cases.push_back(parse_case(argv[i]));
  omp_set_num_threads(threads);
  bool ok = true;
  for (const Case& c : cases) ok = run_case(c, heads, repeats) && ok;
  return ok ? 0 : 1;
}
