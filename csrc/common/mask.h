// The mask rule of the kernels, written once for host and device: the keys each query row sees
// under every MaskKind (params.h), and what a tile of rows and a block of keys derive from them.
// The CPU kernels (csrc/cpu/flash_impl.h) use it with int64_t indices, the CUDA kernels
// (csrc/cuda/*.cu) with int. Torch-free: nvcc compiles it with the kernels.
//
// Note [Mask rule]
// Row r sees the keys [begin(r), end(r)) of [0, seq_k): one half-open interval (empty when
// end <= begin), both ends non-decreasing in r (docs/design.md, "Mask model"):
//   kNone:    [0, seq_k)
//   kCausal:  [0, r + diff + 1), diff = q_offset - k_offset (key j visible iff
//             k_offset + j <= q_offset + r)
//   kRows:    [row_begin[r], row_end[r])
// with both ends clamped to [0, seq_k]. A row past seq_q (the padding of a tile) takes the offset
// rule's natural extension, or under kRows the last row's interval; no kernel stores such a row.
// Because both ends are monotone, the rows r0 <= r <= r1 of a tile see no key outside the tile's
// hull [begin(r0), end(r1)), and every one of them sees every key of its core [begin(r1), end(r0)).
// So a block of keys outside the hull is skipped (kEmpty), one inside the core needs no per-pair
// mask (kFull), and any other is masked pair by pair (kPartial); and the rows that see a key of
// [k0, k1) lie in one contiguous range (rows_seeing), found by binary search. The intervals are
// trusted to be monotone here: the host checks them where they enter (block ops on CPU tensors, the
// CP ops always).
//
// Index types. The host uses int64_t throughout. The device uses int: the kernels keep the
// intervals of a thread's rows in registers and those of a step's rows in shared memory, where
// 64-bit ends would double the space (the tensor-core kernels are sized to their register budget,
// .ci/cuda_build_check.sh fails on spills), and 32-bit index arithmetic is what the rest of a
// kernel does. It holds because seq_q, seq_k < 2^30 (check_shape in csrc/cuda/launch.cuh): diff is
// clamped to +-2^30, which keeps every row's answer, and `row + diff + 1` for a tile row that may
// lie past seq_q (< 2^31) is summed in int64 before the clamp to [0, seq_k].
#pragma once

#include <cstdint>

#include "host_device.h"
#include "params.h"

namespace ring_ext {

// A half-open range [begin, end) of keys (or of rows); empty when end <= begin.
template <typename I>
struct Interval {
  I begin, end;

  RING_EXT_HOST_DEVICE bool empty() const { return end <= begin; }
  RING_EXT_HOST_DEVICE bool contains(I i) const { return begin <= i && i < end; }
  RING_EXT_HOST_DEVICE bool covers(I lo, I hi) const { return begin <= lo && hi <= end; }
};

// The keys some row of a tile sees (its hull) and the keys all of them see (its core), from the
// intervals of its first and last rows (Note [Mask rule]).
template <typename I>
RING_EXT_HOST_DEVICE Interval<I> tile_hull(const Interval<I>& first, const Interval<I>& last) {
  return {first.begin, last.end};
}
template <typename I>
RING_EXT_HOST_DEVICE Interval<I> tile_core(const Interval<I>& first, const Interval<I>& last) {
  return {last.begin, first.end};
}

// How a tile of rows sees a block of keys: none of it, all of it for every row, or in part.
enum class BlockVisibility : int32_t { kEmpty, kPartial, kFull };

// The block of keys [k0, k1) against the tile whose first and last rows see `first` and `last`.
// kEmpty when the block misses the tile's hull: exact for a tile of one row, while a block that
// lies between the intervals of two rows of a taller tile is kPartial although no row sees it
// (rows_seeing tells exactly).
template <typename I>
RING_EXT_HOST_DEVICE BlockVisibility block_visibility(const Interval<I>& first,
                                                      const Interval<I>& last, I k0, I k1) {
  if (tile_core(first, last).covers(k0, k1)) return BlockVisibility::kFull;
  const Interval<I> hull = tile_hull(first, last);
  const I lo = hull.begin > k0 ? hull.begin : k0, hi = hull.end < k1 ? hull.end : k1;
  return hi <= lo ? BlockVisibility::kEmpty : BlockVisibility::kPartial;
}

// The key interval of every row of one (q block, kv block) call: made on the host by row_keys
// from the call's Mask and Shape, read by the kernels (on CUDA, passed by value as a kernel
// argument). I is int64_t on the host, int on the device (Note [Mask rule]).
template <typename I>
struct RowKeys {
  // The largest |diff| that keeps every row's answer for the sizes I may index.
  static constexpr int64_t kDiffLimit = sizeof(I) < 8 ? int64_t{1} << 30 : int64_t{1} << 62;

  bool rows = false;                   // kRows: read row_begin/row_end; else the offset rule
  const int64_t* row_begin = nullptr;  // kRows: [seq_q] each, on the kernel's device
  const int64_t* row_end = nullptr;
  I diff = 0;  // offset rule: q_offset - k_offset (kNone: kDiffLimit), clamped to +-kDiffLimit
  I seq_q = 0, seq_k = 0;

  // The keys row `row` sees; `row` may lie past seq_q (Note [Mask rule]).
  RING_EXT_HOST_DEVICE Interval<I> keys(int64_t row) const {
    if (rows) {
      const int64_t r = row < seq_q ? row : seq_q - 1;
      return {clamp_key(row_begin[r]), clamp_key(row_end[r])};
    }
    return {0, clamp_key(row + diff + 1)};
  }

  // The rows of [0, seq_q) that may see a key of [k0, k1) (0 <= k0 < k1 <= seq_k): from the first
  // row with end(r) > k0 to the first after it with begin(r) >= k1. Every row that sees one lies
  // inside; a row inside with an empty interval sees none. On the device every thread searches
  // alike (the loads are broadcasts).
  RING_EXT_HOST_DEVICE_FN Interval<I> rows_seeing(I k0, I k1) const {
    if (!rows) {
      const I first = k0 - diff;
      return {first < 0 ? I{0} : (first > seq_q ? seq_q : first), seq_q};
    }
    const I begin = first_row(0, [&](I r) { return keys(r).end > k0; });
    return {begin, first_row(begin, [&](I r) { return keys(r).begin >= k1; })};
  }

 private:
  RING_EXT_HOST_DEVICE I clamp_key(int64_t key) const {
    return key < 0 ? I{0} : (key > seq_k ? seq_k : static_cast<I>(key));
  }

  // The first row of [lo, seq_q) with pred(row), seq_q if none (pred false, then true, along rows).
  template <typename Pred>
  RING_EXT_HOST_DEVICE_FN I first_row(I lo, Pred pred) const {
    I hi = seq_q;
    while (lo < hi) {
      const I mid = (lo + hi) / 2;
      if (pred(mid)) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    return lo;
  }
};

// The RowKeys of a call (host code; the CUDA launchers check seq_q, seq_k < 2^30 first).
template <typename I>
RowKeys<I> row_keys(const Mask& m, const Shape& s) {
  constexpr int64_t lim = RowKeys<I>::kDiffLimit;
  RowKeys<I> keys;
  if (m.kind == MaskKind::kRows) {
    keys.rows = true;
    keys.row_begin = m.row_begin;
    keys.row_end = m.row_end;
  }
  const int64_t diff = m.kind == MaskKind::kCausal ? m.q_offset - m.k_offset : lim;
  keys.diff = static_cast<I>(diff > lim ? lim : (diff < -lim ? -lim : diff));
  keys.seq_q = static_cast<I>(s.seq_q);
  keys.seq_k = static_cast<I>(s.seq_k);
  return keys;
}

}  // namespace ring_ext
