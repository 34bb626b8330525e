"""Long-context inference with context parallelism, in one run: prefill time and decode latency against
prompt length and CP size, cache bytes per rank (against 1/cp of one process's) and the bytes one
decode step moves, for a tiny random Llama (ring_ext.hf.generate over spawned Gloo ranks, one thread
each; ring_ext/tools/generate.py); then the planner's prediction for Llama 3 405B on H100 hosts next to
Meta's published figures (ring_ext/tools/planner/inference.py).

    python benchmarks/bench_inference.py                       # prompts 8k, 16k, 32k at cp 1, 2, 4
    python benchmarks/bench_inference.py --seqs 2048 --cp-sizes 1,2 --new-tokens 4   # a quick look
"""

from __future__ import annotations

import argparse
import platform

import torch

from ring_ext.tools import generate
from ring_ext.tools.planner import inference as planned


def cache_ratio_rows(rows: list[dict]) -> list[str]:
    """Live cache bytes per rank x cp over one process's, per prompt (target: within 5% of 1)."""
    one = {r["seq"]: r["cache_live_mib_per_rank"] for r in rows if r["cp"] == 1}
    out = []
    for r in rows:
        if r["seq"] in one and r["cp"] > 1:
            ratio = r["cache_live_mib_per_rank"] * r["cp"] / one[r["seq"]]
            out.append(
                f"prompt {r['seq']}, cp {r['cp']}: live cache per rank x cp / one process's = {ratio:.3f}"
            )
    return out


def planner_table() -> str:
    lines = [
        "| prompt | GPUs (H100, TP 8 x CP hosts) | Meta prefill s | predicted s | Meta parallel eff. | "
        "predicted eff. | predicted decode ms/token |",
        "|" + "---|" * 7,
    ]
    for r in planned.meta_comparison():
        eff = "-" if r["meta_efficiency"] is None else f"{r['meta_efficiency']:.0%}"
        lines.append(
            f"| {r['seq']} | {r['gpus']} | {r['meta_s']} | {r['predicted_s']:.1f} | {eff} | "
            f"{r['predicted_efficiency']:.1%} | {r['predicted_decode_ms']:.1f} |"
        )
    lines.append(
        f"assumptions: GEMMs at {planned.GEMM_EFFICIENCY:.0%} and attention at "
        f"{planned.ATTENTION_EFFICIENCY:.0%} of the bf16 dense peak, FP8 weights for decode, latencies "
        f"{planned.INTRA_LATENCY_S * 1e6:.0f}/{planned.INTER_LATENCY_S * 1e6:.0f} us per collective"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="8192,16384,32768", help="comma list of prompt lengths")
    generate.add_generate_arguments(p)
    args = p.parse_args()
    cases = []
    for seq in (int(x) for x in args.seqs.split(",")):
        args.seq = seq
        cases += generate.cases_of(args)
    print(
        f"tiny Llama: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} K/V, "
        f"fp32, batch {args.batch}, {args.new_tokens} new tokens; {platform.processor() or platform.machine()}, "
        f"cpu_isa={torch.ops.ring_ext.cpu_isa()}, one thread per rank",
        flush=True,
    )
    rows = generate.run_cases(cases)
    generate.check_tokens(rows)
    print(generate.table(rows))
    print("\n".join(cache_ratio_rows(rows)))
    print()
    print(planner_table())


if __name__ == "__main__":
    main()
