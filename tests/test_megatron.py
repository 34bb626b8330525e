"""Megatron-style code on ring_ext (Note [Output contract] in csrc/cp/attention.cpp): q, k, v from one
fused QKV projection (`proj(x).chunk(3, -1)`, strided views), the context layer `.view()`-ed and fed to
the output linear, in MindSpeed's two layouts (sbh, and bnsd under --megatron-cp-in-bnsd), with every
algorithm, eagerly and under torch.compile(fullgraph=True) (inductor: it asserts the fake kernel's
strides at run time). Output, input gradient and weight gradients (summed over the CP group) match the
same layer in float64 over the whole sequence, and compiled matches eager."""

from __future__ import annotations

import pytest
import torch

import ring_ext
from ring_ext.testing.reference import attention_reference
from ring_ext.testing.spawn import run_distributed
from ring_ext.testing.tolerances import REL_L2, rel_l2

SEQ, BATCH, HEADS, HEAD_DIM = 32, 2, 4, 8
HIDDEN = HEADS * HEAD_DIM
CP = 4

ALGOS = {
    "ring": dict(context_parallel_algo="megatron_cp_algo"),
    "double_ring": dict(context_parallel_algo="megatron_cp_algo", cp_window_size=2),
    "ulysses": dict(context_parallel_algo="ulysses_cp_algo"),
    "hybrid": dict(context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2),
}


class MegatronAttention(torch.nn.Module):
    """x [s, b, hidden] -> [s, b, hidden]: fused QKV, attention in `layout`, output projection."""

    def __init__(self, layout: str):
        super().__init__()
        self.layout = layout
        self.qkv = torch.nn.Linear(HIDDEN, 3 * HIDDEN, bias=False)
        self.dense = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x, attn):
        s, b, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # [s, b, h * d] each, views of the fused output
        if self.layout == "sbh":
            context = attn(q, k, v).view(s * b, HIDDEN)  # [s, b, h * d] -> [s * b, h * d]
        else:  # bnsd: [s, b, h * d] -> [b, h, s, d] views
            q, k, v = (t.view(s, b, HEADS, HEAD_DIM).permute(1, 2, 0, 3) for t in (q, k, v))
            out = attn(q, k, v).view(b * HEADS, s * HEAD_DIM)  # needs bnsd-contiguous
            context = out.view(b, HEADS, s, HEAD_DIM).permute(2, 0, 1, 3).reshape(s * b, HIDDEN)
        return self.dense(context).view(s, b, HIDDEN)


def reference_attention(layout):
    """Float64 attention over the whole sequence in `layout` (the oracle; causal)."""

    def attn(q, k, v):
        if layout == "sbh":  # [s, b, h * d] -> [b, s, h, d]
            q, k, v = (t.unflatten(-1, (HEADS, HEAD_DIM)).transpose(0, 1) for t in (q, k, v))
            out, _ = attention_reference(q, k, v, causal=True)
            return out.transpose(0, 1).flatten(-2).contiguous()
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, s, d] -> [b, s, h, d]
        out, _ = attention_reference(q, k, v, causal=True)
        return out.transpose(1, 2).contiguous()

    return attn


def _inputs(layout):
    g = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    layer = MegatronAttention(layout)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    weight = torch.randn(SEQ, BATCH, HIDDEN, generator=g)  # loss = sum(out * weight)
    return layer, x, weight


def _grads(layer, x, weight, attn, fn=None):
    x = x.detach().requires_grad_(True)
    run = fn or (lambda x: layer(x, attn))
    out = run(x)
    (out * weight).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    return out.detach(), x.grad, grads


def megatron_case(rank, world_size, case):
    algo, layout = case
    layer, x, weight = _inputs(layout)
    ref_out, ref_dx, ref_grads = _grads(
        layer.double(), x.double(), weight.double(), reference_attention(layout)
    )
    layer.float()
    cfg = ring_ext.CPConfig(context_parallel_size=world_size, **ALGOS[algo])
    ctx = ring_ext.initialize(cfg)
    x_l, w_l = (ring_ext.shard(t, ctx, seq_dim=0) for t in (x, weight))

    def attn(q, k, v):
        return ring_ext.attention(q, k, v, ctx, layout=layout, num_heads=HEADS)

    def step(x):
        return layer(x, attn)

    eager = _grads(layer, x_l, w_l, attn)
    compiled = _grads(layer, x_l, w_l, attn, torch.compile(step, fullgraph=True))
    for label, (out, dx, grads) in (("eager", eager), ("compiled", compiled)):
        for p in grads.values():
            torch.distributed.all_reduce(p)  # each rank's share of the weight gradients
        checks = [("out", out, ring_ext.shard(ref_out, ctx, seq_dim=0))]
        checks.append(("dx", dx, ring_ext.shard(ref_dx, ctx, seq_dim=0)))
        checks += [(f"d{n}", grads[n], ref_grads[n]) for n in ref_grads]
        for what, actual, expected in checks:
            err = rel_l2(actual, expected)
            assert err <= REL_L2[torch.float32], f"{algo} {layout} {label} {what}: rel L2 {err:.2e}"
    for a, b in zip(
        (eager[0], eager[1], *eager[2].values()), (compiled[0], compiled[1], *compiled[2].values())
    ):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    return True


@pytest.mark.parametrize("layout", ["sbh", "bnsd"])
def test_megatron_layer_every_algorithm(layout):
    cases = [(algo, layout) for algo in ALGOS]
    assert run_distributed(megatron_case, CP, cases, collect=True, timeout_s=900) == [True] * len(cases)
