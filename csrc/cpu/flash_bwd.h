// Backward of the CPU flash attention (Note [CPU flash tiling] in flash_impl.h). Part of
// flash_impl.h: compiled once per instruction set, inside ring_ext::cpu::<isa>.
#pragma once

namespace ring_ext::cpu::RING_EXT_CPU_ISA {

// Q and dO of the q heads of one (batch, kv head) (Note [Packed heads]), per (q head of the GQA
// group, query block): A tiles (left operands of S = Q K^T, dP = dO V^T) and KN tiles (right
// operands of dK += dS^T Q, dV += P^T dO). For float the KN tile is the A tile, so kn() returns
// a(). Q's tiles are padded(dpad) wide, dO's padded(dvpad) (v's head dim: they differ in MLA;
// Note [Padded tile rows]). Each (q head, query block) is packed when a task first needs it
// (head_rows_block).
template <typename T>
struct HeadRows {
  int64_t blocks = 0, q_size = 0, dout_size = 0;
  TileVec<T> q_a, q_kn, dout_a, dout_kn;
  BlockOnce packed;  // per (q head of the group, query block)

  int64_t q_offset(int64_t g, int64_t qb) const { return (g * blocks + qb) * q_size; }
  int64_t dout_offset(int64_t g, int64_t qb) const { return (g * blocks + qb) * dout_size; }
  static const T* kn(const TileVec<T>& a, const TileVec<T>& kn, int64_t off) {
    return (kStep<T> == 1 ? a.data() : kn.data()) + off;
  }
};

template <typename T>
void alloc_head_rows(const BwdParams& p, int64_t dpad, int64_t dvpad, HeadRows<T>& rows) {
  const Shape& sh = p.shape;
  rows.blocks = ceil_div(sh.seq_q, kBwdBlockQ);
  rows.q_size = kBwdBlockQ * padded(dpad);
  rows.dout_size = kBwdBlockQ * padded(dvpad);
  const int64_t n = sh.heads_q / sh.heads_kv * rows.blocks;
  rows.q_a.resize(n * rows.q_size);
  rows.dout_a.resize(n * rows.dout_size);
  if (kStep<T> != 1) {
    rows.q_kn.resize(n * rows.q_size);
    rows.dout_kn.resize(n * rows.dout_size);
  }
  rows.packed.reset(n);
}

// Query block qb of the g-th q head of kv head hk in batch b, packed into rows by the first task
// that needs it.
template <typename T>
void head_rows_block(const BwdParams& p, int64_t b, int64_t hk, int64_t g, int64_t qb, int64_t dpad,
                     int64_t dvpad, HeadRows<T>& rows) {
  rows.packed.run(g * rows.blocks + qb, [&] {
    const Shape& sh = p.shape;
    const int64_t h = hk * (sh.heads_q / sh.heads_kv) + g, q0 = qb * kBwdBlockQ;
    const int64_t nq = std::min(kBwdBlockQ, sh.seq_q - q0);
    const RowBlock q = rows_of(p.q, p.in_dtype, p.q_stride, b, h, q0, nq, sh.head_dim);
    const RowBlock dout = rows_of(p.dout, p.in_dtype, p.dout_stride, b, h, q0, nq, sh.head_dim_v);
    const int64_t q_off = rows.q_offset(g, qb), dout_off = rows.dout_offset(g, qb);
    pack_a(q, kBwdBlockQ, padded(dpad), rows.q_a.data() + q_off);
    pack_a(dout, kBwdBlockQ, padded(dvpad), rows.dout_a.data() + dout_off);
    if (kStep<T> != 1) {
      std::vector<T> tmp(std::max(sh.head_dim, sh.head_dim_v));
      pack_kn(q, kBwdBlockQ, padded(dpad), tmp.data(), rows.q_kn.data() + q_off);
      pack_kn(dout, kBwdBlockQ, padded(dvpad), tmp.data(), rows.dout_kn.data() + dout_off);
    }
  });
}

// Per-thread scratch of one backward task (one key block).
template <typename T>
struct BwdWorkspace {
  TileVec<T> kt, vt, k_kn;           // NK tiles of K, V; KN tile of K (Note [Padded tile rows])
  TileVec<T> p_pairs, ds, ds_pairs;  // bf16 P and dS tiles (unused for float)
  TileVec<float> s, dp, dk, dv;      // S/P, dP/dS [kBwdBlockQ][kBlockK]; dK [kBlockK][dpad],
                                     // dV [kBlockK][dvpad]
  std::vector<T> tmp;                // one input row
  BwdWorkspace(int64_t d, int64_t dpad, int64_t dvpad)
      : kt(dpad * padded(kBlockK)),
        vt(dvpad * padded(kBlockK)),
        k_kn(kBlockK * padded(dpad)),
        p_pairs(kBwdBlockQ * kBlockK),
        ds(kBwdBlockQ * kBlockK),
        ds_pairs(kBwdBlockQ * kBlockK),
        s(kBwdBlockQ * kBlockK),
        dp(kBwdBlockQ * kBlockK),
        dk(kBlockK * dpad),
        dv(kBlockK * dvpad),
        tmp(d) {}
};

// A left operand read by strides: A(i, kk) at data[i * sm + kk * sk].
template <typename T>
struct Operand {
  const T* data;
  int64_t sm, sk;
};

// The left operands of dV += P^T dO, dK += dS^T Q and dQ += dS K from the float32 P (in ws.s) and
// dS (in ws.dp) of the rows [r0, r1) (r0 and r1 even for bf16). float: the same tiles, transposed
// by strides. bf16: rounded copies, P and dS as row pairs [rows/2][kBlockK][2] (so A(j, kk) = the
// pair of rows 2kk, 2kk+1 at key j) and dS row-major. Each operand starts at row 0.
template <typename T>
void bwd_operands(BwdWorkspace<T>& ws, int64_t r0, int64_t r1, int64_t n_pad, Operand<T>& pt,
                  Operand<T>& dst, Operand<T>& ds) {
  if constexpr (kStep<T> == 1) {
    pt = {ws.s.data(), 1, kBlockK};
    dst = {ws.dp.data(), 1, kBlockK};
    ds = {ws.dp.data(), kBlockK, 1};
  } else {
    for (int64_t i = r0; i < r1; i += 2) {
      const float* s0 = ws.s.data() + i * kBlockK;
      const float* dp0 = ws.dp.data() + i * kBlockK;
      store_bf16_row_pairs(s0, s0 + kBlockK, n_pad, ws.p_pairs.data() + i * kBlockK);
      store_bf16_row_pairs(dp0, dp0 + kBlockK, n_pad, ws.ds_pairs.data() + i * kBlockK);
      store_bf16_row(dp0, n_pad, ws.ds.data() + i * kBlockK);
      store_bf16_row(dp0 + kBlockK, n_pad, ws.ds.data() + (i + 1) * kBlockK);
    }
    pt = {ws.p_pairs.data(), 2, 2 * kBlockK};
    dst = {ws.ds_pairs.data(), 2, 2 * kBlockK};
    ds = {ws.ds.data(), kBlockK, 2};
  }
}

// One (query block qb of q head h, the g-th of its GQA group) x (key block [k0, k0 + nk)) pair; ws
// holds the packed key block, rows the packed Q/dO of the group. dq points at the rows of the block
// in the task's float32 dQ partial ([rows][dpad], unscaled).
template <typename T>
void bwd_pair(const BwdParams& p, const RowKeys<int64_t>& keys, const HeadRows<T>& rows, int64_t b,
              int64_t h, int64_t g, int64_t qb, int64_t k0, int64_t nk, int64_t dpad, int64_t dvpad,
              BwdWorkspace<T>& ws, float* dq) {
  constexpr int64_t step = kStep<T>;
  const Shape& sh = p.shape;
  const int64_t q0 = qb * kBwdBlockQ, nq = std::min(kBwdBlockQ, sh.seq_q - q0);
  // Only the block's rows that see a key of the key block, as in the forward: a query block that
  // straddles a document boundary pays for each document's rows against that document's keys
  // only. r0 starts a k step (a bf16 row pair); r1_pad ends one, past nq only by the zero row that
  // pads a bf16 pair.
  const Interval<int64_t> seeing = block_rows_seeing(keys, q0, nq, k0, k0 + nk);
  if (seeing.empty()) return;
  // Only the key columns [c0, c1) those rows see (visible_columns): a query block of one document
  // skips the keys of the document before it in a key block that straddles the boundary.
  const Interval<int64_t> cols =
      visible_columns(keys, q0 + seeing.begin, q0 + seeing.end - 1, k0, nk);
  if (cols.empty()) return;
  const int64_t c0 = cols.begin, c1 = cols.end;
  const int64_t r0 = seeing.begin / step * step, r1_pad = round_up(seeing.end, step);
  const int64_t m = std::min(r1_pad, nq) - r0;  // real rows
  const int64_t n_pad = round_up(nk, 16);
  const int64_t q_off = rows.q_offset(g, qb), dout_off = rows.dout_offset(g, qb);
  const int64_t d_steps = ceil_div(sh.head_dim, step), dv_steps = ceil_div(sh.head_dim_v, step);
  const int64_t nc = round_up(c1 - c0, 16);  // c0 + nc <= n_pad
  // S [m, nc] = Q K^T; dP [m, nc] = dO V^T (rows r0.., columns c0.. of the [rows][kBlockK] tiles)
  const int64_t ldk = padded(kBlockK) * step;  // NK tiles' k step (Note [Padded tile rows])
  gemm(rows.q_a.data() + q_off + r0 * padded(dpad), padded(dpad), step, ws.kt.data() + c0 * step,
       ldk, m, nc, d_steps, ws.s.data() + r0 * kBlockK + c0, kBlockK, false);
  gemm(rows.dout_a.data() + dout_off + r0 * padded(dvpad), padded(dvpad), step,
       ws.vt.data() + c0 * step, ldk, m, nc, dv_steps, ws.dp.data() + r0 * kBlockK + c0, kBlockK,
       false);
  const float* lse = p.lse + b * p.lse_stride.batch + h * p.lse_stride.head + q0;
  const float* delta = p.delta + b * p.delta_stride.batch + h * p.delta_stride.head + q0;
  for (int64_t i = r0; i < r1_pad; ++i) {
    float* srow = ws.s.data() + i * kBlockK;
    float* dprow = ws.dp.data() + i * kBlockK;
    // The zero row that pads a bf16 row pair, and a row that saw no key (lse = -inf): P = dS = 0
    if (i == nq || lse[i] == kNegInf) {
      std::fill(srow, srow + n_pad, 0.0f);
      std::fill(dprow, dprow + n_pad, 0.0f);
      continue;
    }
    const Interval<int64_t> row = keys.keys(q0 + i);
    const int64_t begin = std::clamp<int64_t>(row.begin - k0, c0, c1);
    const int64_t end = std::clamp<int64_t>(row.end - k0, begin, c1);
    if (p.softcap > 0.0f) {  // Note [Softcap and sinks]
      bwd_row_softcap(srow + c0, dprow + c0, begin - c0, end - c0, nc, p.scale, p.softcap, lse[i],
                      delta[i]);
    } else {
      bwd_row(srow + c0, dprow + c0, begin - c0, end - c0, nc, p.scale, lse[i], delta[i]);
    }
  }
  Operand<T> pt, dst, ds;
  bwd_operands(ws, r0, r1_pad, n_pad, pt, dst, ds);
  const T* dout_kn = HeadRows<T>::kn(rows.dout_a, rows.dout_kn, dout_off);
  const T* q_kn = HeadRows<T>::kn(rows.q_a, rows.q_kn, q_off);
  // dV [keys c0..c1, dvpad] += P^T dO; dK [keys c0..c1, dpad] += dS^T Q over the rows r0..r1_pad
  // (k steps r0 / step..); dQ [rows r0.., dpad] += dS K. Key j of P^T / dS^T is at data + j * sm;
  // key pair kk of dS at data + kk * sk, so key c0 (even) at c0.
  const int64_t ks = r0 / step, k_steps = (r1_pad - r0) / step;
  gemm(pt.data + c0 * pt.sm + ks * pt.sk, pt.sm, pt.sk, dout_kn + ks * padded(dvpad) * step,
       padded(dvpad) * step, c1 - c0, dvpad, k_steps, ws.dv.data() + c0 * dvpad, dvpad, true);
  gemm(dst.data + c0 * dst.sm + ks * dst.sk, dst.sm, dst.sk, q_kn + ks * padded(dpad) * step,
       padded(dpad) * step, c1 - c0, dpad, k_steps, ws.dk.data() + c0 * dpad, dpad, true);
  gemm(ds.data + c0 + r0 * ds.sm, ds.sm, ds.sk, ws.k_kn.data() + c0 * padded(dpad),
       padded(dpad) * step, m, dpad, ceil_div(c1 - c0, step), dq + r0 * dpad, dpad, true);
}

// The rows of the query blocks that see a key of [k0, k1) (clipped to seq_q): a task's query
// blocks, and the rows of a unit's dQ partial (Note [Ordered dQ units]).
inline Interval<int64_t> query_block_rows(const RowKeys<int64_t>& keys, int64_t seq_q, int64_t k0,
                                          int64_t k1) {
  const Interval<int64_t> rows = keys.rows_seeing(k0, k1);
  if (rows.empty()) return {0, 0};
  return {rows.begin / kBwdBlockQ * kBwdBlockQ, std::min(seq_q, round_up(rows.end, kBwdBlockQ))};
}

// dst[i * row_stride + c] += alpha * src[i * dpad + c] for i < rows, c < d.
inline void add_rows(const float* src, int64_t dpad, int64_t rows, int64_t d, float alpha,
                     float* dst, int64_t row_stride) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < d; ++c) dst[i * row_stride + c] += alpha * src[i * dpad + c];
}

// One task: key block kb of kv head hk against every query block (of every q head of the GQA group)
// that can see it. dq_part is the group's float32 dQ partial over the unit's rows dq_rows
// ([group][rows][dpad], query_block_rows).
template <typename T>
void bwd_task(const BwdParams& p, const RowKeys<int64_t>& keys, HeadRows<T>& rows, int64_t b,
              int64_t hk, int64_t kb, int64_t dpad, int64_t dvpad, BwdWorkspace<T>& ws,
              const Interval<int64_t>& dq_rows, float* dq_part) {
  const Shape& sh = p.shape;
  const int64_t d = sh.head_dim, dv = sh.head_dim_v, group = sh.heads_q / sh.heads_kv;
  const int64_t k0 = kb * kBlockK, nk = std::min(kBlockK, sh.seq_k - k0);
  const RowBlock k = rows_of(p.k, p.in_dtype, p.k_stride, b, hk, k0, nk, d);
  const RowBlock v = rows_of(p.v, p.in_dtype, p.v_stride, b, hk, k0, nk, dv);
  pack_nk(k, dpad, padded(kBlockK), ws.tmp.data(), ws.kt.data());
  pack_nk(v, dvpad, padded(kBlockK), ws.tmp.data(), ws.vt.data());
  pack_kn(k, kBlockK, padded(dpad), ws.tmp.data(), ws.k_kn.data());
  std::fill(ws.dk.begin(), ws.dk.end(), 0.0f);
  std::fill(ws.dv.begin(), ws.dv.end(), 0.0f);
  const Interval<int64_t> rows_in = query_block_rows(keys, sh.seq_q, k0, k0 + nk);
  const int64_t qb_begin = rows_in.begin / kBwdBlockQ, qb_end = ceil_div(rows_in.end, kBwdBlockQ);
  for (int64_t g = 0; g < group; ++g)
    for (int64_t qb = qb_begin; qb < qb_end; ++qb) {
      head_rows_block(p, b, hk, g, qb, dpad, dvpad, rows);
      bwd_pair(
          p, keys, rows, b, hk * group + g, g, qb, k0, nk, dpad, dvpad, ws,
          dq_part + (g * (dq_rows.end - dq_rows.begin) + qb * kBwdBlockQ - dq_rows.begin) * dpad);
    }
  add_rows(ws.dk.data(), dpad, nk, d, p.scale,
           p.dk + b * p.dk_stride.batch + hk * p.dk_stride.head + k0 * p.dk_stride.seq,
           p.dk_stride.seq);
  add_rows(ws.dv.data(), dvpad, nk, dv, 1.0f,
           p.dv + b * p.dv_stride.batch + hk * p.dv_stride.head + k0 * p.dv_stride.seq,
           p.dv_stride.seq);
}

// p.dq += scale * dq for the q heads of (batch, kv head) `head`; dq is [group][n][dpad] over the
// n rows [rows.begin, rows.end).
inline void add_dq(const BwdParams& p, int64_t head, const Interval<int64_t>& rows, const float* dq,
                   int64_t dpad) {
  const Shape& sh = p.shape;
  const int64_t group = sh.heads_q / sh.heads_kv, b = head / sh.heads_kv;
  const int64_t n = rows.end - rows.begin;
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = head % sh.heads_kv * group + g;
    add_rows(dq + g * n * dpad, dpad, n, sh.head_dim, p.scale,
             p.dq + b * p.dq_stride.batch + h * p.dq_stride.head + rows.begin * p.dq_stride.seq,
             p.dq_stride.seq);
  }
}

// Note [Ordered dQ units]
// The backward's threads take units of tasks dynamically, as the forward's do (Note [Dynamic task
// units]), but a key block's task adds into the dQ rows of every query block that sees it, so who
// ran which unit must not decide the order of dq's sums. A unit is a fixed range of one head's
// key blocks (unit u of U: blocks [u k / U, (u + 1) k / U) of the head's k, U = the smaller of k
// and kBwdUnitsPerHead: fixed by the shape alone, not by the threads). It sums its tasks' dQ into
// a float32 partial of its own over the rows that see its keys (query_block_rows: for a causal mask
// the rows from its first key on, for packed documents those of the documents its keys lie in), and
// the partials of a head are added to dq in unit order: a partial done before the one ahead of it
// is queued, and the thread that adds a head's next partial adds the queued ones that follow. So dq
// is the same on every run and for every number of threads. At most as many partials wait as
// there are threads (a thread finding the queue full waits for its turn; units are taken in order,
// so the one ahead of it is being computed), so a call holds at most two partials per thread.
// A unit's key blocks are contiguous, not zigzag (the forward's order): a partial then spans the
// rows of its keys alone, where a zigzag unit's keys at both ends of a causal row would span all of
// it. The units of a causal head cost less and less; taken in order, the dearest go first and the
// cheapest fill the threads' tails.
constexpr int64_t kBwdUnitsPerHead = 16;

class OrderedDq {
 public:
  OrderedDq(const BwdParams& p, int64_t heads, int64_t dpad)
      : p_(p), dpad_(dpad), next_(heads, 0) {}

  void join() { threads_.fetch_add(1, std::memory_order_relaxed); }  // one more thread adds

  // Unit `unit` of `head` is done: adds its partial dq (over `rows`) and the queued ones that
  // follow it, or queues it (taking its storage) when a unit ahead of it is not done yet.
  void add(int64_t head, int64_t unit, const Interval<int64_t>& rows, std::vector<float>& dq) {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] {
      return unit == next_[head] ||
             int64_t(queued_.size()) < threads_.load(std::memory_order_relaxed);
    });
    if (unit != next_[head]) {
      queued_.push_back({head, unit, rows, std::move(dq)});
      dq = {};
      return;
    }
    add_dq(p_, head, rows, dq.data(), dpad_);  // the usual case: dq keeps its storage
    for (++next_[head];; ++next_[head]) {
      const auto it = std::find_if(queued_.begin(), queued_.end(), [&](const Queued& q) {
        return q.head == head && q.unit == next_[head];
      });
      if (it == queued_.end()) break;
      add_dq(p_, head, it->rows, it->dq.data(), dpad_);
      queued_.erase(it);
    }
    cv_.notify_all();
  }

 private:
  struct Queued {
    int64_t head, unit;
    Interval<int64_t> rows;
    std::vector<float> dq;  // [group][rows.end - rows.begin][dpad], unscaled
  };
  const BwdParams& p_;
  const int64_t dpad_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::atomic<int64_t> threads_{0};
  std::vector<int64_t> next_;  // per head: the unit to add next
  std::vector<Queued> queued_;
};

template <typename T>
void flash_bwd_tiled(const BwdParams& p, ParallelFor parallel_for) {
  const Shape& sh = p.shape;
  const int64_t dpad = round_up(sh.head_dim, 16), dvpad = round_up(sh.head_dim_v, 16);
  const int64_t k_blocks = ceil_div(sh.seq_k, kBlockK), n_heads = sh.batch * sh.heads_kv;
  const int64_t group = sh.heads_q / sh.heads_kv;
  const int64_t units = std::min(k_blocks, kBwdUnitsPerHead);  // per head (Note [Ordered dQ units])
  // Tasks (batch, kv head, key block), k_blocks per head (Note [Packed heads]).
  PackedHeads<HeadRows<T>> heads(n_heads, k_blocks);
  const RowKeys<int64_t> keys = row_keys<int64_t>(p.mask, sh);
  OrderedDq ordered(p, n_heads, dpad);
  std::atomic<int64_t> next_unit{0};
  // Each call of the chunk function (one per thread) takes units until none is left.
  parallel_for(n_heads * units, [&](int64_t, int64_t) {
    BwdWorkspace<T> ws(std::max(sh.head_dim, sh.head_dim_v), dpad, dvpad);
    std::vector<float> dq;
    ordered.join();
    for (int64_t g; (g = next_unit.fetch_add(1, std::memory_order_relaxed)) < n_heads * units;) {
      const int64_t u = g % units, kb0 = u * k_blocks / units, kb1 = (u + 1) * k_blocks / units;
      const Interval<int64_t> rows =
          query_block_rows(keys, sh.seq_q, kb0 * kBlockK, std::min(kb1 * kBlockK, sh.seq_k));
      const int64_t base = g / units * k_blocks;
      for_tasks_by_head(
          heads, k_blocks, base + kb0, base + kb1,
          [&](int64_t, HeadRows<T>& packed) { alloc_head_rows(p, dpad, dvpad, packed); },
          [&](int64_t head, int64_t first, int64_t stop, HeadRows<T>& packed) {
            dq.assign(group * (rows.end - rows.begin) * dpad, 0.0f);
            for (int64_t t = first; t < stop; ++t)
              bwd_task(p, keys, packed, head / sh.heads_kv, head % sh.heads_kv, t % k_blocks, dpad,
                       dvpad, ws, rows, dq.data());
            ordered.add(head, u, rows, dq);
          });
    }
  });
}

void flash_bwd(const BwdParams& p, ParallelFor parallel_for) {
  if constexpr (kHasBf16Dot) {
    if (p.in_dtype == DType::kBFloat16) return flash_bwd_tiled<uint16_t>(p, parallel_for);
  }
  flash_bwd_tiled<float>(p, parallel_for);
}

}  // namespace ring_ext::cpu::RING_EXT_CPU_ISA
