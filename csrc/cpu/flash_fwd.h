// Forward of the CPU flash attention (Note [CPU flash tiling] in flash_impl.h). Part of
// flash_impl.h: compiled once per instruction set, inside ring_ext::cpu::<isa>.
#pragma once

namespace ring_ext::cpu::RING_EXT_CPU_ISA {

// K as NK tiles (K^T) and V as KN tiles of every key block of one (batch, kv head) (Note [Packed
// heads]), each packed when a task first needs it (kv_block). dpad is q/k's padded head dim, dvpad
// v's (they differ in MLA).
template <typename T>
struct HeadKV {
  // [blocks][dpad][padded(kFwdBlockK)] (by k steps), [blocks][kFwdBlockK][padded(dvpad)]
  TileVec<T> kt, v;
  BlockOnce packed;  // per key block
  T* kt_block(int64_t kb, int64_t dpad) { return kt.data() + kb * dpad * padded(kFwdBlockK); }
  T* v_block(int64_t kb, int64_t dvpad) { return v.data() + kb * kFwdBlockK * padded(dvpad); }
};

template <typename T>
void alloc_head_kv(const FwdParams& p, int64_t dpad, int64_t dvpad, HeadKV<T>& kv) {
  const int64_t blocks = ceil_div(p.shape.seq_k, kFwdBlockK);
  kv.kt.resize(blocks * dpad * padded(kFwdBlockK));
  kv.v.resize(blocks * kFwdBlockK * padded(dvpad));
  kv.packed.reset(blocks);
}

// Key block kb of kv head hk in batch b, packed into kv by the first task that needs it.
template <typename T>
void kv_block(const FwdParams& p, int64_t b, int64_t hk, int64_t kb, int64_t dpad, int64_t dvpad,
              HeadKV<T>& kv) {
  kv.packed.run(kb, [&] {
    const Shape& sh = p.shape;
    const int64_t k0 = kb * kFwdBlockK, rows = std::min(kFwdBlockK, sh.seq_k - k0);
    const RowBlock k = rows_of(p.k, p.in_dtype, p.k_stride, b, hk, k0, rows, sh.head_dim);
    const RowBlock v = rows_of(p.v, p.in_dtype, p.v_stride, b, hk, k0, rows, sh.head_dim_v);
    std::vector<T> tmp(std::max(sh.head_dim, sh.head_dim_v));
    pack_nk(k, dpad, padded(kFwdBlockK), tmp.data(), kv.kt_block(kb, dpad));
    pack_kn(v, kFwdBlockK, padded(dvpad), tmp.data(), kv.v_block(kb, dvpad));
  });
}

// Per-thread scratch of one forward task.
template <typename T>
struct FwdWorkspace {
  TileVec<T> q, p;              // A tile of Q [kBlockQ][dpad]; P [kBlockQ][kFwdBlockK]
  TileVec<float> s, acc, m, l;  // S [kBlockQ][kFwdBlockK]; O [kBlockQ][dvpad]; row stats
  FwdWorkspace(int64_t dpad, int64_t dvpad)
      : q(kBlockQ * dpad),
        p(kBlockQ * kFwdBlockK),
        s(kBlockQ * kFwdBlockK),
        acc(kBlockQ * dvpad),
        m(kBlockQ),
        l(kBlockQ) {}
};

// Online softmax of the task's rows [r0, r1) over the keys [k0, k0 + nk), whose scores are the
// columns col.. of the S tile: S -> P (the same columns), updates m and l, rescales O (dvpad wide).
// With a softcap the scores are capped first, in place, and the scale is already in them (Note
// [Softcap and sinks]).
template <typename T>
void softmax_step(const FwdParams& p, const RowKeys<int64_t>& keys, FwdWorkspace<T>& ws, int64_t q0,
                  int64_t r0, int64_t r1, int64_t k0, int64_t nk, int64_t col, int64_t dvpad) {
  const int64_t n_pad = round_up(nk, 16);
  const float scale = p.softcap > 0.0f ? 1.0f : p.scale;
  for (int64_t i = r0; i < r1; ++i) {
    float* srow = ws.s.data() + i * kFwdBlockK + col;
    T* prow = ws.p.data() + i * kFwdBlockK + col;
    const Interval<int64_t> row = keys.keys(q0 + i);
    const int64_t begin = std::clamp<int64_t>(row.begin - k0, 0, nk);
    const int64_t end = std::clamp<int64_t>(row.end - k0, begin, nk);
    const float row_max = p.softcap > 0.0f
                              ? softcap_max_row(srow, begin, end, n_pad, p.scale, p.softcap)
                              : scaled_max(srow, begin, end, scale);
    const float m_new = std::max(ws.m[i], row_max);
    if (m_new == kNegInf) {  // nothing visible yet: P = 0, state unchanged
      std::fill(prow, prow + n_pad, T(0));
      continue;
    }
    const float alpha = m_new == ws.m[i] ? 1.0f : std::exp(ws.m[i] - m_new);  // mostly 1
    ws.l[i] = ws.l[i] * alpha + exp_row(srow, begin, end, n_pad, scale, m_new, prow);
    ws.m[i] = m_new;
    if (alpha != 1.0f) scale_row(ws.acc.data() + i * dvpad, dvpad, alpha);
  }
}

// out = O / l and lse = m + log(l) of the task's rows; rows that saw no key get 0 and -inf. A sink
// (Note [Softcap and sinks]) adds exp(sink) to l, at the larger of m and the sink: a row that saw
// no key gets 0 and lse = sink.
template <typename T>
void fwd_finish(const FwdParams& p, FwdWorkspace<T>& ws, int64_t b, int64_t h, int64_t q0,
                int64_t nq, int64_t dvpad) {
  const int64_t out_base = b * p.out_stride.batch + h * p.out_stride.head + q0 * p.out_stride.seq;
  float* lse = p.lse + b * p.lse_stride.batch + h * p.lse_stride.head + q0;
  for (int64_t i = 0; i < nq; ++i) {
    float* orow = ws.acc.data() + i * dvpad;
    float m = ws.m[i], l = ws.l[i];
    if (p.sinks != nullptr) {
      const float sink = p.sinks[h], top = std::max(m, sink);
      const float kept = l == 0.0f ? 0.0f : std::exp(m - top);
      scale_row(orow, dvpad, kept);  // O and l at the new maximum
      l = l * kept + std::exp(sink - top);
      m = top;
    }
    const bool empty = l == 0.0f;
    scale_row(orow, dvpad, empty ? 0.0f : 1.0f / l);
    store_row(p.out, p.out_dtype, out_base + i * p.out_stride.seq, p.shape.head_dim_v, orow);
    lse[i] = empty ? kNegInf : m + std::log(l);
  }
}

// One task: query rows [q0, q0 + kBlockQ) of q head h against every key block they can see; kv is
// h's kv head, whose key blocks are packed as tasks first need them (kv_block).
template <typename T>
void fwd_task(const FwdParams& p, const RowKeys<int64_t>& keys, HeadKV<T>& kv, int64_t b, int64_t h,
              int64_t q0, int64_t dpad, int64_t dvpad, FwdWorkspace<T>& ws) {
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
    const Interval<int64_t> seeing = block_rows_seeing(keys, q0, nq, k0, k0 + nk);
    if (seeing.empty()) continue;
    const int64_t r0 = seeing.begin, r1 = seeing.end;
    kv_block(p, b, h / (sh.heads_q / sh.heads_kv), kb, dpad, dvpad, kv);
    // In strips of rows when the block is not seen whole by every row (Note [Forward row strips]).
    const bool whole = block_visibility(keys.keys(q0 + r0), keys.keys(q0 + r1 - 1), k0, k0 + nk) ==
                       BlockVisibility::kFull;
    const int64_t strip = whole ? r1 - r0 : kFwdStrip;
    for (int64_t a = r0; a < r1; a += strip) {
      const int64_t e = std::min(r1, a + strip);
      // The columns [c0, c1) the strip's rows see
      const Interval<int64_t> cols = visible_columns(keys, q0 + a, q0 + e - 1, k0, nk);
      if (cols.empty()) continue;  // no row of the strip sees the block: its state stays
      const int64_t c0 = cols.begin, c1 = cols.end;
      // S [e - a, c0..c1] = Q [rows, d] K^T [d, c0..c1]
      gemm(ws.q.data() + a * dpad, dpad, step, kv.kt_block(kb, dpad) + c0 * step,
           padded(kFwdBlockK) * step, e - a, round_up(c1 - c0, 16), ceil_div(sh.head_dim, step),
           ws.s.data() + a * kFwdBlockK + c0, kFwdBlockK, /*accumulate=*/false);
      softmax_step(p, keys, ws, q0, a, e, k0 + c0, c1 - c0, c0, dvpad);
      // O [rows, dvpad] += P [rows, c0..c1] V [c0..c1, dvpad]
      gemm(ws.p.data() + a * kFwdBlockK + c0, kFwdBlockK, step,
           kv.v_block(kb, dvpad) + c0 / step * padded(dvpad) * step, padded(dvpad) * step, e - a,
           dvpad, ceil_div(c1 - c0, step), ws.acc.data() + a * dvpad, dvpad, /*accumulate=*/true);
    }
  }
  fwd_finish(p, ws, b, h, q0, nq, dvpad);
}

template <typename T>
void flash_fwd_tiled(const FwdParams& p, ParallelFor parallel_for) {
  const Shape& sh = p.shape;
  const int64_t dpad = round_up(sh.head_dim, 16), dvpad = round_up(sh.head_dim_v, 16);
  const int64_t q_blocks = ceil_div(sh.seq_q, kBlockQ);
  // Tasks (batch, q head, query block), numbered by (batch, kv head) first: the q heads of a GQA
  // group are consecutive.
  const int64_t tasks_per_head = sh.heads_q / sh.heads_kv * q_blocks;
  PackedHeads<HeadKV<T>> heads(sh.batch * sh.heads_kv, tasks_per_head);
  const RowKeys<int64_t> keys = row_keys<int64_t>(p.mask, sh);
  // Units of tasks taken dynamically (Note [Dynamic task units]); each call of the chunk function
  // (one per thread) takes units until none is left, whatever range it was given.
  TaskUnits units(sh.batch * sh.heads_q * q_blocks, ceil_div(tasks_per_head, kUnitsPerHead));
  parallel_for(units.count(), [&](int64_t, int64_t) {
    FwdWorkspace<T> ws(dpad, dvpad);
    for (int64_t begin, end; units.next(begin, end);) {
      for_tasks_by_head(
          heads, tasks_per_head, begin, end,
          [&](int64_t, HeadKV<T>& kv) { alloc_head_kv(p, dpad, dvpad, kv); },
          [&](int64_t, int64_t first, int64_t stop, HeadKV<T>& kv) {
            for (int64_t t = first; t < stop; ++t) {
              const int64_t qb = zigzag(t % q_blocks, q_blocks), bh = t / q_blocks;
              fwd_task(p, keys, kv, bh / sh.heads_q, bh % sh.heads_q, qb * kBlockQ, dpad, dvpad,
                       ws);
            }
          });
    }
  });
}

void flash_fwd(const FwdParams& p, ParallelFor parallel_for) {
  if constexpr (kHasBf16Dot) {
    if (p.in_dtype == DType::kBFloat16) return flash_fwd_tiled<uint16_t>(p, parallel_for);
  }
  flash_fwd_tiled<float>(p, parallel_for);
}

}  // namespace ring_ext::cpu::RING_EXT_CPU_ISA
