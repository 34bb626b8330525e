"""Softcap, sinks and a v head dim of its own in one process (the kernels through ring_ext.attention),
forward and every gradient against the float64 oracle, on fresh random inputs: causal and not, GQA,
packed documents with a sliding window (rows that see no key included), float32 and bfloat16, head dims
beyond any GPU's (CPU: any), at every CPU instruction-set level this machine can run (a lower level
forced with RING_EXT_CPU_ISA, csrc/cpu/dispatch.cpp). docs/design.md, "Softcap and sinks"."""

from __future__ import annotations

import zlib

import pytest
import torch
from devices import LOWER_CPU_LEVELS, run_at_cpu_level

import ring_ext
from ring_ext.testing.reference import attention_reference, packed_mask

# (name, b, s, hq, hkv, d, dv, causal, softcap, sinks, docs, window)
CASES = [
    ("softcap", 2, 77, 4, 2, 40, 40, True, 5.0, False, None, None),
    ("sinks", 1, 130, 4, 1, 48, 48, False, None, True, None, None),
    ("mla", 1, 150, 4, 2, 64, 48, True, None, False, None, None),
    ("all three, deepseek dims", 1, 96, 2, 2, 192, 128, True, 30.0, True, None, None),
    ("all three, packed + window", 1, 150, 4, 2, 32, 24, True, 20.0, True, (40, 60, 0, 50), 30),
    ("sinks, empty rows", 1, 64, 2, 2, 16, 16, False, 3.0, True, (20, 0, 44), 1),
    ("head dim 600", 1, 40, 2, 1, 600, 520, True, 2.0, True, None, None),
]
BOUND = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # relative L2 against float64


def _check(case, dtype) -> None:
    name, b, s, hq, hkv, d, dv, causal, softcap, use_sinks, docs, window = case
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # not hash(): salted per process
    q = torch.randn(b, s, hq, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(b, s, hkv, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(b, s, hkv, dv, generator=g).to(dtype).requires_grad_()
    sinks = torch.randn(hq, generator=g).requires_grad_() if use_sinks else None
    cu = None if docs is None else torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()])
    out = ring_ext.attention(
        q,
        k,
        v,
        causal=causal,
        softcap=softcap,
        sinks=sinks,
        cu_seqlens=cu,
        sliding_window=window,
        layout="bshd",
    )
    assert out.shape == (b, s, hq, dv) and out.dtype == dtype
    dout = torch.randn(out.shape, generator=g).to(dtype)
    leaves = [q, k, v] + ([sinks] if use_sinks else [])
    got = [out, *torch.autograd.grad(out, leaves, dout)]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    mask = None
    if cu is not None or window is not None:
        positions = torch.arange(s)
        mask = packed_mask(positions, positions, cu.tolist() if cu is not None else [0, s], causal, window)
    ref_out, _ = attention_reference(
        *ref_leaves[:3], causal=causal, mask=mask, softcap=softcap, sinks=ref_leaves[3] if use_sinks else None
    )
    expected = [ref_out, *torch.autograd.grad(ref_out, ref_leaves, dout.double())]
    for what, a, e in zip(("out", "dq", "dk", "dv", "dsinks"), got, expected):
        err = ((a.double() - e).norm() / e.norm().clamp_min(1e-30)).item()
        # dsinks is a sum over rows of terms of both signs, each from the output rounded to bf16: it
        # cancels, so its relative error in bf16 runs several times out's (seen up to 4.5e-2)
        bound = BOUND[dtype] * (5 if what == "dsinks" and dtype == torch.bfloat16 else 1)
        assert err <= bound, f"{name} {dtype} {what}: relative error {err:.2e}"


def run_all() -> None:
    for case in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            if dtype == torch.bfloat16 and case[5] > 256:
                continue  # the wide case once, in float32
            _check(case, dtype)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_variant_matches_the_oracle(case, dtype):
    _check(case, dtype)


@pytest.mark.parametrize("level", LOWER_CPU_LEVELS)
def test_lower_cpu_levels_match_the_oracle(level):
    """The same cases with the kernels of every lower instruction-set level this machine runs (skipped
    where that level is the best this machine has, or above it: the test above ran the best one)."""
    run_at_cpu_level(level, "import test_variants; test_variants.run_all()", timeout=600)


def _shared_prefix_bounds():
    cu, bounds = ring_ext.masks.shared_prefix([(5, (3, 4))])
    return cu, bounds


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda b: b[:3], r"key_bounds must be an integer tensor \[2, S\] or \[4, S\]"),
        (lambda b: b.float(), r"key_bounds must be an integer tensor"),
        (lambda b: b[:, :-1], r"key_bounds must be \[2, 12\] .* or \[4, 12\]"),
        (lambda b: b.index_fill(1, torch.tensor([6]), 13), r"key_bounds must lie in \[0, 12\]"),
        (lambda b: b.flip(1), r"key_bounds' rows must each be non-decreasing"),
        (
            lambda b: torch.stack([b[0], b[3], b[0], b[3]]),
            r"key_bounds' two intervals of a token must not overlap",
        ),
    ],
    ids=["three_rows", "float", "length", "range", "order", "overlap"],
)
def test_key_bounds_bad_input(edit, message):
    """key_bounds that break the rule raise ValueError naming key_bounds and the rule, before any work."""
    cu, bounds = _shared_prefix_bounds()
    q = torch.randn(1, cu[-1], 2, 8)
    with pytest.raises(ValueError, match=message):
        ring_ext.attention(q, q, q, causal=True, key_bounds=edit(bounds))


def test_visible_two_intervals_bad_input():
    """The block op's visible [4, s]: overlapping intervals of a row raise, naming visible."""
    q = torch.randn(1, 4, 2, 8)
    overlap = torch.tensor([[0, 0, 0, 0], [2, 2, 3, 4], [1, 1, 1, 1], [3, 3, 3, 4]])
    with pytest.raises(ValueError, match="visible's two intervals of a row must not overlap"):
        torch.ops.ring_ext.fwd(q, q, q, 0.5, False, 0, 0, False, overlap)
    with pytest.raises(ValueError, match=r"visible must be int64 \[2, 4\] .* or \[4, 4\]"):
        torch.ops.ring_ext.fwd(q, q, q, 0.5, False, 0, 0, False, overlap[:3])


def test_shard_key_bounds_needs_cu_seqlens():
    """Checked before the context is read (the distributed bad-input suite covers the rest of shard)."""
    cu, bounds = _shared_prefix_bounds()
    x = torch.randn(1, cu[-1], 2, 8)
    with pytest.raises(ValueError, match="shard's key_bounds balances a packed placement: give cu_seqlens"):
        ring_ext.shard(x, None, 1, key_bounds=bounds)
