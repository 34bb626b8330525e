"""The planner against measurements on this machine: `python -m ring_ext plan --calibrate`'s predictions
next to `python -m ring_ext bench` for cp 2 and 4, every algorithm, overlap off and on.

1. Calibrate as `plan --calibrate` does (planner.calibrated_flops): the kernels' forward+backward rate
   measured in as many processes at once as the cores hold (1 thread each: ranks share the memory
   bandwidth and clock), cut to each rank's share of the cores when the ranks outnumber them; and one
   local Gloo link (bandwidth, latency).
2. Measure: `python -m ring_ext bench --cp-sizes 2,4 --json` (one spawned Gloo world per size, 1 thread
   per rank, the slowest rank's best forward and backward), without and with
   --use-cp-send-recv-overlap.
3. Table: predicted and measured forward+backward per layout, the error, and each layout's rank among
   the layouts of its CP size, predicted and measured. The issue's targets: error within +-25 % per
   layout, and the measured fastest layout predicted first.

    python benchmarks/bench_planner.py                    # S = 8192, h 8, d 64, bf16, causal
    python benchmarks/bench_planner.py --seq 4096 --quick  # smaller, one repeat
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from ring_ext import planner


# bench's case names -> the planner's layouts (ring_ext/cli.py cases_for: window 2, Ulysses degree 2).
def layout_of(name: str, cp: int, overlap: bool) -> planner.Layout:
    if name == "ulysses":
        return planner.Layout("ulysses", cp, ulysses_degree=cp)
    if name == "ring":
        return planner.Layout("ring", cp, overlap=overlap)
    if name.startswith("double ring"):
        return planner.Layout("double_ring", cp, window=int(name.split("w=")[1]), overlap=overlap)
    if name.startswith("hybrid"):
        return planner.Layout("hybrid", cp, ulysses_degree=int(name.split("u=")[1]), overlap=overlap)
    raise ValueError(f"unknown bench case {name!r}")


def measure(args, overlap: bool) -> list[dict]:
    cmd = [
        sys.executable, "-m", "ring_ext", "bench", "--json",
        "--cp-sizes", args.cp_sizes, "--seq", str(args.seq), "--heads", str(args.heads),
        "--head-dim", str(args.head_dim), "--dtype", args.dtype, "--repeats", str(args.repeats),
        "--verify-max-seq", "0",
    ]  # fmt: skip
    if overlap:
        cmd.append("--use-cp-send-recv-overlap")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("[") :])


def rank_of(values: dict) -> dict:
    order = sorted(values, key=values.get)
    return {key: order.index(key) + 1 for key in values}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--cp-sizes", default="2,4")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one repeat")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    print(f"load before: {os.getloadavg()[0]:.2f}")
    shape = planner.Shape(seq=args.seq, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype)
    bw, lat = planner.measure_link()
    sizes = [int(x) for x in args.cp_sizes.split(",")]
    rates = {cp: planner.calibrated_flops(shape, cp) for cp in sizes}
    for cp, (flops, how) in rates.items():
        print(f"calibrated for cp={cp}: kernels {flops / 1e9:.1f} GFLOP/s per rank ({how})")
    print(f"Gloo link {bw / 1e9:.2f} GB/s, latency {lat * 1e6:.0f} us; {planner._cores()} cores")
    measured = {}
    for overlap in (False, True):
        for row in measure(args, overlap):
            layout = layout_of(row["algo"], row["cp"], overlap)
            measured.setdefault(layout, (row["fwd_ms"] + row["bwd_ms"]) / 1e3)
    predicted = {}
    for layout in measured:
        cluster = planner.Cluster(
            nodes=1,
            gpus_per_node=layout.cp,
            intra_bw=bw,
            inter_bw=bw,
            flops_per_s=rates[layout.cp][0],
            intra_latency=lat,
            inter_latency=lat,
        )
        predicted[layout] = planner.predict(shape, cluster, layout).seconds
    print(f"\nS={args.seq} h={args.heads} d={args.head_dim} {args.dtype} causal, forward+backward per layer")
    print("| cp | layout | predicted ms | measured ms | error | rank predicted | rank measured |")
    print("|---|---|---|---|---|---|---|")
    worst, firsts = 0.0, []
    for cp in sorted({layout.cp for layout in measured}):
        mine = [layout for layout in measured if layout.cp == cp]
        pr = rank_of({layout: predicted[layout] for layout in mine})
        mr = rank_of({layout: measured[layout] for layout in mine})
        for layout in sorted(mine, key=lambda x: measured[x]):
            err = predicted[layout] / measured[layout] - 1
            worst = max(worst, abs(err))
            print(
                f"| {cp} | {planner.describe(layout)} | {predicted[layout] * 1e3:.0f} | "
                f"{measured[layout] * 1e3:.0f} | {err:+.0%} | {pr[layout]} | {mr[layout]} |"
            )
        fastest = min(mine, key=lambda x: measured[x])
        firsts.append(pr[fastest] == 1)
    print(
        f"\nworst |error| {worst:.0%} (target 25 %); measured fastest predicted first at every cp: {all(firsts)}"
    )
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
