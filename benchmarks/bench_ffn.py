"""Peak memory and time of blockwise_ffn vs the plain FFN, forward + backward, on CPU.

Each variant runs in a fresh process and reports its peak resident memory above the start
(ring_ext.peak_memory), so allocator caching cannot hide anything. Usage: python benchmarks/bench_ffn.py [--seq 32768]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def run_variant(seq: int, d_model: int, hidden: int, chunk: int) -> dict:
    import torch

    from ring_ext.ffn import blockwise_ffn
    from ring_ext.peak_memory import PeakRSS, exact_peaks

    exact_peaks()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(d_model, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, d_model)
    )
    x = torch.randn(seq, 1, d_model, requires_grad=True)
    with PeakRSS() as m:
        out = blockwise_ffn(x, mlp, chunk) if chunk else mlp(x)
        out.square().mean().backward()
    return {"seconds": m.seconds, "peak_mib": m.peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--chunks", default="0,4096,1024", help="0 = plain FFN")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_variant(args.seq, args.d_model, args.hidden, args.child)))
        return
    print(f"FFN {args.d_model} -> {args.hidden} -> {args.d_model}, seq {args.seq}, fp32, forward + backward")
    print("| variant | time s | peak RSS above start, MiB | one [rows, hidden] fp32 activation, MiB |")
    print("|---|---|---|---|")
    for chunk in (int(c) for c in args.chunks.split(",")):
        cmd = [
            sys.executable,
            __file__,
            "--seq",
            str(args.seq),
            "--d-model",
            str(args.d_model),
            "--hidden",
            str(args.hidden),
            "--child",
            str(chunk),
        ]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600).stdout)
        rows = chunk or args.seq
        name = f"blockwise, chunk {chunk}" if chunk else "plain FFN"
        print(f"| {name} | {r['seconds']:.2f} | {r['peak_mib']:.0f} | {rows * args.hidden * 4 / 2**20:.0f} |")


if __name__ == "__main__":
    main()
