"""Ring and double ring attention over real Gloo processes, forward and backward against the float64 oracle.

One spawn per world size runs a whole batch of cases (tests/distributed.py); the matrix covers causal and
general masks, windows, overlap on and off, every layout, MHA/GQA/MQA, odd head dims, fp32 and bf16.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from distributed import run_distributed
from ring_cases import Case, run_case

LAYOUTS = ("bshd", "sbhd", "bnsd", "sbh")
HEADS = ((4, 4), (4, 2), (6, 1))  # MHA, GQA, MQA


def matrix(world_size: int, windows: tuple[int, ...], seq_per_rank: int = 8) -> list[Case]:
    """causal x window x overlap x dtype, with layouts, head counts and head dims cycled through."""
    cases = []
    combos = itertools.product((True, False), windows, (True, False), (torch.float32, torch.bfloat16))
    for n, (causal, window, overlap, dtype) in enumerate(combos):
        hq, hkv = HEADS[n % len(HEADS)]
        cases.append(
            Case(
                causal=causal,
                window=window,
                overlap=overlap,
                dtype=dtype,
                layout=LAYOUTS[n % 4],
                heads_q=hq,
                heads_kv=hkv,
                head_dim=(16, 24, 7)[n % 3],
                batch=1 + n % 2,
                seq_per_rank=seq_per_rank,
                seed=n,
            )
        )
    return cases


@pytest.mark.parametrize("world_size,windows", [(1, (1,)), (2, (1, 2)), (3, (1, 3)), (4, (1, 2))])
def test_ring_gloo(world_size, windows):
    run_distributed(run_case, world_size, matrix(world_size, windows), timeout_s=240)


def test_ring_gloo_world8_tiny():
    cases = [c for c in matrix(8, (1, 2, 4), seq_per_rank=2) if c.dtype == torch.float32 or c.window == 4]
    run_distributed(run_case, 8, cases, timeout_s=240)


def test_ring_gloo_layout_sweep():
    """Every layout with causal double ring at 4 ranks (the matrix cycles layouts; this pins each)."""
    cases = [Case(layout=lay, window=2, heads_q=4, heads_kv=1, seed=7) for lay in LAYOUTS]
    run_distributed(run_case, 4, cases, timeout_s=120)
