"""Where a kernel's time goes: the samples of a `perf script` under a caller, by the function they fell in.

Reads the output of `perf script` on a recording with call graphs and keeps the samples whose stack
holds a frame matching --under (a substring, e.g. `ab_new::cpu::ab_new::fwd_task` for the forward of
benchmarks/ab_kernels.py's new revision); prints each leaf function's share of them. Inlined code counts
as its caller (softmax_step holds exp_row and scaled_max), so the split is by the kernels' functions:
the micro-kernel (gemm_tile), the softmax, packing, the dQ sums.

    B=$(ls -t /tmp/ring_ext_ab_kernels/*/ab_kernels | head -1)   # the binary of the last ab_kernels.py run
    perf record -F 1500 --call-graph dwarf,8192 -o perf.data $B 1 2 4 fp32:64:4096:full
    perf script -i perf.data > perf.txt
    python tools/perf_split.py perf.txt --under ab_new::cpu::ab_new::fwd_task
    python tools/perf_split.py perf.txt --under ab_new::cpu::ab_new::flash_bwd
"""

from __future__ import annotations

import argparse
import collections
import re

FRAME = re.compile(r"^\s*[0-9a-f]+ (.+?)(\+0x[0-9a-f]+)? \(")  # "addr symbol+off (dso)"


def leaf_counts(text: str, under: str) -> tuple[collections.Counter, int]:
    """Samples per leaf function among those with a frame containing `under`, and their number."""
    counts: collections.Counter = collections.Counter()
    total = 0
    for sample in text.split("\n\n"):
        frames = [m.group(1) for line in sample.splitlines()[1:] if (m := FRAME.match(line))]
        if frames and any(under in frame for frame in frames):
            total += 1
            counts[re.sub(r"\bring_ext\w*::cpu::\w+::", "", frames[0].split("(")[0])] += 1
    return counts, total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("script", help="output of `perf script` on a recording with --call-graph")
    parser.add_argument("--under", required=True, help="keep samples with a frame containing this")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    with open(args.script) as f:
        counts, total = leaf_counts(f.read(), args.under)
    if total == 0:
        raise SystemExit(f"perf_split: no sample has a frame containing {args.under!r}")
    print(f"{total} samples under {args.under}")
    for name, n in counts.most_common(args.top):
        print(f"{100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
