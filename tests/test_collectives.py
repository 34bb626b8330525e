"""The Python API's collectives (ring_ext/collectives.py) over 3 real Gloo ranks: values against what
every rank contributed, on fresh random inputs. They exist so that no tensor Python has seen is handed
to c10d (tests/test_teardown.py has the crash that prevents)."""

from __future__ import annotations

import pytest
import torch

import ring_ext
from ring_ext.collectives import all_gather
from ring_ext.testing.spawn import run_distributed

WORLD = 3


def _contribution(rank: int, shape, dtype=torch.float32, salt: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * salt + rank)
    return torch.randn(shape, generator=g).to(dtype)


def _check(rank: int, world_size: int, _case) -> None:
    ctx = ring_ext.initialize(ring_ext.CPConfig(context_parallel_size=world_size))
    everyone = range(world_size)

    # all_gather: group-rank order, a non-contiguous input, the input untouched.
    x = _contribution(rank, (5, 4), salt=1).t()
    before = x.clone()
    parts = all_gather(x, ctx)
    assert len(parts) == world_size
    for r, part in zip(everyone, parts):
        torch.testing.assert_close(part, _contribution(r, (5, 4), salt=1).t(), rtol=0, atol=0)
    torch.testing.assert_close(x, before, rtol=0, atol=0)

    # all_reduce: sum and max as new tensors; the input untouched.
    y = _contribution(rank, (7,), torch.float64, salt=2)
    total = ring_ext.all_reduce(y, ctx)
    expected = sum(_contribution(r, (7,), torch.float64, salt=2) for r in everyone)
    torch.testing.assert_close(total, expected, rtol=1e-15, atol=1e-15)
    top = ring_ext.all_reduce(y, ctx, op="max")
    expected_max = torch.stack([_contribution(r, (7,), torch.float64, salt=2) for r in everyone]).amax(0)
    torch.testing.assert_close(top, expected_max, rtol=0, atol=0)
    torch.testing.assert_close(y, _contribution(rank, (7,), torch.float64, salt=2), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="op must be 'sum' or 'max'"):
        ring_ext.all_reduce(y, ctx, op="min")

    # reduce_gradients: mixed dtypes, a parameter without gradient, a non-contiguous gradient.
    params = [
        torch.nn.Parameter(torch.zeros(3, 2)),
        torch.nn.Parameter(torch.zeros(4)),
        torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)),
        torch.nn.Parameter(torch.zeros(1)),
    ]
    params[0].grad = _contribution(rank, (2, 3), salt=3).t()
    params[1].grad = _contribution(rank, (4,), salt=4)
    params[2].grad = _contribution(rank, (2,), torch.float64, salt=5)
    ring_ext.reduce_gradients(params, ctx)
    for p, shape, dtype, salt, t in (
        (params[0], (2, 3), torch.float32, 3, True),
        (params[1], (4,), torch.float32, 4, False),
        (params[2], (2,), torch.float64, 5, False),
    ):
        want = sum(_contribution(r, shape, dtype, salt) for r in everyone)
        torch.testing.assert_close(p.grad, want.t() if t else want, rtol=1e-6, atol=1e-6)
    assert params[3].grad is None


def test_collectives_world3():
    run_distributed(_check, WORLD, [None])
