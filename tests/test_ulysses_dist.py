"""Ulysses (the default algorithm) and hybrid Ulysses x ring over real Gloo processes, forward and
backward against the float64 oracle. Each matrix is a pairwise covering table (ring_cases.pairwise):
layout x dtype (fp32, bf16, fp16) x heads (GQA with fewer K/V heads than the Ulysses degree: head
replication) x mask x head dim x batch (and odd local lengths for Ulysses, overlap and the Ulysses
degree / double ring window for hybrid) all vary independently. A hybrid double ring has
1 < window < ring size (cp / degree); a non-default softmax_scale runs through both algorithms."""

from __future__ import annotations

import pytest
import torch

from ring_ext.testing.spawn import run_distributed

from ring_cases import Case, pairwise, run_case

LAYOUTS = ("bshd", "sbhd", "bnsd", "sbh")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def ulysses_matrix(world_size: int, heads: list[tuple[int, int]], seq_per_rank: int = 6) -> list[Case]:
    rows = pairwise(
        dict(
            layout=LAYOUTS,
            dtype=DTYPES,
            heads=tuple(heads),
            causal=(True, False),
            head_dim=(16, 24, 40),
            batch=(1, 2),
            odd=(0, 1),  # odd local lengths too: Ulysses has no zigzag
        )
    )
    return [
        Case(
            algo="ulysses_cp_algo",
            causal=r["causal"],
            dtype=r["dtype"],
            heads_q=r["heads"][0],
            heads_kv=r["heads"][1],
            layout=r["layout"],
            head_dim=r["head_dim"],
            batch=r["batch"],
            seq_per_rank=seq_per_rank + r["odd"],
            seed=n,
        )
        for n, r in enumerate(rows)
    ]


# (q heads, kv heads) per world size: MHA, GQA with kv heads >= degree, and kv heads < degree
# (each K/V head replicated degree / kv_heads times).
ULYSSES_HEADS = {
    1: [(4, 4), (4, 1)],
    2: [(4, 4), (4, 2), (4, 1)],
    3: [(6, 6), (6, 3), (6, 1)],
    4: [(8, 8), (8, 4), (8, 2), (4, 1)],
}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ulysses_gloo(world_size):
    cases = ulysses_matrix(world_size, ULYSSES_HEADS[world_size])
    if world_size == 3:
        cases.append(
            Case(algo="ulysses_cp_algo", heads_q=6, heads_kv=3, softmax_scale=0.6, dtype=torch.float16)
        )
    run_distributed(run_case, world_size, cases, timeout_s=240)


def hybrid_matrix(
    world_size: int, degrees_windows: list[tuple[int, int]], seq_per_rank: int = 4
) -> list[Case]:
    rows = pairwise(
        dict(
            layout=LAYOUTS,
            dtype=DTYPES,
            degree_window=tuple(degrees_windows),
            causal=(True, False),
            overlap=(True, False),
            heads=((4, 4), (4, 2), (4, 1)),
            head_dim=(16, 24),
            batch=(1, 2),
        )
    )
    return [
        Case(
            algo="hybrid_cp_algo",
            ulysses_degree=r["degree_window"][0],
            window=r["degree_window"][1],
            causal=r["causal"],
            overlap=r["overlap"],
            dtype=r["dtype"],
            heads_q=r["heads"][0],
            heads_kv=r["heads"][1],
            layout=r["layout"],
            head_dim=r["head_dim"],
            batch=r["batch"],
            seq_per_rank=seq_per_rank,
            seed=n,
        )
        for n, r in enumerate(rows)
    ]


@pytest.mark.parametrize(
    "world_size,degrees_windows",
    [
        (2, [(2, 1), (1, 1)]),  # all-Ulysses and all-ring extremes
        # 2 Ulysses groups x a ring of 2; all-Ulysses; all-ring as a double ring (window 2 of 4)
        (4, [(2, 1), (4, 1), (1, 2)]),
    ],
)
def test_hybrid_gloo(world_size, degrees_windows):
    cases = hybrid_matrix(world_size, degrees_windows)
    for case in cases:
        ring = world_size // case.ulysses_degree
        assert case.window == 1 or 1 < case.window < ring, f"{case}: not a double ring"
    if world_size == 4:
        cases.append(Case(algo="hybrid_cp_algo", ulysses_degree=2, softmax_scale=0.21, dtype=torch.bfloat16))
    run_distributed(run_case, world_size, cases, timeout_s=240)


def test_ulysses_and_hybrid_world8_tiny():
    """8 ranks: Ulysses with MQA replication, hybrid u=2 x a double ring (window 2 of a ring of 4)."""
    cases = [
        Case(algo="ulysses_cp_algo", heads_q=8, heads_kv=1, seq_per_rank=2, seed=1),
        Case(
            algo="ulysses_cp_algo",
            causal=False,
            heads_q=8,
            heads_kv=2,
            layout="sbh",
            dtype=torch.float16,
            seq_per_rank=2,
            seed=2,
        ),
        Case(
            algo="hybrid_cp_algo",
            ulysses_degree=2,
            window=2,
            heads_q=4,
            heads_kv=1,
            batch=2,
            dtype=torch.bfloat16,
            seq_per_rank=2,
            seed=3,
        ),
        Case(
            algo="hybrid_cp_algo", ulysses_degree=4, window=1, causal=False, heads_q=4, seq_per_rank=2, seed=4
        ),
    ]
    run_distributed(run_case, 8, cases, timeout_s=240)


def test_ulysses_row_chunks():
    """Sequences longer than the CPU backward's row chunk (1024 gathered rows, Note [Ulysses row
    chunks] in csrc/cp/attention.cpp), with a short last chunk: the causal offset of each chunk, its
    rows of packed documents' and windows' visible intervals, and dK/dV of K/V heads shared by
    several ranks, summed over the chunks."""
    from packed_cases import PackedCase, run_packed_case

    cases = [
        Case(algo="ulysses_cp_algo", heads_q=6, heads_kv=3, seq_per_rank=401, dtype=torch.bfloat16),
        Case(
            algo="ulysses_cp_algo",
            causal=False,
            heads_q=3,
            heads_kv=1,
            seq_per_rank=350,
            layout="sbhd",
            batch=2,
            seed=1,
        ),
    ]
    run_distributed(run_case, 3, cases, timeout_s=240)
    packed = [
        PackedCase((700, 3, 0, 500), algo="ulysses_cp_algo", heads_q=3, heads_kv=3, seed=2),
        PackedCase((1100, 103), algo="ulysses_cp_algo", heads_q=3, heads_kv=3, sliding_window=300, seed=3),
    ]
    run_distributed(run_packed_case, 3, packed, timeout_s=240)
