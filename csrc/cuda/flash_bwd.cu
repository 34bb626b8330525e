// Blockwise flash attention backward on tensor cores (bf16/fp16 in, float32 accumulate).
//
// Note [Backward tiling]
// One CTA owns kBlockN keys of one (batch, kv head) and walks every (q head of its GQA group,
// q block of kBlockM rows) that can see them; dK and dV stay in registers for the whole walk.
//
//   smem: K, V [kBlockN x D]   Q, dO [kBlockM x D]   P^T, dS^T [kBlockN x kBlockM]
//         lse, delta, begin and end of the visible keys [kBlockM]
//
//   step 1  S^T = K Q^T, dP^T = V dO^T         warps tile [kBlockN x kBlockM] in 16-key strips
//           P^T = exp(x(S^T) - lse), dS^T = P^T * (dP^T - delta) * x'   -> smem (16-bit)
//   step 2  dV += P^T dO, dK += dS^T Q         warps tile [kBlockN x Ds]; accumulators in registers
//           (barrier, then the next Q, dO, lse, delta start loading)
//   step 3  dQ += dS K                         warps tile [kBlockM x Ds]; atomicAdd into float32 dq
//
// x is the score (scale, then the softcap if any; Scores in scores.cuh), x' its slope (1 without a
// softcap; Note [Softcap and sinks] in csrc/common/params.h). Ds = D up to D = 256; Note [Head dim
// 512 in the backward] for D = 512. Q, K, V, dO are D wide in smem and zero past their own dims
// (Note [One bucket for q/k and v] in head_dim.h): dq, dk stop at head_dim, dv at head_dim_v.
//
// dq accumulation: several CTAs (one per key block) add into the same dq rows, so dq is accumulated
// with float32 atomicAdd straight into the caller's float32 accumulator (no extra buffer; the order
// of additions, hence the last bits of dq, is not deterministic). dK/dV are deterministic: one CTA
// owns its keys for every q head of the GQA group and adds into dk/dv once, without atomics.
// Rows past seq_q get lse = +inf (P = 0) and rows with lse = -inf (no visible key) likewise; keys
// past seq_k and hidden pairs are masked to P = 0. The CTA walks only the q blocks holding rows
// that see its keys (RowKeys::rows_seeing, Note [Mask rule] in csrc/common/mask.h). Softmax runs in
// log2 units.
//
// Note [Head dim 512 in the backward]
// dK and dV of a warp's [16 keys x Ds / (warps per key strip)] tile live in registers for the whole
// walk: 128 floats per thread at the D = 256 tilings, the most that fits. At D = 512 a CTA
// therefore accumulates Ds = 256 of the dims: two CTAs per key block, one for the dims [0, 256) of
// dK, dV and dq, one for [256, 512); each runs step 1 over all D dims (S^T and dP^T are recomputed
// by the second: 7 of the backward's GEMMs instead of 5) and steps 2 and 3 over its half. Its
// tiling, m32n32w4 (K, V, Q, dO 32 x 512 each: 132.5 KiB), has the register tiles of the D = 256
// small tiling and fits sm_80/87 (163 KiB) and sm_90 (227 KiB); a 99 KiB device (sm_86/89/120) fits
// no D = 512 tiling and takes the SIMT backward.
//
// Note [Backward tilings and shared memory]
// The tiling is a template parameter (BwdConfig<D, kBlockN, kBlockM, kWarps, kDoubleQdo>); each
// head-dim bucket has its candidates (Note [Candidate tilings] in flash_fwd.cu), the default first,
// and a small tiling for 99 KiB devices. Unless RING_EXT_CUDA_BWD_TILING names one, the launcher
// takes the default if its shared memory fits the device's opt-in limit (max_smem_per_block), else
// the small one, else the SIMT kernels (which need 16 KiB):
//
//   D     default (name, smem)   other candidates (smem)                  small (smem)
//   64    m64n128w8, 81 KiB      m64n128w8d (98), m128n128w8 (130)        -
//   128   m64n128w8, 129 KiB     m64n128w8d (162), m128n64w8 (130)        m64n64w8 (81)
//   256   m64n64w8, 145 KiB      -                                        m32n32w4 (68.5)
//   512   m32n32w4, 132.5 KiB    -                                        - (SIMT)
//
// (m<rows per step>n<keys per CTA>w<warps>; d: Q, dO, lse, delta and the key ranges are
// double-buffered, so the next step's loads overlap all three steps of this one, one barrier
// fewer per step.) sm_80/87 (163 KiB) and sm_90 (227 KiB) take the defaults; sm_86/89/120 (99 KiB)
// the small tilings for D > 64. The small tilings keep each warp's register tiles (dK, dV, dq) the
// same size.
#include <cmath>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "head_dim.h"
#include "kernels.h"
#include "launch.cuh"
#include "mma.cuh"
#include "scores.cuh"
#include "tilings.h"

namespace ring_ext::cuda {

void simt_bwd(const BwdParams& p, cudaStream_t stream);  // simt_fallback.cu

namespace {

template <int D_, int kBlockN_, int kBlockM_, int kWarps_, bool kDoubleQdo_ = false>
struct BwdConfig {
  static constexpr int D = D_;
  static constexpr bool kDoubleQdo = kDoubleQdo_;
  static constexpr int kQBuffers = kDoubleQdo ? 2 : 1;  // Q, dO, lse, delta, key ranges
  static constexpr int kWarps = kWarps_, kThreads = 32 * kWarps;
  static constexpr int kBlockN = kBlockN_;  // keys per CTA
  static constexpr int kBlockM = kBlockM_;  // q rows per step
  using KTile = SmemTile<kBlockN, D>;
  using QTile = SmemTile<kBlockM, D>;
  using PTile = SmemTile<kBlockN, kBlockM>;
  // The dims of dK, dV and dq one CTA accumulates, and its CTAs per key block (Note [Head dim 512
  // in the backward]).
  static constexpr int Ds = D < 256 ? D : 256;
  static constexpr int kSlices = D / Ds;
  // Warp grids of the three steps: (key strips x q-column groups), (key strips x dim groups),
  // (q-row strips x dim groups).
  static constexpr int kKeyStrips = kBlockN / 16, kRowStrips = kBlockM / 16;
  static constexpr int kCols1 = kBlockM / (kWarps / kKeyStrips);
  static constexpr int kDims2 = Ds / (kWarps / kKeyStrips);
  static constexpr int kDims3 = Ds / (kWarps / kRowStrips);
  static_assert(kWarps % kKeyStrips == 0 && kWarps % kRowStrips == 0, "warp grid");
  static_assert(kCols1 % 16 == 0 && kDims2 % 16 == 0 && kDims3 % 16 == 0, "two n-tiles per load");
  static constexpr int kRowBytes = 4 * kBlockM * 4;  // lse, delta, key_begin, key_end
  static constexpr int kSmemBytes =
      (2 * KTile::kElems + 2 * PTile::kElems) * 2 + kQBuffers * (2 * QTile::kElems * 2 + kRowBytes);
  static std::string name() { return tiling_name(kBlockM, kBlockN, kWarps, false, kDoubleQdo); }
};

struct Smem {
  void* k;
  void* v;
  void* q;
  void* dout;
  void* pt;
  void* dst;
  float* lse;      // log2 units; +inf for rows that must contribute nothing
  float* delta;    // [kBlockM]
  int* key_begin;  // [kBlockM] the keys [key_begin, key_end) each row sees; rows past seq_q: none
  int* key_end;
};

// Layout: K, V, P^T, dS^T, then per Q buffer: Q, dO, lse, delta, key_begin, key_end.
template <typename Cfg, typename T>
__device__ __forceinline__ Smem carve_smem(unsigned char* raw, int buffer) {
  T* base = reinterpret_cast<T*>(raw);
  Smem s;
  s.k = base;
  s.v = base + Cfg::KTile::kElems;
  s.pt = base + 2 * Cfg::KTile::kElems;
  s.dst = base + 2 * Cfg::KTile::kElems + Cfg::PTile::kElems;
  unsigned char* qbuf = raw + (2 * Cfg::KTile::kElems + 2 * Cfg::PTile::kElems) * 2 +
                        buffer * (2 * Cfg::QTile::kElems * 2 + Cfg::kRowBytes);
  s.q = qbuf;
  s.dout = reinterpret_cast<T*>(qbuf) + Cfg::QTile::kElems;
  s.lse = reinterpret_cast<float*>(qbuf + 2 * Cfg::QTile::kElems * 2);
  s.delta = s.lse + Cfg::kBlockM;
  s.key_begin = reinterpret_cast<int*>(s.delta + Cfg::kBlockM);
  s.key_end = s.key_begin + Cfg::kBlockM;
  return s;
}

// Starts loading Q, dO (cp.async) and lse, delta, the key ranges (plain loads) of q head h, rows
// [m0, m0 + kBlockM).
template <typename Cfg, typename T>
__device__ __forceinline__ void load_q_block(const BwdParams& p, const RowKeys<int>& keys,
                                             const Smem& s, int h, int m0) {
  const int b = blockIdx.z, seq_q = static_cast<int>(p.shape.seq_q);
  const int head_dim = static_cast<int>(p.shape.head_dim);
  const int head_dim_v = static_cast<int>(p.shape.head_dim_v);
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride.batch + h * p.q_stride.head;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_stride.batch + h * p.dout_stride.head;
  load_tile<typename Cfg::QTile, Cfg::kThreads>(static_cast<T*>(s.q), q, p.q_stride.seq, m0, seq_q,
                                                head_dim);
  load_tile<typename Cfg::QTile, Cfg::kThreads>(static_cast<T*>(s.dout), dout, p.dout_stride.seq,
                                                m0, seq_q, head_dim_v);
  cp_async_commit();
  for (int i = threadIdx.x; i < Cfg::kBlockM; i += Cfg::kThreads) {
    const int row = m0 + i;
    float lse = INFINITY, delta = 0.0f;
    Interval<int> seen{keys.seq_k, 0};  // rows past seq_q: no key (begin stays >= every key)
    if (row < seq_q) {
      lse = p.lse[b * p.lse_stride.batch + h * p.lse_stride.head + row];
      lse = lse == -INFINITY ? INFINITY : lse * kLog2e;
      delta = p.delta[b * p.delta_stride.batch + h * p.delta_stride.head + row];
      seen = keys.keys(row);
    }
    s.lse[i] = lse;
    s.delta[i] = delta;
    s.key_begin[i] = seen.begin;
    s.key_end[i] = seen.end;
  }
}

// Step 1 for this warp's [16 keys x kCols1 rows] strip: P^T and dS^T into smem.
// A (key, row) pair is visible iff key_begin[row] <= key < key_end[row] (smem, from load_q_block).
template <typename Cfg, typename T>
__device__ __forceinline__ void probs_and_grads(const Smem& s, int n0, const Scores& score) {
  constexpr int NT = Cfg::kCols1 / 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int key0 = (warp % Cfg::kKeyStrips) * 16, col0 = (warp / Cfg::kKeyStrips) * Cfg::kCols1;
  float st[1][NT][4], dpt[1][NT][4];
  zero(st);
  zero(dpt);
  warp_gemm<false, false, 1, NT, Cfg::D, typename Cfg::KTile, typename Cfg::QTile>(
      st, static_cast<const T*>(s.k), key0, static_cast<const T*>(s.q), col0);
  warp_gemm<false, false, 1, NT, Cfg::D, typename Cfg::KTile, typename Cfg::QTile>(
      dpt, static_cast<const T*>(s.v), key0, static_cast<const T*>(s.dout), col0);
  // Masking is needed unless the strip's 16 keys are kFull for its columns, a tile of rows whose
  // first and last are col0 and col0 + kCols1 - 1 (Note [Mask rule]; padding rows see nothing).
  const auto seen = [&](int col) { return Interval<int>{s.key_begin[col], s.key_end[col]}; };
  const bool masked = block_visibility(seen(col0), seen(col0 + Cfg::kCols1 - 1), n0 + key0,
                                       n0 + key0 + 16) != BlockVisibility::kFull;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = n0 + key0 + g + 8 * (i / 2), col = col0 + nt * 8 + 2 * t + i % 2;
      const bool visible = !masked || seen(col).contains(key);
      float slope;
      const float x = score(st[0][nt][i], slope);
      const float prob = visible ? ex2(x - s.lse[col]) : 0.0f;
      st[0][nt][i] = prob;
      dpt[0][nt][i] = prob * (dpt[0][nt][i] - s.delta[col]) * slope;
    }
  }
  store_frag<1, NT, typename Cfg::PTile>(static_cast<T*>(s.pt), st, key0, col0);
  store_frag<1, NT, typename Cfg::PTile>(static_cast<T*>(s.dst), dpt, key0, col0);
}

// Step 3: dq[rows m0.., :] += scale * dS K for this warp's [16 rows x kDims3 dims] tile of the
// CTA's dims [d0, d0 + Ds).
template <typename Cfg, typename T>
__device__ __forceinline__ void accumulate_dq(const BwdParams& p, const Smem& s, int h, int m0,
                                              int d0) {
  constexpr int NT = Cfg::kDims3 / 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row0 = (warp % Cfg::kRowStrips) * 16;
  const int dim0 = d0 + (warp / Cfg::kRowStrips) * Cfg::kDims3;
  float dq[1][NT][4];
  zero(dq);
  warp_gemm<true, true, 1, NT, Cfg::kBlockN, typename Cfg::PTile, typename Cfg::KTile>(
      dq, static_cast<const T*>(s.dst), row0, static_cast<const T*>(s.k), dim0);
  const int seq_q = static_cast<int>(p.shape.seq_q), head_dim = static_cast<int>(p.shape.head_dim);
  float* out = p.dq + blockIdx.z * p.dq_stride.batch + h * p.dq_stride.head;
#pragma unroll
  for (int i = 0; i < 4; i += 2) {
    const int row = m0 + row0 + g + 8 * (i / 2);
    if (row >= seq_q) continue;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int dim = dim0 + nt * 8 + 2 * t;
      if (dim >= head_dim) break;
      atomicAdd(out + row * p.dq_stride.seq + dim, p.scale * dq[0][nt][i]);
      atomicAdd(out + row * p.dq_stride.seq + dim + 1, p.scale * dq[0][nt][i + 1]);
    }
  }
}

// out[keys n0.., dims < `dims`] += factor * this warp's register tile of the CTA's dims [d0, d0 +
// Ds) (dk: q/k's dims, scaled; dv: v's); the CTA owns these keys and dims.
template <typename Cfg, int NT>
__device__ __forceinline__ void add_key_tile(float* out, int64_t ld, const float (&tile)[1][NT][4],
                                             int n0, int d0, int seq_k, int dims, float factor) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int key0 = (warp % Cfg::kKeyStrips) * 16;
  const int dim0 = d0 + (warp / Cfg::kKeyStrips) * Cfg::kDims2;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int key = n0 + key0 + g + 8 * (i / 2);
    if (key >= seq_k) continue;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int dim = dim0 + nt * 8 + 2 * t + i % 2;
      if (dim >= dims) break;
      out[key * ld + dim] += factor * tile[0][nt][i];
    }
  }
}

// dk, dv[keys n0.., :] += this warp's register tiles, dk scaled. One after the other, not in one
// loop: the dk tile's registers are free before the dv loop starts (one loop spilled at D = 256).
template <typename Cfg, int NT>
__device__ __forceinline__ void add_dkdv(const BwdParams& p, const float (&dk)[1][NT][4],
                                         const float (&dv)[1][NT][4], int hk, int n0, int d0) {
  const int b = blockIdx.z, seq_k = static_cast<int>(p.shape.seq_k);
  add_key_tile<Cfg>(p.dk + b * p.dk_stride.batch + hk * p.dk_stride.head, p.dk_stride.seq, dk, n0,
                    d0, seq_k, static_cast<int>(p.shape.head_dim), p.scale);
  add_key_tile<Cfg>(p.dv + b * p.dv_stride.batch + hk * p.dv_stride.head, p.dv_stride.seq, dv, n0,
                    d0, seq_k, static_cast<int>(p.shape.head_dim_v), 1.0f);
}

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    flash_bwd_kernel(const BwdParams p, const RowKeys<int> keys) {
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, NT2 = Cfg::kDims2 / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];

  // The Cfg::kSlices CTAs of one key block, one per Ds of the dims, are neighbours.
  const int b = blockIdx.z, hk = blockIdx.y;
  const int n0 = (blockIdx.x / Cfg::kSlices) * kBlockN, d0 = (blockIdx.x % Cfg::kSlices) * Cfg::Ds;
  const int group = static_cast<int>(p.shape.heads_q / p.shape.heads_kv);
  const int seq_k = static_cast<int>(p.shape.seq_k);
  // Only the q blocks holding rows that see one of this CTA's keys.
  const Interval<int> rows = keys.rows_seeing(n0, min(n0 + kBlockN, seq_k));
  const int m_begin = rows.begin / kBlockM;
  const int m_count = rows.empty() ? 0 : (rows.end + kBlockM - 1) / kBlockM - m_begin;
  const int steps = group * m_count;
  if (steps == 0) return;
  const Scores score = Scores::make(p.scale, p.softcap, kLog2e);
  // Step i reads the q block (q head hk * group + i / m_count, rows from step_m0(i)).
  const auto step_head = [&](int i) { return hk * group + i / m_count; };
  const auto step_m0 = [&](int i) { return (m_begin + i % m_count) * kBlockM; };

  const int head_dim = static_cast<int>(p.shape.head_dim);
  const int head_dim_v = static_cast<int>(p.shape.head_dim_v);
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head;
  const Smem first_buffer = carve_smem<Cfg, T>(smem_raw, 0);
  load_tile<typename Cfg::KTile, Cfg::kThreads>(static_cast<T*>(first_buffer.k), k, p.k_stride.seq,
                                                n0, seq_k, head_dim);
  load_tile<typename Cfg::KTile, Cfg::kThreads>(static_cast<T*>(first_buffer.v), v, p.v_stride.seq,
                                                n0, seq_k, head_dim_v);
  load_q_block<Cfg, T>(p, keys, first_buffer, step_head(0), step_m0(0));

  const int warp = threadIdx.x / 32;
  const int key0 = (warp % Cfg::kKeyStrips) * 16;
  const int dim0 = d0 + (warp / Cfg::kKeyStrips) * Cfg::kDims2;
  float dk[1][NT2][4], dv[1][NT2][4];
  zero(dk);
  zero(dv);
  for (int step = 0; step < steps; ++step) {
    const Smem s = carve_smem<Cfg, T>(smem_raw, step % Cfg::kQBuffers);
    cp_async_wait_all();
    __syncthreads();  // this step's Q, dO, lse, delta visible; the last step is done everywhere
    if (Cfg::kDoubleQdo && step + 1 < steps) {  // into the buffer the last step read
      load_q_block<Cfg, T>(p, keys, carve_smem<Cfg, T>(smem_raw, (step + 1) % 2),
                           step_head(step + 1), step_m0(step + 1));
    }
    probs_and_grads<Cfg, T>(s, n0, score);
    __syncthreads();  // P^T, dS^T complete
    warp_gemm<false, true, 1, NT2, kBlockM, typename Cfg::PTile, typename Cfg::QTile>(
        dv, static_cast<const T*>(s.pt), key0, static_cast<const T*>(s.dout), dim0);
    warp_gemm<false, true, 1, NT2, kBlockM, typename Cfg::PTile, typename Cfg::QTile>(
        dk, static_cast<const T*>(s.dst), key0, static_cast<const T*>(s.q), dim0);
    if (!Cfg::kDoubleQdo && step + 1 < steps) {
      __syncthreads();  // every warp is done with Q, dO, lse, delta: reload them
      load_q_block<Cfg, T>(p, keys, s, step_head(step + 1), step_m0(step + 1));
    }
    accumulate_dq<Cfg, T>(p, s, step_head(step), step_m0(step), d0);
  }
  add_dkdv<Cfg, NT2>(p, dk, dv, hk, n0, d0);
}

// The candidates of each head-dim bucket, default first, and the small tiling for 99 KiB devices
// (Note [Backward tilings and shared memory]).
template <int D>
struct BwdCandidates;
template <>
struct BwdCandidates<64> {
  using List = std::tuple<BwdConfig<64, 128, 64, 8>, BwdConfig<64, 128, 64, 8, true>,
                          BwdConfig<64, 128, 128, 8>>;
  using Small = BwdConfig<64, 128, 64, 8>;
};
template <>
struct BwdCandidates<128> {
  using List = std::tuple<BwdConfig<128, 128, 64, 8>, BwdConfig<128, 128, 64, 8, true>,
                          BwdConfig<128, 64, 128, 8>>;
  using Small = BwdConfig<128, 64, 64, 8>;
};
template <>
struct BwdCandidates<256> {
  using List = std::tuple<BwdConfig<256, 64, 64, 8>>;
  using Small = BwdConfig<256, 32, 32, 4>;
};
template <>
struct BwdCandidates<512> {
  using List = std::tuple<BwdConfig<512, 32, 32, 4>>;
  using Small = void;  // none fits 99 KiB: the SIMT backward (Note [Head dim 512 in the backward])
};

template <typename T, typename Cfg>
void launch_bwd(const BwdParams& p, cudaStream_t stream) {
  const int64_t key_blocks = (p.shape.seq_k + Cfg::kBlockN - 1) / Cfg::kBlockN;
  const dim3 grid =
      make_grid(key_blocks * Cfg::kSlices, p.shape.heads_kv, p.shape.batch, "flash_bwd");
  launch(flash_bwd_kernel<T, Cfg>, "flash_bwd", grid, Cfg::kThreads, Cfg::kSmemBytes, stream, p,
         row_keys<int>(p.mask, p.shape));
}

// The candidate named by RING_EXT_CUDA_BWD_TILING (an error naming the device's limit if it does
// not fit, from launch); unset: the default if it fits this device's shared memory, else the small
// tiling (Small = void: none), else the SIMT kernels.
template <typename T, typename Small, typename Default, typename... Others>
void launch_chosen(const BwdParams& p, cudaStream_t stream, std::tuple<Default, Others...>*) {
  constexpr bool kHasSmall = !std::is_void_v<Small>;
  if constexpr (kHasSmall) {
    static_assert(Small::kSmemBytes <= 99 * 1024, "the small tiling fits sm_86/89/120");
  }
  static const std::vector<std::string> names =
      names_of(static_cast<std::tuple<Default, Others...>*>(nullptr));
  const int chosen = chosen_tiling(TiledKernel::kBwd, Default::D, names);
  if (chosen == 0) return launch_bwd<T, Default>(p, stream);
  if (chosen > 0) {
    [[maybe_unused]] int i = 1;
    ((i++ == chosen ? launch_bwd<T, Others>(p, stream) : void()), ...);
    return;
  }
  const int limit = max_smem_per_block();
  if (Default::kSmemBytes <= limit) {
    launch_bwd<T, Default>(p, stream);
    return;
  }
  if constexpr (kHasSmall) {
    if (Small::kSmemBytes <= limit) return launch_bwd<T, Small>(p, stream);
  }
  simt_bwd(p, stream);
}

template <typename T, int D>
void launch_bucket(const BwdParams& p, cudaStream_t stream) {
  using Candidates = BwdCandidates<D>;
  launch_chosen<T, typename Candidates::Small>(p, stream,
                                               static_cast<typename Candidates::List*>(nullptr));
}

template <typename T>
void dispatch_head_dim(const BwdParams& p, cudaStream_t stream) {
  head_dim_switch(bucket_dim(p.shape),
                  [&](auto d) { launch_bucket<T, decltype(d)::value>(p, stream); });
}

bool use_tensor_cores(const BwdParams& p) {
  const Shape& s = p.shape;
  return p.in_dtype != DType::kFloat32 && tensor_core_dims(s) &&
         rows_aligned(p.q, p.q_stride, s.batch, s.seq_q, s.heads_q) &&
         rows_aligned(p.k, p.k_stride, s.batch, s.seq_k, s.heads_kv) &&
         rows_aligned(p.v, p.v_stride, s.batch, s.seq_k, s.heads_kv) &&
         rows_aligned(p.dout, p.dout_stride, s.batch, s.seq_q, s.heads_q);
}

}  // namespace

std::vector<std::string> bwd_tilings() { return bucket_tilings<BwdCandidates>("bwd"); }

void flash_bwd(const BwdParams& p, cudaStream_t stream) {
  check_shape(p.shape);
  if (!use_tensor_cores(p)) {
    simt_bwd(p, stream);
  } else if (p.in_dtype == DType::kBFloat16) {
    dispatch_head_dim<__nv_bfloat16>(p, stream);
  } else {
    dispatch_head_dim<__half>(p, stream);
  }
}

}  // namespace ring_ext::cuda
