"""ring_ext.initialize(cfg, group=mesh["cp"]): context parallelism as one dimension of a DeviceMesh.

Four Gloo ranks, one spawn (ring_ext/testing/spawn.py), meshes from init_device_mesh("cpu", ...):

    ("dp", "cp") = (2, 2)   cp groups [0 1] and [2 3]: two CP groups run side by side on different data
    ("cp", "dp") = (2, 2)   cp groups [0 2] and [1 3]: CP ranks that are not consecutive world ranks
    ("dp", "cp") = (1, 4)   one CP group of 4: ring, double ring (w=2), Ulysses, hybrid (u=2)

Each case shards q/k/v over mesh["cp"] (ring_ext.shard), runs ring_ext.attention forward and backward
and compares the local output and gradients with the float64 oracle on the full tensors, sharded the
same way (float32 inputs: ring_ext/testing/tolerances.py REL_L2). Each dp replica draws its own inputs,
so a CP group that reached into the other replica would fail the comparison. A mesh of more than one
dimension is refused with a ValueError naming what to pass.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import ring_ext
from ring_ext.testing.reference import attention_reference
from ring_ext.testing.spawn import run_distributed
from ring_ext.testing.tolerances import assert_rel_l2


@dataclasses.dataclass(frozen=True)
class MeshCase:
    shape: tuple[int, int]
    names: tuple[str, str] = ("dp", "cp")
    algo: str = "megatron_cp_algo"
    window: int = 1
    ulysses_degree: int | None = None
    causal: bool = True
    overlap: bool = False
    seed: int = 0
    expect_error: bool = False  # pass the whole 2-D mesh: initialize must refuse it

    def config(self, cp: int) -> ring_ext.CPConfig:
        return ring_ext.CPConfig(
            context_parallel_size=cp,
            context_parallel_algo=self.algo,
            cp_window_size=self.window,
            ulysses_degree_in_cp=self.ulysses_degree,
            attention_mask_type="causal" if self.causal else "general",
            use_cp_send_recv_overlap=self.overlap,
        )


RING, ULYSSES, HYBRID = "megatron_cp_algo", "ulysses_cp_algo", "hybrid_cp_algo"
DP_CP, CP_DP = ("dp", "cp"), ("cp", "dp")

CASES = [
    MeshCase((2, 2), algo=RING, seed=1),
    MeshCase((2, 2), algo=RING, causal=False, overlap=True, seed=2),
    MeshCase((2, 2), algo=ULYSSES, seed=3),
    MeshCase((2, 2), CP_DP, algo=RING, overlap=True, seed=4),
    MeshCase((2, 2), CP_DP, algo=ULYSSES, causal=False, seed=5),
    MeshCase((1, 4), algo=RING, seed=6),
    MeshCase((1, 4), algo=RING, window=2, seed=7),
    MeshCase((1, 4), algo=RING, window=2, causal=False, overlap=True, seed=8),
    MeshCase((1, 4), algo=ULYSSES, seed=9),
    MeshCase((1, 4), algo=HYBRID, ulysses_degree=2, seed=10),
    MeshCase((1, 4), algo=HYBRID, ulysses_degree=2, causal=False, overlap=True, seed=11),
    MeshCase((2, 2), expect_error=True),
    MeshCase((1, 4), expect_error=True),
]

_MESHES: dict = {}  # one mesh per (shape, names) per rank process: init_device_mesh creates groups


def _mesh(case: MeshCase):
    key = (case.shape, case.names)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh("cpu", case.shape, mesh_dim_names=case.names)
    return _MESHES[key]


def run_mesh_case(rank: int, world_size: int, case: MeshCase) -> None:
    mesh = _mesh(case)
    cp_mesh = mesh["cp"]
    cp = cp_mesh.size()
    if case.expect_error:
        with pytest.raises(ValueError, match=r'mesh\["cp"\]'):
            ring_ext.initialize(case.config(cp), group=mesh)
        return
    ctx = ring_ext.initialize(case.config(cp), group=cp_mesh)
    _check_groups(ctx, cp_mesh)

    # Each dp replica its own inputs: [b, s, h, d], s = 8 per CP rank, GQA (4 q heads, 2 kv heads).
    dp_rank = mesh["dp"].get_local_rank()
    g = torch.Generator().manual_seed(1000 * case.seed + dp_rank)
    s = 8 * cp
    q, k, v, dout = (torch.randn(2, s, h, 16, generator=g) for h in (4, 2, 2, 4))

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, causal=case.causal)
    expected = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]

    ql, kl, vl = (ring_ext.shard(t, ctx, seq_dim=1).requires_grad_() for t in (q, k, v))
    out = ring_ext.attention(ql, kl, vl, ctx, layout="bshd")
    out.backward(ring_ext.shard(dout, ctx, seq_dim=1))
    what = f"{case} rank {rank}"
    for name, got, full in zip(("out", "dq", "dk", "dv"), (out, ql.grad, kl.grad, vl.grad), expected):
        want = ring_ext.shard(full, ctx, seq_dim=1)
        assert_rel_l2(got.detach(), want, torch.float32, f"{what} {name}")


def _check_groups(ctx, cp_mesh) -> None:
    """The context's group is the mesh dimension's, its rank the mesh coordinate, and every sub-group
    is made of that dimension's ranks."""
    cp_ranks = cp_mesh.mesh.tolist()
    assert ctx.group == cp_mesh.get_group()
    assert dist.get_process_group_ranks(ctx.group) == cp_ranks
    assert ctx.rank == cp_mesh.get_local_rank()
    me = dist.get_rank()
    for name in ("ring_group", "inner_group", "outer_group", "ulysses_group"):
        sub = getattr(ctx, name)
        if sub is not None:
            ranks = dist.get_process_group_ranks(sub)
            assert me in ranks and set(ranks) <= set(cp_ranks), (name, ranks, cp_ranks)
    if ctx.config.cp_window_size > 1:  # double ring: windows of consecutive ranks of the mesh dimension
        inner = dist.get_process_group_ranks(ctx.inner_group)
        w = ctx.config.cp_window_size
        assert inner == cp_ranks[ctx.rank // w * w : ctx.rank // w * w + w]
    if ctx.algo == HYBRID:  # Ulysses over consecutive ranks of the mesh dimension
        u = ctx.ulysses_degree
        assert (
            dist.get_process_group_ranks(ctx.ulysses_group)
            == cp_ranks[ctx.rank // u * u : ctx.rank // u * u + u]
        )


def test_initialize_from_mesh_dimension():
    run_distributed(run_mesh_case, 4, CASES, timeout_s=240)


def test_cases_cover_every_algorithm():
    """Every algorithm the CP size allows appears: cp 2 ring and Ulysses; cp 4 also double ring, hybrid."""
    run = [c for c in CASES if not c.expect_error]
    at_4 = {(c.algo, c.window > 1) for c in run if c.shape == (1, 4)}
    assert at_4 == {(RING, False), (RING, True), (ULYSSES, False), (HYBRID, False)}
    at_2 = {c.algo for c in run if c.shape == (2, 2)}
    assert at_2 == {RING, ULYSSES}
