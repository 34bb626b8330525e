"""The CPU kernels' matrix products alone, one thread, as % of the FMA-loop peak: their ceiling.

benchmarks/bench_kernels.py gives a whole kernel's % of the peak; this gives that of the products inside
it, csrc/cpu's gemm at the shapes, strides and operand layouts flash_fwd and flash_bwd call it with (one
forward task's key block, one backward (query block, key block) pair; benchmarks/bench_tiles_main.cpp
lists them). Each is timed with its right operand B hot (the same packed block every call: L1/L2) and
cold (the next block of a --cold-mib pool at every call: L3 or memory, as a forward task meets the key
blocks of a long sequence and a backward task the query blocks). A kernel's % of the peak over its
products' says what its other work (softmax, packing, dQ sums) and its cold operands cost.

Each level (csrc/cpu/dispatch.cpp's names) is compiled from the working tree's kernels_<level>.cpp into
its own binary (cached by a hash of csrc/, the C++ main, the flags and the compiler: compiled.py). The binary also
checks every product against a plain sum over the same strides; above 1e-4 (fp32) or 1e-2 (bf16) the
row says MISMATCH and the script exits 1.

    python benchmarks/bench_tiles.py                     # every level this CPU runs, d = 64 and 128
    python benchmarks/bench_tiles.py --isa avx2 --dims 64 96 128 256
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from ab_kernels import CXXFLAGS, ISAS, cpu_isas
from compiled import cached_binary, compiler, read, tree_digest
from peak import cpu_model, fma_peak, fma_vectors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "benchmarks", "bench_tiles_main.cpp")
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}


def build(isa: str) -> str:
    """The binary of the working tree's kernels_<isa>.cpp and bench_tiles_main.cpp, compiled unless
    cached."""
    csrc = os.path.join(ROOT, "csrc")
    kernels = os.path.join(csrc, "cpu", f"kernels_{isa}.cpp")
    key = "\0".join([" ".join(CXXFLAGS), isa, tree_digest(csrc)]).encode() + read(MAIN)
    return cached_binary(
        "bench_tiles",
        key,
        lambda out: subprocess.run(
            [compiler(), *CXXFLAGS, f'-DRING_EXT_BENCH_KERNELS="{kernels}"', MAIN, "-o", out], check=True
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--isa", choices=ISAS, nargs="+", help="levels (default: every one this CPU runs)")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="head dims")
    parser.add_argument("--cold-mib", type=int, default=64, help="pool of B blocks for the cold column")
    parser.add_argument("--seconds", type=float, default=0.05, help="per timed run")
    parser.add_argument("--rounds", type=int, default=10, help="timed runs of each product (the best)")
    args = parser.parse_args()
    runnable = cpu_isas()
    levels = args.isa or runnable
    if any(isa not in runnable for isa in levels):
        sys.exit(f"bench_tiles: this CPU runs the levels {', '.join(runnable)}, not {', '.join(levels)}")

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    peak_before = fma_peak(1)
    lines = []
    mismatch = False
    for isa in levels:
        command = [
            build(isa),
            str(args.cold_mib << 20),
            str(args.seconds),
            str(args.rounds),
            *map(str, args.dims),
        ]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            dtype, d, name, m, n, k, hot, cold, error = line.split("\t")
            ok = float(error) <= TOLERANCE[dtype]
            mismatch |= not ok
            lines.append((isa, dtype, d, name, m, n, k, float(hot), float(cold), error, ok))
    peak_after = fma_peak(1)
    peak = {k: max(peak_before[k], peak_after[k]) for k in peak_before}

    print(
        f"CPU kernels' matrix products (benchmarks/bench_tiles.py): cpu: {cpu_model()}, one thread, "
        f"FMA loop on {fma_vectors()}; load average (1, 5, 15 min) at start: {load}.\n"
    )
    print(
        "| level | dtype | d | product | m | n | k | hot GFLOP/s | hot % peak | cold GFLOP/s | cold % peak "
        "| error |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for isa, dtype, d, name, m, n, k, hot, cold, error, ok in lines:
        print(
            f"| {isa} | {dtype} | {d} | {name} | {m} | {n} | {k} | {hot:.1f} | {100 * hot / peak[dtype]:.0f}% "
            f"| {cold:.1f} | {100 * cold / peak[dtype]:.0f}% | {error if ok else f'**MISMATCH** {error}'} |"
        )
    print(
        f"\nk counts elements (a bf16 step is a pair). hot: B the same block every call; cold: the next "
        f"block of a {args.cold_mib} MiB pool. GFLOP/s: the best of {args.rounds} runs of {args.seconds} s, "
        "in rounds over every product. error: "
        "max |gemm - plain sum| / max |sum|. One-thread FMA-loop peak, GFLOP/s (before / after): "
        + ", ".join(f"{k} {peak_before[k]:.0f} / {peak_after[k]:.0f}" for k in peak)
        + f". Load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}."
    )
    if mismatch:
        sys.exit("bench_tiles: MISMATCH: a product disagrees with the plain sum (rows marked above)")


if __name__ == "__main__":
    main()
