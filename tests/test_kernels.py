"""Block kernels (forward, backward, merge) against the float64 oracle, on fresh random inputs: one suite
for both devices. Every case runs on CPU and, with a GPU and a CUDA build, on CUDA (tests/devices.py;
elsewhere the CUDA variant skips with "no CUDA device"). The oracle runs in float64 on the inputs'
device; the rule (ring_ext/testing/tolerances.py): at most twice the error of PyTorch's own attention in
the same dtype on the same device, LSE tightly. On CUDA, cases that target one kernel family (tensor
cores or SIMT) also check, with the profiler, that this family is the one that ran."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import zlib

import pytest
import test_packed
import torch
from devices import DEVICES, LOWER_CPU_LEVELS, expect_family, make_qkv, misaligned_qkv, run_at_cpu_level

import ring_ext
from ring_ext.layouts import from_bshd, to_bshd
from ring_ext.testing.reference import attention_reference, merge_reference, packed_mask
from ring_ext.testing.tolerances import (
    FP32_LONG_FACTOR,
    REL_L2,
    assert_attention,
    assert_close_to_oracle,
    assert_lse,
    assert_rel_l2,
    rel_l2,
    torch_attention,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HALF_DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def seed_of(*params) -> int:
    """A seed from the test's parameters, stable across processes."""
    return zlib.crc32(repr(params).encode())


def tensor_core_family(dtype, head_dim) -> str:
    """The CUDA kernel family of aligned inputs: tensor cores for 16-bit dtypes and head dims that are
    multiples of 8 (up to 512; the backward above 256 only where the shared memory allows it,
    docs/cuda.md), else SIMT."""
    return "tensor_core" if dtype != torch.float32 and head_dim % 8 == 0 and head_dim <= 512 else "simt"


def well_conditioned_rows(sq, sk, causal, q_offset=0, k_offset=0, device="cpu"):
    """The rows whose dq the worst-row measure holds (tolerances.assert_attention, dq_rows): those that
    see at least MIN_KEYS_FOR_ROW_CHECK keys. A causal row that sees one to three keys has an
    ill-conditioned dq (PyTorch's own error there reaches 0.1 in bf16), held by the whole-tensor
    measure only, as for packed documents."""
    if not causal:
        return None
    keys = (q_offset + torch.arange(sq, device=device) - k_offset + 1).clamp(0, sk)
    return keys >= test_packed.MIN_KEYS_FOR_ROW_CHECK


def seeded_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    """Fresh normal values of t's shape, dtype and device from their own seeded generator, so a run does
    not depend on the global RNG's state (which earlier tests move)."""
    g = torch.Generator(device=t.device).manual_seed(seed)
    return torch.randn(t.shape, generator=g, device=t.device).to(t.dtype)


def check_fwd_bwd(q, k, v, *, causal, q_offset=0, k_offset=0, seed=0, out_fp32=False, dout=None):
    """Forward (out, lse) and backward (dq, dk, dv) of the fwd op against the oracle, with PyTorch's
    attention in the same dtype as the yardstick. q, k, v reach the op as given (views stay views: a
    misaligned input stays misaligned); dout too when given (e.g. strided). dq rows that see fewer than
    four keys are held by the whole-tensor measure only (well_conditioned_rows)."""
    dtype, device = q.dtype, q.device
    scale = 1.0 / math.sqrt(q.shape[-1])
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    if dout is None:
        g = torch.Generator(device=device).manual_seed(seed + 1)
        dout = torch.randn(q.shape, generator=g, device=device).to(dtype)
    out, lse = torch.ops.ring_ext.fwd(qg, kg, vg, scale, causal, q_offset, k_offset, out_fp32)
    assert out.dtype == (torch.float32 if out_fp32 else dtype)
    assert out.device == q.device and lse.device == q.device
    out.backward(dout.to(out.dtype))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_reference(
        q64, k64, v64, causal=causal, scale=scale, q_offset=q_offset, k_offset=k_offset
    )
    assert_lse(lse, ref_lse.detach())
    ref_out.backward(dout.double())
    assert all(t.grad.dtype == dtype for t in (qg, kg, vg))
    baseline = torch_attention(
        q, k, v, dout, causal=causal, scale=scale, q_offset=q_offset, k_offset=k_offset
    )
    got = [out.detach(), qg.grad, kg.grad, vg.grad]
    dq_rows = well_conditioned_rows(q.shape[1], k.shape[1], causal, q_offset, k_offset, device)
    assert_attention(
        got,
        [ref_out.detach(), q64.grad, k64.grad, v64.grad],
        baseline,
        f"{dtype} causal={causal}",
        dq_rows=dq_rows,
    )


# ---- shapes, dtypes, masks ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fwd_bwd_dtypes_masks_gqa(device, dtype, causal, heads, head_dim):
    seed = seed_of(str(dtype), causal, heads, head_dim)
    q, k, v = make_qkv(2, 203, 203, heads[0], heads[1], head_dim, dtype, seed, device)
    with expect_family(device, tensor_core_family(dtype, head_dim)):
        check_fwd_bwd(q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim", [8, 32, 40, 72, 96, 128, 136, 192, 200, 256])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_head_dims(device, head_dim, dtype):
    """Every head-dim bucket of the tensor-core kernels (64, 128, 256), its edges and dims between."""
    q, k, v = make_qkv(1, 150, 150, 2, 1, head_dim, dtype, seed_of(head_dim, str(dtype)), device)
    with expect_family(device, "tensor_core"):
        check_fwd_bwd(q, k, v, causal=True)


@pytest.mark.parametrize("head_dim", [1, 7, 33, 100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_dims_not_multiple_of_8(device, head_dim, dtype):
    """Head dims the tensor cores cannot take (not a multiple of 8; on CUDA the SIMT kernels), in every
    dtype, with GQA, causal at an offset, and lengths that are not multiples of any tile."""
    q, k, v = make_qkv(2, 157, 203, 4, 2, head_dim, dtype, seed_of(head_dim, str(dtype)), device)
    with expect_family(device, "simt"):
        check_fwd_bwd(q, k, v, causal=True, q_offset=46)


@pytest.mark.parametrize(
    "sq,sk",
    [(1, 1), (2, 2), (1, 300), (63, 64), (64, 64), (65, 65), (129, 127), (257, 257), (257, 1000)],
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 32), (torch.bfloat16, 64)])
def test_odd_lengths(device, sq, sk, causal, dtype, head_dim):
    """Lengths around and between the tiles. (With one key, dq is exactly 0 and the whole-tensor
    measure is absolute: float32 at head_dim 32 keeps the summation-order residue of dP - D under the
    float32 floor on every CPU ISA.)"""
    q, k, v = make_qkv(1, sq, sk, 2, 1, head_dim, dtype, seed_of(sq, sk, causal), device)
    check_fwd_bwd(q, k, v, causal=causal)


@pytest.mark.parametrize(
    "sq,sk,q_offset,k_offset",
    [
        (48, 80, 64, 0),  # queries after part of the keys: partly visible
        (48, 80, 0, 0),  # top-left causal with more keys than queries
        (200, 300, 0, 0),  # the same across several tiles
        (64, 64, 0, 64),  # keys entirely after the queries: every row sees nothing
        (140, 140, 10, 20),  # the first 10 rows see nothing
        (33, 129, 200, 0),  # every key visible
        (256, 256, 1 << 40, (1 << 40) + 128),  # huge global offsets
        (200, 300, (1 << 30) - 50, 0),  # difference just below the 2^30 clamp (CUDA): every key visible
        (130, 260, 1 << 30, 0),  # difference at the clamp
        (150, 150, (1 << 31) + 5, 1 << 31),  # offsets past int32, small difference
        (100, 300, 0, (1 << 30) - 100),  # keys far after the queries: every row sees nothing
        (100, 300, 0, (1 << 31) + 100),  # the same past int32 (CUDA clamps the difference at -2^30)
    ],
)
@pytest.mark.parametrize(
    "dtype,head_dim", [(torch.bfloat16, 64), (torch.float16, 64), (torch.float32, 64), (torch.bfloat16, 33)]
)
def test_causal_offsets(device, sq, sk, q_offset, k_offset, dtype, head_dim):
    """On CUDA: tensor-core kernels (bf16/fp16, head_dim 64) and SIMT kernels (float32; bf16 with 33)."""
    q, k, v = make_qkv(2, sq, sk, 2, 1, head_dim, dtype, seed_of(sq, sk, q_offset, k_offset), device)
    with expect_family(device, tensor_core_family(dtype, head_dim)):
        check_fwd_bwd(q, k, v, causal=True, q_offset=q_offset, k_offset=k_offset)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_out_fp32_partials(device, dtype):
    """out_fp32: the float32 partial output the ring merges, from half inputs."""
    q, k, v = make_qkv(1, 130, 170, 4, 2, 128, dtype, seed=21, device=device)
    check_fwd_bwd(q, k, v, causal=True, q_offset=40, out_fp32=True)


def test_rows_without_keys_are_zero_not_nan(device):
    q, k, v = make_qkv(1, 200, 200, 2, 2, 64, torch.bfloat16, seed=3, device=device)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.125, True, 0, 150)  # rows 0..149 see no key
    assert torch.isneginf(lse[:, :, :150]).all() and torch.isfinite(lse[:, :, 150:]).all()
    assert (out[:, :150] == 0).all() and torch.isfinite(out).all()
    dq, dk, dv = torch.ops.ring_ext.bwd(seeded_like(out, 101), q, k, v, out, lse, 0.125, True, 0, 150)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert (dq[:, :150] == 0).all()


def test_empty_key_block(device):
    q, _, _ = make_qkv(1, 5, 5, 2, 2, 32, torch.float32, seed=4, device=device)
    k = v = torch.empty(1, 0, 2, 32, device=device)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.2, False)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_256_batched(device, dtype, causal):
    """D = 256 (on CUDA the largest tiles: 4-warp forward, 64-key backward) with batch > 1 and GQA;
    float32 on the SIMT kernels (8 dims per lane, 16 keys per CTA)."""
    q, k, v = make_qkv(3, 211, 333, 4, 2, 256, dtype, seed=256, device=device)
    with expect_family(device, tensor_core_family(dtype, 256)):
        check_fwd_bwd(q, k, v, causal=causal)


def test_long_sequence(device):
    """A long causal block (bf16, GQA, head_dim 128) forward and backward against the oracle: 16k tokens
    on CUDA; 4k on CPU, where the float64 oracle of 16k (4 GB per score matrix) would dominate CI."""
    seq = 16384 if device == "cuda" else 4096
    q, k, v = make_qkv(1, seq, seq, 2, 1, 128, torch.bfloat16, seed=16, device=device)
    with expect_family(device, "tensor_core"):
        check_fwd_bwd(q, k, v, causal=True)


# ---- layouts, strides, alignment ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["bshd", "sbhd", "bnsd", "sbh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts_through_strides(device, layout, dtype):
    """ring_ext.attention in every layout equals the oracle, with gradients in the input layout."""
    b, s, hq, hkv, d = 2, 150, 4, 2, 64
    q, k, v = make_qkv(b, s, s, hq, hkv, d, dtype, seed=11, device=device)
    ql, kl, vl = (from_bshd(t, layout).contiguous().requires_grad_() for t in (q, k, v))
    out = ring_ext.attention(ql, kl, vl, layout=layout, causal=True, num_heads=hq)
    assert out.shape == ql.shape and out.dtype == dtype
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(12)).to(device, dtype)
    out.backward(dout)
    assert all(t.grad.shape == t.shape for t in (ql, kl, vl))
    got = [to_bshd(t, layout, d) for t in (out.detach(), ql.grad, kl.grad, vl.grad)]
    dout = to_bshd(dout, layout, d)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, causal=True)
    expected = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]
    baseline = torch_attention(q, k, v, dout, causal=True)
    dq_rows = well_conditioned_rows(s, s, True, device=device)
    assert_attention(got, expected, baseline, f"{layout} {dtype}", dq_rows=dq_rows)


def test_non_contiguous_inputs(device):
    """Sliced heads and a strided head_dim (copied once by the glue) still give exact results."""
    g = torch.Generator().manual_seed(17)
    q = torch.randn(2, 40, 6, 32, generator=g).to(device)[:, :, 1:5]  # a slice of the heads
    k = torch.randn(2, 40, 2, 64, generator=g).to(device)[..., ::2]  # head_dim stride 2
    v = torch.randn(40, 2, 2, 32, generator=g).to(device).transpose(0, 1)  # seq-major memory
    check_fwd_bwd(q, k, v, causal=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_misaligned_views(device, dtype, causal):
    """Views at an odd element offset (rows not 16-byte aligned), passed as views: on CUDA the SIMT
    kernels run (head_dim 64 would take the tensor cores if aligned); GQA included."""
    q, k, v = misaligned_qkv(2, 150, 4, 2, 64, dtype, seed=13, device=device)
    with expect_family(device, "simt"):
        check_fwd_bwd(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_dout(device, dtype):
    """dout as a non-contiguous view (seq-major memory, a slice of wider heads): the backward reads it
    through its strides (or the glue copies it) and the gradients still match the oracle."""
    q, k, v = make_qkv(2, 130, 130, 4, 2, 64, dtype, seed=19, device=device)
    g = torch.Generator(device=device).manual_seed(20)
    wide = torch.randn(130, 2, 6, 64, generator=g, device=device).to(dtype)
    dout = wide.transpose(0, 1)[:, :, 1:5]
    assert not dout.is_contiguous()
    check_fwd_bwd(q, k, v, causal=True, dout=dout)


# ---- packed documents and sliding windows (per-row key intervals) ---------------------------------------

# Documents across the CUDA tiles (64 and 128 rows, 32/64/128-key blocks), lengths 0, 1 and more than a
# tile, padding rows that see nothing.
PACKED_DOCS = (1, 0, 130, 2, 64, 65, 0, 190, 7)
PACKED_CU = test_packed.cu_of(PACKED_DOCS)
PACKED_PAD = 9


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 13, 200])
@pytest.mark.parametrize("head_dim", [32, 128, 256])
def test_packed_and_windowed_masks(device, dtype, causal, window, head_dim):
    """Block-diagonal and banded masks, GQA, every head-dim bucket; windows smaller than, equal to and
    larger than a tile (tests/test_packed.py's check on the device)."""
    cu = PACKED_CU
    seed = seed_of(str(dtype), causal, window, head_dim)
    q, k, v = make_qkv(1, cu[-1] + PACKED_PAD, cu[-1] + PACKED_PAD, 4, 2, head_dim, dtype, seed, device)
    with expect_family(device, tensor_core_family(dtype, head_dim) if head_dim == 128 else None):
        test_packed.check_packed(q, k, v, cu, causal, window, seed)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("window", [None, 13])
def test_packed_masks_on_misaligned_views(device, dtype, window):
    cu = PACKED_CU
    q, k, v = misaligned_qkv(1, cu[-1] + PACKED_PAD, 4, 2, 64, dtype, seed=77, device=device)
    with expect_family(device, "simt"):
        test_packed.check_packed(q, k, v, cu, True, window, 77)


def test_packed_attention_api_thd(device):
    """ring_ext.attention(layout="thd", cu_seqlens=...) forward and backward."""
    cu = PACKED_CU
    q, k, v = (
        t[0].requires_grad_() for t in make_qkv(1, cu[-1], cu[-1], 4, 2, 64, torch.bfloat16, 91, device)
    )
    out = ring_ext.attention(q, k, v, layout="thd", causal=True, cu_seqlens=torch.tensor(cu))
    dout = seeded_like(out, 102)
    out.backward(dout)
    index = torch.arange(cu[-1])
    mask = packed_mask(index, index, cu, True).to(device)
    q64, k64, v64 = (t.detach().double()[None].requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, causal=False, mask=mask)
    expected = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double()[None])]
    got = [out.detach()[None], q.grad[None], k.grad[None], v.grad[None]]
    baseline = torch_attention(q[None], k[None], v[None], dout[None], causal=False, mask=mask)
    well_conditioned = mask.sum(1) >= test_packed.MIN_KEYS_FOR_ROW_CHECK
    assert_attention(got, expected, baseline, "thd packed", dq_rows=well_conditioned)


# Shared prompts: two key intervals per row (Note [Two key intervals per row] in
# csrc/common/block_ops.cpp). Prompts and answers across the CUDA tiles, an empty answer, a one-token
# answer, rows that see nothing (the first ones, and padding).
SHARED_PREFIX = ((70, (1, 66, 0, 30)), (3, (130, 2)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("variant", ["plain", "out_fp32", "softcap_sinks"])
def test_two_key_intervals_per_row(device, dtype, head_dim, variant):
    """fwd/bwd with visible [4, s] (each row a shared prompt and its own answer) against the float64
    oracle with the mask written out from the two intervals."""
    cu, bounds = ring_ext.masks.shared_prefix(SHARED_PREFIX)
    bounds[:2, :5] = 0  # the first five rows see nothing
    total, pad = cu[-1], 7
    index = torch.arange(total + pad)
    vis = ring_ext.masks.visible_keys(
        index, index, tuple(cu), True, bounds=ring_ext.masks.check_key_bounds(bounds, total)
    )
    keys = index[None, :]
    mask = torch.zeros(len(index), len(index), dtype=torch.bool)
    for lo, hi in bounds.view(2, 2, total):
        mask[:total] |= (keys >= lo[:, None]) & (keys < hi[:, None])
    seed = seed_of("two intervals", str(dtype), head_dim, variant)
    q, k, v = make_qkv(1, len(index), len(index), 4, 2, head_dim, dtype, seed, device)
    softcap = 2.5 if variant == "softcap_sinks" else 0.0
    sinks = seeded_like(torch.empty(4), seed + 2).to(device) if variant == "softcap_sinks" else None
    scale = 1.0 / math.sqrt(head_dim)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_fp32 = variant == "out_fp32"
    out, lse = torch.ops.ring_ext.fwd(
        qg, kg, vg, scale, False, 0, 0, out_fp32, vis.to(device), softcap, sinks
    )
    assert out.dtype == (torch.float32 if out_fp32 else dtype) and out.stride() == q.stride()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(
        q64, k64, v64, causal=False, scale=scale, mask=mask.to(device), softcap=softcap or None, sinks=sinks
    )
    assert_lse(lse, ref_lse.detach())
    dout = seeded_like(out, seed + 1).to(dtype)
    out.backward(dout.to(out.dtype))
    ref.backward(dout.double())
    got = [out.detach(), qg.grad, kg.grad, vg.grad]
    expected = [ref.detach(), q64.grad, k64.grad, v64.grad]
    if softcap:  # PyTorch's attention has no softcap: the oracle alone, within two units of the
        # dtype's rounding (measured on CPU: 3e-7 float32, 1.7e-3 bfloat16, 2.2e-4 float16)
        bound = {torch.float32: REL_L2[torch.float32], torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
            err = rel_l2(a, b)
            assert err <= bound, f"two intervals {dtype} softcap: {name} rel err {err:.2e}"
        return
    baseline = torch_attention(q, k, v, dout, causal=False, scale=scale, mask=mask.to(device))
    assert_attention(got, expected, baseline, f"two intervals {dtype}", dq_rows=mask.sum(1) >= 4)


# ---- merge and the backward's accumulators -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_matches_reference(device, dtype):
    b, s, h, d = 2, 333, 3, 72
    g = torch.Generator(device=device).manual_seed(5)
    o1 = torch.randn(b, s, h, d, generator=g, device=device)
    o2 = torch.randn(b, s, h, d, generator=g, device=device).to(dtype)
    l1 = torch.randn(b, h, s, generator=g, device=device)
    l2 = torch.randn(b, h, s, generator=g, device=device)
    l1[:, :, :5] = -math.inf  # first side saw no key
    l2[:, :, 3:8] = -math.inf  # second side saw no key; rows 3, 4: neither
    o1[:, :5] = 0
    o2[:, 3:8] = 0
    ref_o, ref_l = merge_reference(o1.double(), l1.double(), o2.double(), l2.double())
    out, lse = o1.clone(), l1.clone()
    torch.ops.ring_ext.merge_(out, lse, o2, l2)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.isneginf(lse[:, :, 3:5]).all() and (out[:, 3:5] == 0).all()
    assert_rel_l2(out, ref_o, torch.float32, "merged out")
    assert_lse(lse, ref_l, "merged lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_of_two_halves_is_full_attention(device, dtype):
    """Attention over keys [0, s) equals the merge of attention over two disjoint key blocks."""
    q, k, v = make_qkv(1, 300, 500, 4, 2, 128, dtype, seed=9, device=device)
    full, full_lse = torch.ops.ring_ext.fwd(q, k, v, 0.1, True, 300, 0, True)
    out, lse = torch.ops.ring_ext.fwd(q, k[:, :250], v[:, :250], 0.1, True, 300, 0, True)
    part, part_lse = torch.ops.ring_ext.fwd(q, k[:, 250:], v[:, 250:], 0.1, True, 300, 250, True)
    torch.ops.ring_ext.merge_(out, lse, part, part_lse)
    ref, ref_lse = attention_reference(q, k, v, causal=True, scale=0.1, q_offset=300)
    baseline = torch_attention(q, k, v, causal=True, scale=0.1, q_offset=300)[0]
    for what, o, lse_o in (("merged halves", out, lse), ("full", full, full_lse)):
        assert_close_to_oracle(o, ref, baseline, what)
        assert_lse(lse_o, ref_lse, f"{what} lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_bwd_acc_adds_into_accumulators(device, dtype):
    """bwd_acc adds this block's gradients into float32 accumulators that already hold something."""
    q, k, v = make_qkv(1, 150, 150, 4, 1, 128, dtype, seed=12, device=device)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.09, True)
    dout = seeded_like(out, 103)
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    acc = [torch.full(t.shape, 1.5, device=device) for t in (q, k, v)]
    torch.ops.ring_ext.bwd_acc(dout, q, k, v, lse, delta, 0.09, True, 0, 0, *acc)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, causal=True, scale=0.09)
    expected = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    baseline = torch_attention(q, k, v, dout, causal=True, scale=0.09)[1:]
    for name, a, e, b in zip(("dq", "dk", "dv"), acc, expected, baseline):
        assert_close_to_oracle(a - 1.5, e, b, f"bwd_acc {name}", grad=True)


def test_lse_gradient(device):
    """dlse: a loss on lse as well as out; d lse / d S = P folds into delta."""
    q, k, v = make_qkv(1, 20, 24, 2, 2, 16, torch.float32, seed=13, device=device)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = torch.ops.ring_ext.fwd(qg, kg, vg, 0.25, False)
    (out.sum() + (lse * 0.7).sum()).backward()
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ro, rl = attention_reference(q64, k64, v64, causal=False, scale=0.25)
    (ro.sum() + (rl * 0.7).sum()).backward()
    for ours, ref in ((qg, q64), (kg, k64), (vg, v64)):
        assert_rel_l2(ours.grad, ref.grad, torch.float32, "grad with lse loss")


def test_gradcheck_tiny(device):
    """Finite differences on a tiny problem. The kernels compute in float32, so this runs in float32
    with finite-difference tolerances; float64-oracle tests above hold the exact gradients."""
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 5, 6, 2, 1, 8, torch.float32, seed=14, device=device))

    def f(q, k, v):
        return torch.ops.ring_ext.fwd(q, k, v, 0.3, True, 1, 0)[0]

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-3, atol=3e-3, rtol=1e-2, nondet_tol=1e-6)


# ---- against PyTorch, numerics, determinism -------------------------------------------------------------


def test_matches_sdpa(device):
    """Same numbers as PyTorch's own attention in float32, in every mask mode (top-left causal)."""
    q, k, v = make_qkv(2, 100, 100, 4, 4, 64, torch.float32, seed=15, device=device)
    for causal in (False, True):
        ours = ring_ext.attention(q, k, v, causal=causal)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        ).transpose(1, 2)
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)


def test_sdpa_agreement_large(device):
    """A long causal row block in bf16, forward and backward: the float64 oracle, PyTorch's SDPA in
    bf16 (on CUDA its flash kernel) as the yardstick."""
    q, k, v = make_qkv(1, 2048, 2048, 4, 4, 128, torch.bfloat16, seed=41, device=device)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = ring_ext.attention(qg, kg, vg, causal=True)
    dout = seeded_like(out, 104)
    out.backward(dout)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, causal=True)
    expected = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]
    got = [out.detach(), qg.grad, kg.grad, vg.grad]
    assert_attention(got, expected, torch_attention(q, k, v, dout, causal=True), "s=2048 vs SDPA bf16")


@pytest.mark.parametrize("causal", [True, False])
def test_fp32_error_of_long_sums(causal):
    """CPU, float32 at S = 2048: out, dq, dk, dv within 1.5x PyTorch's error, no floor. Sums over 2048
    rows or keys are where the CPU kernels' accumulation order shows (Note [Blocked accumulation]); the
    CUDA float32 (SIMT) kernels are held to the general rule, and their errors are recorded, in
    tests/test_cuda.py (test_simt_float32_error)."""
    q, k, v, dout = make_qkv(1, 2048, 2048, 4, 4, 64, torch.float32, seed=21) + (
        torch.randn(1, 2048, 4, 64, generator=torch.Generator().manual_seed(22)),
    )
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, causal=causal)
    expected = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]
    ts = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ring_ext.attention(*ts, causal=causal)
    ours = [out, *torch.autograd.grad(out, ts, dout)]
    theirs = torch_attention(q, k, v, dout, causal=causal)
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), ours, theirs, expected):
        assert rel_l2(a, e) <= FP32_LONG_FACTOR * rel_l2(b, e), (name, rel_l2(a, e), rel_l2(b, e))


@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 128), (torch.float32, 64), (torch.bfloat16, 33)])
def test_deterministic(device, dtype, head_dim):
    """Forward, dK and dV are bitwise identical over runs on both devices (on CUDA one CTA owns each key
    block and writes its dK/dV once, without atomics, in both kernel families). dq is bitwise identical
    on CPU; on CUDA it is summed with atomics and only close."""
    q, k, v = make_qkv(2, 300, 300, 4, 1, head_dim, dtype, seed=5, device=device)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.1, True)
    dout = seeded_like(out, 105)
    with expect_family(device, tensor_core_family(dtype, head_dim)):
        first = torch.ops.ring_ext.bwd(dout, q, k, v, out, lse, 0.1, True)
        torch.ops.ring_ext.fwd(q, k, v, 0.1, True)  # the family check wants both kernels
    for _ in range(3):
        out_again, _ = torch.ops.ring_ext.fwd(q, k, v, 0.1, True)
        again = torch.ops.ring_ext.bwd(dout, q, k, v, out, lse, 0.1, True)
        assert torch.equal(out_again, out)
        assert torch.equal(again[1], first[1]) and torch.equal(again[2], first[2])
        if device == "cpu":
            assert torch.equal(again[0], first[0])
        else:
            torch.testing.assert_close(again[0], first[0], rtol=1e-2, atol=1e-3)


THREAD_COUNTS = (1, 2, 3, 5)


def fwd_bwd_at_thread_counts(q, k, v, dout) -> list[tuple]:
    """(out, dq, dk, dv) of the CPU kernels at each of THREAD_COUNTS, every one checked against the
    oracle first; the process's thread count is restored after."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in THREAD_COUNTS:
            torch.set_num_threads(n)
            check_fwd_bwd(q, k, v, causal=True, dout=dout)
            out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.125, True)
            results.append((out, *torch.ops.ring_ext.bwd(dout, q, k, v, out, lse, 0.125, True)))
    finally:
        torch.set_num_threads(threads)
    return results


@pytest.mark.parametrize("heads", [(4, 2), (3, 1), (2, 2)], ids=["gqa", "mqa", "mha"])
def test_threads_share_packed_heads(heads):
    """CPU: with 1, 2, 3 and 5 threads a kv head's packed copy is made by one thread and shared by the
    others whose tasks reach it (Note [Packed heads] in csrc/cpu/flash_impl.h), and a head's dq is summed
    from its units' partials in unit order, whichever thread ran them (Note [Ordered dQ units] in
    flash_bwd.h). Every thread count matches the oracle; out, dq, dk and dv do not depend on it at all."""
    q, k, v = make_qkv(2, 181, 181, heads[0], heads[1], 64, torch.float32, seed_of("threads", heads), "cpu")
    results = fwd_bwd_at_thread_counts(q, k, v, seeded_like(q, 106))
    for n, (out, dq, dk, dv) in zip(THREAD_COUNTS[1:], results[1:]):
        assert torch.equal(out, results[0][0]), f"out with {n} threads"
        assert torch.equal(dq, results[0][1]), f"dq with {n} threads"
        assert torch.equal(dk, results[0][2]) and torch.equal(dv, results[0][3]), f"dk/dv with {n} threads"


@pytest.mark.parametrize("heads", [(6, 3), (4, 4)], ids=["gqa", "mha"])
def test_bwd_head_groups(heads):
    """CPU, 16-bit inputs: the one-process backward runs the heads in groups of kv heads, each with float32
    accumulators of its own (Note [Bounded backward accumulators] in csrc/common/block_ops.cpp); the
    group width follows the thread count (1, 2, 3 and 5 threads give groups of 2 + 1, 3, ... kv heads
    here). Every grouping matches the oracle, and dk/dv do not depend on it at all."""
    q, k, v = make_qkv(1, 200, 200, heads[0], heads[1], 64, torch.bfloat16, seed_of("groups", heads), "cpu")
    results = fwd_bwd_at_thread_counts(q, k, v, seeded_like(q, 107))
    for n, (_out, _dq, dk, dv) in zip(THREAD_COUNTS[1:], results[1:]):
        assert torch.equal(dk, results[0][2]) and torch.equal(dv, results[0][3]), f"dk/dv with {n} threads"


@pytest.mark.parametrize("level", LOWER_CPU_LEVELS)
def test_kernel_suite_at_lower_cpu_levels(level):
    """The CPU cases of this suite, in a subprocess, with the kernels of every lower instruction-set level
    this machine runs (RING_EXT_CPU_ISA; skipped at and above its best level, which the cases above ran):
    on an AVX-512 machine the AVX2 and baseline kernels stay tested. The large combinatorial tables
    (packed masks, causal offsets, odd lengths) run at the best level only: the lower levels share their
    mask and tiling code with it, and three levels of the whole suite would cost CI minutes."""
    skipped = (
        "cuda",
        "lower_cpu_levels",
        "packed_and_windowed_masks",
        "causal_offsets",
        "odd_lengths",
        "long",
    )
    args = [
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "tests/test_kernels.py",
        "-k",
        " and ".join(f"not {t}" for t in skipped),
    ]
    run_at_cpu_level(level, f"import pytest; sys.exit(pytest.main({args!r}))", timeout=1800)


def test_exp_fit_is_the_one_in_the_kernels():
    """csrc/cpu/exp2_fit.h holds what tools/fit_exp2.py fits (the softmax's exp at the AVX2 and AVX-512
    levels), and that fit evaluated in float32 stays within 1e-7 of 2^f: a stale or hand-edited constant
    fails here, not as a tolerance somewhere in the attention tests."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    spec = importlib.util.spec_from_file_location("fit_exp2", os.path.join(root, "tools", "fit_exp2.py"))
    fit_exp2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_exp2)
    with open(os.path.join(root, "csrc", "cpu", "exp2_fit.h")) as header:
        table = re.search(r"kExp2\[7\] = \{([^}]*)\}", header.read()).group(1)
    in_header = [float(x.strip().rstrip("f")) for x in table.split(",")]
    fitted = fit_exp2.fit()
    assert in_header == pytest.approx(list(fitted), rel=1e-9, abs=1e-12)
    assert fit_exp2.float32_error(fitted) < 1e-7
