// Forward of the CPU flash attention (Note [CPU flash tiling] in flash_impl.h). Part of
// flash_impl.h: compiled once per instruction set, inside ring_ext::cpu::<isa>.
#pragma once

namespace ring_ext::cpu::RING_EXT_CPU_ISA {

// K as NK tiles (K^T) and V as KN tiles of every key block of one (batch, kv head) (Note [Packed
// heads]).
template <typename T>
struct HeadKV {
  std::vector<T> kt, v;  // [blocks][dpad][kFwdBlockK] (by k steps), [blocks][kFwdBlockK][dpad]
  const T* kt_block(int64_t kb, int64_t dpad) const { return kt.data() + kb * dpad * kFwdBlockK; }
  const T* v_block(int64_t kb, int64_t dpad) const { return v.data() + kb * kFwdBlockK * dpad; }
};

template <typename T>
void pack_head_kv(const FwdParams& p, int64_t b, int64_t hk, int64_t dpad, HeadKV<T>& kv) {
  const Shape& sh = p.shape;
  const int64_t blocks = ceil_div(sh.seq_k, kFwdBlockK), size = dpad * kFwdBlockK;
  kv.kt.resize(blocks * size);
  kv.v.resize(blocks * size);
  std::vector<T> tmp(sh.head_dim);
  for (int64_t kb = 0; kb < blocks; ++kb) {
    const int64_t k0 = kb * kFwdBlockK, rows = std::min(kFwdBlockK, sh.seq_k - k0);
    const RowBlock k = rows_of(p.k, p.in_dtype, p.k_stride, b, hk, k0, rows, sh.head_dim);
    const RowBlock v = rows_of(p.v, p.in_dtype, p.v_stride, b, hk, k0, rows, sh.head_dim);
    pack_nk(k, dpad, kFwdBlockK, tmp.data(), kv.kt.data() + kb * size);
    pack_kn(v, kFwdBlockK, dpad, tmp.data(), kv.v.data() + kb * size);
  }
}

// Per-thread scratch of one forward task.
template <typename T>
struct FwdWorkspace {
  std::vector<T> q, p;              // A tile of Q [kBlockQ][dpad]; P [kBlockQ][kFwdBlockK]
  std::vector<float> s, acc, m, l;  // S [kBlockQ][kFwdBlockK]; O [kBlockQ][dpad]; row stats
  explicit FwdWorkspace(int64_t dpad)
      : q(kBlockQ * dpad),
        p(kBlockQ * kFwdBlockK),
        s(kBlockQ * kFwdBlockK),
        acc(kBlockQ * dpad),
        m(kBlockQ),
        l(kBlockQ) {}
};

// Online softmax of the task's rows [r0, r1) over one key block [k0, k0 + nk): S -> P, updates m
// and l, rescales O.
template <typename T>
void softmax_step(const FwdParams& p, const RowKeys<int64_t>& keys, FwdWorkspace<T>& ws, int64_t q0,
                  int64_t r0, int64_t r1, int64_t k0, int64_t nk, int64_t dpad) {
  const int64_t n_pad = round_up(nk, 16);
  for (int64_t i = r0; i < r1; ++i) {
    const float* srow = ws.s.data() + i * kFwdBlockK;
    T* prow = ws.p.data() + i * kFwdBlockK;
    const Interval<int64_t> row = keys.keys(q0 + i);
    const int64_t begin = std::clamp<int64_t>(row.begin - k0, 0, nk);
    const int64_t end = std::clamp<int64_t>(row.end - k0, begin, nk);
    const float m_new = std::max(ws.m[i], scaled_max(srow, begin, end, p.scale));
    if (m_new == kNegInf) {  // nothing visible yet: P = 0, state unchanged
      std::fill(prow, prow + n_pad, T(0));
      continue;
    }
    const float alpha = std::exp(ws.m[i] - m_new);
    ws.l[i] = ws.l[i] * alpha + exp_row(srow, begin, end, n_pad, p.scale, m_new, prow);
    ws.m[i] = m_new;
    if (alpha != 1.0f) scale_row(ws.acc.data() + i * dpad, dpad, alpha);
  }
}

// out = O / l and lse = m + log(l) of the task's rows; rows that saw no key get 0 and -inf.
template <typename T>
void fwd_finish(const FwdParams& p, FwdWorkspace<T>& ws, int64_t b, int64_t h, int64_t q0,
                int64_t nq, int64_t dpad) {
  const int64_t out_base = b * p.out_stride.batch + h * p.out_stride.head + q0 * p.out_stride.seq;
  float* lse = p.lse + b * p.lse_stride.batch + h * p.lse_stride.head + q0;
  for (int64_t i = 0; i < nq; ++i) {
    float* orow = ws.acc.data() + i * dpad;
    const bool empty = ws.l[i] == 0.0f;
    scale_row(orow, dpad, empty ? 0.0f : 1.0f / ws.l[i]);
    store_row(p.out, p.out_dtype, out_base + i * p.out_stride.seq, p.shape.head_dim, orow);
    lse[i] = empty ? kNegInf : ws.m[i] + std::log(ws.l[i]);
  }
}

// One task: query rows [q0, q0 + kBlockQ) of q head h against every key block they can see; kv is
// h's kv head, packed.
template <typename T>
void fwd_task(const FwdParams& p, const RowKeys<int64_t>& keys, const HeadKV<T>& kv, int64_t b,
              int64_t h, int64_t q0, int64_t dpad, FwdWorkspace<T>& ws) {
  constexpr int64_t step = kStep<T>;
  const Shape& sh = p.shape;
  const int64_t nq = std::min(kBlockQ, sh.seq_q - q0);
  const RowBlock q = rows_of(p.q, p.in_dtype, p.q_stride, b, h, q0, nq, sh.head_dim);
  pack_a(q, kBlockQ, dpad, ws.q.data());
  std::fill(ws.m.begin(), ws.m.end(), kNegInf);
  std::fill(ws.l.begin(), ws.l.end(), 0.0f);
  std::fill(ws.acc.begin(), ws.acc.end(), 0.0f);
  // The key blocks some row of the task sees (its hull, Note [Mask rule]): skipped blocks cost
  // nothing (Note [CPU flash tiling]).
  const Interval<int64_t> hull = tile_hull(keys.keys(q0), keys.keys(q0 + nq - 1));
  const int64_t k_begin = hull.begin / kFwdBlockK * kFwdBlockK, k_end = hull.end;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kFwdBlockK) {
    const int64_t nk = std::min(kFwdBlockK, k_end - k0), kb = k0 / kFwdBlockK;
    // Only the task's rows [r0, r1) that see a key of this block (a contiguous range: the intervals
    // are monotone), so a task that straddles a document boundary pays for each document's rows
    // against that document's keys only.
    int64_t r0 = 0, r1 = nq;
    while (r0 < nq && keys.keys(q0 + r0).end <= k0) ++r0;
    while (r1 > r0 && keys.keys(q0 + r1 - 1).begin >= k0 + nk) --r1;
    if (r0 == r1) continue;
    // S [r1 - r0, kFwdBlockK] = Q [rows, d] K^T [d, nk]
    gemm(ws.q.data() + r0 * dpad, dpad, step, kv.kt_block(kb, dpad), kFwdBlockK * step, r1 - r0,
         round_up(nk, 16), ceil_div(sh.head_dim, step), ws.s.data() + r0 * kFwdBlockK, kFwdBlockK,
         /*accumulate=*/false);
    softmax_step(p, keys, ws, q0, r0, r1, k0, nk, dpad);
    // O [rows, dpad] += P [rows, nk] V [nk, dpad]
    gemm(ws.p.data() + r0 * kFwdBlockK, kFwdBlockK, step, kv.v_block(kb, dpad), dpad * step,
         r1 - r0, dpad, ceil_div(nk, step), ws.acc.data() + r0 * dpad, dpad, /*accumulate=*/true);
  }
  fwd_finish(p, ws, b, h, q0, nq, dpad);
}

template <typename T>
void flash_fwd_tiled(const FwdParams& p, ParallelFor parallel_for) {
  const Shape& sh = p.shape;
  const int64_t dpad = round_up(sh.head_dim, 16), q_blocks = ceil_div(sh.seq_q, kBlockQ);
  // Tasks (batch, q head, query block), numbered by (batch, kv head) first: the q heads of a GQA
  // group are consecutive.
  const int64_t tasks_per_head = sh.heads_q / sh.heads_kv * q_blocks;
  PackedHeads<HeadKV<T>> heads(sh.batch * sh.heads_kv, tasks_per_head);
  const RowKeys<int64_t> keys = row_keys<int64_t>(p.mask, sh);
  parallel_for(sh.batch * sh.heads_q * q_blocks, [&](int64_t begin, int64_t end) {
    FwdWorkspace<T> ws(dpad);
    for_tasks_by_head(
        heads, tasks_per_head, begin, end,
        [&](int64_t head, HeadKV<T>& kv) {
          pack_head_kv(p, head / sh.heads_kv, head % sh.heads_kv, dpad, kv);
        },
        [&](int64_t, int64_t first, int64_t stop, const HeadKV<T>& kv) {
          for (int64_t t = first; t < stop; ++t) {
            const int64_t qb = zigzag(t % q_blocks, q_blocks), bh = t / q_blocks;
            fwd_task(p, keys, kv, bh / sh.heads_q, bh % sh.heads_q, qb * kBlockQ, dpad, ws);
          }
        });
  });
}

void flash_fwd(const FwdParams& p, ParallelFor parallel_for) {
  if constexpr (kHasBf16Dot) {
    if (p.in_dtype == DType::kBFloat16) return flash_fwd_tiled<uint16_t>(p, parallel_for);
  }
  flash_fwd_tiled<float>(p, parallel_for);
}

}  // namespace ring_ext::cpu::RING_EXT_CPU_ISA
