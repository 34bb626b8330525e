// Blockwise flash attention on the CPU, compiled once per instruction set: kernels_<isa>.cpp
// defines RING_EXT_CPU_ISA, sets the compiler target and includes its tile primitives
// (tiles_avx512.h or tiles_generic.h: gemm, exp_row, bwd_row, ...) before this file.
//
// Note [CPU flash tiling]
// Every matrix product runs on *packed tiles* through one register-blocked gemm (Note [AVX-512
// micro-kernel] in tiles_avx512.h): C (+)= A B with A read by strides and B packed with its N
// dimension contiguous. The element type T of packed tiles is float (one k step = one element) or,
// for bf16 inputs on AVX-512 BF16, bf16 bits (one k step = a pair of elements, for vdpbf16ps).
// Packed forms of a block of `rows` rows of a [seq, head_dim] matrix, head_dim zero-padded to dpad
// (a multiple of 16) and rows zero-padded to the block size; right operands' rows padded by 16
// more columns (Note [Padded tile rows]):
//   A tile   [rows][dpad]                   row-major: the left operand of S = Q K^T, dP = dO V^T
//   KN tile  [rows/step][dpad+16][step]     right operand with K = rows: V in O += P V, K in
//                                           dQ += dS K, Q and dO in dK += dS^T Q, dV += P^T dO
//   NK tile  [dpad/step][width+16][step]    right operand with K = head_dim: K^T, V^T (width =
//                                           the key block size, kFwdBlockK or kBlockK)
// (for float, step = 1 and a KN tile is the A tile). P and dS are float32 after the softmax; for
// bf16 they are rounded to bf16 (as GPU flash attention does) into row-major [rows][kBlockK] (left
// operand of P V, dS K) and row-pair [rows/2][kBlockK][2] tiles (transposed left operand of
// P^T dO, dS^T Q); float uses the float32 tiles directly, transposed by strides.
//
// Forward: K/V of each (batch, kv head) are packed once per call, each key block by the first task
// that needs it (Note [Packed heads]). One task = (batch, q head, block of kBlockQ query rows):
// pack Q, then walk the key blocks with the online softmax, S = Q K^T, running max m and sum l, O =
// O * exp(m_old - m) + P V. The task visits only the key blocks between the first key its first row
// sees and the last key its last row sees (the tile's hull: every mask is a monotone interval per
// row, Note [Mask rule] in csrc/common/mask.h); inside a block, keys outside a row's interval are
// masked lane by lane. Within a visited block only the task's rows that see it take part (a task
// straddling a document boundary computes each document's rows against that document's keys), in
// strips of rows on a block they see in part (Note [Forward row strips]). So
// blocks outside a causal diagonal, a document or a sliding window cost nothing, and the cost
// follows the visible pairs up to the tile edges.
//
// Backward: Q/dO of the q heads of each (batch, kv head), in blocks of kBwdBlockQ rows (larger
// than the forward's: they are the k loop of dK and dV), are packed once per call the same way.
// One task = (batch, kv head, key block), so dK/dV of a key block have one writer; it walks the q
// heads of its GQA group and the query blocks that can see the block: P = exp(S - lse),
// dV += P^T dO, dP = dO V^T, dS = P * (dP - delta), dK += dS^T Q, dQ += dS K. dQ goes to a float32
// partial per unit of tasks over the rows that see the unit's keys, added to dq in a fixed order
// (Note [Ordered dQ units] in flash_bwd.h). The query blocks a key block visits are the contiguous
// range of rows that see it (RowKeys::rows_seeing), and each (query block, key block) pair computes
// only the block's rows that see the key block and the key columns they see (from 16-column
// boundaries), in all five products. Parallelism
// stays good when batch * heads is 1: tasks are per block, and the threads take small units of
// tasks dynamically, in the forward and the backward (Note [Dynamic task units]). The forward deals
// causal tasks in zigzag order (0, n-1, 1, n-2, ...) so contiguous units get equal work; the
// backward's units are contiguous key blocks, dearest first (Note [Ordered dQ units]). Memory: the
// packed heads in use (Note [Packed heads]) and at most two dQ partials per thread, O(seq *
// head_dim); never O(seq^2).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#include "../common/lse_math.h"
#include "../common/mask.h"
#include "convert.h"
#include "kernels.h"

#ifndef RING_EXT_CPU_ISA
#error "define RING_EXT_CPU_ISA before including flash_impl.h"
#endif

namespace ring_ext::cpu::RING_EXT_CPU_ISA {

// Block sizes. Forward: kBlockQ query rows x kFwdBlockK keys (the per-row softmax work is per key
// block, so wide key blocks). A forward task reads all of its head's packed K/V once, so tall
// query blocks read it fewer times: at d = 128, s = 8192 a head's K/V is 9 MiB, past L2 and a
// thread's share of L3 (docs/kernel_bench.md, 2026-12-06). Backward: kBwdBlockQ query rows (the k
// loop of dK and dV; even) x kBlockK keys. Every float32 S/P/dP/dS tile and packed block stays in
// L1/L2.
constexpr int64_t kBlockQ = 256;
constexpr int64_t kFwdBlockK = 128;
// Note [Forward row strips]
// A key block that some of a forward task's rows see only in part (a causal diagonal, a document's
// first keys, a window's edge) runs its S = Q K^T, softmax and P V in strips of kFwdStrip rows,
// each over the columns its own rows see (their hull, from 16-column boundaries): on a causal
// diagonal the 256 x 128 tile then costs about the visible half plus a strip's triangle, not all of
// it. Blocks every row sees whole run as one strip. 48 rows: whole 6-row tiles of the
// micro-kernels.
constexpr int64_t kFwdStrip = 48;
constexpr int64_t kBwdBlockQ = 128;
constexpr int64_t kBlockK = kBwdKeysPerTask;  // 64 (kernels.h): a multiple of 16, like kFwdBlockK
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Note [Padded tile rows]
// The micro-kernel walks a 16-column panel of its packed right operand B down the k loop: one
// 64-byte row piece per k step, k = 64-128 of them, re-read for every tile of rows of C. With B's
// rows 256 or 512 bytes apart (64 or 128 floats) those pieces fall into 1/4 or 1/8 of L1's sets,
// which hold 128 or 64 lines: a d = 128 panel does not fit and is fetched again from L2 for every
// tile of rows (and a tile that is not 64-byte aligned touches two lines per piece). So every
// packed tile is 64-byte aligned (TileVec) and its rows are padded by 16 columns (64 bytes: a row
// length of an odd number of cache lines, padded(n) * 4 bytes for float and for bf16 pairs alike),
// which spreads a panel over every set. The padding columns are zero and no product reads them.
constexpr int64_t kRowPad = 16;
inline int64_t padded(int64_t n) { return n + kRowPad; }

template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* ptr, size_t) { ::operator delete(ptr, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const {
    return true;
  }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const {
    return false;
  }
};
template <typename T>
using TileVec = std::vector<T, Aligned64<T>>;

// Elements per k step of the gemm for tile type T (float: 1; bf16 bits: a pair).
template <typename T>
constexpr int64_t kStep = sizeof(T) == 4 ? 1 : 2;

// The rows of [q0, q0 + nq) that see a key of [k0, k1), as offsets from q0: a contiguous range
// (the intervals are monotone, Note [Mask rule]; RowKeys::rows_seeing), empty when none does.
inline Interval<int64_t> block_rows_seeing(const RowKeys<int64_t>& keys, int64_t q0, int64_t nq,
                                           int64_t k0, int64_t k1) {
  const Interval<int64_t> rows = keys.rows_seeing(k0, k1);
  return {std::clamp<int64_t>(rows.begin - q0, 0, nq), std::clamp<int64_t>(rows.end - q0, 0, nq)};
}

// The columns of the key block [k0, k0 + nk) that the rows first..last see (their hull, Note [Mask
// rule]), from a 16-column boundary (the micro-kernels' panels); empty when they see none.
inline Interval<int64_t> visible_columns(const RowKeys<int64_t>& keys, int64_t first, int64_t last,
                                         int64_t k0, int64_t nk) {
  const Interval<int64_t> hull = tile_hull(keys.keys(first), keys.keys(last));
  return {std::clamp<int64_t>(hull.begin - k0, 0, nk) / 16 * 16,
          std::clamp<int64_t>(hull.end - k0, 0, nk)};
}

// Task i of n in zigzag order 0, n-1, 1, n-2, ...: contiguous chunks of tasks whose cost falls
// (or rises) linearly with the index get equal work.
inline int64_t zigzag(int64_t i, int64_t n) { return i % 2 == 0 ? i / 2 : n - 1 - i / 2; }

// Note [Dynamic task units]
// Tasks cost unevenly (packed documents of different lengths, windows, one head per call under
// context parallelism), so static chunks of tasks give threads uneven work. The forward instead
// cuts its tasks into units of consecutive tasks, about kUnitsPerHead per head, fixed by the shape
// alone, and every thread takes the next unit from a shared counter until none is left. A forward
// task writes its own rows only, so the result does not depend on which thread ran which unit; the
// backward's units add their dQ in a fixed order (Note [Ordered dQ units] in flash_bwd.h).
// Units are taken in order, so the threads stay on a few neighbouring heads (Note [Packed heads]).
constexpr int64_t kUnitsPerHead = 32;

class TaskUnits {
 public:
  TaskUnits(int64_t tasks, int64_t unit) : tasks_(tasks), unit_(std::max<int64_t>(unit, 1)) {}
  int64_t count() const { return ceil_div(tasks_, unit_); }
  // The next unit's tasks [begin, end); false when none is left.
  bool next(int64_t& begin, int64_t& end) {
    const int64_t u = next_.fetch_add(1, std::memory_order_relaxed);
    if (u >= count()) return false;
    begin = u * unit_;
    end = std::min(tasks_, begin + unit_);
    return true;
  }

 private:
  const int64_t tasks_, unit_;
  std::atomic<int64_t> next_{0};
};

// ---- loads and stores, converting to and from float32 -------------------------------------------

inline void load_row(const void* base, DType dtype, int64_t offset, int64_t n, float* dst) {
  switch (dtype) {
    case DType::kFloat32: {
      const float* src = static_cast<const float*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = src[c];
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = bf16_to_float(src[c]);
      break;
    }
    case DType::kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = fp16_to_float(src[c]);
      break;
    }
  }
}

inline void store_row(void* base, DType dtype, int64_t offset, int64_t n, const float* src) {
  switch (dtype) {
    case DType::kFloat32: {
      float* dst = static_cast<float*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = src[c];
      break;
    }
    case DType::kBFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = float_to_bf16(src[c]);
      break;
    }
    case DType::kFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = float_to_fp16(src[c]);
      break;
    }
  }
}

// ---- packing (Note [CPU flash tiling])
// ------------------------------------------------------------

// A rows x d block of a strided tensor: row i at base[offset + i * row_stride], d contiguous.
struct RowBlock {
  const void* base;
  DType dtype;
  int64_t offset, row_stride, rows, d;
};

// Rows [row0, row0 + rows) of head h in batch b of a [batch, seq, heads, d] tensor.
inline RowBlock rows_of(const void* base, DType dtype, const Strides& st, int64_t b, int64_t h,
                        int64_t row0, int64_t rows, int64_t d) {
  return {base, dtype, b * st.batch + h * st.head + row0 * st.seq, st.seq, rows, d};
}

// Row i of src as tile elements: float32 (converted from any dtype) or bf16 bits (copied; bf16
// tiles are only used for bf16 inputs).
inline void load_tile_row(const RowBlock& src, int64_t i, float* dst) {
  load_row(src.base, src.dtype, src.offset + i * src.row_stride, src.d, dst);
}
inline void load_tile_row(const RowBlock& src, int64_t i, uint16_t* dst) {
  std::memcpy(dst, static_cast<const uint16_t*>(src.base) + src.offset + i * src.row_stride,
              src.d * sizeof(uint16_t));
}

// KN tile [block_rows/step][width][step] (for float: the A tile [block_rows][width]); width is
// padded(dpad) (Note [Padded tile rows]); zero padded.
template <typename T>
void pack_kn(const RowBlock& src, int64_t block_rows, int64_t width, T* tmp, T* dst) {
  constexpr int64_t step = kStep<T>;
  std::fill(dst, dst + block_rows * width, T(0));
  for (int64_t i = 0; i < src.rows; ++i) {
    load_tile_row(src, i, tmp);
    T* out = dst + (i / step) * width * step + i % step;
    for (int64_t c = 0; c < src.d; ++c) out[c * step] = tmp[c];
  }
}

// A tile [block_rows][width], width >= dpad, zero padded (for float the same as the KN tile).
template <typename T>
void pack_a(const RowBlock& src, int64_t block_rows, int64_t width, T* dst) {
  std::fill(dst, dst + block_rows * width, T(0));
  for (int64_t i = 0; i < src.rows; ++i) load_tile_row(src, i, dst + i * width);
}

// NK tile [dpad/step][width][step] of a block of at most width rows (width: padded(block size),
// Note [Padded tile rows]); zero padded.
template <typename T>
void pack_nk(const RowBlock& src, int64_t dpad, int64_t width, T* tmp, T* dst) {
  constexpr int64_t step = kStep<T>;
  std::fill(dst, dst + dpad * width, T(0));
  for (int64_t i = 0; i < src.rows; ++i) {
    load_tile_row(src, i, tmp);
    for (int64_t c = 0; c < src.d; ++c)
      dst[(c / step) * width * step + i * step + c % step] = tmp[c];
  }
}

// Note [Packed heads]
// The forward packs K/V, the backward Q/dO, per (batch, kv head): a "head" here. Tasks run head by
// head and each thread takes units of them in order (Note [Dynamic task units]), so a
// head is used by the one or few threads whose ranges cover its tasks. The first of them allocates
// its packed copy, and each block of it (a key block of K/V, a query block of Q/dO) is packed by
// the first task that needs it, the others waiting for that block only (BlockOnce): the threads on
// a head pack its blocks side by side, where one thread packing the whole head held up the others
// (every thread, when a call has one head, as context-parallel calls on CPU do). The last one to
// finish its tasks there frees it: a call holds the packed copies of the heads its threads are on,
// never a copy of every head and never two copies of one.
template <typename Pack>
class PackedHeads {
 public:
  PackedHeads(int64_t heads, int64_t tasks_per_head) : slots_(heads) {
    for (Slot& slot : slots_) slot.remaining = tasks_per_head;
  }

  // Head `head`, allocated by pack(Pack&) if no thread has done so yet.
  template <typename PackFn>
  Pack& get(int64_t head, PackFn&& pack) {
    Slot& slot = slots_[head];
    std::call_once(slot.packed, [&] { pack(slot.pack); });
    return slot.pack;
  }

  // The caller has run `tasks` tasks of `head` and reads it no more; the last user frees it.
  void done(int64_t head, int64_t tasks) {
    Slot& slot = slots_[head];
    if (slot.remaining.fetch_sub(tasks, std::memory_order_acq_rel) == tasks) slot.pack = Pack{};
  }

 private:
  struct Slot {
    std::once_flag packed;
    std::atomic<int64_t> remaining{0};
    Pack pack;
  };
  std::vector<Slot> slots_;
};

// Once flags for the blocks of a packed head (Note [Packed heads]).
class BlockOnce {
 public:
  void reset(int64_t blocks) { flags_ = std::make_unique<std::once_flag[]>(blocks); }
  // Runs fn() if no thread has run it for `block` yet; else waits until that run has finished.
  template <typename Fn>
  void run(int64_t block, Fn&& fn) {
    std::call_once(flags_[block], std::forward<Fn>(fn));
  }

 private:
  std::unique_ptr<std::once_flag[]> flags_;
};

// Walks a thread's range [begin, end) of tasks numbered head by head (tasks_per_head each): for
// each head it meets, run(head, first, stop, packed) runs the tasks [first, stop) of that head,
// with the head packed by pack(head, Pack&) if no thread has packed it yet.
template <typename Pack, typename PackFn, typename RunFn>
void for_tasks_by_head(PackedHeads<Pack>& heads, int64_t tasks_per_head, int64_t begin, int64_t end,
                       PackFn&& pack, RunFn&& run) {
  for (int64_t first = begin; first < end;) {
    const int64_t head = first / tasks_per_head;
    const int64_t stop = std::min(end, (head + 1) * tasks_per_head);
    run(head, first, stop, heads.get(head, [&](Pack& dst) { pack(head, dst); }));
    heads.done(head, stop - first);
    first = stop;
  }
}

// ---- merge
// ----------------------------------------------------------------------------------------

void lse_merge(const MergeParams& p, ParallelFor parallel_for) {
  const Shape& sh = p.shape;
  const int64_t d = sh.head_dim;
  parallel_for(sh.batch * sh.heads_q * sh.seq_q, [&](int64_t begin, int64_t end) {
    std::vector<float> block_row(d);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t % sh.seq_q, h = (t / sh.seq_q) % sh.heads_q;
      const int64_t b = t / (sh.seq_q * sh.heads_q);
      float* lse = p.lse + b * p.lse_stride.batch + h * p.lse_stride.head + i;
      const float block_lse =
          p.block_lse[b * p.block_lse_stride.batch + h * p.block_lse_stride.head + i];
      const MergeWeights w = merge_weights(*lse, block_lse);
      load_row(
          p.block_out, p.block_dtype,
          b * p.block_out_stride.batch + h * p.block_out_stride.head + i * p.block_out_stride.seq,
          d, block_row.data());
      float* out = p.out + b * p.out_stride.batch + h * p.out_stride.head + i * p.out_stride.seq;
      for (int64_t c = 0; c < d; ++c) out[c] = w.w1 * out[c] + w.w2 * block_row[c];
      *lse = w.lse;
    }
  });
}

}  // namespace ring_ext::cpu::RING_EXT_CPU_ISA

#include "flash_bwd.h"
#include "flash_fwd.h"
