"""What the cross-rank check costs (docs/design.md, Cross-rank check): ring_ext.attention with the
check (the default) and with check_consistency=False, side by side in one run, on Gloo ranks.

    python benchmarks/bench_consistency.py                 # 2 ranks, 32k tokens, bf16, causal ring
    python benchmarks/bench_consistency.py --seq 8192      # quicker

Two measurements, each interleaved (on, off, on, off, ...) and reported as medians:
1. the check alone: a tiny forward (16 tokens per rank) with and without it, `--calls` times each; the
   difference is what the check adds to every attention forward;
2. a full forward+backward at `--seq` tokens with and without it, `--reps` times each: the ratio is
   the check's share of a real step.
Prints the CPU model and ring_ext.build_info()["cpu_isa"] with the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ring_ext
from ring_ext.testing.spawn import run_distributed


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(rank: int, world: int, job):
    seq, heads, dim, calls, reps, algo = job
    ctx = ring_ext.initialize(ring_ext.CPConfig(context_parallel_size=world, context_parallel_algo=algo))
    tiny = torch.randn(1, 16, heads, dim, dtype=torch.bfloat16)

    def forward(check: bool) -> None:
        ring_ext.attention(tiny, tiny, tiny, ctx, layout="bshd", check_consistency=check)

    big = [torch.randn(1, seq // world, heads, dim, dtype=torch.bfloat16).requires_grad_() for _ in range(3)]

    def step(check: bool) -> None:
        out = ring_ext.attention(*big, ctx, layout="bshd", check_consistency=check)
        out.backward(torch.ones_like(out))

    for check in (True, False):  # warm-up
        forward(check)
    small = {True: [], False: []}
    for _ in range(calls):
        for check in (True, False):
            small[check].append(_time(lambda: forward(check)))
    full = {True: [], False: []}
    for _ in range(reps):
        for check in (True, False):
            full[check].append(_time(lambda: step(check)))
    return {k: statistics.median(v) for k, v in small.items()}, {
        k: statistics.median(v) for k, v in full.items()
    }


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=2, help="Gloo ranks (default: 2)")
    parser.add_argument(
        "--seq", type=int, default=32768, help="total tokens of the full step (default: 32768)"
    )
    parser.add_argument("--heads", type=int, default=8, help="q and k/v heads (default: 8)")
    parser.add_argument("--dim", type=int, default=64, help="head_dim (default: 64)")
    parser.add_argument("--calls", type=int, default=200, help="tiny forwards per setting (default: 200)")
    parser.add_argument("--reps", type=int, default=2, help="full steps per setting (default: 2)")
    parser.add_argument(
        "--algo", default="megatron_cp_algo", help="context_parallel_algo (default: megatron_cp_algo)"
    )
    args = parser.parse_args(argv)
    print(
        f"cpu: {cpu_model()}; cpu_isa={ring_ext.build_info()['cpu_isa']}; {args.world} Gloo ranks x 1 thread"
    )
    job = (args.seq, args.heads, args.dim, args.calls, args.reps, args.algo)
    (small, full) = run_distributed(measure, args.world, [job], timeout_s=3600, collect=True)[0]
    added = small[True] - small[False]
    print("| measurement | check on | check off | on - off | share of a full step |")
    print("|---|---|---|---|---|")
    print(
        f"| tiny forward (16 tokens/rank), median of {args.calls} | {small[True] * 1e3:.3f} ms | "
        f"{small[False] * 1e3:.3f} ms | {added * 1e3:.3f} ms | {added / full[False]:.5%} |"
    )
    print(
        f"| fwd+bwd, {args.seq} tokens, bf16, {args.heads} heads x {args.dim}, {args.algo}, median of {args.reps} | "
        f"{full[True]:.2f} s | {full[False]:.2f} s | {full[True] - full[False]:+.2f} s | "
        f"ratio {full[True] / full[False]:.4f} |"
    )


if __name__ == "__main__":
    main()
