"""ring_ext's CPU attention against PyTorch's CPU flash attention (F.scaled_dot_product_attention).

Both run in the same process on the same tensors ([b, h, s, d], the "bnsd" layout for ring_ext),
interleaved (ours, theirs, ours, theirs, ...), and each time is the median of the repeats, so the
noise of a shared machine hits both alike. Each kernel's GFLOP/s is shown as a fraction of the CPU's
arithmetic peak for the row's dtype, measured before and after the table with an FMA loop on the
widest vectors the CPU has (benchmarks/peak.py; the larger of the two), not of torch.mm, which on AMD
takes a slower MKL path. The header names the CPU model, the kernels' cpu_isa and those vectors.

FLOPs: forward 4 * b * h * s^2 * d (two matmuls), forward+backward 3.5x that (five more matmuls in
the backward, counted as 2.5 forwards, as flash-attention does); causal counts half.

    python benchmarks/bench_kernels.py                 # full table (~15 minutes on 2 cores)
    python benchmarks/bench_kernels.py --quick         # smoke subset
    python benchmarks/bench_kernels.py --shapes bf16:128:4096:causal fp32:64:2048:full --out t.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from peak import cpu_model, fma_peak, fma_vectors

import ring_ext

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BATCH, HEADS = 1, 8


def parse_shape(text: str) -> tuple[str, int, int, bool]:
    """'bf16:128:4096:causal' -> ('bf16', 128, 4096, True)."""
    try:
        dtype, d, s, mask = text.split(":")
        assert dtype in DTYPES and mask in ("causal", "full")
        return dtype, int(d), int(s), mask == "causal"
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(
            f"shape must be dtype:d:s:causal|full (dtype in {list(DTYPES)}), got {text!r}"
        ) from None


def default_shapes(quick: bool) -> list[tuple[str, int, int, bool]]:
    if quick:
        return [(dt, 64, 2048, causal) for dt in DTYPES for causal in (False, True)]
    return [
        (dt, d, s, causal)
        for dt in DTYPES
        for d in (64, 128)
        for s in (2048, 4096, 8192)
        for causal in (False, True)
    ]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_runners(dtype: torch.dtype, d: int, s: int, causal: bool, backward: bool):
    """Two callables (ours, sdpa) computing the same attention on the same [b, h, s, d] tensors."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(BATCH, HEADS, s, d, generator=g).to(dtype).requires_grad_(backward) for _ in range(3)
    )
    dout = torch.randn(BATCH, HEADS, s, d, generator=g).to(dtype)

    def ours():
        return ring_ext.attention(q, k, v, layout="bnsd", causal=causal)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def with_backward(fn):
        def run():
            out = fn()
            q.grad = k.grad = v.grad = None
            out.backward(dout)

        return run

    if backward:
        return with_backward(ours), with_backward(sdpa)
    return (lambda: ours()), (lambda: sdpa())


def bench_interleaved(fns, repeats: int) -> list[float]:
    """Median seconds of each callable, run round-robin after one warm-up each."""
    with torch.inference_mode(False):
        for fn in fns:
            fn()
        times = [[] for _ in fns]
        for _ in range(repeats):
            for fn, ts in zip(fns, times):
                ts.append(timed(fn))
    return [statistics.median(ts) for ts in times]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small subset (s=2048, d=64) for smoke runs")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, help="dtype:d:s:causal|full entries")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=0, help="per shape; 0 = 5 below s=8192, else 3")
    parser.add_argument("--out", help="also write the markdown table to this file")
    if ring_ext.build_info()["emulated_avx512"]:
        sys.exit(
            "bench_kernels: this is a test build with emulated AVX-512 kernels (setup.py); its speed means nothing"
        )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = args.shapes or default_shapes(args.quick)

    peak_before = fma_peak(args.threads)
    lines = [
        f"ring_ext CPU kernels vs F.scaled_dot_product_attention, torch {torch.__version__}, "
        f"cpu: {cpu_model()}, cpu_isa={ring_ext.build_info()['cpu_isa']}, b={BATCH}, h={HEADS}, "
        f"{args.threads} threads. % peak = GFLOP/s over the FMA-loop peak of the row's dtype "
        f"(benchmarks/peak.py, on the widest vectors: {fma_vectors()}; fp32 {peak_before['fp32']:.0f}, "
        f"bf16 {peak_before['bf16']:.0f} GFLOP/s before the table). "
        "ratio = ours / SDPA time (< 1: ours faster). Causal FLOPs counted as half. "
        f"Load average at start: {os.getloadavg()[0]:.1f}.",
        "",
        "| dtype | d | s | mask | pass | ours ms | SDPA ms | ours GFLOP/s | SDPA GFLOP/s "
        "| ours % peak | SDPA % peak | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rows = []
    for dtype_name, d, s, causal in shapes:
        for backward in (False, True):
            repeats = args.repeats or (5 if s < 8192 else 3)
            ours, sdpa = make_runners(DTYPES[dtype_name], d, s, causal, backward)
            t_ours, t_sdpa = bench_interleaved([ours, sdpa], repeats)
            flops = 4 * BATCH * HEADS * s * s * d * (3.5 if backward else 1.0) * (0.5 if causal else 1.0)
            rows.append((dtype_name, d, s, causal, backward, t_ours, t_sdpa, flops))
            print(f"{rows[-1][:5]}: ours {t_ours * 1e3:.1f} ms, SDPA {t_sdpa * 1e3:.1f} ms", flush=True)
    peak_after = fma_peak(args.threads)
    peak = {k: max(peak_before[k], peak_after[k]) for k in peak_before}
    for dtype_name, d, s, causal, backward, t_ours, t_sdpa, flops in rows:
        g_ours, g_sdpa = flops / t_ours / 1e9, flops / t_sdpa / 1e9
        lines.append(
            f"| {dtype_name} | {d} | {s} | {'causal' if causal else 'full'} | "
            f"{'fwd+bwd' if backward else 'fwd'} | {t_ours * 1e3:.1f} | {t_sdpa * 1e3:.1f} | "
            f"{g_ours:.0f} | {g_sdpa:.0f} | {100 * g_ours / peak[dtype_name]:.0f}% | "
            f"{100 * g_sdpa / peak[dtype_name]:.0f}% | {t_ours / t_sdpa:.2f} |"
        )
    lines.append(
        "\nFMA-loop peak, GFLOP/s (before / after the table): "
        + ", ".join(f"{k} {peak_before[k]:.0f} / {peak_after[k]:.0f}" for k in peak)
        + "."
    )
    print("\n".join(lines[2:]), flush=True)
    lines.append(f"\nLoad average at end: {os.getloadavg()[0]:.1f}.")
    print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
