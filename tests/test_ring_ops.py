"""The ring ops in one process (a world of one Gloo rank): fullgraph compile, errors (opcheck samples
live in tests/test_ops.py with every other op's).

Multi-rank behaviour is in tests/test_ring_dist.py."""

from __future__ import annotations

import pytest
import torch

import ring_ext
from ring_ext.testing.spawn import run_distributed

from ring_cases import Block, Case, compile_case

RING = dict(context_parallel_size=1, context_parallel_algo="megatron_cp_algo")


def qkv(dtype=torch.float32, s=8, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, s, 4, 8, generator=g, dtype=dtype)
    k, v = (torch.randn(2, s, 2, 8, generator=g, dtype=dtype) for _ in range(2))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def test_fullgraph_compile_matches_eager_inductor(world):
    ctx = ring_ext.initialize(ring_ext.CPConfig(**RING))
    torch.manual_seed(0)
    block = Block(ctx, 32, 4)
    x = torch.randn(8, 2, 32)
    results = []
    for fn in (block, torch.compile(block, fullgraph=True)):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, block.qkv.weight.grad.clone()))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_fullgraph_compile_two_ranks():
    run_distributed(compile_case, 2, [Case(causal=True, overlap=True)], timeout_s=180)


@pytest.mark.parametrize("algo", ["ulysses_cp_algo", "hybrid_cp_algo"])
def test_ulysses_and_hybrid_on_one_rank(world, algo):
    """With one rank the all-to-alls are identities: the result is plain attention."""
    extra = dict(ulysses_degree_in_cp=1) if algo == "hybrid_cp_algo" else {}
    ctx = ring_ext.initialize(ring_ext.CPConfig(context_parallel_size=1, context_parallel_algo=algo, **extra))
    q, k, v = qkv(requires_grad=True)
    out = ring_ext.attention(q, k, v, ctx)
    ref = ring_ext.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_initialize_checks_the_group(world):
    with pytest.raises(ValueError, match="context_parallel_size"):
        ring_ext.initialize(
            ring_ext.CPConfig(context_parallel_size=2, context_parallel_algo="megatron_cp_algo")
        )
    with pytest.raises(TypeError, match="CPConfig"):
        ring_ext.initialize({"context_parallel_size": 1})


def test_bad_inputs_name_the_argument(world):
    ctx = ring_ext.initialize(ring_ext.CPConfig(**RING))
    q, k, v = qkv()
    with pytest.raises(ValueError, match="dtype"):
        ring_ext.attention(q, k.double(), v, ctx)
    with pytest.raises(ValueError, match="kv heads"):
        ring_ext.attention(torch.randn(2, 8, 3, 8), k, v, ctx)
    with pytest.raises(ValueError, match="divisible by 2"):
        ring_ext.attention(*qkv(s=7), ctx)
    with pytest.raises(ValueError, match="causal"):
        ring_ext.attention(q, k, v, ctx, causal=False)
    with pytest.raises(ValueError, match="num_heads"):
        ring_ext.attention(q.flatten(-2), k.flatten(-2), v.flatten(-2), ctx, layout="sbh")
    with pytest.raises(RuntimeError, match="process group"):
        torch.ops.ring_ext.attention(q, k, v, 1.0, True, "megatron_cp_algo", "")
