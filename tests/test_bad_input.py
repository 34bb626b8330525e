"""Bad input (docs/design.md, Bad input; docs/reliability.md): every case of the table is rejected on every rank,
before any communication, with the same exception type and a message naming the argument; a valid
call on the same group afterwards is exact (ring_cases.run_case against the float64 oracle).

One spawn per world size (3 and 4 ranks over Gloo: an odd size, and the smallest with a real double
ring, 1 < window < cp) runs the whole matrix: each bad call under every context it applies to (ring
causal, double ring general at 4 ranks, Ulysses, hybrid with all-Ulysses and all-ring degrees), each
followed by a valid call. A rank that communicated before raising would leave a message in flight and
corrupt or hang that valid call. Bad calls without a context (plain attention on one process) raise the
same ValueError naming the argument, never the kernels' RuntimeError.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

import ring_ext
from ring_ext.testing.spawn import run_distributed

from ring_cases import Case, context, run_case

# ---- the contexts every attention case runs under (world size W) -------------------------------


WORLDS = (3, 4)
HQ = 12  # q heads: split over W = 3 or 4 ranks; kv heads W


def double_ring_window(world: int) -> int | None:
    """The smallest window with 1 < window < world dividing world (window == world is the plain ring)."""
    return next((w for w in range(2, world) if world % w == 0), None)


def contexts(world: int) -> dict[str, Case]:
    base = dict(heads_q=HQ, heads_kv=world, head_dim=8, seq_per_rank=4)
    out = {"ring": Case(algo="megatron_cp_algo", causal=True, **base)}
    window = double_ring_window(world)
    if window is not None:
        out["double_ring_general"] = Case(
            algo="megatron_cp_algo", causal=False, window=window, overlap=False, **base
        )
    out["ulysses"] = Case(algo="ulysses_cp_algo", causal=True, **base)
    out["hybrid_u=W"] = Case(algo="hybrid_cp_algo", ulysses_degree=world, causal=True, **base)
    out["hybrid_u=1"] = Case(algo="hybrid_cp_algo", ulysses_degree=1, causal=False, **base)
    return out


def is_zigzag(case: Case) -> bool:
    return case.causal and case.algo != "ulysses_cp_algo"


def has_ulysses(case: Case, world: int) -> bool:
    return case.algo == "ulysses_cp_algo" or (case.algo == "hybrid_cp_algo" and case.ulysses_degree > 1)


# ---- the bad calls ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bad:
    name: str
    entry: str  # initialize | shard | unshard | attention | attention (no context) | op
    exc: type
    match: str  # regex the message must contain (names the argument / expected value)
    call: Callable  # call(ctx, case, world) -> raises
    applies: Callable = lambda case, world: True  # noqa: E731
    per_context: bool = True  # False: run once (under the ring context)


def qkv(case: Case, world: int, *, s=None, hq=None, hkv=None, d=None, b=1, dtype=torch.float32, device="cpu"):
    s = case.seq_per_rank if s is None else s
    hq = case.heads_q if hq is None else hq
    hkv = case.heads_kv if hkv is None else hkv
    d = case.head_dim if d is None else d
    q = torch.randn(b, s, hq, d, dtype=dtype, device=device)
    kv = [torch.randn(b, s, hkv, d, dtype=dtype, device=device) for _ in range(2)]
    return q, *kv


def att(ctx, q, k, v, **kw):
    return ring_ext.attention(q, k, v, ctx, layout=kw.pop("layout", "bshd"), **kw)


def plain(q, k, v, **kw):
    """ring_ext.attention without a context (one process, the local kernel)."""
    kw.setdefault("causal", True)
    return ring_ext.attention(q, k, v, layout=kw.pop("layout", "bshd"), **kw)


def op(ctx, q, k, v, *, scale=0.5, algo=None, group=None):
    return torch.ops.ring_ext.attention(
        q,
        k,
        v,
        scale,
        ctx.causal,
        ctx.algo if algo is None else algo,
        ctx.ring_group_name if group is None else group,
        ctx.inner_group_name,
        ctx.outer_group_name,
        ctx.ulysses_group_name,
        True,
    )


def cfg(world, **kw):
    return ring_ext.CPConfig(**{"context_parallel_size": world, **kw})


def _with(t: tuple, i: int, x) -> tuple:
    return tuple(x if j == i else a for j, a in enumerate(t))


RING = dict(context_parallel_algo="megatron_cp_algo")

BAD = [
    # initialize (CPConfig is validated when built, initialize checks it against the group)
    Bad(
        "cp size != group size",
        "initialize",
        ValueError,
        r"context_parallel_size \(\d+\) must equal the size of the process group",
        lambda ctx, c, w: ring_ext.initialize(cfg(w + 1, **RING)),
        per_context=False,
    ),
    Bad(
        "window does not divide cp",
        "initialize",
        ValueError,
        r"cp_window_size \(\d+\) must divide",
        lambda ctx, c, w: ring_ext.initialize(cfg(w, cp_window_size=w + 1, **RING)),
        per_context=False,
    ),
    Bad(
        "ulysses degree does not divide cp",
        "initialize",
        ValueError,
        r"ulysses_degree_in_cp \(\d+\) must divide",
        lambda ctx, c, w: ring_ext.initialize(
            cfg(w, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=w + 1)
        ),
        per_context=False,
    ),
    Bad(
        "hybrid without ulysses degree",
        "initialize",
        ValueError,
        "ulysses_degree_in_cp must be set",
        lambda ctx, c, w: ring_ext.initialize(cfg(w, context_parallel_algo="hybrid_cp_algo")),
        per_context=False,
    ),
    Bad(
        "unknown algorithm",
        "initialize",
        ValueError,
        "context_parallel_algo must be one of",
        lambda ctx, c, w: ring_ext.initialize(cfg(w, context_parallel_algo="ring")),
        per_context=False,
    ),
    Bad(
        "unknown mask type",
        "initialize",
        ValueError,
        "attention_mask_type must be one of",
        lambda ctx, c, w: ring_ext.initialize(cfg(w, attention_mask_type="sliding")),
        per_context=False,
    ),
    Bad(
        "config not a CPConfig",
        "initialize",
        TypeError,
        "config must be a ring_ext.CPConfig",
        lambda ctx, c, w: ring_ext.initialize({"context_parallel_size": w}),
        per_context=False,
    ),
    # shard / unshard
    Bad(
        "length the sharding cannot split",
        "shard",
        ValueError,
        r"sequence length \d+ \(dim 1\) must be divisible by",
        lambda ctx, c, w: ring_ext.shard(torch.randn(1, 2 * w * 4 + 1, 2, 8), ctx, 1),
    ),
    Bad(
        "seq_dim out of range",
        "shard",
        ValueError,
        r"seq_dim must be an int in \[-4, 4\)",
        lambda ctx, c, w: ring_ext.shard(torch.randn(1, 2 * w * 4, 2, 8), ctx, 4),
        per_context=False,
    ),
    Bad(
        "odd local length (zigzag)",
        "unshard",
        ValueError,
        r"local sequence length 5 \(dim 1\) must be divisible by 2",
        lambda ctx, c, w: ring_ext.unshard(torch.randn(1, 5, 2, 8), ctx, 1),
        applies=lambda c, w: is_zigzag(c),
    ),
    Bad(
        "seq_dim out of range",
        "unshard",
        ValueError,
        r"seq_dim must be an int",
        lambda ctx, c, w: ring_ext.unshard(torch.randn(1, 4, 2, 8), ctx, -5),
        per_context=False,
    ),
    Bad(
        "device the backend cannot serve",
        "unshard",
        ValueError,
        "x is on meta, but the context's process group",
        lambda ctx, c, w: ring_ext.unshard(torch.empty(1, 4, 2, 8, device="meta"), ctx, 1),
        per_context=False,
    ),
    # attention, under every context
    Bad(
        "q not a tensor",
        "attention",
        TypeError,
        "q must be a torch.Tensor",
        lambda ctx, c, w: att(ctx, [1.0], *qkv(c, w)[1:]),
    ),
    Bad(
        "dtype mismatch",
        "attention",
        ValueError,
        r"k and v must have q's dtype torch.float32",
        lambda ctx, c, w: att(ctx, *_with(qkv(c, w), 1, qkv(c, w)[1].bfloat16())),
    ),
    Bad(
        "unsupported dtype",
        "attention",
        ValueError,
        r"must be one of .* got torch.float64",
        lambda ctx, c, w: att(ctx, *qkv(c, w, dtype=torch.float64)),
    ),
    Bad(
        "device mismatch",
        "attention",
        ValueError,
        r"k and v must be on q's device cpu",
        lambda ctx, c, w: att(ctx, *_with(qkv(c, w), 2, torch.empty(1, 4, c.heads_kv, 8, device="meta"))),
    ),
    Bad(
        "rank (dims) mismatch",
        "attention",
        ValueError,
        r"k must be 4-D in layout 'bshd'",
        lambda ctx, c, w: att(ctx, *_with(qkv(c, w), 1, qkv(c, w)[1][0])),
    ),
    Bad(
        "head dim mismatch",
        "attention",
        ValueError,
        r"k must have q's head_dim 8",
        lambda ctx, c, w: att(ctx, qkv(c, w)[0], *qkv(c, w, d=16)[1:]),
    ),
    Bad(
        "batch mismatch",
        "attention",
        ValueError,
        r"k must have q's batch 1",
        lambda ctx, c, w: att(ctx, qkv(c, w)[0], *qkv(c, w, b=2)[1:]),
    ),
    Bad(
        "length mismatch",
        "attention",
        ValueError,
        r"k and v must have q's local sequence length 4",
        lambda ctx, c, w: att(ctx, qkv(c, w)[0], *qkv(c, w, s=6)[1:]),
    ),
    Bad(
        "k/v shape mismatch",
        "attention",
        ValueError,
        r"v must have k's batch, length and heads",
        lambda ctx, c, w: att(ctx, *_with(qkv(c, w), 2, qkv(c, w, hkv=1)[2])),
    ),
    Bad(
        "kv heads do not divide q heads",
        "attention",
        ValueError,
        r"kv heads \(5\) must divide q heads \(12\)",
        lambda ctx, c, w: att(ctx, *qkv(c, w, hkv=5)),
    ),
    Bad(
        "unknown layout",
        "attention",
        ValueError,
        r"layout must be one of .* got 'bhsd'",
        lambda ctx, c, w: att(ctx, *qkv(c, w), layout="bhsd"),
    ),
    Bad(
        "sbh without num_heads",
        "attention",
        ValueError,
        "num_heads is required with layout 'sbh'",
        lambda ctx, c, w: att(ctx, *(t.transpose(0, 1).flatten(-2) for t in qkv(c, w)), layout="sbh"),
    ),
    Bad(
        "sbh num_heads not dividing hidden",
        "attention",
        ValueError,
        r"num_heads must divide q's hidden size 96",
        lambda ctx, c, w: att(
            ctx, *(t.transpose(0, 1).flatten(-2) for t in qkv(c, w)), layout="sbh", num_heads=5
        ),
    ),
    Bad(
        "softcap not positive",
        "attention",
        ValueError,
        r"softcap must be None or a positive finite number, got -1.0",
        lambda ctx, c, w: att(ctx, *qkv(c, w), softcap=-1.0),
    ),
    Bad(
        "sinks not one per q head",
        "attention",
        ValueError,
        r"sinks must be a float tensor \[q heads\] = \[12\], got torch.float32 \(4,\)",
        lambda ctx, c, w: att(ctx, *qkv(c, w), sinks=torch.zeros(4)),
    ),
    Bad(
        "length zigzag cannot split",
        "attention",
        ValueError,
        r"local sequence length 3 must be divisible by 2",
        lambda ctx, c, w: att(ctx, *qkv(c, w, s=3)),
        applies=lambda c, w: is_zigzag(c) and not (c.algo == "hybrid_cp_algo" and c.ulysses_degree % 2 == 0),
    ),
    Bad(
        "q heads Ulysses cannot split",
        "attention",
        ValueError,
        r"q heads \(1\) must be at least the Ulysses degree",
        lambda ctx, c, w: att(ctx, *qkv(c, w, hq=1, hkv=1)),
        applies=has_ulysses,
    ),
    Bad(
        "causal= contradicts the context",
        "attention",
        ValueError,
        r"contradicts the context's attention_mask_type",
        lambda ctx, c, w: att(ctx, *qkv(c, w), causal=not c.causal),
    ),
    Bad(
        "NaN softmax scale",
        "attention",
        ValueError,
        r"softmax_scale must be a finite non-zero number, got nan",
        lambda ctx, c, w: att(ctx, *qkv(c, w), softmax_scale=math.nan),
    ),
    Bad(
        "inf softmax scale",
        "attention",
        ValueError,
        r"softmax_scale must be a finite non-zero number, got -inf",
        lambda ctx, c, w: att(ctx, *qkv(c, w), softmax_scale=-math.inf),
    ),
    Bad(
        "device the backend cannot serve",
        "attention",
        ValueError,
        r"q is on meta, but the context's process group \(gloo\) serves cpu",
        lambda ctx, c, w: att(ctx, *qkv(c, w, device="meta")),
    ),
    # attention without a context: the same checks, the same ValueError (run once per world)
    *[
        Bad(name, "attention (no context)", exc, match, call, per_context=False)
        for name, exc, match, call in [
            (
                "kv heads do not divide q heads",
                ValueError,
                r"kv heads \(5\) must divide q heads \(12\)",
                lambda ctx, c, w: plain(*qkv(c, w, hkv=5)),
            ),
            (
                "kv heads do not divide q heads (bnsd)",
                ValueError,
                r"kv heads \(5\) must divide q heads \(12\)",
                lambda ctx, c, w: plain(*(t.transpose(1, 2) for t in qkv(c, w, hkv=5)), layout="bnsd"),
            ),
            (
                "kv heads do not divide q heads (sbh)",
                ValueError,
                r"kv heads \(5\) must divide q heads \(12\)",
                lambda ctx, c, w: plain(
                    *(t.transpose(0, 1).flatten(-2) for t in qkv(c, w, hkv=5)), layout="sbh", num_heads=HQ
                ),
            ),
            (
                "batch mismatch",
                ValueError,
                r"k must have q's batch 1, got 2",
                lambda ctx, c, w: plain(qkv(c, w)[0], *qkv(c, w, b=2)[1:]),
            ),
            (
                "head dim mismatch",
                ValueError,
                r"k must have q's head_dim 8, got 16",
                lambda ctx, c, w: plain(qkv(c, w)[0], *qkv(c, w, d=16)[1:]),
            ),
            (
                "k/v shape mismatch",
                ValueError,
                r"v must have k's batch, length and heads",
                lambda ctx, c, w: plain(*_with(qkv(c, w), 2, qkv(c, w, hkv=1)[2])),
            ),
            (
                "softcap not a number",
                ValueError,
                r"softcap must be None or a positive finite number, got inf",
                lambda ctx, c, w: plain(*qkv(c, w), softcap=float("inf")),
            ),
            (
                "no mask given",
                ValueError,
                "causal must be True or False when no context is given",
                lambda ctx, c, w: plain(*qkv(c, w), causal=None),
            ),
            (
                "dtype mismatch",
                ValueError,
                r"k and v must have q's dtype torch.float32",
                lambda ctx, c, w: plain(*_with(qkv(c, w), 1, qkv(c, w)[1].half())),
            ),
            (
                "unsupported dtype",
                ValueError,
                r"must be one of .* got torch.float64",
                lambda ctx, c, w: plain(*qkv(c, w, dtype=torch.float64)),
            ),
            (
                "rank (dims) mismatch",
                ValueError,
                r"v must be 4-D in layout 'bshd'",
                lambda ctx, c, w: plain(*_with(qkv(c, w), 2, qkv(c, w)[2][0])),
            ),
            (
                "unknown layout",
                ValueError,
                r"layout must be one of .* got 'bsh'",
                lambda ctx, c, w: plain(*qkv(c, w), layout="bsh"),
            ),
            (
                "sbh without num_heads",
                ValueError,
                "num_heads is required with layout 'sbh'",
                lambda ctx, c, w: plain(*(t.transpose(0, 1).flatten(-2) for t in qkv(c, w)), layout="sbh"),
            ),
            (
                "zero softmax scale",
                ValueError,
                r"softmax_scale must be a finite non-zero number, got 0.0",
                lambda ctx, c, w: plain(*qkv(c, w), softmax_scale=0.0),
            ),
        ]
    ],
    # the op, called directly (its own C++ checks)
    Bad(
        "dtype mismatch",
        "op",
        ValueError,
        r"k and v must have q's dtype",
        lambda ctx, c, w: op(ctx, *_with(qkv(c, w), 1, qkv(c, w)[1].bfloat16())),
    ),
    Bad(
        "3-D shards",
        "op",
        ValueError,
        r"attention takes 4-D",
        lambda ctx, c, w: op(ctx, *(t[0] for t in qkv(c, w))),
    ),
    Bad(
        "length mismatch",
        "op",
        ValueError,
        r"must match q's batch, length and head_dim",
        lambda ctx, c, w: op(ctx, qkv(c, w)[0], *qkv(c, w, s=6)[1:]),
    ),
    Bad(
        "kv heads do not divide q heads",
        "op",
        ValueError,
        r"kv heads \(5\) must divide q heads \(12\)",
        lambda ctx, c, w: op(ctx, *qkv(c, w, hkv=5)),
    ),
    Bad(
        "NaN softmax scale",
        "op",
        ValueError,
        "softmax_scale must be a finite non-zero number",
        lambda ctx, c, w: op(ctx, *qkv(c, w), scale=math.nan),
    ),
    Bad(
        "unknown algorithm",
        "op",
        ValueError,
        "context_parallel_algo must be",
        lambda ctx, c, w: op(ctx, *qkv(c, w), algo="ring"),
        per_context=False,
    ),
    Bad(
        "length zigzag cannot split",
        "op",
        ValueError,
        r"must be a multiple of 2",
        lambda ctx, c, w: op(ctx, *qkv(c, w, s=3)),
        applies=lambda c, w: is_zigzag(c) and c.algo == "megatron_cp_algo",
    ),
    Bad(
        "q heads Ulysses cannot split",
        "op",
        ValueError,
        r"q heads \(1\) must be at least the Ulysses degree",
        lambda ctx, c, w: op(ctx, *qkv(c, w, hq=1, hkv=1)),
        applies=has_ulysses,
    ),
    Bad(
        "no process group",
        "op",
        RuntimeError,
        "process group name is empty",
        lambda ctx, c, w: op(ctx, *qkv(c, w), group=""),
        applies=lambda c, w: c.algo == "megatron_cp_algo",
    ),
]


def matrix(world: int) -> list[tuple[str, int]]:
    """(context name, index into BAD) pairs."""
    out = []
    for i, bad in enumerate(BAD):
        for name, case in contexts(world).items():
            if (bad.per_context or name == "ring") and bad.applies(case, world):
                out.append((name, i))
    return out


def bad_then_valid(rank: int, world: int, item: tuple[str, int]):
    name, i = item
    bad, case = BAD[i], contexts(world)[name]
    ctx = context(case, world)
    torch.manual_seed(rank)
    with pytest.raises(bad.exc, match=bad.match) as info:
        bad.call(ctx, case, world)
    kinds = [None] * world
    dist.all_gather_object(kinds, type(info.value).__name__)  # the same type on every rank
    assert len(set(kinds)) == 1, f"{bad.entry}: {bad.name} under {name}: ranks raised {kinds}"
    run_case(rank, world, case)  # the group still works, and exactly


@pytest.mark.parametrize("world_size", WORLDS)
def test_bad_input_matrix(world_size):
    items = matrix(world_size)
    assert len({i for _, i in items}) == len(BAD)  # every row of the table runs
    run_distributed(bad_then_valid, world_size, items, timeout_s=180, pg_timeout_s=30)


def table() -> str:
    """The docs/reliability.md table (python tests/test_bad_input.py)."""
    rows = ["| entry point | bad input | raises | message contains |", "|---|---|---|---|"]
    for bad in BAD:
        text = re.sub(r"\\d\+?", "N", bad.match).replace(".*", "…")
        text = re.sub(r"\\(.)", r"\1", text)
        rows.append(f"| `{bad.entry}` | {bad.name} | `{bad.exc.__name__}` | {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
