"""The one tolerance rule of the test suite.

Every result is compared with the float64 oracle (ring_ext.reference) computed from the *same*
(already rounded) inputs, by relative L2 error ||actual - expected|| / ||expected||, with a bound that
depends only on the input dtype. The bounds are the contract of the issues: fp32 2e-5, bf16 1e-2,
fp16 2e-3 (float64 is for gradcheck-sized exactness checks).
"""

from __future__ import annotations

import torch

REL_L2 = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff if denom == 0.0 else diff / denom


def assert_rel_l2(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err, bound = rel_l2(actual, expected), REL_L2[dtype]
    assert err <= bound, f"{what}: relative L2 error {err:.3e} > {bound:.1e} ({dtype})"
