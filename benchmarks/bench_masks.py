"""What shared prompts cost (docs/design.md, "Two intervals per row"), side by side in one run:

1. One process, forward+backward: one prompt with its answers packed once (key_bounds from
   ring_ext.masks.shared_prefix, two key intervals per answer row) against what users do today, the
   prompt packed once per answer (n documents of prompt + answer, cu_seqlens): time (interleaved,
   medians) and peak resident memory of each (ring_ext.peak_memory, exact peaks), and the pairs each
   computes.
2. Balance under context parallelism at cp 2-16: the mask's visible pairs and the tokens of the
   busiest ring member over the mean, with the plain packed placement (the zigzag of equal-length
   pieces) and with the placement balanced by the mask (shard(..., key_bounds=kb); Note [Placement
   balanced by key_bounds] in ring_ext/placement.py). Counted from the placement, no processes.

    python benchmarks/bench_masks.py                              # 8k prompt, eight 1k answers, bf16
    python benchmarks/bench_masks.py --prompt 2048 --answers 512 --count 4 --repeats 1   # quick

Prints the CPU model, ring_ext.build_info()["cpu_isa"] and the load average with the numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from peak import cpu_model

import ring_ext
from ring_ext import masks, placement
from ring_ext.peak_memory import PeakRSS, exact_peaks

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def shared_call(prompt: int, answers: list[int], heads: int, dim: int, dtype):
    """fwd+bwd over the prompt packed once: key_bounds with two intervals per answer row."""
    cu, bounds = masks.shared_prefix([(prompt, answers)])
    return _call(cu[-1], heads, dim, dtype, {"cu_seqlens": torch.tensor(cu), "key_bounds": bounds})


def per_answer_call(prompt: int, answers: list[int], heads: int, dim: int, dtype):
    """fwd+bwd over the prompt packed once per answer: len(answers) causal documents."""
    docs = [prompt + a for a in answers]
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()])
    return _call(int(cu[-1]), heads, dim, dtype, {"cu_seqlens": cu})


def _call(total: int, heads: int, dim: int, dtype, mask: dict):
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(total, heads, dim, generator=g).to(dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()

    def run():
        out = ring_ext.attention(q, k, v, layout="thd", causal=True, **mask)
        out.backward(dout)
        for t in (q, k, v):
            t.grad = None

    return run, total


def pairs_of(prompt: int, answers: list[int]) -> tuple[int, int]:
    """Visible pairs of (shared, per answer)."""
    cu, kb = masks.shared_prefix([(prompt, answers)])
    bounds = masks.check_key_bounds(kb, cu[-1])
    shared = int(masks.visible_pairs(torch.arange(cu[-1]), tuple(cu), True, bounds=bounds).sum())
    per_answer = sum((prompt + a) * (prompt + a + 1) // 2 for a in answers)
    return shared, per_answer


def time_table(args, dtype) -> list[str]:
    answers = [args.answers] * args.count
    calls = {
        "shared prompt (key_bounds)": shared_call(args.prompt, answers, args.heads, args.dim, dtype),
        "prompt once per answer": per_answer_call(args.prompt, answers, args.heads, args.dim, dtype),
    }
    times = {name: [] for name in calls}
    peaks = {name: 0.0 for name in calls}
    for run, _ in calls.values():  # warm-up: placement caches, first-touch pages
        run()
    for _ in range(args.repeats):
        for name, (run, _) in calls.items():
            with PeakRSS() as m:
                run()
            times[name].append(m.seconds)
            peaks[name] = max(peaks[name], m.peak_mib)
    shared_pairs, per_answer_pairs = pairs_of(args.prompt, answers)
    pairs = {"shared prompt (key_bounds)": shared_pairs, "prompt once per answer": per_answer_pairs}
    base = statistics.median(times["prompt once per answer"])
    base_peak = peaks["prompt once per answer"]
    rows = [
        f"| {args.dtype}, h={args.heads}, d={args.dim}: prompt {args.prompt}, {args.count} answers of "
        f"{args.answers} | tokens | pairs (M) | fwd+bwd s | time vs per answer | peak MiB | memory vs per answer |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (_, total) in calls.items():
        t = statistics.median(times[name])
        rows.append(
            f"| {name} | {total} | {pairs[name] / 1e6:.1f} | {t:.2f} | {t / base:.2f}x | "
            f"{peaks[name]:.0f} | {f'{peaks[name] / base_peak:.2f}x' if base_peak > 0 else '-'} |"
        )
    return rows


def balance_table(args) -> list[str]:
    answers = [args.answers] * args.count
    cu, kb = masks.shared_prefix([(args.prompt, answers)])
    bounds = masks.check_key_bounds(kb, cu[-1])
    total, cu = cu[-1], tuple(cu)
    pairs = masks.visible_pairs(torch.arange(total), cu, True, bounds=bounds)
    rows = [
        "| cp (ring members) | work max/mean, plain placement | tokens max/mean, plain | work max/mean, "
        "balanced by key_bounds | tokens max/mean, balanced |",
        "|---|---|---|---|---|",
    ]
    for cp in args.cps:
        cells = []
        for balance in (None, bounds):
            plan = placement.packed_tokens(cu, cp, 1, True, None, balance)
            real = [t[t < total] for t in plan]
            work = [int(pairs[r].sum()) for r in real]
            tokens = [len(r) for r in real]
            cells += [f"{max(work) / (sum(work) / cp):.3f}", f"{max(tokens) / (sum(tokens) / cp):.3f}"]
        rows.append(f"| {cp} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=int, default=8192)
    p.add_argument("--answers", type=int, default=1024, help="tokens per answer")
    p.add_argument("--count", type=int, default=8, help="answers per prompt")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cps", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--balance-only", action="store_true", help="only the placement table (no timing)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    exact_peaks()
    print(
        f"CPU: {cpu_model()}, cpu_isa={ring_ext.build_info()['cpu_isa']}, threads={args.threads}, "
        f"load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    if not args.balance_only:
        print("\n".join(time_table(args, DTYPES[args.dtype])))
        print()
    print("\n".join(balance_table(args)))


if __name__ == "__main__":
    main()
