"""Packed documents and sliding windows on one process: the key intervals against the per-pair mask,
the packed placement (pure: coverage, order, balance, token bound), the kernels against the float64 oracle
with block-diagonal and banded masks, the public API and its bad-input errors."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import ring_ext
from ring_ext.masks import check_cu_seqlens, pairs_before, visible_keys
from ring_ext.placement import packed_tokens
from ring_ext.testing import documents
from ring_ext.testing.documents import lognormal_docs
from ring_ext.testing.reference import attention_reference, packed_mask
from ring_ext.testing.tolerances import assert_attention, assert_lse, torch_attention

MIXES = {
    "tiny_and_empty": (1, 2, 0, 37, 5, 3),
    "one_prime_doc": (61,),
    "empties_first": (0, 0, 3, 20, 1, 1, 9, 0),
    "lognormal": lognormal_docs(300, 9, seed=7),
}


def cu_of(docs) -> tuple[int, ...]:
    return tuple(documents.cu_of(docs))


def intervals_to_mask(vis: torch.Tensor, n_keys: int) -> torch.Tensor:
    j = torch.arange(n_keys)[None, :]
    return (j >= vis[0][:, None]) & (j < vis[1][:, None])


def pairwise_mask(
    q_index, k_index, cu_seqlens, causal: bool, window: int | None = None, chunk: int | None = None
):
    """The mask model of ring_ext/masks.py written out per token pair, independently of its code: both
    in the same document, and causal pos_k <= pos_q / a window |pos_q - pos_k| < w / a chunk
    pos_q // c == pos_k // c. Indices >= S are padding: they see nothing and nothing sees them."""
    cu = torch.as_tensor(list(cu_seqlens), dtype=torch.int64)
    total = int(cu[-1])
    doc_of = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])  # [S]
    start_of = cu[doc_of]

    def doc_pos(idx):
        real = idx < total
        safe = idx.clamp(max=max(total - 1, 0))
        doc = torch.where(real, doc_of[safe] if total else safe, -1)
        return doc, idx - (start_of[safe] if total else 0), real

    dq, pq, rq = doc_pos(torch.as_tensor(q_index))
    dk, pk, rk = doc_pos(torch.as_tensor(k_index))
    diff = pq[:, None] - pk[None, :]
    allowed = (dq[:, None] == dk[None, :]) & rq[:, None] & rk[None, :]
    if causal:
        allowed &= diff >= 0
    if window is not None:
        allowed &= diff.abs() < window
    if chunk is not None:
        allowed &= pq[:, None] // chunk == pk[None, :] // chunk
    return allowed


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("window", "chunk"), [(None, None), (1, None), (4, None), (1000, None), (None, 5), (4, 7)]
)
def test_visible_keys_is_the_mask_model(mix, causal, window, chunk):
    """On blocks that are sorted subsets of the tokens plus padding (as a placement gives ranks), the
    intervals and the reference's mask reproduce the per-pair mask exactly, and never move backwards."""
    cu = cu_of(MIXES[mix])
    total = cu[-1]
    g = torch.Generator().manual_seed(zlib.crc32(repr((mix, causal, window, chunk)).encode()))
    for _ in range(4):
        q_index = torch.cat(
            [torch.sort(torch.randperm(total, generator=g)[: total // 2]).values, total + torch.arange(3)]
        )
        k_index = torch.cat(
            [torch.sort(torch.randperm(total, generator=g)[: total // 3]).values, total + torch.arange(2)]
        )
        vis = visible_keys(q_index, k_index, cu, causal, window, chunk)
        want = pairwise_mask(q_index, k_index, cu, causal, window, chunk)
        assert torch.equal(intervals_to_mask(vis, len(k_index)), want)
        assert torch.equal(packed_mask(q_index, k_index, cu, causal, window, chunk), want)
        assert (vis[:, 1:] >= vis[:, :-1]).all()


def test_pairs_before_counts_the_mask():
    for length in (1, 2, 7, 30):
        for causal in (True, False):
            for window in (None, 1, 3, 50):
                mask = pairwise_mask(torch.arange(length), torch.arange(length), (0, length), causal, window)
                for x in range(length + 1):
                    assert pairs_before(x, length, causal, window) == int(mask[:x].sum()), (
                        length,
                        causal,
                        window,
                        x,
                    )


@pytest.mark.parametrize(
    "groups,members", [(1, 1), (2, 1), (3, 1), (4, 1), (8, 1), (1, 4), (2, 2), (4, 2), (3, 3)]
)
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_plan_covers_every_token_once_in_order(groups, members, mix):
    cu = cu_of(MIXES[mix])
    total = cu[-1]
    plan = packed_tokens(cu, groups, members, True)
    assert len(plan) == groups * members
    assert len({len(t) for t in plan}) == 1, "every rank holds the same padded length"
    real = torch.cat([t[t < total] for t in plan])
    assert torch.equal(torch.sort(real).values, torch.arange(total)), "every token exactly once"
    for g in range(groups):  # a ring member's block (its ranks' tokens gathered) is increasing, padding last
        block = torch.cat(plan[g * members : (g + 1) * members])
        assert (block[1:] > block[:-1]).all()


def _pairs_per_rank(plan, cu, causal=True):
    total = cu[-1]
    out = []
    for t in plan:
        idx = t[t < total]
        out.append(int(packed_mask(idx, torch.arange(total), cu, causal).sum()))
    return out


@pytest.mark.parametrize("cp", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_plan_balance(cp, seed):
    """Causal work (visible pairs) per rank within 5% of the mean for lognormal mixes, and tokens per rank
    within S / cp + 2 * n_docs (issue targets; the balance table of benchmarks/bench_varlen.py is larger)."""
    docs = lognormal_docs(4096, 12, seed)
    cu = cu_of(docs)
    plan = packed_tokens(cu, cp, 1, True)
    pairs = _pairs_per_rank(plan, cu)
    assert max(pairs) / (sum(pairs) / cp) <= 1.05, pairs
    assert max(int((t < cu[-1]).sum()) for t in plan) <= 4096 / cp + 2 * len(docs)


@pytest.mark.parametrize("cp", [2, 3, 4, 8, 16])
@pytest.mark.parametrize(
    "groups", [((2048, (512,) * 8),), ((700, (900, 3, 0, 1300)), (33, (5, 60)), (0, (400,)))]
)
def test_plan_balanced_by_key_bounds(cp, groups):
    """shard(..., key_bounds=kb) (Note [Placement balanced by key_bounds]): every token once, increasing
    per member, hybrid-ready (2 ranks per member); the mask's visible pairs per member within 2% of the
    mean where the plain zigzag is off by up to 1.28x, tokens per member within S / cp + 16 per document
    (8 pieces per member of every document, each within a token of the others)."""
    cu, kb = ring_ext.masks.shared_prefix(groups)
    bounds = ring_ext.masks.check_key_bounds(kb, cu[-1])
    total, cu = cu[-1], tuple(cu)
    plan = packed_tokens(cu, cp, 2, True, None, bounds)
    real = torch.cat([t[t < total] for t in plan])
    assert torch.equal(torch.sort(real).values, torch.arange(total)), "every token exactly once"
    blocks = [torch.cat(plan[g * 2 : g * 2 + 2]) for g in range(cp)]
    assert all((b[1:] > b[:-1]).all() for b in blocks)
    pairs = ring_ext.masks.visible_pairs(torch.arange(total), cu, True, bounds=bounds)
    work = [int(pairs[b[b < total]].sum()) for b in blocks]
    if len(groups) == 1:  # one long group: room to balance (small mixed groups: pieces of few tokens)
        assert max(work) / (sum(work) / cp) <= 1.02, work
    assert max(int((b < total).sum()) for b in blocks) <= total / cp + 16 * (len(cu) - 1)


@pytest.mark.parametrize("cp", [2, 3, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_windowed_plan_is_contiguous_and_balanced(cp, causal):
    """--cp-sliding-window: every member holds one run of consecutive tokens, in rank order, with windowed
    work (visible pairs under the window) within two tokens' worth of each other."""
    window = 64
    cu = cu_of(lognormal_docs(4096, 12, 0))
    total = cu[-1]
    plan = packed_tokens(cu, cp, 2, causal, window)
    blocks = [torch.cat(plan[g * 2 : g * 2 + 2]) for g in range(cp)]
    real = [b[b < total] for b in blocks]
    assert torch.equal(torch.cat(real), torch.arange(total)), "consecutive pieces, in rank order"
    pairs = [int(packed_mask(r, torch.arange(total), cu, causal, window).sum()) for r in real]
    token = window if causal else 2 * window - 1  # the most keys one token sees
    assert max(pairs) - min(pairs) <= 2 * token, pairs


# ---- kernels ------------------------------------------------------------------------------------

# dq rows of queries seeing fewer keys are ill-conditioned (tolerances.assert_attention, dq_rows).
MIN_KEYS_FOR_ROW_CHECK = 4


def check_packed(q, k, v, cu, causal, window, seed):
    """fwd with the intervals of ring_ext.masks, and its backward, against the float64 oracle with the
    per-pair mask, on q's device (tests/test_kernels.py runs it on every device). Rows past cu[-1] are padding: they
    see nothing (out 0, lse -inf)."""
    rows, device = q.shape[1], q.device
    index = torch.arange(rows)
    vis = visible_keys(index, index, cu, causal, window).to(device)
    mask = packed_mask(index, index, cu, causal, window).to(device)
    scale = 1.0 / math.sqrt(q.shape[-1])
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = torch.ops.ring_ext.fwd(qg, kg, vg, scale, False, visible=vis)
    sees = mask.any(1)
    assert torch.isneginf(lse[..., ~sees]).all() and (out[:, ~sees] == 0).all()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(q64, k64, v64, causal=False, scale=scale, mask=mask)
    assert_lse(lse, ref_lse.detach())
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, q.dtype)
    out.backward(dout)
    ref.backward(dout.double())
    baseline = torch_attention(q, k, v, dout, causal=False, scale=scale, mask=mask)
    got = [out.detach(), qg.grad, kg.grad, vg.grad]
    well_conditioned = mask.sum(1) >= MIN_KEYS_FOR_ROW_CHECK
    assert_attention(
        got,
        [ref.detach(), q64.grad, k64.grad, v64.grad],
        baseline,
        f"{q.dtype} {cu} {causal} {window}",
        dq_rows=well_conditioned,
    )


# The kernels on block-diagonal and banded masks, on every device: tests/test_kernels.py
# (test_packed_and_windowed_masks and the misaligned and thd cases next to it).


def test_rows_that_see_nothing_give_zero_and_minus_inf():
    """Padding rows (intervals empty) get out 0 and lse -inf, their gradients 0, never NaN."""
    total, pad = 70, 5
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, total + pad, 2, 16, generator=g).requires_grad_() for _ in range(3))
    index = torch.arange(total + pad)
    vis = visible_keys(index, index, (0, 30, total), True)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.25, False, visible=vis)
    assert torch.equal(out[:, total:], torch.zeros_like(out[:, total:]))
    assert torch.isneginf(lse[..., total:]).all() and torch.isfinite(lse[..., :total]).all()
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[:, total:], torch.zeros_like(t.grad[:, total:]))


# ---- the public API ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["thd", "bshd", "sbhd", "bnsd"])
@pytest.mark.parametrize("mix", ["tiny_and_empty", "lognormal"])
def test_attention_packed_one_process(layout, mix):
    cu = cu_of(MIXES[mix])
    total = cu[-1]
    g = torch.Generator().manual_seed(zlib.crc32(f"{layout}{mix}".encode()))
    q, k, v = (torch.randn(1, total, 4, 16, generator=g, dtype=torch.float64) for _ in range(3))
    to = ring_ext.layouts.from_bshd
    args = [(to(t, layout) if layout != "thd" else t[0]).float() for t in (q, k, v)]
    out = ring_ext.attention(*args, layout=layout, causal=True, cu_seqlens=torch.tensor(cu))
    index = torch.arange(total)
    ref, _ = attention_reference(q, k, v, causal=False, mask=packed_mask(index, index, cu, True))
    got = ring_ext.layouts.to_bshd(out, layout, 16)
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-5, atol=1e-5)


def test_layout_none_with_cu_seqlens_is_thd():
    q = torch.randn(10, 2, 8)
    out = ring_ext.attention(q, q, q, causal=True, cu_seqlens=[0, 4, 10])
    assert out.shape == q.shape


def test_dense_sliding_window_any_batch():
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 150, 4, 16, generator=g, dtype=torch.float64) for _ in range(3))
    for causal in (True, False):
        out = ring_ext.attention(q.float(), k.float(), v.float(), causal=causal, sliding_window=20)
        index = torch.arange(150)
        ref, _ = attention_reference(
            q, k, v, causal=False, mask=packed_mask(index, index, (0, 150), causal, 20)
        )
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-5, atol=1e-5)


def test_window_of_one_is_each_token_alone():
    v = torch.randn(1, 40, 2, 8)
    out = ring_ext.attention(
        torch.randn(1, 40, 2, 8), torch.randn(1, 40, 2, 8), v, causal=True, sliding_window=1
    )
    torch.testing.assert_close(out, v)


@pytest.mark.parametrize(
    "cu,match",
    [
        ([1, 10], "start with 0"),
        ([0, 6, 4, 10], "non-decreasing"),
        ([0, 4, 9], "end with the packed sequence length 10"),
        (torch.tensor([0.0, 10.0]), "integer tensor"),
        (torch.tensor([[0, 10]]), "1-D"),
        ([0], "at least one document"),
    ],
)
def test_bad_cu_seqlens(cu, match):
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match=match):
        ring_ext.attention(q, q, q, causal=True, cu_seqlens=cu)


def test_bad_packed_calls():
    q = torch.randn(2, 10, 2, 8)
    with pytest.raises(ValueError, match="batch must be 1"):
        ring_ext.attention(q, q, q, causal=True, cu_seqlens=[0, 10])
    for w in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match="sliding_window must be an int >= 1"):
            ring_ext.attention(q, q, q, causal=True, sliding_window=w)
    with pytest.raises(ValueError, match="k and v must have q's length 10"):
        ring_ext.attention(q, q[:, :7], q[:, :7], causal=True, sliding_window=3)
    with pytest.raises(ValueError, match="causal=False with visible"):
        torch.ops.ring_ext.fwd(q, q, q, 0.3, True, visible=torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="non-decreasing"):
        bad = torch.tensor([[0] * 10, [5, 4] + [9] * 8])
        torch.ops.ring_ext.fwd(q, q, q, 0.3, False, visible=bad)


def test_check_cu_seqlens_accepts_sequences_and_tensors():
    assert check_cu_seqlens([0, 3, 3, 8], 8) == (0, 3, 3, 8)
    assert check_cu_seqlens(torch.tensor([0, 8], dtype=torch.int32)) == (0, 8)
