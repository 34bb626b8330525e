// Blockwise flash attention forward on tensor cores (bf16/fp16 in, float32 accumulate).
//
// Note [Forward tiling]
// One CTA owns kBlockM = 16 * kRowTiles * kWarps query rows of one (batch, head) and walks the
// visible key blocks of kBlockN keys; warp w owns the query rows [w R, w R + R), R = 16 kRowTiles,
// and every key/dim column:
//
//        smem:  Q [kBlockM x D]   K [kBlockN x D]   V [kBlockN x Dv]     (swizzled, 16-bit)
//        regs:  S = Q K^T  per warp R x kBlockN       O per warp R x Dv (float32)
//
//   iteration j:   wait K_j | issue V_j load | S = Q K_j^T | mask, online softmax, rescale O
//                  wait V_j | issue K_{j+1} load | O += P V_j        (P packed from S, never in
//                  smem)
//
// K_{j+1} streams in during P V_j and V_j during Q K_j^T (FlashAttention-2 order), with a single
// buffer each: the barrier after a wait also proves every warp is done with the buffer reloaded
// next. Head dims are bucketed to D in {64, 128, 256, 512} (Note [One bucket for q/k and v] in
// head_dim.h); dims past each tensor's own are zero-filled in smem and never stored. Keys and rows
// past the sequence end are zero-filled and masked (keys) or not stored (rows). The online softmax
// runs in log2 units (scores * scale * log2 e, or the softcap's c log2 e tanh(scale qk / c): Scores
// in scores.cuh); a row that has seen no visible key keeps max = -inf and uses 0 as its exponent
// base, so it stays at l = 0, O = 0 and ends with out = 0, lse = -inf, or lse = its head's sink
// (finish_row in scores.cuh, which folds the sink into every row).
//
// Note [Head dim 512 in the forward]
// O of one 16-row tile is 16 x Dv floats in a warp's registers: 128 per thread at Dv = 256, the
// most that fits (the D = 256 tilings use 253-255 registers). So a CTA computes at most Dv = 256 of
// the output's dims: with head_dim_v > 256 the grid holds two CTAs per row block, one for the v
// dims [0, 256) and one for [256, 512), each computing S = Q K^T over all of q/k's dims (the
// second one's Q K^T is recomputed: 1.5x the forward's work at head dims 512/512, nothing more
// when head_dim_v <= 256) and storing its half of out; the first stores lse. The D = 512 tiling,
// m64n16w4 (Q 64 KiB, K 16 KiB, V 8 KiB), fits the 99 KiB of every sm_80+ GPU, so the forward takes
// the tensor cores at every head dim up to 512.
//
// Note [Candidate tilings]
// Each head-dim bucket up to 256 is compiled in 2-3 tilings, 512 in one (FwdCandidates here,
// BwdCandidates in flash_bwd.cu), named m<rows>n<keys>w<warps> plus p when the k loop's fragments
// are double-buffered (warp_gemm, kPipelined) and d when the backward's Q/dO are. The first of each
// bucket is the default; the environment variables RING_EXT_CUDA_FWD_TILING and
// RING_EXT_CUDA_BWD_TILING (read at every launch, tilings.h) run another, so that
// benchmarks/bench_cuda.py can time them all in one process. The defaults stay until a GPU run
// picks (docs/cuda.md, "Candidate tilings"). Forward candidates:
//
//   D     default            candidates
//   64    m128n64w8          m128n64w8p, m128n64w4p (FlashAttention-2's 4 warps x 32 rows)
//   128   m128n64w8          m128n64w8p, m128n32w4p (64 keys would spill registers)
//   256   m64n32w4           m64n32w4p
//   512   m64n16w4           - (Note [Head dim 512 in the forward])

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "head_dim.h"
#include "kernels.h"
#include "launch.cuh"
#include "mma.cuh"
#include "scores.cuh"
#include "tilings.h"

namespace ring_ext::cuda {
namespace {

// kWarps warps of kRowTiles 16-row tiles each; kPipelined: double-buffered fragments in Q K^T.
template <int D_, int kWarps_, int kRowTiles_, int kBlockN_, bool kPipelined_>
struct FwdConfig {
  static constexpr int D = D_, kWarps = kWarps_, kRowTiles = kRowTiles_, kBlockN = kBlockN_;
  static constexpr bool kPipelined = kPipelined_;
  static constexpr int kWarpRows = 16 * kRowTiles;
  static constexpr int kBlockM = kWarpRows * kWarps;
  static constexpr int kThreads = 32 * kWarps;
  // The v dims one CTA computes (Note [Head dim 512 in the forward]).
  static constexpr int Dv = D < 256 ? D : 256;
  using QTile = SmemTile<kBlockM, D>;
  using KTile = SmemTile<kBlockN, D>;
  using VTile = SmemTile<kBlockN, Dv>;
  static constexpr int kSmemBytes = (QTile::kElems + KTile::kElems + VTile::kElems) * 2;
  static_assert(kSmemBytes <= 99 * 1024, "fits every sm_80+ device (sm_86/89/120: 99 KiB)");
  static std::string name() { return tiling_name(kBlockM, kBlockN, kWarps, kPipelined, false); }
};

// The tilings of each head-dim bucket, default first (Note [Candidate tilings]).
template <int D>
struct FwdCandidates;
template <>
struct FwdCandidates<64> {
  using List = std::tuple<FwdConfig<64, 8, 1, 64, false>, FwdConfig<64, 8, 1, 64, true>,
                          FwdConfig<64, 4, 2, 64, true>>;
};
template <>
struct FwdCandidates<128> {
  // 4 x 32 rows with 64 keys spills at D = 128 (255 registers): 32 keys.
  using List = std::tuple<FwdConfig<128, 8, 1, 64, false>, FwdConfig<128, 8, 1, 64, true>,
                          FwdConfig<128, 4, 2, 32, true>>;
};
template <>
struct FwdCandidates<256> {
  using List = std::tuple<FwdConfig<256, 4, 1, 32, false>, FwdConfig<256, 4, 1, 32, true>>;
};
template <>
struct FwdCandidates<512> {
  using List = std::tuple<FwdConfig<512, 4, 1, 16, false>>;
};

// CTAs per row block: one per Dv of the output's dims (Note [Head dim 512 in the forward]).
template <typename Cfg>
__host__ __device__ int v_slices(const Shape& s) {
  return static_cast<int>((s.head_dim_v + Cfg::Dv - 1) / Cfg::Dv);
}

// Per-thread running softmax state of its two rows (g and g + 8 of the warp's 16).
struct RowState {
  float max[2] = {-INFINITY, -INFINITY};  // log2 units
  float sum[2] = {0.0f, 0.0f};  // this thread's partial sum; summed over the quad at the end
};

// s (the dot products q . k of a 16 x kBlockN warp tile) -> scores (`score`: scale, softcap, log2
// units) -> probabilities relative to the updated row max; rescales o and the running sums. Row r
// sees the block-local keys [key_begin[r], key_end[r]), applied only when `masked`.
template <int NS, int NO>
__device__ __forceinline__ void online_softmax(float (&s)[NS][4], float (&o)[NO][4], RowState& st,
                                               const Scores& score, bool masked,
                                               const int (&key_begin)[2], const int (&key_end)[2]) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float x = score(s[nt][2 * r + e]);
        const int key = nt * 8 + 2 * t + e;
        if (masked && (key < key_begin[r] || key >= key_end[r])) x = -INFINITY;
        s[nt][2 * r + e] = x;
        mx = fmaxf(mx, x);
      }
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
    const float new_max = fmaxf(st.max[r], mx);
    const float base = new_max == -INFINITY ? 0.0f : new_max;
    const float alpha = ex2(st.max[r] - base);
    float sum = 0.0f;
#pragma unroll
    for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float p = ex2(s[nt][2 * r + e] - base);
        s[nt][2 * r + e] = p;
        sum += p;
      }
    }
    st.sum[r] = st.sum[r] * alpha + sum;
    st.max[r] = new_max;
#pragma unroll
    for (int dt = 0; dt < NO; ++dt) {
      o[dt][2 * r] *= alpha;
      o[dt][2 * r + 1] *= alpha;
    }
  }
}

// The warp's rows' out (its v dims [v0, v0 + 8 NO)) and, from the CTA of v0 = 0, lse, both from
// finish_row (the sink folded in); rows past seq_q and dims past head_dim_v are not stored.
template <typename T, int NO>
__device__ __forceinline__ void store_out(const FwdParams& p, float (&o)[NO][4], RowState& st,
                                          int row0, int v0) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int b = blockIdx.z, h = blockIdx.y;
  const int seq_q = static_cast<int>(p.shape.seq_q);
  const int head_dim_v = static_cast<int>(p.shape.head_dim_v);
  const float sink = sink_of(p, h, kLog2e);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = st.sum[r];
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    sum += __shfl_xor_sync(0xffffffff, sum, 2);
    const int row = row0 + g + 8 * r;
    if (row >= seq_q) continue;
    const RowEnd end = finish_row<true>(st.max[r], sum, sink);
    const int64_t base =
        b * p.out_stride.batch + h * p.out_stride.head + row * p.out_stride.seq + v0 + 2 * t;
#pragma unroll
    for (int dt = 0; dt < NO; ++dt) {
      if (v0 + dt * 8 >= head_dim_v) break;
      const float x0 = o[dt][2 * r] * end.out_scale, x1 = o[dt][2 * r + 1] * end.out_scale;
      if (p.out_dtype == DType::kFloat32) {
        *reinterpret_cast<float2*>(static_cast<float*>(p.out) + base + dt * 8) =
            make_float2(x0, x1);
      } else {
        *reinterpret_cast<uint32_t*>(static_cast<T*>(p.out) + base + dt * 8) =
            MmaType<T>::pack(x0, x1);
      }
    }
    if (t == 0 && v0 == 0) p.lse[b * p.lse_stride.batch + h * p.lse_stride.head + row] = end.lse;
  }
}

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    flash_fwd_kernel(const FwdParams p, const RowKeys<int> keys) {
  using QTile = typename Cfg::QTile;
  using KTile = typename Cfg::KTile;
  using VTile = typename Cfg::VTile;
  constexpr int D = Cfg::D, Dv = Cfg::Dv, MT = Cfg::kRowTiles;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kThreads = Cfg::kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // [kBlockM, D]
  T* sK = sQ + QTile::kElems;          // [kBlockN, D]
  T* sV = sK + KTile::kElems;          // [kBlockN, Dv]

  const int b = blockIdx.z, h = blockIdx.y, hk = h / (p.shape.heads_q / p.shape.heads_kv);
  const int seq_q = static_cast<int>(p.shape.seq_q), seq_k = static_cast<int>(p.shape.seq_k);
  const int head_dim = static_cast<int>(p.shape.head_dim);
  const int head_dim_v = static_cast<int>(p.shape.head_dim_v);
  // Last row block first: under a causal mask it has the most keys, so the long CTAs start early.
  // The CTAs of one row block, one per Dv of the v dims, are neighbours.
  const int slices = v_slices<Cfg>(p.shape), tile = gridDim.x - 1 - blockIdx.x;
  const int m0 = (tile / slices) * kBlockM, v0 = (tile % slices) * Dv;
  const int warp_row = (threadIdx.x / 32) * Cfg::kWarpRows;
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride.batch + h * p.q_stride.head;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head + v0;

  // Key blocks [nb_begin, nb_end) hold every key some row of this CTA sees: its hull (Note [Mask
  // rule] in csrc/common/mask.h; the last row may lie past seq_q).
  const Interval<int> hull = tile_hull(keys.keys(m0), keys.keys(int64_t{m0} + kBlockM - 1));
  const int nb_begin = hull.begin / kBlockN;
  const int nb_end = (hull.end + kBlockN - 1) / kBlockN;
  // The visible keys of each of this thread's rows (global key indices): rows g and g + 8 of each
  // of the warp's 16-row tiles.
  const int g = (threadIdx.x % 32) / 4;
  Interval<int> seen[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
      seen[mt][r] = keys.keys(int64_t{m0} + warp_row + 16 * mt + g + 8 * r);
  }

  float o[MT][Dv / 8][4];
  zero(o);
  RowState st[MT];
  const Scores score = Scores::make(p.scale, p.softcap, kLog2e);

  if (nb_begin < nb_end) {
    load_tile<QTile, kThreads>(sQ, q, p.q_stride.seq, m0, seq_q, head_dim);
    load_tile<KTile, kThreads>(sK, k, p.k_stride.seq, nb_begin * kBlockN, seq_k, head_dim);
    cp_async_commit();
  }
  for (int nb = nb_begin; nb < nb_end; ++nb) {
    const int n0 = nb * kBlockN;
    cp_async_wait_all();
    __syncthreads();  // K_nb visible; every warp is done with V_{nb-1}
    load_tile<VTile, kThreads>(sV, v, p.v_stride.seq, n0, seq_k, head_dim_v - v0);
    cp_async_commit();

    float s[MT][kBlockN / 8][4];  // [R rows, kBlockN keys] of this warp
    zero(s);
    warp_gemm<false, false, MT, kBlockN / 8, D, QTile, KTile, T, Cfg::kPipelined>(s, sQ, warp_row,
                                                                                  sK, 0);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      // Masking is needed unless both of the thread's rows see the whole block (the intervals end
      // at seq_k, so keys past the end are masked too).
      const bool masked =
          block_visibility(seen[mt][0], seen[mt][1], n0, n0 + kBlockN) != BlockVisibility::kFull;
      const int key_begin[2] = {seen[mt][0].begin - n0, seen[mt][1].begin - n0};
      const int key_end[2] = {seen[mt][0].end - n0, seen[mt][1].end - n0};
      online_softmax(s[mt], o[mt], st[mt], score, masked, key_begin, key_end);
    }

    cp_async_wait_all();
    __syncthreads();  // V_nb visible; every warp is done with K_nb
    if (nb + 1 < nb_end) {
      load_tile<KTile, kThreads>(sK, k, p.k_stride.seq, n0 + kBlockN, seq_k, head_dim);
      cp_async_commit();
    }
    warp_gemm_reg_a<MT, Dv / 8, kBlockN, VTile>(o, s, sV, 0);
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) store_out<T>(p, o[mt], st[mt], m0 + warp_row + 16 * mt, v0);
}

template <typename T, typename Cfg>
void launch_fwd(const FwdParams& p, cudaStream_t stream) {
  const int64_t row_blocks = (p.shape.seq_q + Cfg::kBlockM - 1) / Cfg::kBlockM;
  const dim3 grid =
      make_grid(row_blocks * v_slices<Cfg>(p.shape), p.shape.heads_q, p.shape.batch, "flash_fwd");
  launch(flash_fwd_kernel<T, Cfg>, "flash_fwd", grid, Cfg::kThreads, Cfg::kSmemBytes, stream, p,
         row_keys<int>(p.mask, p.shape));
}

// The candidate chosen by RING_EXT_CUDA_FWD_TILING, else the default (the first).
template <typename T, typename... Cfgs>
void launch_chosen(const FwdParams& p, cudaStream_t stream, std::tuple<Cfgs...>*) {
  const int D = std::tuple_element_t<0, std::tuple<Cfgs...>>::D;
  static const std::vector<std::string> names =
      names_of(static_cast<std::tuple<Cfgs...>*>(nullptr));
  const int chosen = std::max(0, chosen_tiling(TiledKernel::kFwd, D, names));
  int i = 0;
  ((i++ == chosen ? launch_fwd<T, Cfgs>(p, stream) : void()), ...);
}

template <typename T, int D>
void launch_bucket(const FwdParams& p, cudaStream_t stream) {
  launch_chosen<T>(p, stream, static_cast<typename FwdCandidates<D>::List*>(nullptr));
}

template <typename T>
void dispatch_head_dim(const FwdParams& p, cudaStream_t stream) {
  head_dim_switch(bucket_dim(p.shape),
                  [&](auto d) { launch_bucket<T, decltype(d)::value>(p, stream); });
}

bool use_tensor_cores(const FwdParams& p) {
  const Shape& s = p.shape;
  return p.in_dtype != DType::kFloat32 && tensor_core_dims(s) &&
         rows_aligned(p.q, p.q_stride, s.batch, s.seq_q, s.heads_q) &&
         rows_aligned(p.k, p.k_stride, s.batch, s.seq_k, s.heads_kv) &&
         rows_aligned(p.v, p.v_stride, s.batch, s.seq_k, s.heads_kv) &&
         rows_aligned(p.out, p.out_stride, s.batch, s.seq_q, s.heads_q);
}

}  // namespace

void simt_fwd(const FwdParams& p, cudaStream_t stream);  // simt_fallback.cu

std::vector<std::string> fwd_tilings() { return bucket_tilings<FwdCandidates>("fwd"); }

void flash_fwd(const FwdParams& p, cudaStream_t stream) {
  check_shape(p.shape);
  if (!use_tensor_cores(p)) {
    simt_fwd(p, stream);
  } else if (p.in_dtype == DType::kBFloat16) {
    dispatch_head_dim<__nv_bfloat16>(p, stream);
  } else {
    dispatch_head_dim<__half>(p, stream);
  }
}

}  // namespace ring_ext::cuda
