"""Block kernels (forward, backward, merge) against the float64 oracle, on fresh random inputs."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import ring_ext
from ring_ext.layouts import from_bshd, to_bshd
from ring_ext.reference import attention_reference, merge_reference

from tolerances import FP32_LONG_FACTOR, assert_attention, assert_lse, assert_rel_l2, rel_l2, torch_attention

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_qkv(b, sq, sk, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g).to(dtype)
    k = torch.randn(b, sk, hkv, d, generator=g).to(dtype)
    v = torch.randn(b, sk, hkv, d, generator=g).to(dtype)
    return q, k, v


def check_fwd_bwd(q, k, v, *, causal, q_offset=0, k_offset=0, seed=0):
    """Forward (out, lse) and backward (dq, dk, dv) of the fwd op against the oracle, with PyTorch's
    attention in the same dtype as the yardstick (tests/tolerances.py)."""
    dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1])
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = torch.ops.ring_ext.fwd(qg, kg, vg, scale, causal, q_offset, k_offset)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_reference(
        q64, k64, v64, causal=causal, scale=scale, q_offset=q_offset, k_offset=k_offset
    )
    assert out.dtype == dtype
    assert_lse(lse, ref_lse.detach())
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    out.backward(dout)
    ref_out.backward(dout.double())
    assert all(t.grad.dtype == dtype for t in (qg, kg, vg))
    baseline = torch_attention(
        q, k, v, dout, causal=causal, scale=scale, q_offset=q_offset, k_offset=k_offset
    )
    got = [out.detach(), qg.grad, kg.grad, vg.grad]
    assert_attention(
        got, [ref_out.detach(), q64.grad, k64.grad, v64.grad], baseline, f"{dtype} causal={causal}"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_fwd_bwd_dtypes_masks_gqa(dtype, causal, heads):
    seed = zlib.crc32(repr((str(dtype), causal, heads)).encode())  # stable across processes
    q, k, v = make_qkv(2, 77, 77, heads[0], heads[1], 64, dtype, seed=seed)
    check_fwd_bwd(q, k, v, causal=causal)


@pytest.mark.parametrize("seq", [1, 2, 63, 64, 65, 257])
@pytest.mark.parametrize("causal", [False, True])
def test_odd_lengths(seq, causal):
    q, k, v = make_qkv(1, seq, seq, 2, 1, 32, torch.float32, seed=seq)
    check_fwd_bwd(q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim", [1, 8, 40, 72, 100, 128, 200, 256])
def test_head_dims(head_dim):
    q, k, v = make_qkv(1, 70, 70, 2, 2, head_dim, torch.bfloat16, seed=head_dim)
    check_fwd_bwd(q, k, v, causal=True)


@pytest.mark.parametrize(
    "sq,sk,q_offset,k_offset",
    [
        (48, 80, 64, 0),  # queries after part of the keys: partly visible
        (48, 80, 0, 0),  # square-ish top-left causal with more keys than queries
        (64, 64, 0, 64),  # keys entirely after the queries: every row sees nothing
        (40, 40, 10, 20),  # the first 10 rows see nothing
        (33, 129, 200, 0),  # every key visible
    ],
)
def test_causal_offsets(sq, sk, q_offset, k_offset):
    q, k, v = make_qkv(2, sq, sk, 2, 1, 48, torch.float32, seed=sq + sk)
    check_fwd_bwd(q, k, v, causal=True, q_offset=q_offset, k_offset=k_offset)


def test_rows_without_keys_are_zero_not_nan():
    q, k, v = make_qkv(1, 16, 16, 2, 2, 32, torch.bfloat16, seed=3)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.125, True, 0, 8)  # rows 0..7 see no key
    assert torch.isneginf(lse[:, :, :8]).all() and torch.isfinite(lse[:, :, 8:]).all()
    assert (out[:, :8] == 0).all() and torch.isfinite(out).all()


def test_empty_key_block():
    q, _, _ = make_qkv(1, 5, 5, 2, 2, 32, torch.float32, seed=4)
    k = v = torch.empty(1, 0, 2, 32)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.2, False)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("layout", ["bshd", "sbhd", "bnsd", "sbh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts_through_strides(layout, dtype):
    """ring_ext.attention in every layout equals the oracle, with gradients in the input layout."""
    b, s, hq, hkv, d = 2, 50, 4, 2, 32
    q, k, v = make_qkv(b, s, s, hq, hkv, d, dtype, seed=11)
    ql, kl, vl = (from_bshd(t, layout).contiguous().requires_grad_() for t in (q, k, v))
    out = ring_ext.attention(ql, kl, vl, layout=layout, causal=True, num_heads=hq)
    assert out.shape == ql.shape and out.dtype == dtype
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(12)).to(dtype)
    out.backward(dout)
    assert all(t.grad.shape == t.shape for t in (ql, kl, vl))
    got = [to_bshd(t, layout, d) for t in (out.detach(), ql.grad, kl.grad, vl.grad)]
    dout = to_bshd(dout, layout, d)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, causal=True)
    expected = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]
    baseline = torch_attention(q, k, v, dout, causal=True)
    assert_attention(got, expected, baseline, f"{layout} {dtype}")


def test_non_contiguous_inputs():
    """Sliced heads and a strided head_dim (copied once by the glue) still give exact results."""
    q = torch.randn(2, 40, 6, 32)[:, :, 1:5]  # a slice of the heads: strided batch and seq
    k = torch.randn(2, 40, 2, 64)[..., ::2]  # head_dim stride 2
    v = torch.randn(40, 2, 2, 32).transpose(0, 1)  # seq-major memory
    check_fwd_bwd(q, k, v, causal=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_matches_reference(dtype):
    b, s, h, d = 2, 33, 3, 40
    g = torch.Generator().manual_seed(5)
    o1, o2 = torch.randn(b, s, h, d, generator=g), torch.randn(b, s, h, d, generator=g).to(dtype)
    l1, l2 = torch.randn(b, h, s, generator=g), torch.randn(b, h, s, generator=g)
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


def test_merge_of_two_halves_is_full_attention():
    """Attention over keys [0, s) equals the merge of attention over two disjoint halves."""
    q, k, v = make_qkv(1, 64, 96, 4, 2, 32, torch.float32, seed=9)
    full, full_lse = torch.ops.ring_ext.fwd(q, k, v, 0.2, True, 40, 0)
    out, lse = torch.ops.ring_ext.fwd(q, k[:, :50], v[:, :50], 0.2, True, 40, 0, True)
    part, part_lse = torch.ops.ring_ext.fwd(q, k[:, 50:], v[:, 50:], 0.2, True, 40, 50, True)
    torch.ops.ring_ext.merge_(out, lse, part, part_lse)
    assert_rel_l2(out, full, torch.float32, "merged halves")
    assert torch.allclose(lse, full_lse, atol=1e-5)


def test_bwd_acc_adds_into_accumulators():
    q, k, v = make_qkv(1, 30, 30, 2, 1, 16, torch.float32, seed=12)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.25, True)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.ops.ring_ext.bwd(dout, q, k, v, out, lse, 0.25, True)
    delta = (dout * out).sum(-1).transpose(1, 2).contiguous()
    acc = [torch.full(t.shape, 1.5) for t in (q, k, v)]
    torch.ops.ring_ext.bwd_acc(dout, q, k, v, lse, delta, 0.25, True, 0, 0, *acc)
    for a, g in zip(acc, (dq, dk, dv)):
        assert torch.allclose(a - 1.5, g, atol=1e-5)


def test_lse_gradient():
    """A loss on lse as well as out: d lse / d S = P folds into delta."""
    q, k, v = make_qkv(1, 20, 24, 2, 2, 16, torch.float32, seed=13)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = torch.ops.ring_ext.fwd(qg, kg, vg, 0.25, False)
    (out.sum() + (lse * 0.7).sum()).backward()
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ro, rl = attention_reference(q64, k64, v64, causal=False, scale=0.25)
    (ro.sum() + (rl * 0.7).sum()).backward()
    for ours, ref in ((qg, q64), (kg, k64), (vg, v64)):
        assert_rel_l2(ours.grad, ref.grad, torch.float32, "grad with lse loss")


def test_gradcheck_tiny():
    """Finite differences on a tiny problem. The kernels compute in float32, so this runs in float32
    with finite-difference tolerances; float64-oracle tests above hold the exact gradients."""
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 5, 6, 2, 1, 8, torch.float32, seed=14))

    def f(q, k, v):
        return torch.ops.ring_ext.fwd(q, k, v, 0.3, True, 1, 0)[0]

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-3, atol=3e-3, rtol=1e-2, nondet_tol=1e-6)


def test_matches_sdpa():
    """Same numbers as PyTorch's own attention, in every mask mode (top-left causal)."""
    q, k, v = make_qkv(2, 100, 100, 4, 4, 64, torch.float32, seed=15)
    for causal in (False, True):
        ours = ring_ext.attention(q, k, v, causal=causal)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        ).transpose(1, 2)
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_fp32_error_of_long_sums(causal):
    """float32 at S = 2048: out, dq, dk, dv within 1.5x PyTorch's error, no floor. Sums over 2048 rows
    or keys are where the accumulation order shows (Note [Blocked accumulation])."""
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


def test_deterministic():
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 90, 90, 4, 2, 64, torch.bfloat16, seed=16))
    runs = []
    for _ in range(2):
        out = ring_ext.attention(q, k, v, causal=True)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        runs.append((out, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
