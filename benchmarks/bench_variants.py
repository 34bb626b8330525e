"""What the attention of today's models costs on the CPU kernels (docs/design.md, "Softcap and sinks",
"Multi-head latent attention"), each compared side by side in one run, interleaved, medians:

1. softcap and sinks: the same call without them, with softcap=50, with sinks, with both (target: at
   most 10% over the plain call), forward and forward+backward;
2. MLA (q/k head dim 192, v head dim 128, as DeepSeek-V3): ours with v as it is against the workaround
   of other libraries, v padded with zeros to 192 and the output cut back.

    python benchmarks/bench_variants.py                      # bf16 and fp32, s=2048, 2 threads
    python benchmarks/bench_variants.py --seq 4096 --dtypes bf16 --repeats 5

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

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(calls: dict, repeats: int) -> dict:
    """calls: name -> fn; each run once to warm up, then `repeats` rounds of all of them in turn."""
    for fn in calls.values():
        fn()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def call(q, k, v, backward: bool, **kw):
    def fn():
        if not backward:
            with torch.no_grad():
                ring_ext.attention(q, k, v, causal=True, **kw)
            return
        out = ring_ext.attention(q, k, v, causal=True, **kw)
        out.backward(torch.ones_like(out))

    return fn


def variants_table(args) -> list[str]:
    rows = [
        "| dtype | s | heads | d | pass | plain ms | softcap | sinks | softcap+sinks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        g = torch.Generator().manual_seed(0)
        q, k, v = (
            torch.randn(1, args.seq, args.heads, args.dim, generator=g).to(dtype).requires_grad_()
            for _ in range(3)
        )
        sinks = torch.randn(args.heads, requires_grad=True)
        for backward in (False, True):
            calls = {
                "plain": call(q, k, v, backward),
                "softcap": call(q, k, v, backward, softcap=50.0),
                "sinks": call(q, k, v, backward, sinks=sinks),
                "both": call(q, k, v, backward, softcap=50.0, sinks=sinks),
            }
            t = run(calls, args.repeats)
            base = t["plain"]
            rows.append(
                f"| {name} | {args.seq} | {args.heads} | {args.dim} | {'fwd+bwd' if backward else 'fwd'} "
                f"| {base * 1e3:.1f} | {t['softcap'] / base:.3f}x | {t['sinks'] / base:.3f}x | {t['both'] / base:.3f}x |"
            )
    return rows


def mla_table(args) -> list[str]:
    rows = [
        "| dtype | s | heads | d_qk / d_v | pass | v as it is ms | v padded to d_qk ms | padded / ours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        g = torch.Generator().manual_seed(1)
        q, k = (
            torch.randn(1, args.seq, args.heads, 192, generator=g).to(dtype).requires_grad_()
            for _ in range(2)
        )
        v = torch.randn(1, args.seq, args.heads, 128, generator=g).to(dtype).requires_grad_()

        def padded(backward: bool):
            def fn():
                with torch.set_grad_enabled(backward):
                    vp = torch.nn.functional.pad(v, (0, 64))  # the workaround: zeros up to d_qk
                    out = ring_ext.attention(q, k, vp, causal=True)[..., :128]
                    if backward:
                        out.backward(torch.ones_like(out))

            return fn

        for backward in (False, True):
            t = run({"ours": call(q, k, v, backward), "padded": padded(backward)}, args.repeats)
            rows.append(
                f"| {name} | {args.seq} | {args.heads} | 192 / 128 | {'fwd+bwd' if backward else 'fwd'} "
                f"| {t['ours'] * 1e3:.1f} | {t['padded'] * 1e3:.1f} | {t['padded'] / t['ours']:.3f}x |"
            )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    parser.add_argument("--heads", type=int, default=8, help="heads, q and k/v alike (default 8)")
    parser.add_argument(
        "--dim", type=int, default=128, help="head dim of the softcap/sinks table (default 128)"
    )
    parser.add_argument(
        "--dtypes", default="bf16,fp32", help="comma-separated bf16, fp32 (default bf16,fp32)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="interleaved rounds, median reported (default 5)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", help="also write the tables to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    header = (
        f"cpu: {cpu_model()}; cpu_isa={ring_ext.build_info()['cpu_isa']}; {args.threads} threads; "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )
    lines = [header, "", *variants_table(args), "", *mla_table(args), ""]
    lines.append(f"load average after: {os.getloadavg()[0]:.2f}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
