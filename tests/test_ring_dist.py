"""Ring and double ring attention over real Gloo processes, forward and backward against the float64 oracle.

One spawn per world size runs a whole batch of cases (ring_ext/testing/spawn.py). The matrix is a pairwise
covering table (ring_cases.pairwise) over layout x dtype (fp32, bf16, fp16) x heads (MHA/GQA/MQA) x
head dim x mask x overlap x window x batch: every two of them vary independently, in 12-16 cases per
world. A double ring always has 1 < window < cp (window == cp is the plain ring). The world-2 spawn
also carries the API cases: a non-default softmax_scale, and layout=None (the context picks bnsd
under --megatron-cp-in-bnsd, else sbh for 3-D and bshd for 4-D inputs).
"""

from __future__ import annotations

import pytest
import torch

from ring_ext.testing.spawn import run_distributed

from ring_cases import Case, pairwise, run_case

LAYOUTS = ("bshd", "sbhd", "bnsd", "sbh")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEADS = ((4, 4), (4, 2), (6, 1))  # MHA, GQA, MQA

# Double ring windows per world size: only 1 < window < cp is a double ring.
WINDOWS = {1: (1,), 2: (1,), 3: (1,), 4: (1, 2), 8: (1, 2, 4)}


def matrix(world_size: int, seq_per_rank: int = 8) -> list[Case]:
    rows = pairwise(
        dict(
            layout=LAYOUTS,
            dtype=DTYPES,
            heads=HEADS,
            head_dim=(16, 24, 7),
            causal=(True, False),
            overlap=(True, False),
            window=WINDOWS[world_size],
            batch=(1, 2),
        )
    )
    return [
        Case(
            causal=r["causal"],
            window=r["window"],
            overlap=r["overlap"],
            dtype=r["dtype"],
            layout=r["layout"],
            heads_q=r["heads"][0],
            heads_kv=r["heads"][1],
            head_dim=r["head_dim"],
            batch=r["batch"],
            seq_per_rank=seq_per_rank,
            seed=n,
        )
        for n, r in enumerate(rows)
    ]


# Through ring_ext.attention with a context: a non-default softmax_scale (half and fp32, causal and
# general), and layout=None.
API_CASES = [
    Case(softmax_scale=0.37, dtype=torch.float16, layout="sbhd", seed=101),
    Case(softmax_scale=1.9, causal=False, dtype=torch.bfloat16, batch=2, seed=102),
    Case(softmax_scale=0.05, layout="sbh", seed=103),
    Case(layout="bnsd", bnsd_flag=True, pass_layout=False, dtype=torch.bfloat16, seed=104),
    Case(layout="sbh", pass_layout=False, causal=False, seed=105),
    Case(layout="bshd", pass_layout=False, dtype=torch.float16, batch=2, seed=106),
]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_gloo(world_size):
    cases = matrix(world_size) + (API_CASES if world_size == 2 else [])
    run_distributed(run_case, world_size, cases, timeout_s=240)


def test_ring_gloo_world8_tiny():
    run_distributed(run_case, 8, matrix(8, seq_per_rank=2), timeout_s=240)


def test_ring_gloo_layout_sweep():
    """Every layout with causal double ring at 4 ranks (the matrix covers layouts pairwise; this pins each)."""
    cases = [Case(layout=lay, window=2, heads_q=4, heads_kv=1, seed=7) for lay in LAYOUTS]
    run_distributed(run_case, 4, cases, timeout_s=120)


def test_matrices_cover_every_pair():
    """No factor of the distributed matrices is aliased with another (pairwise checks its table), and
    every double ring is a real one."""
    for world in WINDOWS:
        cases = matrix(world)
        assert all(c.window == 1 or 1 < c.window < world for c in cases)
        assert {c.dtype for c in cases} == set(DTYPES)
        assert len(cases) <= 16
