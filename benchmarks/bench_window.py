"""Sliding windows: time and bytes sent against the window w at a fixed S.

1. One process, forward+backward, [1, S, h, d] causal, interleaved (every window and full causal in
   one loop, median of the repeats): time and its ratio to full causal, next to the share of visible
   pairs (what an ideal kernel would cost).
2. 2 Gloo ranks x 1 thread: the ring (megatron_cp_algo) on the default zigzag placement and on the
   windowed one (--cp-sliding-window w: contiguous shards), and Ulysses. Time per fwd+bwd (the slowest
   rank's) and the bytes the busiest rank sends in the forward and in the backward, counted by
   torch.ops.ring_ext.sent_bytes() (ring transfers and all-to-alls alike), next to one K/V halo of
   w - 1 rows (what a rank of contiguous shards needs from its neighbour).

    python benchmarks/bench_window.py            # S = 32768 one process, 16384 on 2 ranks
    python benchmarks/bench_window.py --quick    # S = 8192 / 4096
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import ring_ext
from ring_ext.testing.spawn import run_distributed

HEADS, HEAD_DIM = 2, 64


def fwd_bwd(q, k, v, **kw):
    ts = [t.detach().requires_grad_() for t in (q, k, v)]
    out = ring_ext.attention(*ts, **kw)
    out.backward(torch.ones_like(out))


def visible_share(total: int, window: int | None) -> float:
    """Visible pairs of a causal window over the causal triangle's."""
    full = total * (total + 1) / 2
    if window is None or window >= total:
        return 1.0
    return (window * (window + 1) / 2 + (total - window) * window) / full


def one_process(total: int, windows: list[int], repeats: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, total, HEADS, HEAD_DIM, generator=g).to(torch.bfloat16) for _ in range(3))
    cases = [None, *windows]
    times = {w: [] for w in cases}
    for w in cases:  # warm up
        fwd_bwd(q, k, v, causal=True, sliding_window=w)
    for _ in range(repeats):
        for w in cases:
            start = time.perf_counter()
            fwd_bwd(q, k, v, causal=True, sliding_window=w)
            times[w].append(time.perf_counter() - start)
    full = statistics.median(times[None])
    rows = [
        f"### One process, S = {total}, bf16, h={HEADS} d={HEAD_DIM}, causal, fwd+bwd, {torch.get_num_threads()} threads",
        "",
        "| window | ms | / full causal | visible pairs / full causal |",
        "|---|---|---|---|",
    ]
    for w in cases:
        t = statistics.median(times[w])
        rows.append(f"| {w or 'full'} | {t * 1e3:.1f} | {t / full:.3f} | {visible_share(total, w):.3f} |")
    return rows


def cp_worker(rank: int, world_size: int, case):
    algo, placement, total, window, repeats = case
    torch.set_num_threads(1)
    cfg = ring_ext.CPConfig(
        context_parallel_size=world_size, context_parallel_algo=algo, cp_sliding_window=placement
    )
    ctx = ring_ext.initialize(cfg)
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, total, HEADS, HEAD_DIM, generator=g).to(torch.bfloat16) for _ in range(3)]
    q, k, v = (ring_ext.shard(t, ctx, 1).requires_grad_() for t in full)
    before = torch.ops.ring_ext.sent_bytes()
    out = ring_ext.attention(q, k, v, ctx, sliding_window=window)
    forward = torch.ops.ring_ext.sent_bytes() - before
    out.backward(torch.ones_like(out))
    backward = torch.ops.ring_ext.sent_bytes() - before - forward
    times = []
    for _ in range(repeats):
        ring_ext.all_reduce(torch.zeros(1), ctx)
        start = time.perf_counter()
        fwd_bwd(q, k, v, ctx=ctx, sliding_window=window)
        times.append(ring_ext.all_reduce(torch.tensor([time.perf_counter() - start]), ctx, op="max").item())
    sent = ring_ext.all_reduce(torch.tensor([forward, backward], dtype=torch.float64), ctx, op="max")
    return statistics.median(times) * 1e3, int(sent[0]), int(sent[1])


def halo_bytes(window: int | None) -> int:
    """One K/V halo: the w - 1 rows before a contiguous shard, K and V, bf16."""
    return 0 if window is None else 2 * (window - 1) * HEADS * HEAD_DIM * 2


def two_ranks(total: int, windows: list[int], repeats: int) -> list[str]:
    rows = [
        f"### 2 Gloo ranks x 1 thread, S = {total}, bf16, h={HEADS} d={HEAD_DIM}, causal, fwd+bwd (slowest rank)",
        "",
        "| algorithm | placement | window | ms | / zigzag ring, full | forward bytes sent | backward bytes sent | one K/V halo |",
        "|---|---|---|---|---|---|---|---|",
    ]
    setups = [("megatron_cp_algo", False), ("megatron_cp_algo", True), ("ulysses_cp_algo", False)]
    cases = []
    for algo, windowed in setups:
        for w in (None, *windows):
            placement = (w or total) if windowed else None
            cases.append((algo, placement, total, w, repeats))
    results = run_distributed(cp_worker, 2, cases, collect=True, timeout_s=3600)
    base = results[0][0]
    for (algo, placement, _, w, _), (ms, fwd, bwd) in zip(cases, results):
        where = "contiguous" if placement or algo == "ulysses_cp_algo" else "zigzag"
        rows.append(
            f"| {algo} | {where} | {w or 'full'} | {ms:.1f} | {ms / base:.3f} | {fwd} | {bwd} | {halo_bytes(w)} |"
        )
    return rows


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    s1, s2 = (8192, 4096) if args.quick else (32768, 16384)
    print(
        f"cpu_isa={ring_ext.build_info()['cpu_isa']} torch={torch.__version__} load={os.getloadavg()[0]:.2f}"
    )
    rows = one_process(s1, [128, 512, 2048, s1 // 4], args.repeats)
    rows += [""] + two_ranks(s2, [256, 2048, s2 // 2], args.repeats)
    text = "\n".join(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
