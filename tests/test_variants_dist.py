"""The attention of today's models under context parallelism, over real Gloo ranks: logit softcap
(Gemma 2), attention sinks (gpt-oss), a v head dim of its own (multi-head latent attention), Ulysses
with heads that do not divide its degree, and masks of real models (chunks, image blocks, shared
prompts with two key intervals per row, rows that see nothing), in every algorithm, dense and packed
with a sliding window, forward and every gradient (the sinks' included) against the float64 oracle at
world sizes 1, 2, 3 and 4 (docs/design.md, "Softcap and sinks", "Chunks and key bounds")."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

import ring_ext
from ring_ext.layouts import SEQ_DIM, from_bshd, to_bshd
from ring_ext.testing.reference import attention_reference, packed_mask
from ring_ext.testing.spawn import run_distributed
from ring_ext.testing.tolerances import REL_L2

from ring_cases import Case, context


@dataclasses.dataclass(frozen=True)
class Variant:
    algo: str = "megatron_cp_algo"
    ulysses_degree: int | None = None
    window: int = 1  # --cp-window-size
    causal: bool = True
    layout: str = "bshd"
    heads_q: int = 6
    heads_kv: int = 2
    head_dim: int = 24
    head_dim_v: int = 16
    softcap: float | None = 3.0
    sinks: bool = True
    docs: tuple[int, ...] | None = None  # packed documents (layout thd), else a dense sequence
    sliding_window: int | None = None
    chunk: int | None = None  # attention_chunk_size (Llama 4)
    blocks: tuple | None = None  # bidirectional blocks (image tokens): key_bounds
    # shared prompts (masks.shared_prefix groups of (prompt_len, answer lens)): key_bounds [4, S],
    # packed one document per group with layout thd, else over the dense sequence ("dense": one
    # group sized to it); empty_rows: that many first tokens see nothing
    prefix: tuple | str | None = None
    empty_rows: int = 0
    prefix_mask: bool = True  # False: the shards balanced by the prefix mask, the call plainly causal
    seq_per_rank: int = 8

    def config(self, world: int) -> ring_ext.CPConfig:
        fields = ("algo", "ulysses_degree", "causal", "window")
        return Case(**{f: getattr(self, f) for f in fields}).config(world)


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def run_variant(rank: int, world: int, case: Variant):
    ctx = context(case, world)
    total = sum(case.docs) if case.docs else case.seq_per_rank * world
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, total, case.heads_q, case.head_dim, generator=g)
    k = torch.randn(1, total, case.heads_kv, case.head_dim, generator=g)
    v = torch.randn(1, total, case.heads_kv, case.head_dim_v, generator=g)
    dout = torch.randn(1, total, case.heads_q, case.head_dim_v, generator=g)
    sinks = torch.randn(case.heads_q, generator=g) if case.sinks else None
    cu = None
    if case.docs:
        cu = torch.tensor([0, *torch.tensor(case.docs).cumsum(0).tolist()])
    packing = {} if cu is None else {"cu_seqlens": cu}
    bounds = None
    if case.prefix:
        groups = (
            case.prefix
            if case.prefix != "dense"
            else ((total // 2, (total // 4, total - total // 2 - total // 4)),)
        )
        cu_list, bounds = ring_ext.masks.shared_prefix(groups)
        assert cu_list[-1] == total
        bounds[:2, : case.empty_rows] = 0  # rows that see nothing (the second interval is empty there)
        if case.docs:
            cu = torch.tensor(cu_list)
            packing = {"cu_seqlens": cu}
    placed_by = bounds
    if not case.prefix_mask:  # another layer on the same shards: its own mask, the shards' placement
        bounds = None
    if case.blocks:
        bounds = ring_ext.masks.bidirectional_blocks(
            cu if cu is not None else [0, total], case.blocks, case.causal
        )
    # packed shared prompts: the placement balanced by their mask (Note [Placement balanced by
    # key_bounds]); packed image blocks keep the plain placement
    balance = {"key_bounds": placed_by} if case.prefix and cu is not None else {}
    seq_dim = SEQ_DIM[case.layout]
    local = [
        ring_ext.shard(from_bshd(t, case.layout).contiguous(), ctx, seq_dim, **packing, **balance)
        for t in (q, k, v, dout)
    ]
    ql, kl, vl = (t.requires_grad_() for t in local[:3])
    sl = sinks.clone().requires_grad_() if case.sinks else None
    out = ring_ext.attention(
        ql, kl, vl, ctx, layout=case.layout, num_heads=case.heads_q, softcap=case.softcap, sinks=sl,
        sliding_window=case.sliding_window, attention_chunk_size=case.chunk,
        key_bounds=bounds, **packing,
    )  # fmt: skip
    out.backward(local[3])
    got = [ring_ext.unshard(t.detach(), ctx, seq_dim, **packing) for t in (out, ql.grad, kl.grad, vl.grad)]
    dims = (case.head_dim_v, case.head_dim, case.head_dim, case.head_dim_v)
    got = [to_bshd(t, case.layout, d) for t, d in zip(got, dims)]
    if sl is not None:  # every rank's rows' part, summed as a data-parallel reduction would
        dsinks = sl.grad.clone()
        dist.all_reduce(dsinks)
        got.append(dsinks)

    leaves = [t.double().requires_grad_() for t in (q, k, v)] + (
        [sinks.double().requires_grad_()] if case.sinks else []
    )
    mask = None
    if bounds is not None:
        keys = torch.arange(total)[None, :]
        mask = torch.zeros(total, total, dtype=torch.bool)
        for lo, hi in bounds.view(len(bounds) // 2, 2, total):  # one or two intervals per row
            mask |= (keys >= lo[:, None]) & (keys < hi[:, None])
    elif cu is not None or case.sliding_window or case.chunk:
        positions = torch.arange(total)
        mask = packed_mask(
            positions,
            positions,
            cu.tolist() if cu is not None else [0, total],
            case.causal,
            case.sliding_window,
            case.chunk,
        )
    o64, _ = attention_reference(
        *leaves[:3],
        causal=case.causal,
        mask=mask,
        softcap=case.softcap,
        sinks=leaves[3] if case.sinks else None,
    )
    expected = [o64.detach(), *torch.autograd.grad(o64, leaves, dout.double())]
    names = ["out", "dq", "dk", "dv", "dsinks"]
    for name, a, b in zip(names, got, expected):
        assert a.shape == b.shape, (rank, case, name, a.shape, b.shape)
        err = _rel(a, b)
        assert err <= REL_L2[torch.float32], f"rank {rank}/{world} {case}: {name} rel err {err:.2e}"


def _cases(world: int) -> list[Variant]:
    heads = {"heads_q": 6, "heads_kv": 2} if world != 3 else {"heads_q": 6, "heads_kv": 3}
    algos = [Variant(), Variant(algo="ulysses_cp_algo")]
    if world == 4:
        algos += [Variant(window=2), Variant(algo="hybrid_cp_algo", ulysses_degree=2)]
    if world == 3:
        algos += [Variant(algo="hybrid_cp_algo", ulysses_degree=3)]
    cases = []
    for base in algos:
        base = dataclasses.replace(base, **heads)
        cases += [
            base,  # causal, dense, bshd: softcap + sinks + d_v != d
            dataclasses.replace(base, causal=False, layout="sbh", softcap=None),  # sinks + MLA in sbh
            dataclasses.replace(base, layout="thd", docs=(5, 9, 2, 13, 3), sliding_window=6),
            # chunked attention (Llama 4): dense with a window too, packed without softcap and sinks
            dataclasses.replace(base, chunk=5, sliding_window=3),
            dataclasses.replace(base, layout="thd", docs=(11, 4, 15), chunk=6, softcap=None, sinks=False),
            # image blocks (key_bounds): dense, and packed with a block in the second document
            dataclasses.replace(base, blocks=((1, 4), (5, 7))),
            dataclasses.replace(base, layout="thd", docs=(11, 4, 15), blocks=((1, 5), (16, 22)), sinks=False),
            # shared prompts (two intervals per row): packed groups, and dense with empty rows
            dataclasses.replace(base, layout="thd", docs=(13, 10), prefix=((6, (3, 4)), (5, (2, 0, 3)))),
            dataclasses.replace(base, prefix="dense", empty_rows=3, sinks=False),
            dataclasses.replace(
                base, layout="thd", docs=(13, 10), prefix=((6, (3, 4)), (5, (2, 0, 3))), prefix_mask=False
            ),
        ]
    # Ulysses' uneven head splits (Note [Ulysses head split]): at 3 ranks q heads 8 over K/V heads
    # 2 give rank 1 two q heads of K/V head 0 and one of K/V head 1; at 4, 6 heads without GQA.
    uneven = {3: dict(heads_q=8, heads_kv=2), 4: dict(heads_q=6, heads_kv=6), 2: dict(heads_q=3, heads_kv=1)}
    for algo in ("ulysses_cp_algo", "hybrid_cp_algo") if world > 1 else ():
        degree = {"ulysses_cp_algo": None, "hybrid_cp_algo": world if world < 4 else 2}[algo]
        base = Variant(algo=algo, ulysses_degree=degree, **uneven[world])
        cases += [base, dataclasses.replace(base, layout="thd", docs=(7, 3, 11, 5), softcap=None)]
    return cases


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_variants_match_the_oracle(world):
    run_distributed(run_variant, world, _cases(world), timeout_s=600)
