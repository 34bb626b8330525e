"""Ulysses (the default algorithm) and hybrid Ulysses x ring over real Gloo processes, forward and
backward against the float64 oracle: causal and general, every layout, GQA with fewer K/V heads than
the Ulysses degree (head replication), fp32 and bf16, overlap on and off, hybrid with a double ring."""

from __future__ import annotations

import itertools

import pytest
import torch

from distributed import run_distributed
from ring_cases import Case, run_case

LAYOUTS = ("bshd", "sbhd", "bnsd", "sbh")


def ulysses_matrix(world_size: int, heads: list[tuple[int, int]], seq_per_rank: int = 6) -> list[Case]:
    """causal x dtype x heads, layouts and head dims cycled through."""
    cases = []
    for n, (causal, dtype, (hq, hkv)) in enumerate(
        itertools.product((True, False), (torch.float32, torch.bfloat16), heads)
    ):
        cases.append(
            Case(
                algo="ulysses_cp_algo",
                causal=causal,
                dtype=dtype,
                heads_q=hq,
                heads_kv=hkv,
                layout=LAYOUTS[n % 4],
                head_dim=(16, 24, 40)[n % 3],
                batch=1 + n % 2,
                seq_per_rank=seq_per_rank + n % 2,  # odd local lengths too: Ulysses has no zigzag
                seed=n,
            )
        )
    return cases


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
    run_distributed(
        run_case, world_size, ulysses_matrix(world_size, ULYSSES_HEADS[world_size]), timeout_s=240
    )


def hybrid_matrix(
    world_size: int, degrees_windows: list[tuple[int, int]], seq_per_rank: int = 4
) -> list[Case]:
    cases = []
    combos = itertools.product(degrees_windows, (True, False), (True, False), (torch.float32, torch.bfloat16))
    for n, ((u, window), causal, overlap, dtype) in enumerate(combos):
        hq, hkv = ((4, 4), (4, 2), (4, 1))[n % 3]
        cases.append(
            Case(
                algo="hybrid_cp_algo",
                ulysses_degree=u,
                window=window,
                causal=causal,
                overlap=overlap,
                dtype=dtype,
                heads_q=hq,
                heads_kv=hkv,
                layout=LAYOUTS[n % 4],
                head_dim=(16, 24)[n % 2],
                seq_per_rank=seq_per_rank,
                seed=n,
            )
        )
    return cases


@pytest.mark.parametrize(
    "world_size,degrees_windows",
    [
        (2, [(2, 1), (1, 1)]),  # all-Ulysses and all-ring extremes
        (4, [(2, 1), (2, 2)]),  # 2 Ulysses groups x ring of 2
    ],
)
def test_hybrid_gloo(world_size, degrees_windows):
    run_distributed(run_case, world_size, hybrid_matrix(world_size, degrees_windows), timeout_s=240)


def test_ulysses_and_hybrid_world8_tiny():
    """8 ranks: Ulysses with MQA replication, hybrid u=2 x a double ring (window 2 of a ring of 4)."""
    cases = [
        Case(algo="ulysses_cp_algo", heads_q=8, heads_kv=1, seq_per_rank=2, seed=1),
        Case(
            algo="ulysses_cp_algo", causal=False, heads_q=8, heads_kv=2, layout="sbh", seq_per_rank=2, seed=2
        ),
        Case(
            algo="hybrid_cp_algo", ulysses_degree=2, window=2, heads_q=4, heads_kv=1, seq_per_rank=2, seed=3
        ),
        Case(
            algo="hybrid_cp_algo", ulysses_degree=4, window=1, causal=False, heads_q=4, seq_per_rank=2, seed=4
        ),
    ]
    run_distributed(run_case, 8, cases, timeout_s=240)
