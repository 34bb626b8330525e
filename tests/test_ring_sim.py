"""Every rank of the ring simulated in one process: execute each rank's schedule with the registered block ops
(the same calls the C++ driver makes) and compare forward and backward with the float64 oracle.

Fast: it checks the schedule, the chunk offsets and the merge/gradient bookkeeping for many
(cp, window, mask) without spawning processes; tests/test_ring_dist.py checks the real transfers.
"""

from __future__ import annotations

import pytest
import torch

from ring_ext.ring import schedule
from ring_ext.sharding import shard_tensor, unshard_parts
from ring_ext.testing.reference import attention_reference
from ring_ext.testing.tolerances import assert_attention, assert_lse, torch_attention

ALGO = "megatron_cp_algo"


def _rows(item, chunk):
    return (
        slice(item.q_chunk * chunk, (item.q_chunk + item.q_chunks) * chunk),
        slice(item.kv_chunk * chunk, (item.kv_chunk + item.kv_chunks) * chunk),
    )


def simulate(q, k, v, dout, cp, window, causal):
    """out, dq, dk, dv of the full sequence by simulating each rank's schedule."""
    mode = "zigzag" if causal else "contiguous"
    qs, ks, vs, ds = ([shard_tensor(t, 1, mode, cp, r) for r in range(cp)] for t in (q, k, v, dout))
    scale = q.shape[-1] ** -0.5
    chunk = qs[0].shape[1] // (2 if causal else 1)
    outs, lses = [], []
    for r in range(cp):
        out = torch.zeros(qs[r].shape, dtype=torch.float32)
        lse = torch.full((q.shape[0], q.shape[2], qs[r].shape[1]), float("-inf"))
        for step in schedule(ALGO, cp, r, window, causal):
            for item in step.items:
                qr, kr = _rows(item, chunk)
                bo, bl = torch.ops.ring_ext.fwd(
                    qs[r][:, qr],
                    ks[step.src][:, kr],
                    vs[step.src][:, kr],
                    scale,
                    item.causal,
                    item.q_offset * chunk,
                    item.k_offset * chunk,
                    True,
                )
                torch.ops.ring_ext.merge_(out[:, qr], lse[..., qr], bo, bl)
        outs.append(out.to(q.dtype))
        lses.append(lse)
    dqs = [torch.zeros(t.shape) for t in qs]
    dks, dvs = [torch.zeros(t.shape) for t in ks], [torch.zeros(t.shape) for t in vs]
    for r in range(cp):
        delta = (ds[r].float() * outs[r].float()).sum(-1).transpose(1, 2).contiguous()
        for step in schedule(ALGO, cp, r, window, causal):
            for item in step.items:
                qr, kr = _rows(item, chunk)
                torch.ops.ring_ext.bwd_acc(
                    ds[r][:, qr],
                    qs[r][:, qr],
                    ks[step.src][:, kr],
                    vs[step.src][:, kr],
                    lses[r][..., qr],
                    delta[..., qr],
                    scale,
                    item.causal,
                    item.q_offset * chunk,
                    item.k_offset * chunk,
                    dqs[r][:, qr],
                    dks[step.src][:, kr],
                    dvs[step.src][:, kr],
                )
    return [unshard_parts(parts, 1, mode) for parts in (outs, dqs, dks, dvs)], unshard_parts(lses, 2, mode)


@pytest.mark.parametrize(
    "cp,window", [(1, 1), (2, 1), (3, 1), (4, 1), (4, 2), (5, 1), (6, 3), (8, 2), (8, 4)]
)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_simulated_ring_matches_oracle(cp, window, causal, dtype):
    g = torch.Generator().manual_seed(cp * 10 + window)
    b, s, hq, hkv, d = 2, 4 * cp, 4, 2, 8
    q, dout = (torch.randn(b, s, hq, d, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, s, hkv, d, generator=g).to(dtype) for _ in range(2))
    got, lse = simulate(q, k, v, dout, cp, window, causal)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out, ref_lse = attention_reference(q64, k64, v64, causal=causal)
    expected = [out.detach(), *torch.autograd.grad(out, (q64, k64, v64), dout.double())]
    baseline = torch_attention(q, k, v, dout, causal=causal)
    what = f"cp={cp} window={window} causal={causal}"
    assert_attention(got, expected, baseline, what)
    assert_lse(lse, ref_lse.detach(), f"{what} lse")
