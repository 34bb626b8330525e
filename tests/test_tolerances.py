"""The tolerance rule sees the bug it is there for (ring_ext/testing/tolerances.py).

A result is built with a deliberately leaky causal mask: one row (the last row that has a future
key, in one (batch, head)) also sees the next key. It is computed in float64 and rounded to the
input dtype, so the only error beyond one rounding is the leak. The rule must reject it, and the
honest result (our kernel on the same inputs) must pass. At seed 0 (`python tests/test_tolerances.py`
prints these):

    dtype  s     old rule: rel L2 vs 1e-2 / 2e-3   whole tensor vs bound   worst row vs bound   max |LSE error|
    bf16   77    2.5e-3  passes the leak            2.5e-3 <= 4.7e-3        1.1e-1 > 7.0e-3      1.8e-2
    bf16   2048  1.6e-3  passes the leak            1.6e-3 <= 5.1e-3        1.1e-2 > 7.5e-3      3.6e-4
    fp16   77    1.9e-3  passes the leak            1.9e-3 >  5.9e-4        1.1e-1 > 8.8e-4      1.8e-2
    fp16   2048  2.1e-4  passes the leak            2.1e-4 <= 6.5e-4        1.1e-2 > 9.4e-4      3.6e-4
    ours         (the honest result)                1.6e-3 / 2.0e-4         2.4e-3 / 3.1e-4      8.6e-7

(LSE bound: 1e-5 + 2e-6 |lse|, about 2.5e-5.) The whole-tensor norm dilutes one row by the number of
rows; the worst row sees the leak. The LSE sees it with the widest margin: over 8 seeds and two
leaked rows each, a bf16 output row at s=2048 showed the leak in only 9 of 16 draws (a leaked key of
probability ~1e-4 moves a row by about one bf16 rounding), the float32 LSE in all 16, by 2.6x or more.
"""

from __future__ import annotations

import math

import pytest
import torch

import ring_ext
from ring_ext.testing.reference import attention_reference, dense_mask
from ring_ext.testing.tolerances import REL_L2, assert_lse, assert_rel_l2, judge, rel_l2, torch_attention

OLD_REL_L2 = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # the global bounds this rule replaced


def leaky_reference(q, k, v, row: int, batch: int, head: int):
    """float64 (out, lse) of causal attention in which `row` of (batch, head) also sees key row + 1."""
    q, k, v = (t.double() for t in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    mask = dense_mask(q.shape[1], k.shape[1], True).expand(s.shape).clone()  # [b, h, sq, sk]
    mask[batch, head, row, row + 1] = True
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # [b, h, sq]
    return torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse[..., None]), v), lse


def leak_case(dtype, seq, seed=0):
    """(verdict on the leaky output, verdict on ours, the leaky LSE, the oracle's LSE, ours's LSE,
    the leaky output's relative L2 error)."""
    b, h, d = (2, 4, 64) if seq < 1000 else (1, 2, 64)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, seq, h, d, generator=g).to(dtype) for _ in range(3))
    expected, expected_lse = attention_reference(q, k, v, causal=True)
    baseline = torch_attention(q, k, v, causal=True)[0]
    leaky, leaky_lse = leaky_reference(q, k, v, row=seq - 2, batch=b - 1, head=h - 1)
    leaky = leaky.to(dtype)  # one rounding, as a kernel would store it
    ours, ours_lse = torch.ops.ring_ext.fwd(q, k, v, d**-0.5, True)
    return (
        judge(leaky, expected, baseline, f"leaky {dtype} s={seq}"),
        judge(ours, expected, baseline, f"ours {dtype} s={seq}"),
        leaky_lse.float(),
        expected_lse,
        ours_lse,
        rel_l2(leaky, expected),
    )


CASES = [(dtype, seq) for dtype in (torch.bfloat16, torch.float16) for seq in (77, 2048)]


@pytest.mark.parametrize("dtype,seq", CASES, ids=[f"{str(d)[6:]}-s{s}" for d, s in CASES])
def test_rule_rejects_a_one_key_mask_leak(dtype, seq):
    leaky, ours, leaky_lse, expected_lse, ours_lse, leaky_err = leak_case(dtype, seq)
    assert leaky_err <= OLD_REL_L2[dtype], "the old global bound already rejected this leak"
    assert ours.ok, f"the honest result fails the rule: {ours}"
    assert_lse(ours_lse, expected_lse, "ours")
    with pytest.raises(AssertionError, match="lse - oracle"):
        assert_lse(leaky_lse, expected_lse, "leaky")
    assert not leaky.ok and leaky.row_err > leaky.row_bound, f"the leak passes: {leaky}"


def test_plain_bounds_are_for_full_precision_only():
    """Half precision has no fixed bound: assert_rel_l2 refuses it rather than apply one."""
    assert set(REL_L2) == {torch.float32, torch.float64}
    x = torch.ones(4, dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="no fixed bound"):
        assert_rel_l2(x, x.double(), torch.bfloat16)


def test_rule_accepts_pytorch_itself_and_ring_ext_attention():
    """The yardstick passes its own rule, and so does ring_ext.attention on a small GQA case."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 40, 4, 16, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(2, 40, 2, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    expected, _ = attention_reference(q, k, v, causal=False, scale=0.4)
    baseline = torch_attention(q, k, v, causal=False, scale=0.4)[0]
    assert judge(baseline, expected, baseline).ok
    assert judge(ring_ext.attention(q, k, v, causal=False, softmax_scale=0.4), expected, baseline).ok


if __name__ == "__main__":  # the table in the docstring
    for dtype, seq in CASES:
        leaky, ours, leaky_lse, expected_lse, ours_lse, err = leak_case(dtype, seq)
        seen = torch.isfinite(expected_lse)
        lse_err = (leaky_lse.double() - expected_lse)[seen].abs().max().item()
        ours_lse_err = (ours_lse.double() - expected_lse)[seen].abs().max().item()
        print(f"{leaky}; LSE {lse_err:.1e} (ours {ours_lse_err:.1e}); old rel L2 {err:.1e}")
        print(f"    {ours}")
