// The ring schedules as pure functions: (algo, cp_size, rank, step, cp_window_size, mask) -> the
// work items and every transfer (hop) of that step. Torch-free and tensor-free; the driver
// (ring.cpp) only posts, waits and computes what these return (no peer arithmetic of its own), and
// tests/test_planner.py checks them through the ring_ext::ring_schedule op.
//
// Note [Zigzag causal schedule]
// -----------------------------
// With a causal mask the sequence is cut into 2N chunks and rank r holds chunks r and 2N-1-r
// (ring_ext/sharding.py). Inside a rank the two chunks keep their global order, so "causal in local
// coordinates" equals "causal in global coordinates" whenever Q and K/V come from the same rank.
// At a step where rank r holds the K/V of rank src:
//
//   src == r   diagonal: all local Q x all local K/V, causal at local offsets (0, 0)
//   src <  r   all local Q (chunks r, 2N-1-r) x first K/V chunk (src) only; full   (half a block)
//   src >  r   second local Q chunk (2N-1-r) x all K/V (src, 2N-1-src); full      (half a block)
//
//   N = 4, chunks 0..7; Q rows of rank 1 = chunks {1, 6}:
//     step  src  K/V chunks   work item (Q chunks x K/V chunks)
//      0     1    {1, 6}      {1,6} x {1,6} causal
//      1     0    {0, 7}      {1,6} x {0}   full
//      2     3    {3, 4}      {6}   x {3,4} full
//      3     2    {2, 5}      {6}   x {2,5} full
//
// Every off-diagonal step costs half a block on every rank, so the ring stays balanced.
// Without a mask ("general") each rank holds one contiguous chunk and every step is one full item.
//
// Note [Double ring schedule]
// ---------------------------
// cp_size N = n_out * w ranks; rank r = o * w + i sits at inner position i of window o. An outer
// round so = 0 .. n_out-1 starts with rank (o, i) holding the K/V of rank (o - so, i); while the w
// inner steps pass blocks around the window (inner ring), the round-start block is already on its
// way to (o + 1, i) over the outer ring, posted before the inner steps. Step t = so * w + si:
//
//   src(o, i, t) = ((o - so) mod n_out) * w + ((i - si) mod w)
//
//   N = 4, w = 2 (windows {0,1}, {2,3}); src per rank and step:
//     step  so si   r=0  r=1  r=2  r=3
//      0    0  0     0    1    2    3
//      1    0  1     1    0    3    2
//      2    1  0     2    3    0    1     <- round-start blocks came over the outer ring
//      3    1  1     3    2    1    0
//
// window 1 (or N) is the plain ring: one round of N inner steps. The work items of a step depend
// only on (src, rank, mask), so the zigzag balance holds for the double ring too. Gradients of K/V
// travel with their block along the inner ring and go home to their owner at the end of each round
// (ring.cpp, Note [K/V gradients]).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ring_ext {
namespace ring {

enum class Algo : int64_t { kUlysses = 0, kRing = 1, kHybrid = 2 };

Algo parse_algo(const std::string& name);  // schedule.cpp; rejects unknown names
void check_ring_algo(Algo algo);           // schedule.cpp; rejects algorithms without a ring

// One (Q rows x K/V rows) block of a step, in units of chunks (a rank holds `chunks_per_rank`
// equal chunks). Offsets are the causal mask's positions (in chunks) in local coordinates.
struct WorkItem {
  int64_t q_chunk = 0, q_chunks = 0;    // local Q chunks [q_chunk, q_chunk + q_chunks)
  int64_t kv_chunk = 0, kv_chunks = 0;  // chunks of the held K/V block
  bool causal = false;
  int64_t q_offset = 0, k_offset = 0;
};

// What a hop carries. K/V blocks move in forward and backward alike; the float32 dK/dV partial of
// the held block moves with it (backward only) and goes home to the block's owner at the end of
// each round (Note [K/V gradients] in ring.cpp).
enum class Payload : int64_t { kKv = 0, kOuterKv = 1, kKvGrad = 2, kGradHome = 3 };

// The process group a hop travels over (ring_ext/context.py): the inner ring (the window of w
// consecutive ring ranks; the whole ring when w = cp), the outer ring (ranks with the same position
// in their window) or the ring itself.
enum class Link : int64_t { kInner = 0, kOuter = 1, kRing = 2 };

// One send/recv pair of a step: send to `send_to`, receive from `recv_from`, both ranks of the
// `link` group. Posted at the step it is listed in; what is sent and when it is waited is the
// driver's (ring.cpp): kKv and kKvGrad are needed by the next step, kOuterKv by the next round's
// first step, kGradHome by the end of the backward.
struct Hop {
  Payload what = Payload::kKv;
  Link link = Link::kInner;
  int64_t send_to = 0, recv_from = 0;
};

struct Step {
  int64_t src = 0;  // the rank whose K/V block is held at this step
  std::vector<WorkItem> items;
  std::vector<Hop> hops;
};

// The double ring's shape: `inner` consecutive ring ranks form an inner ring (--cp-window-size;
// cp_size for the plain ring), cp_size / inner of them the outer ring. ("window" in this code base
// means a sliding window of attention; the flag keeps MindSpeed's name.)
struct Topology {
  int64_t cp_size = 1, inner = 1;
  int64_t outer() const { return cp_size / inner; }
};

inline int64_t mod(int64_t a, int64_t n) { return ((a % n) + n) % n; }

// 1 for a full mask (contiguous sharding), 2 for causal (zigzag).
inline int64_t chunks_per_rank(bool causal) { return causal ? 2 : 1; }

// The topology of a --cp-window-size: 1 means the plain ring, whose inner ring is everyone.
inline Topology topology(int64_t cp_size, int64_t cp_window_size) {
  return {cp_size, cp_window_size <= 1 ? cp_size : cp_window_size};
}

// Note [Double ring schedule].
inline int64_t source(const Topology& t, int64_t rank, int64_t step) {
  const int64_t o = rank / t.inner, i = rank % t.inner;
  const int64_t so = step / t.inner, si = step % t.inner;
  return mod(o - so, t.outer()) * t.inner + mod(i - si, t.inner);
}

// The rank that holds `rank`'s block at `step` (inverse of source()).
inline int64_t holder(const Topology& t, int64_t rank, int64_t step) {
  const int64_t o = rank / t.inner, i = rank % t.inner;
  const int64_t so = step / t.inner, si = step % t.inner;
  return mod(o + so, t.outer()) * t.inner + mod(i + si, t.inner);
}

// Note [Zigzag causal schedule].
inline std::vector<WorkItem> work_items(int64_t src, int64_t rank, bool causal) {
  if (!causal) return {WorkItem{0, 1, 0, 1, false, 0, 0}};
  if (src == rank) return {WorkItem{0, 2, 0, 2, true, 0, 0}};
  if (src < rank) return {WorkItem{0, 2, 0, 1, false, 0, 0}};
  return {WorkItem{1, 1, 0, 2, false, 0, 0}};
}

// Every transfer of `rank` at `step` (Note [Double ring schedule], Note [K/V gradients]). Inner
// ranks are positions in the window, outer ranks window indices, ring ranks ring ranks.
inline std::vector<Hop> hops(const Topology& t, int64_t rank, int64_t step) {
  const int64_t w = t.inner, n_out = t.outer();
  const int64_t o = rank / w, i = rank % w, so = step / w, si = step % w;
  std::vector<Hop> out;
  if (si == 0 && so + 1 < n_out) {  // the next round's block, hidden behind this whole round
    out.push_back({Payload::kOuterKv, Link::kOuter, mod(o + 1, n_out), mod(o - 1, n_out)});
  }
  if (si + 1 < w) {  // the next step's block, and the partial gradient of the one held now
    out.push_back({Payload::kKv, Link::kInner, mod(i + 1, w), mod(i - 1, w)});
    out.push_back({Payload::kKvGrad, Link::kInner, mod(i + 1, w), mod(i - 1, w)});
  } else if (t.cp_size > 1) {  // round's end: the partial goes home; ours comes from its holder
    out.push_back({Payload::kGradHome, Link::kRing, source(t, rank, step), holder(t, rank, step)});
  }
  return out;
}

// The ring part of megatron_cp_algo and hybrid_cp_algo share one schedule; Ulysses has none.
inline Step schedule_step(Algo algo, int64_t cp_size, int64_t rank, int64_t step,
                          int64_t cp_window_size, bool causal) {
  check_ring_algo(algo);
  const Topology t = topology(cp_size, cp_window_size);
  const int64_t src = source(t, rank, step);
  return {src, work_items(src, rank, causal), hops(t, rank, step)};
}

}  // namespace ring
}  // namespace ring_ext
