"""Sliding windows: time and bytes sent against the window w at a fixed S.

1. One process, forward+backward, [1, S, h, d] causal, interleaved (every window and full causal in
   one loop, median of the repeats): time and its ratio to full causal, next to the share of visible
   pairs (what an ideal kernel would cost).
2. 2 Gloo ranks x 1 thread, the ring (megatron_cp_algo) and Ulysses: time per fwd+bwd (the slowest
   rank's) and the forward bytes each rank sends per layer, as sent today: the ring still moves every
   K/V block whatever the window (skipping the blocks a window never needs is not built yet), Ulysses
   moves q, k, v and out once each.

    python benchmarks/bench_window.py            # S = 32768 one process, 16384 on 2 ranks
    python benchmarks/bench_window.py --quick    # S = 8192 / 4096
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import ring_ext  # noqa: E402

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
    algo, total, window, repeats = case
    torch.set_num_threads(1)
    cfg = ring_ext.CPConfig(context_parallel_size=world_size, context_parallel_algo=algo)
    ctx = ring_ext.initialize(cfg)
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, total, HEADS, HEAD_DIM, generator=g).to(torch.bfloat16) for _ in range(3)]
    q, k, v = (ring_ext.shard(t, ctx, 1) for t in full)
    fwd_bwd(q, k, v, ctx=ctx, sliding_window=window)
    times = []
    for _ in range(repeats):
        ring_ext.all_reduce(torch.zeros(1), ctx)
        start = time.perf_counter()
        fwd_bwd(q, k, v, ctx=ctx, sliding_window=window)
        times.append(ring_ext.all_reduce(torch.tensor([time.perf_counter() - start]), ctx, op="max").item())
    return statistics.median(times) * 1e3


def sent_bytes(algo: str, total: int, world: int) -> int:
    """Forward bytes one rank sends per layer, as the code does today (bf16, K/V heads = q heads)."""
    local = total // world * HEADS * HEAD_DIM * 2
    if algo == "megatron_cp_algo":
        return (world - 1) * 2 * local  # K and V, every step
    return 4 * local * (world - 1) // world  # q, k, v in; out back


def two_ranks(total: int, windows: list[int], repeats: int) -> list[str]:
    from distributed import run_distributed

    rows = [
        f"### 2 Gloo ranks x 1 thread, S = {total}, bf16, causal, fwd+bwd (slowest rank)",
        "",
        "| algorithm | window | ms | / full causal | forward bytes sent per rank |",
        "|---|---|---|---|---|",
    ]
    for algo in ("megatron_cp_algo", "ulysses_cp_algo"):
        cases = [(algo, total, w, repeats) for w in (None, *windows)]
        ms = run_distributed(cp_worker, 2, cases, collect=True, timeout_s=1800)
        for (_, _, w, _), t in zip(cases, ms):
            rows.append(
                f"| {algo} | {w or 'full'} | {t:.1f} | {t / ms[0]:.3f} | {sent_bytes(algo, total, 2)} |"
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
