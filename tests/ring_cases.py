"""One context-parallel attention case, run on every rank (tests/test_ring_dist.py,
tests/test_ulysses_dist.py, benchmarks): shard the full inputs, run forward and backward through
ring_ext.attention, unshard, compare with the float64 oracle (ring_ext/testing/tolerances.py: at most twice
PyTorch's own error in the same dtype, LSE tightly); and `pairwise`, the small covering tables the
distributed matrices are drawn from."""

from __future__ import annotations

import dataclasses
import itertools

import torch

import ring_ext
from ring_ext.attention import cp_op
from ring_ext.layouts import SEQ_DIM, from_bshd, to_bshd
from ring_ext.testing.reference import attention_reference
from ring_ext.testing.tolerances import assert_attention, assert_lse, torch_attention


@dataclasses.dataclass(frozen=True)
class Case:
    algo: str = "megatron_cp_algo"
    ulysses_degree: int | None = None  # hybrid_cp_algo only
    causal: bool = True
    window: int = 1
    overlap: bool = True
    layout: str = "bshd"
    dtype: torch.dtype = torch.float32
    batch: int = 1
    seq_per_rank: int = 8
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 16
    seed: int = 0
    softmax_scale: float | None = None  # None: 1/sqrt(head_dim)
    bnsd_flag: bool = False  # --megatron-cp-in-bnsd
    pass_layout: bool = True  # False: layout=None, the context must pick `layout` itself

    def config(self, world_size: int) -> ring_ext.CPConfig:
        return ring_ext.CPConfig(
            context_parallel_size=world_size,
            context_parallel_algo=self.algo,
            ulysses_degree_in_cp=self.ulysses_degree,
            attention_mask_type="causal" if self.causal else "general",
            cp_window_size=self.window,
            use_cp_send_recv_overlap=self.overlap,
            megatron_cp_in_bnsd=self.bnsd_flag,
        )


def full_inputs(case: Case, world_size: int):
    """q, k, v, dout over the whole sequence, [b, s, h, d], identical on every rank."""
    g = torch.Generator().manual_seed(case.seed)
    s = case.seq_per_rank * world_size
    shape_q = (case.batch, s, case.heads_q, case.head_dim)
    shape_kv = (case.batch, s, case.heads_kv, case.head_dim)
    q, k, v, dout = (
        torch.randn(sh, generator=g).to(case.dtype) for sh in (shape_q, shape_kv, shape_kv, shape_q)
    )
    return q, k, v, dout


def oracle(q, k, v, dout, causal, scale=None):
    """float64 [out, dq, dk, dv] and lse of the full sequence."""
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out, lse = attention_reference(q64, k64, v64, causal=causal, scale=scale)
    dq, dk, dv = torch.autograd.grad(out, (q64, k64, v64), dout.double())
    return [out.detach(), dq, dk, dv], lse.detach()


_CONTEXTS: dict = {}  # per worker process: (config) -> CPContext, so groups are built once per config


def context(case: Case, world_size: int):
    cfg = case.config(world_size)
    if cfg not in _CONTEXTS:
        _CONTEXTS[cfg] = ring_ext.initialize(cfg)
    return _CONTEXTS[cfg]


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A fresh contiguous tensor in layout from a [b, s, h, d] one."""
    return from_bshd(t, layout).contiguous()


def run_case(rank: int, world_size: int, case: Case):
    ctx = context(case, world_size)
    q, k, v, dout = full_inputs(case, world_size)
    seq_dim, head_dim = SEQ_DIM[case.layout], case.head_dim
    local = [ring_ext.shard(to_layout(t, case.layout), ctx, seq_dim) for t in (q, k, v, dout)]
    ql, kl, vl = (t.requires_grad_() for t in local[:3])
    kw = dict(num_heads=case.heads_q, softmax_scale=case.softmax_scale)  # num_heads: q's, for sbh
    if case.pass_layout:
        kw["layout"] = case.layout
    out_l = ring_ext.attention(ql, kl, vl, ctx, **kw)
    assert out_l.shape == ql.shape and out_l.dtype == case.dtype
    out_l.backward(local[3])
    got = [ring_ext.unshard(t.detach(), ctx, seq_dim) for t in (out_l, ql.grad, kl.grad, vl.grad)]
    got = [to_bshd(t, case.layout, head_dim) for t in got]
    expected, expected_lse = oracle(q, k, v, dout, case.causal, case.softmax_scale)
    baseline = torch_attention(q, k, v, dout, causal=case.causal, scale=case.softmax_scale)
    what = f"rank {rank}/{world_size} {case}"
    assert_attention(got, expected, baseline, what)
    lse = ring_ext.unshard(local_lse(ctx, case, *local[:3]), ctx, 2)  # [b, hq, s]
    assert_lse(lse, expected_lse, f"{what} lse")


def local_lse(ctx, case: Case, q, k, v) -> torch.Tensor:
    """This rank's float32 LSE [b, hq, s_local] from the op ring_ext.attention calls (the Python API
    returns only the output)."""
    qv, kv, vv = (to_bshd(t.detach(), case.layout, case.head_dim) for t in (q, k, v))
    scale = case.head_dim**-0.5 if case.softmax_scale is None else case.softmax_scale
    _, lse = cp_op(qv, kv, vv, ctx, scale)
    return lse.contiguous()


def pairwise(factors: dict[str, tuple]) -> list[dict]:
    """A small table of rows (dicts) in which every pair of values of every two factors appears in
    some row: a strength-2 covering array, so that no factor is aliased with another (as cycling
    them all by one row index does) while the table stays far smaller than the full product.

    Built in parameter order (IPO): the product of the first two factors, then each further factor
    filled in row by row with the value that covers the most pairs still missing (ties rotate), and
    one row added for each pair that is still missing (its other entries rotate).
    """
    names = list(factors)
    rows = [dict(zip(names[:2], pair)) for pair in itertools.product(*(factors[n] for n in names[:2]))]
    for i, name in enumerate(names[2:], 2):
        values, done = factors[name], names[:i]
        missing = {(p, a, b) for p in done for a in factors[p] for b in values}
        for r, row in enumerate(rows):

            def gain(j, row=row, r=r):
                return (sum((p, row[p], values[j]) in missing for p in done), -((j - r) % len(values)))

            row[name] = values[max(range(len(values)), key=gain)]
            missing -= {(p, row[p], row[name]) for p in done}
        for p, a, b in sorted(missing, key=repr):
            if any(row[p] == a and row[name] == b for row in rows):
                continue
            n = len(rows)
            rows.append({**{q: factors[q][n % len(factors[q])] for q in done}, p: a, name: b})
    for p, q in itertools.combinations(names, 2):  # the promise, checked
        seen = {(row[p], row[q]) for row in rows}
        assert seen == set(itertools.product(factors[p], factors[q])), (p, q)
    return rows


class Block(torch.nn.Module):
    """A model block that calls ring attention: projections, attention over the context, projection."""

    def __init__(self, ctx, hidden: int, heads: int):
        super().__init__()
        self.ctx, self.heads = ctx, heads
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.proj = torch.nn.Linear(hidden, hidden)

    def forward(self, x):  # x [s, b, hidden] (sbh)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(ring_ext.attention(q, k, v, self.ctx, layout="sbh", num_heads=self.heads))


def compile_case(rank: int, world_size: int, case: Case):
    """torch.compile(fullgraph=True) of Block matches eager, forward and backward."""
    ctx = context(case, world_size)
    torch.manual_seed(0)
    block = Block(ctx, 32, 4)
    x = ring_ext.shard(torch.randn(8 * world_size, 2, 32), ctx, 0)
    grads = []
    for fn in (block, torch.compile(block, fullgraph=True, backend="aot_eager")):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.square().sum().backward()
        grads.append((out.detach(), xi.grad, block.qkv.weight.grad.clone()))
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
