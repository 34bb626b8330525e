// Warp-level building blocks of the tensor-core kernels: cp.async tile loads, swizzled
// shared-memory tiles, ldmatrix, mma.sync m16n8k16 (bf16/fp16 in, float32 accumulate) and one
// generic warp GEMM.
//
// Note [mma.sync m16n8k16 fragments]
// lane = 4 * g + t (g = lane / 4 in 0..7, t = lane % 4 in 0..3). Per warp:
//   A 16x16 (4 regs of 2 halves): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..],
//                                 a2 = A[g][2t+8..],   a3 = A[g+8][2t+8..]
//   B 16x8 (2 regs):              b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C 16x8 (4 floats):            c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
// ldmatrix.x4 loads four 8x8 matrices; lane L supplies the address of row L % 8 of matrix L / 8 and
// receives row g, columns 2t..2t+1 of each (".trans": row 2t..2t+1, column g of the stored matrix).
// Two lane -> (row, col) address patterns cover every operand we need (load_a, load_b):
//   P1(L) = (L % 16, (L / 16) * 8)       P2(L) = (L % 8 + (L / 16) * 8, ((L / 8) % 2) * 8)
//   A stored [m][k]: ldmatrix       at (m0 + P1.row, k0 + P1.col)
//   A stored [k][m]: ldmatrix.trans at (k0 + P2.row, m0 + P2.col)
//   B stored [n][k]: ldmatrix       at (n0 + P2.row, k0 + P2.col): b0, b1 of n-tile n0, then n0 + 8
//   B stored [k][n]: ldmatrix.trans at (k0 + P1.row, n0 + P1.col): b0, b1 of n-tile n0, then n0 + 8
// A C fragment pair (two 16x8 tiles side by side) is an A fragment of the next GEMM once packed to
// 16-bit: a0 = pack(c0, c1) of tile 0, a1 = pack(c2, c3) of tile 0, a2/a3 the same of tile 1.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace ring_ext::cuda {

// ---- element types
// -------------------------------------------------------------------------------

template <typename T>
struct MmaType;

template <>
struct MmaType<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct MmaType<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// ---- shared memory
// --------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// A [kRows, kCols] tile of 16-bit elements in shared memory. 16-byte chunks are XOR-swizzled with
// the row so that the 8 rows one ldmatrix reads fall in different banks.
template <int kRows_, int kCols_>
struct SmemTile {
  static constexpr int kRows = kRows_, kCols = kCols_;
  static constexpr int kChunks = kCols / 8;
  static constexpr int kSwizzle = (kChunks >= 8 ? 8 : kChunks) - 1;
  static constexpr int kElems = kRows * kCols;
  static_assert(kCols % 16 == 0 && kRows % 16 == 0, "tiles are whole 16x16 MMA blocks");

  // Element offset of (row, col); col's low 3 bits stay inside the chunk.
  static __device__ __forceinline__ int offset(int row, int col) {
    return row * kCols + ((((col >> 3) ^ (row & kSwizzle)) << 3) | (col & 7));
  }
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// ---- global -> shared copies
// ---------------------------------------------------------------------

// 16-byte asynchronous copy; when !valid the destination is zero-filled and nothing is read.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// Copies rows [row0, row0 + Tile::kRows) x dims [0, Tile::kCols) of a [seq, head_dim] matrix with
// row stride `ld` (elements, head_dim contiguous) into `tile`, zero-filling rows >= rows and
// dims >= head_dim (head_dim is a multiple of 8, so every 16-byte chunk is all in or all out).
template <typename Tile, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* base, int64_t ld, int row0, int rows,
                                          int head_dim) {
  constexpr int kChunks = Tile::kRows * Tile::kChunks;
  const int tid = threadIdx.x;
  // Unrolled 8 chunks at a time (whole up to 8 per thread): the 16 per thread of the D = 512
  // backward's Q and dO tiles, unrolled whole, keep their addresses live and spill on sm_80.
#pragma unroll 8
  for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
    const int c = tid + i * kThreads;
    if (kChunks % kThreads != 0 && c >= kChunks) break;
    const int row = c / Tile::kChunks;
    const int col = (c % Tile::kChunks) * 8;
    const bool valid = row0 + row < rows && col < head_dim;
    const T* src = valid ? base + (row0 + row) * ld + col : base;
    cp_async_16(tile + Tile::offset(row, col), src, valid);
  }
}

// ---- warp GEMM
// -----------------------------------------------------------------------------------

// Fragment loads of warp_gemm (Note [mma.sync m16n8k16 fragments]): the A fragments of the MT
// 16-row tiles at (m0, k0), and the B fragments of the n-tile pair at (n, k0).
template <bool kATrans, int MT, typename TileA, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[MT][4], const T* sA, int m0, int k0) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = m0 + mt * 16;
    if constexpr (kATrans) {
      ldmatrix_x4_trans(
          a[mt], sA + TileA::offset(k0 + lane % 8 + (lane / 16) * 8, m + ((lane / 8) % 2) * 8));
    } else {
      ldmatrix_x4(a[mt], sA + TileA::offset(m + lane % 16, k0 + (lane / 16) * 8));
    }
  }
}

template <bool kBTrans, typename TileB, typename T>
__device__ __forceinline__ void load_b(uint32_t (&b)[4], const T* sB, int n, int k0) {
  const int lane = threadIdx.x % 32;
  if constexpr (kBTrans) {
    ldmatrix_x4_trans(b, sB + TileB::offset(k0 + lane % 16, n + (lane / 16) * 8));
  } else {
    ldmatrix_x4(b, sB + TileB::offset(n + lane % 8 + (lane / 16) * 8, k0 + ((lane / 8) % 2) * 8));
  }
}

// acc += A[:, k0 : k0 + 16] * B[k0 : k0 + 16, n0 : n0 + 8 NT] for A fragments already loaded;
// with kPrefetch the B fragments of the next n-tile pair load while the current pair multiplies.
template <bool kBTrans, bool kPrefetch, int MT, int NT, typename TileB, typename T>
__device__ __forceinline__ void mma_k_step(float (&acc)[MT][NT][4], const uint32_t (&a)[MT][4],
                                           const T* sB, int n0, int k0) {
  uint32_t b[2][4];
  if constexpr (kPrefetch) load_b<kBTrans, TileB>(b[0], sB, n0, k0);
#pragma unroll
  for (int j = 0; j < NT / 2; ++j) {
    if constexpr (kPrefetch) {
      if (j + 1 < NT / 2) load_b<kBTrans, TileB>(b[(j + 1) % 2], sB, n0 + (j + 1) * 16, k0);
    } else {
      load_b<kBTrans, TileB>(b[j % 2], sB, n0 + j * 16, k0);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      MmaType<T>::mma(acc[mt][2 * j], a[mt], b[j % 2][0], b[j % 2][1]);
      MmaType<T>::mma(acc[mt][2 * j + 1], a[mt], b[j % 2][2], b[j % 2][3]);
    }
  }
}

// acc[MT][NT] (a (16 MT) x (8 NT) warp tile) += A[m0 : m0 + 16 MT, 0 : K] * B[0 : K, n0 : n0 + 8
// NT]. A lives in shared memory as [m][k] (kATrans = false) or [k][m] (true); B as [n][k] (kBTrans
// = false, e.g. K when computing Q K^T) or [k][n] (true, e.g. V when computing P V).
//
// kPipelined (a candidate tiling's choice, Note [Candidate tilings] in flash_fwd.cu): fragments
// are double-buffered, so the ldmatrix of the next A (k step) and of the next B (n-tile pair) are
// issued before the mma that does not need them; without it each mma waits for its own loads.
// Either way the k loop stays rolled (two steps per iteration when pipelined): unrolling it whole
// lets the compiler hoist every ldmatrix of the whole K ahead and spill.
template <bool kATrans, bool kBTrans, int MT, int NT, int K, typename TileA, typename TileB,
          typename T, bool kPipelined = false>
__device__ __forceinline__ void warp_gemm(float (&acc)[MT][NT][4], const T* sA, int m0, const T* sB,
                                          int n0) {
  static_assert(NT % 2 == 0 && K % 16 == 0, "B is loaded two n-tiles at a time");
  if constexpr (kPipelined) {
    static_assert(K % 32 == 0, "two k steps per iteration");
    uint32_t a[2][MT][4];
    load_a<kATrans, MT, TileA>(a[0], sA, m0, 0);
#pragma unroll 1
    for (int k0 = 0; k0 < K; k0 += 32) {
      load_a<kATrans, MT, TileA>(a[1], sA, m0, k0 + 16);
      mma_k_step<kBTrans, true, MT, NT, TileB>(acc, a[0], sB, n0, k0);
      if (k0 + 32 < K) load_a<kATrans, MT, TileA>(a[0], sA, m0, k0 + 32);
      mma_k_step<kBTrans, true, MT, NT, TileB>(acc, a[1], sB, n0, k0 + 16);
    }
  } else {
#pragma unroll 1
    for (int k0 = 0; k0 < K; k0 += 16) {
      uint32_t a[MT][4];
      load_a<kATrans, MT, TileA>(a, sA, m0, k0);
      mma_k_step<kBTrans, false, MT, NT, TileB>(acc, a, sB, n0, k0);
    }
  }
}

// acc[MT][NT] (a (16 MT) x (8 NT) warp tile) += A * B[0 : K, n0 : n0 + 8 NT], where A (16 MT x K)
// is given as the float C fragments of a previous GEMM (c[MT][K / 8][4], i.e. a 16 MT x K warp
// tile) and B is stored [k][n]. Each B fragment is loaded once for all MT row tiles.
template <int MT, int NT, int K, typename TileB, typename T>
__device__ __forceinline__ void warp_gemm_reg_a(float (&acc)[MT][NT][4],
                                                const float (&c)[MT][K / 8][4], const T* sB,
                                                int n0) {
  static_assert(NT % 2 == 0 && K % 16 == 0, "B is loaded two n-tiles at a time");
#pragma unroll
  for (int kt = 0; kt < K / 16; ++kt) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const float (&c0)[4] = c[mt][2 * kt];
      const float (&c1)[4] = c[mt][2 * kt + 1];
      a[mt][0] = MmaType<T>::pack(c0[0], c0[1]);
      a[mt][1] = MmaType<T>::pack(c0[2], c0[3]);
      a[mt][2] = MmaType<T>::pack(c1[0], c1[1]);
      a[mt][3] = MmaType<T>::pack(c1[2], c1[3]);
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t b[4];
      load_b<true, TileB>(b, sB, n0 + nt * 8, kt * 16);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        MmaType<T>::mma(acc[mt][nt], a[mt], b[0], b[1]);
        MmaType<T>::mma(acc[mt][nt + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// Stores a warp's float C fragments (a (16 MT) x (8 NT) tile at (m0, n0)) as 16-bit into a tile.
template <int MT, int NT, typename Tile, typename T>
__device__ __forceinline__ void store_frag(T* tile, const float (&c)[MT][NT][4], int m0, int n0) {
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int row = m0 + mt * 16 + g, col = n0 + nt * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(tile + Tile::offset(row, col)) =
          MmaType<T>::pack(c[mt][nt][0], c[mt][nt][1]);
      *reinterpret_cast<uint32_t*>(tile + Tile::offset(row + 8, col)) =
          MmaType<T>::pack(c[mt][nt][2], c[mt][nt][3]);
    }
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&c)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) c[n][i] = 0.0f;
}

template <int MT, int NT>
__device__ __forceinline__ void zero(float (&c)[MT][NT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) c[mt][nt][i] = 0.0f;
}

}  // namespace ring_ext::cuda
