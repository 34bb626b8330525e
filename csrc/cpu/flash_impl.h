// Blockwise flash attention on the CPU, compiled once per instruction set (kernels_<isa>.cpp
// defines RING_EXT_CPU_ISA and the compiler target before including this file).
//
// Note [CPU flash tiling]
// Forward: one task = (batch, q head, block of kBlockQ query rows). The task converts its Q block
// to float32 once (pre-scaled by softmax_scale), then walks kBlockK-key blocks of K/V with the
// online softmax: S = Q K^T, running row max m and row sum l, O = O * exp(m_old - m) + P V. Causal
// masks skip whole blocks past the diagonal and mask only the blocks that straddle it. Memory per
// task is O(kBlockQ * (kBlockK + head_dim)), never O(seq^2). Backward: one task = (batch, kv head)
// so that dK/dV of a head, and dQ of the q heads sharing it (GQA), are written by one thread only,
// with no atomics. Inside: for each key block, for each q head of the group and each query block: P
// = exp(S - lse), dV += P^T dO, dP = dO V^T, dS = P * (dP - delta), dQ += scale * dS K, dK += scale
// * dS^T Q.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/lse_math.h"
#include "convert.h"
#include "kernels.h"

#ifndef RING_EXT_CPU_ISA
#error "define RING_EXT_CPU_ISA before including flash_impl.h"
#endif

namespace ring_ext::cpu::RING_EXT_CPU_ISA {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for float32 with ~2 ulp error; exp(-inf) = 0. Branch-free so loops over it vectorise.
inline float fast_exp(float x) {
  const float clamped = std::max(x, -87.0f);
  const float t = clamped * 1.44269504088896341f;
  const float n = std::nearbyint(t);
  const float r = (t - n) * 0.693147180559945309f;  // |r| <= ln2 / 2
  float poly = 1.0f / 5040;
  poly = poly * r + 1.0f / 720;
  poly = poly * r + 1.0f / 120;
  poly = poly * r + 1.0f / 24;
  poly = poly * r + 1.0f / 6;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const float scale = bits_to_float(uint32_t(int32_t(n) + 127) << 23);
  return x < -87.0f ? 0.0f : poly * scale;
}

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

// rows x d block at base[offset + i * row_stride + c] -> dst[i * d + c] (float32, scaled).
inline void load_block(const void* base, DType dtype, int64_t offset, int64_t row_stride,
                       int64_t rows, int64_t d, float scale, float* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = dst + i * d;
    load_row(base, dtype, offset + i * row_stride, d, row);
    if (scale != 1.0f)
      for (int64_t c = 0; c < d; ++c) row[c] *= scale;
  }
}

// Transposed: rows x d block -> dst[c * kBlockK + i].
inline void load_block_t(const void* base, DType dtype, int64_t offset, int64_t row_stride,
                         int64_t rows, int64_t d, float* tmp_row, float* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    load_row(base, dtype, offset + i * row_stride, d, tmp_row);
    for (int64_t c = 0; c < d; ++c) dst[c * kBlockK + i] = tmp_row[c];
  }
}

// ---- small matrix products on float32 tiles
// -------------------------------------------------------

// s[i, j] = sum_c a[i, c] * bt[c, j] for i < m, j < n; a is m x d, bt is d x kBlockK, s is m x
// kBlockK.
inline void matmul_abt(const float* a, const float* bt, int64_t m, int64_t n, int64_t d, float* s) {
  for (int64_t i = 0; i < m; ++i) {
    float* srow = s + i * kBlockK;
    for (int64_t j = 0; j < n; ++j) srow[j] = 0.0f;
    const float* arow = a + i * d;
    for (int64_t c = 0; c < d; ++c) {
      const float ac = arow[c];
      const float* brow = bt + c * kBlockK;
      for (int64_t j = 0; j < n; ++j) srow[j] += ac * brow[j];
    }
  }
}

// out[i, :] += sum_j p[i, j] * b[j, :]; p is m x kBlockK, b is n x d, out is m x d (row stride ld).
inline void matmul_pb_acc(const float* p, const float* b, int64_t m, int64_t n, int64_t d,
                          float alpha, float* out, int64_t ld) {
  for (int64_t i = 0; i < m; ++i) {
    float* orow = out + i * ld;
    const float* prow = p + i * kBlockK;
    for (int64_t j = 0; j < n; ++j) {
      const float pij = prow[j] * alpha;
      if (pij == 0.0f) continue;
      const float* brow = b + j * d;
      for (int64_t c = 0; c < d; ++c) orow[c] += pij * brow[c];
    }
  }
}

// out[j, :] += alpha * sum_i p[i, j] * a[i, :]; p is m x kBlockK, a is m x d, out is n x d.
inline void matmul_ptb_acc(const float* p, const float* a, int64_t m, int64_t n, int64_t d,
                           float alpha, float* out) {
  for (int64_t i = 0; i < m; ++i) {
    const float* prow = p + i * kBlockK;
    const float* arow = a + i * d;
    for (int64_t j = 0; j < n; ++j) {
      const float pij = prow[j] * alpha;
      if (pij == 0.0f) continue;
      float* orow = out + j * d;
      for (int64_t c = 0; c < d; ++c) orow[c] += pij * arow[c];
    }
  }
}

// ---- masks
// ----------------------------------------------------------------------------------------

// Number of keys of [k0, seq_k) visible to query row qi: keys k0 <= j < end.
inline int64_t visible_end(const Mask& mask, int64_t qi, int64_t seq_k) {
  if (mask.kind == MaskKind::kNone) return seq_k;
  return std::clamp<int64_t>(mask.q_offset + qi - mask.k_offset + 1, 0, seq_k);
}

// ---- forward
// --------------------------------------------------------------------------------------

struct FwdWorkspace {
  std::vector<float> q, kt, v, s, acc, m, l, tmp;
  explicit FwdWorkspace(int64_t d)
      : q(kBlockQ * d),
        kt(d * kBlockK),
        v(kBlockK * d),
        s(kBlockQ * kBlockK),
        acc(kBlockQ * d),
        m(kBlockQ),
        l(kBlockQ),
        tmp(d) {}
};

// Online softmax over one key block: updates m, l, rescales acc, and turns s into P.
inline void softmax_step(FwdWorkspace& ws, const Mask& mask, int64_t q0, int64_t nq, int64_t k0,
                         int64_t nk, int64_t seq_k, int64_t d) {
  for (int64_t i = 0; i < nq; ++i) {
    float* srow = ws.s.data() + i * kBlockK;
    const int64_t end = std::min(visible_end(mask, q0 + i, seq_k) - k0, nk);
    for (int64_t j = std::max<int64_t>(end, 0); j < nk; ++j) srow[j] = kNegInf;
    float block_max = kNegInf;
    for (int64_t j = 0; j < nk; ++j) block_max = std::max(block_max, srow[j]);
    const float m_new = std::max(ws.m[i], block_max);
    if (m_new == kNegInf) {  // nothing visible yet: P = 0, state unchanged
      for (int64_t j = 0; j < nk; ++j) srow[j] = 0.0f;
      continue;
    }
    const float alpha = fast_exp(ws.m[i] - m_new);
    float sum = 0.0f;
    for (int64_t j = 0; j < nk; ++j) {
      srow[j] = fast_exp(srow[j] - m_new);
      sum += srow[j];
    }
    ws.l[i] = ws.l[i] * alpha + sum;
    ws.m[i] = m_new;
    if (alpha != 1.0f) {
      float* arow = ws.acc.data() + i * d;
      for (int64_t c = 0; c < d; ++c) arow[c] *= alpha;
    }
  }
}

inline void fwd_task(const FwdParams& p, int64_t b, int64_t h, int64_t q0, FwdWorkspace& ws) {
  const Shape& sh = p.shape;
  const int64_t d = sh.head_dim, hk = h / (sh.heads_q / sh.heads_kv);
  const int64_t nq = std::min(kBlockQ, sh.seq_q - q0);
  load_block(p.q, p.in_dtype, b * p.q_stride.batch + h * p.q_stride.head + q0 * p.q_stride.seq,
             p.q_stride.seq, nq, d, p.scale, ws.q.data());
  std::fill(ws.m.begin(), ws.m.end(), kNegInf);
  std::fill(ws.l.begin(), ws.l.end(), 0.0f);
  std::fill(ws.acc.begin(), ws.acc.end(), 0.0f);
  const int64_t k_end = visible_end(p.mask, q0 + nq - 1, sh.seq_k);
  const int64_t k_base = b * p.k_stride.batch + hk * p.k_stride.head;
  const int64_t v_base = b * p.v_stride.batch + hk * p.v_stride.head;
  for (int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
    const int64_t nk = std::min(kBlockK, k_end - k0);
    load_block_t(p.k, p.in_dtype, k_base + k0 * p.k_stride.seq, p.k_stride.seq, nk, d,
                 ws.tmp.data(), ws.kt.data());
    load_block(p.v, p.in_dtype, v_base + k0 * p.v_stride.seq, p.v_stride.seq, nk, d, 1.0f,
               ws.v.data());
    matmul_abt(ws.q.data(), ws.kt.data(), nq, nk, d, ws.s.data());
    softmax_step(ws, p.mask, q0, nq, k0, nk, sh.seq_k, d);
    matmul_pb_acc(ws.s.data(), ws.v.data(), nq, nk, d, 1.0f, ws.acc.data(), d);
  }
  const int64_t out_base = b * p.out_stride.batch + h * p.out_stride.head + q0 * p.out_stride.seq;
  float* lse = p.lse + b * p.lse_stride.batch + h * p.lse_stride.head + q0;
  for (int64_t i = 0; i < nq; ++i) {
    float* arow = ws.acc.data() + i * d;
    const bool empty = ws.l[i] == 0.0f;
    const float inv = empty ? 0.0f : 1.0f / ws.l[i];
    for (int64_t c = 0; c < d; ++c) arow[c] *= inv;
    store_row(p.out, p.out_dtype, out_base + i * p.out_stride.seq, d, arow);
    lse[i] = empty ? kNegInf : ws.m[i] + std::log(ws.l[i]);
  }
}

void flash_fwd(const FwdParams& p, ParallelFor parallel_for) {
  const Shape& sh = p.shape;
  const int64_t q_blocks = (sh.seq_q + kBlockQ - 1) / kBlockQ;
  parallel_for(sh.batch * sh.heads_q * q_blocks, [&](int64_t begin, int64_t end) {
    FwdWorkspace ws(sh.head_dim);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t qb = t % q_blocks, bh = t / q_blocks;
      fwd_task(p, bh / sh.heads_q, bh % sh.heads_q, qb * kBlockQ, ws);
    }
  });
}

// ---- backward
// -------------------------------------------------------------------------------------

struct BwdWorkspace {
  std::vector<float> k, kt, vt, dk, dv, q, dout, s, dp, tmp;
  explicit BwdWorkspace(int64_t d)
      : k(kBlockK * d),
        kt(d * kBlockK),
        vt(d * kBlockK),
        dk(kBlockK * d),
        dv(kBlockK * d),
        q(kBlockQ * d),
        dout(kBlockQ * d),
        s(kBlockQ * kBlockK),
        dp(kBlockQ * kBlockK),
        tmp(d) {}
};

// One (q block of head h) x (key block at k0) pair; ws holds K, K^T, V^T of the key block.
inline void bwd_pair(const BwdParams& p, int64_t b, int64_t h, int64_t q0, int64_t k0, int64_t nk,
                     BwdWorkspace& ws) {
  const Shape& sh = p.shape;
  const int64_t d = sh.head_dim, nq = std::min(kBlockQ, sh.seq_q - q0);
  load_block(p.q, p.in_dtype, b * p.q_stride.batch + h * p.q_stride.head + q0 * p.q_stride.seq,
             p.q_stride.seq, nq, d, 1.0f, ws.q.data());
  load_block(p.dout, p.in_dtype,
             b * p.dout_stride.batch + h * p.dout_stride.head + q0 * p.dout_stride.seq,
             p.dout_stride.seq, nq, d, 1.0f, ws.dout.data());
  const float* lse = p.lse + b * p.lse_stride.batch + h * p.lse_stride.head + q0;
  const float* delta = p.delta + b * p.delta_stride.batch + h * p.delta_stride.head + q0;
  matmul_abt(ws.q.data(), ws.kt.data(), nq, nk, d, ws.s.data());      // S = Q K^T
  matmul_abt(ws.dout.data(), ws.vt.data(), nq, nk, d, ws.dp.data());  // dP = dO V^T
  for (int64_t i = 0; i < nq; ++i) {
    float* srow = ws.s.data() + i * kBlockK;
    float* dprow = ws.dp.data() + i * kBlockK;
    const int64_t end = std::min(visible_end(p.mask, q0 + i, sh.seq_k) - k0, nk);
    const float row_lse = lse[i] == kNegInf ? std::numeric_limits<float>::infinity() : lse[i];
    for (int64_t j = 0; j < nk; ++j) {
      const float pij = j < end ? fast_exp(srow[j] * p.scale - row_lse) : 0.0f;
      srow[j] = pij;                           // P
      dprow[j] = pij * (dprow[j] - delta[i]);  // dS
    }
  }
  matmul_ptb_acc(ws.s.data(), ws.dout.data(), nq, nk, d, 1.0f, ws.dv.data());   // dV += P^T dO
  matmul_ptb_acc(ws.dp.data(), ws.q.data(), nq, nk, d, p.scale, ws.dk.data());  // dK += s dS^T Q
  float* dq = p.dq + b * p.dq_stride.batch + h * p.dq_stride.head + q0 * p.dq_stride.seq;
  matmul_pb_acc(ws.dp.data(), ws.k.data(), nq, nk, d, p.scale, dq,
                p.dq_stride.seq);  // dQ += s dS K
}

inline void add_rows(const float* src, int64_t rows, int64_t d, float* dst, int64_t row_stride) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < d; ++c) dst[i * row_stride + c] += src[i * d + c];
}

inline void bwd_task(const BwdParams& p, int64_t b, int64_t hk, BwdWorkspace& ws) {
  const Shape& sh = p.shape;
  const int64_t d = sh.head_dim, group = sh.heads_q / sh.heads_kv;
  for (int64_t k0 = 0; k0 < sh.seq_k; k0 += kBlockK) {
    const int64_t nk = std::min(kBlockK, sh.seq_k - k0);
    const int64_t k_off = b * p.k_stride.batch + hk * p.k_stride.head + k0 * p.k_stride.seq;
    const int64_t v_off = b * p.v_stride.batch + hk * p.v_stride.head + k0 * p.v_stride.seq;
    load_block(p.k, p.in_dtype, k_off, p.k_stride.seq, nk, d, 1.0f, ws.k.data());
    load_block_t(p.k, p.in_dtype, k_off, p.k_stride.seq, nk, d, ws.tmp.data(), ws.kt.data());
    load_block_t(p.v, p.in_dtype, v_off, p.v_stride.seq, nk, d, ws.tmp.data(), ws.vt.data());
    std::fill(ws.dk.begin(), ws.dk.end(), 0.0f);
    std::fill(ws.dv.begin(), ws.dv.end(), 0.0f);
    // Causal: query rows before the first visible one see nothing of this block.
    int64_t q_begin = 0;
    if (p.mask.kind == MaskKind::kCausal)
      q_begin = std::clamp<int64_t>(p.mask.k_offset + k0 - p.mask.q_offset, 0, sh.seq_q);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
      for (int64_t q0 = q_begin / kBlockQ * kBlockQ; q0 < sh.seq_q; q0 += kBlockQ)
        bwd_pair(p, b, h, q0, k0, nk, ws);
    add_rows(ws.dk.data(), nk, d,
             p.dk + b * p.dk_stride.batch + hk * p.dk_stride.head + k0 * p.dk_stride.seq,
             p.dk_stride.seq);
    add_rows(ws.dv.data(), nk, d,
             p.dv + b * p.dv_stride.batch + hk * p.dv_stride.head + k0 * p.dv_stride.seq,
             p.dv_stride.seq);
  }
}

void flash_bwd(const BwdParams& p, ParallelFor parallel_for) {
  const Shape& sh = p.shape;
  parallel_for(sh.batch * sh.heads_kv, [&](int64_t begin, int64_t end) {
    BwdWorkspace ws(sh.head_dim);
    for (int64_t t = begin; t < end; ++t) bwd_task(p, t / sh.heads_kv, t % sh.heads_kv, ws);
  });
}

// ---- merge
// ----------------------------------------------------------------------------------------

void lse_merge(const MergeParams& p, ParallelFor parallel_for) {
  const Shape& sh = p.shape;
  const int64_t d = sh.head_dim;
  parallel_for(sh.batch * sh.heads_q * sh.seq_q, [&](int64_t begin, int64_t end) {
    std::vector<float> block_row(d);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t % sh.seq_q, h = (t / sh.seq_q) % sh.heads_q,
                    b = t / (sh.seq_q * sh.heads_q);
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
