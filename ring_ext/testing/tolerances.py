"""The one tolerance rule of the test suite (flash-attention's): ours may be at most twice as far from
the float64 oracle as PyTorch's own attention in the same dtype.

Every attention result (out, dq, dk, dv) in input dtype D is compared with the float64 oracle
(ring_ext.testing.reference) computed from the same, already rounded, inputs; the yardstick is PyTorch's
attention run in D on those inputs (`torch_attention`: F.scaled_dot_product_attention, with an explicit
mask where is_causal cannot express the offsets). Two measures, the same rule for both:

    whole tensor   rel_l2(ours)   <= 2 * rel_l2(pytorch)   + FLOOR[D]
    worst row      max_row(ours)  <= 2 * max_row(pytorch)  + ROW_FLOOR[out or grad][D]

A row is one head's vector (the last dim) at one (batch, position, head); its error is relative to its
own norm, so a late causal row, whose values are small, counts as much as an early one (rows whose
oracle is far below the typical row, like dq of causal row 0, which is exactly 0, are measured against
ROW_NORM_FLOOR of the RMS row norm instead). The worst-row measure is what sees one bad row: a mask
leaking one future key into one row moves the whole-tensor error by 1e-4 (less than bf16 rounding
itself) but that row by up to percents. LSE, float32 whatever D is, is held tightly: the same -inf rows
as the oracle and |lse - oracle| <= LSE_ATOL + LSE_RTOL * |oracle|. A one-key leak moves a row's LSE by
about the leaked key's probability (1e-4 at s=2048, 50x float32's error there), which is what sees a
leak too faint for a bf16 output row to show (tests/test_tolerances.py: the numbers).

The floors cover what rounding does where a factor of 2 says nothing, measured over this suite (the
largest floor any case needed, in brackets):
  - fp32, where both errors are ~1e-7: summing the keys in another order (whole tensor 4e-7; a row 2e-7,
    a gradient row 4e-6);
  - a gradient row that is ill-conditioned: dq of a row that sees few keys is a difference dP - D of
    nearly equal numbers, D from the output rounded to D, so ours and PyTorch's each land anywhere
    within a few roundings (bf16 2.3 u, fp16 3 u, u = D's unit roundoff): 6 u;
  - in half precision elsewhere, a quarter of u (none needed: ours is below PyTorch's error).

Results that are not attention in a low precision (fp32 merges, model logits, float64 FFN gradients)
keep a plain relative L2 bound, REL_L2, for float32 and float64 only: half precision has no fixed bound.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .reference import dense_mask

FACTOR = 2.0

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
_U_BF16, _U_FP16 = UNIT_ROUNDOFF[torch.bfloat16], UNIT_ROUNDOFF[torch.float16]
FLOOR = {torch.float32: 2e-6, torch.bfloat16: _U_BF16 / 4, torch.float16: _U_FP16 / 4}
ROW_FLOOR = {
    "out": {torch.float32: 2e-6, torch.bfloat16: _U_BF16 / 4, torch.float16: _U_FP16 / 4},
    "grad": {torch.float32: 2e-5, torch.bfloat16: 6 * _U_BF16, torch.float16: 6 * _U_FP16},
}
ROW_NORM_FLOOR = 0.1

LSE_ATOL, LSE_RTOL = 1e-5, 2e-6

REL_L2 = {torch.float64: 1e-10, torch.float32: 2e-5}

# Long float32 sums, checked without a floor (tests/test_kernels.py, test_fp32_error_of_long_sums): at
# S = 2048 every output and gradient within 1.5x PyTorch's own whole-tensor error (Note [Blocked
# accumulation] in csrc/cpu/tiles_generic.h; before it, dK/dV were 2.6x).
FP32_LONG_FACTOR = 1.5


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff if denom == 0.0 else diff / denom


def max_row_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max over rows (every index but the last dim) of ||row error|| / ||oracle row||."""
    if expected.numel() == 0:
        return 0.0
    a = actual.double().reshape(-1, actual.shape[-1])  # [rows, head_dim]
    e = expected.double().reshape(-1, expected.shape[-1])
    norms = e.norm(dim=-1)
    floor = ROW_NORM_FLOOR * e.norm().item() / math.sqrt(norms.numel())
    if floor == 0.0:
        return (a - e).norm(dim=-1).max().item()
    return ((a - e).norm(dim=-1) / norms.clamp_min(floor)).max().item()


def torch_attention(
    q, k, v, dout=None, *, causal: bool, scale=None, q_offset: int = 0, k_offset: int = 0, mask=None
):
    """PyTorch's own attention in q's dtype on q's device, [b, s, h, d] in and out (k, v may have fewer
    heads): [out], or [out, dq, dk, dv] when dout is given. The mask is the oracle's
    (ring_ext.testing.reference.dense_mask: top-left causal, rows at q_offset + i attend to keys at
    k_offset + j <= it), or `mask` ([sq, sk] bool) when given; rows that see no key give 0 (SDPA's NaN
    there is replaced)."""
    grad = dout is not None
    qs, ks, vs = (t.detach().transpose(1, 2).requires_grad_(grad) for t in (q, k, v))  # [b, h, s, d]
    is_causal = False
    if mask is not None:
        mask = mask.to(q.device)
    elif causal and q_offset == k_offset:
        is_causal = True
    elif causal:
        mask = dense_mask(q.shape[1], k.shape[1], True, q_offset, k_offset, q.device)
    with torch.enable_grad():
        out = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
        )
        if not grad:
            return [out.detach().nan_to_num(0.0).transpose(1, 2)]
        grads = torch.autograd.grad(out, (qs, ks, vs), dout.transpose(1, 2))
    return [t.nan_to_num(0.0).transpose(1, 2) for t in (out.detach(), *grads)]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Both measures of one result against the oracle, with PyTorch's error as the yardstick."""

    what: str
    dtype: torch.dtype
    err: float
    bound: float
    row_err: float
    row_bound: float

    @property
    def ok(self) -> bool:
        return self.err <= self.bound and self.row_err <= self.row_bound

    def __str__(self) -> str:
        return (
            f"{self.what} ({self.dtype}): rel L2 {self.err:.2e} (bound {self.bound:.2e}), "
            f"worst row {self.row_err:.2e} (bound {self.row_bound:.2e}); "
            f"bound = {FACTOR:g} x PyTorch's error + floor"
        )


def judge(actual, expected, baseline, what: str = "", grad: bool = False) -> Verdict:
    """The rule, without asserting. baseline: PyTorch's result in the input dtype (its dtype is D);
    grad: actual is a gradient (dq, dk, dv), whose rows may be ill-conditioned."""
    dtype = baseline.dtype
    return Verdict(
        what,
        dtype,
        rel_l2(actual, expected),
        FACTOR * rel_l2(baseline, expected) + FLOOR[dtype],
        max_row_err(actual, expected),
        FACTOR * max_row_err(baseline, expected) + ROW_FLOOR["grad" if grad else "out"][dtype],
    )


def assert_close_to_oracle(actual, expected, baseline, what: str = "", grad: bool = False) -> None:
    """actual (ours) against expected (the float64 oracle), held to 2x baseline's (PyTorch's) error."""
    assert actual.shape == expected.shape == baseline.shape, (
        f"{what}: shapes {tuple(actual.shape)}, oracle {tuple(expected.shape)}, "
        f"PyTorch {tuple(baseline.shape)}"
    )
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    verdict = judge(actual, expected, baseline, what, grad)
    assert verdict.ok, str(verdict)


def assert_attention(
    got, expected, baseline, what: str = "", names=("out", "dq", "dk", "dv"), dq_rows=None
) -> None:
    """assert_close_to_oracle for each of (out, dq, dk, dv).

    dq_rows (bool [seq], packed documents and windows): the rows whose dq is held to the worst-row
    measure; the whole-tensor measure still covers every row. A query that sees only a few keys (the
    first tokens of every document) has an ill-conditioned dq, sum_j P_j (dP_j - D) with D from the
    rounded output: measured 28 u in float16 for a row of two keys, bit for bit what the dense kernel
    gives on that document alone (tests/test_packed.py), so no floor fits it without blinding the row
    measure elsewhere."""
    assert len(got) == len(expected) == len(baseline)
    for name, a, e, b in zip(names, got, expected, baseline):
        if name == "dq" and dq_rows is not None:
            verdict = judge(a, e, b, f"{what} dq (all rows)", grad=True)
            assert verdict.err <= verdict.bound, str(verdict)
            a, e, b = (t[:, dq_rows] for t in (a, e, b))
        assert_close_to_oracle(a, e, b, f"{what} {name}", grad=name != "out")


def assert_lse(lse: torch.Tensor, expected: torch.Tensor, what: str = "lse") -> None:
    """float32 LSE against the float64 oracle: the same -inf rows, and a tight bound elsewhere."""
    assert lse.dtype == torch.float32, f"{what}: dtype {lse.dtype}, expected torch.float32"
    assert lse.shape == expected.shape, f"{what}: shape {tuple(lse.shape)} != {tuple(expected.shape)}"
    seen = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(lse), seen), f"{what}: -inf rows differ from the oracle's"
    a, e = lse[seen].double(), expected[seen].double()
    excess = ((a - e).abs() - (LSE_ATOL + LSE_RTOL * e.abs())).max().item() if e.numel() else -1.0
    worst = (a - e).abs().max().item() if e.numel() else 0.0
    assert excess <= 0, f"{what}: |lse - oracle| up to {worst:.2e} > {LSE_ATOL:g} + {LSE_RTOL:g} |oracle|"


def assert_rel_l2(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Relative L2 against an oracle, for float32/float64 results that have no PyTorch yardstick."""
    assert dtype in REL_L2, (
        f"{what}: no fixed bound in {dtype}: compare half precision with assert_close_to_oracle "
        "(2x PyTorch's own error in the same dtype)"
    )
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err, bound = rel_l2(actual, expected), REL_L2[dtype]
    assert err <= bound, f"{what}: relative L2 error {err:.3e} > {bound:.1e} ({dtype})"
