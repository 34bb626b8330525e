"""Packed documents: what a packed row costs against what its documents cost.

1. One process, forward+backward of one packed row of lognormal documents ([t, h, d], h=8, d=64),
   interleaved in one loop (ours packed, ours per document, SDPA per document, ours dense causal over
   the whole row, repeat), median of the repeats:
       packed      ring_ext.attention(layout="thd", cu_seqlens=cu, causal=True)
       loop        ring_ext.attention per document (causal)
       sdpa loop   F.scaled_dot_product_attention(is_causal=True) per document
       dense       ring_ext.attention over the whole row, causal, no document mask (what packing
                   costs without a document mask, and the wrong answer)
2. Context parallelism: 2 Gloo ranks x 1 thread (megatron_cp_algo, causal) against one process x 2
   threads on the same row, packed and (for scale) dense causal over the whole row; the one-process time
   is taken before and after the ranks run.
3. The packed placement's balance (ring_ext/placement.py): max/mean visible pairs per rank and the most
   tokens a rank holds against S/cp + 2 n_docs, for cp 2-16 over several lognormal mixes.

    python benchmarks/bench_varlen.py                   # S = 16384, bf16 and fp32 (~10 minutes)
    python benchmarks/bench_varlen.py --quick           # S = 4096
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from peak import fma_peak

import ring_ext
from ring_ext.placement import packed_tokens
from ring_ext.testing.documents import cu_of, lognormal_docs
from ring_ext.testing.spawn import run_distributed

HEADS, HEAD_DIM = 8, 64
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def fwd_bwd(fn, *inputs):
    ts = [t.detach().requires_grad_() for t in inputs]
    out = fn(*ts)
    out.backward(torch.ones_like(out))


def packed(q, k, v, cu):
    return lambda: fwd_bwd(
        lambda a, b, c: ring_ext.attention(a, b, c, layout="thd", cu_seqlens=cu, causal=True), q, k, v
    )


def per_doc(q, k, v, cu, sdpa: bool):
    def run():
        for a, b in zip(cu, cu[1:]):
            if b == a:
                continue
            if sdpa:  # [t, h, d] -> [1, h, t, d]
                fwd_bwd(
                    lambda x, y, z: F.scaled_dot_product_attention(
                        x.transpose(0, 1)[None],
                        y.transpose(0, 1)[None],
                        z.transpose(0, 1)[None],
                        is_causal=True,
                    ),
                    q[a:b],
                    k[a:b],
                    v[a:b],
                )
            else:
                fwd_bwd(
                    lambda x, y, z: ring_ext.attention(x[None], y[None], z[None], causal=True),
                    q[a:b],
                    k[a:b],
                    v[a:b],
                )

    return run


def dense(q, k, v):
    return lambda: fwd_bwd(
        lambda a, b, c: ring_ext.attention(a[None], b[None], c[None], causal=True), q, k, v
    )


def interleaved(fns: dict, repeats: int) -> dict:
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def inputs(total: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(total, HEADS, HEAD_DIM, generator=g).to(dtype) for _ in range(3)]


def percent_of_peak(flops: float, ms: float, peak_gflops: float) -> str:
    return f"{100 * flops / (ms * 1e-3) / 1e9 / peak_gflops:.0f}%"


def one_process_table(total: int, n_docs: int, repeats: int) -> list[str]:
    peak = fma_peak(torch.get_num_threads())
    rows = [
        f"### One process, S = {total}, {n_docs} lognormal documents, h={HEADS} d={HEAD_DIM}, fwd+bwd, "
        f"{torch.get_num_threads()} threads",
        "",
        "% peak: the documents' fwd+bwd FLOPs (3.5 x 4 h d sum L^2 / 2, as bench_kernels counts causal) per "
        f"second over the FMA-loop peak of the dtype (benchmarks/peak.py: {peak['fp32']:.0f} GFLOP/s fp32, "
        f"{peak['bf16']:.0f} bf16).",
        "",
        "| dtype | packed ms | loop ms | SDPA loop ms | dense causal ms | packed / loop | SDPA loop / packed "
        "| dense / packed | packed % peak | SDPA loop % peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cu = cu_of(lognormal_docs(total, n_docs, seed=0))
    flops = 3.5 * 4 * HEADS * HEAD_DIM * sum((b - a) ** 2 / 2 for a, b in zip(cu, cu[1:]))
    for name, dtype in DTYPES.items():
        q, k, v = inputs(total, dtype)
        t = interleaved(
            {
                "packed": packed(q, k, v, cu),
                "loop": per_doc(q, k, v, cu, sdpa=False),
                "sdpa": per_doc(q, k, v, cu, sdpa=True),
                "dense": dense(q, k, v),
            },
            repeats,
        )
        rows.append(
            f"| {name} | {t['packed']:.1f} | {t['loop']:.1f} | {t['sdpa']:.1f} | {t['dense']:.1f} "
            f"| {t['packed'] / t['loop']:.2f} | {t['sdpa'] / t['packed']:.2f} | {t['dense'] / t['packed']:.2f} "
            f"| {percent_of_peak(flops, t['packed'], peak[name])} | {percent_of_peak(flops, t['sdpa'], peak[name])} |"
        )
        print(rows[-1], flush=True)
    rows.append(f"\ndocument lengths: {[b - a for a, b in zip(cu, cu[1:])]}")
    return rows


def cp_worker(rank: int, world_size: int, case):
    total, n_docs, dtype_name, repeats, packed_row = case
    torch.set_num_threads(1)
    ctx = ring_ext.initialize(
        ring_ext.CPConfig(context_parallel_size=world_size, context_parallel_algo="megatron_cp_algo")
    )
    kw = {"cu_seqlens": torch.tensor(cu_of(lognormal_docs(total, n_docs, seed=0)))} if packed_row else {}
    q, k, v = (ring_ext.shard(t, ctx, 0, **kw) for t in inputs(total, DTYPES[dtype_name]))

    def step():
        fwd_bwd(lambda a, b, c: ring_ext.attention(a, b, c, ctx, layout="thd", **kw), q, k, v)

    step()
    times = []
    for _ in range(repeats):
        ring_ext.all_reduce(torch.zeros(1), ctx)  # start together
        start = time.perf_counter()
        step()
        elapsed = torch.tensor([time.perf_counter() - start])
        times.append(ring_ext.all_reduce(elapsed, ctx, op="max").item())  # the slowest rank's time
    return statistics.median(times) * 1e3


def cp_table(total: int, n_docs: int, repeats: int, rows_of=(True, False)) -> list[str]:
    rows = [
        f"### 2 Gloo ranks x 1 thread vs one process x 2 threads, causal, S = {total} ({n_docs} documents when packed)",
        "",
        "| dtype | row | one process ms (before) | 2 ranks ms | one process ms (after) | 2 ranks / one process |",
        "|---|---|---|---|---|---|",
    ]
    cu = cu_of(lognormal_docs(total, n_docs, seed=0))
    for name, dtype in DTYPES.items():
        q, k, v = inputs(total, dtype)
        torch.set_num_threads(2)
        for packed_row in rows_of:
            one_fn = packed(q, k, v, cu) if packed_row else dense(q, k, v)
            before = interleaved({"p": one_fn}, repeats)["p"]
            case = (total, n_docs, name, repeats, packed_row)
            ranks = run_distributed(cp_worker, 2, [case], collect=True, timeout_s=900)[0]
            after = interleaved({"p": one_fn}, repeats)["p"]
            one = (before + after) / 2
            what = "packed" if packed_row else "dense causal"
            rows.append(f"| {name} | {what} | {before:.1f} | {ranks:.1f} | {after:.1f} | {ranks / one:.2f} |")
            print(rows[-1], flush=True)
    return rows


def pairs_per_token(index: torch.Tensor, cu: list[int]) -> int:
    """Causal visible pairs of these queries: position + 1 each."""
    cu_t = torch.tensor(cu)
    doc = torch.searchsorted(cu_t, index, right=True) - 1
    return int((index - cu_t[doc] + 1).sum())


def balance_table(total: int) -> list[str]:
    rows = [
        f"### Token plan balance, S = {total}, causal, worst over 5 lognormal mixes per row",
        "",
        "| documents | cp | max/mean visible pairs | max tokens per rank | S/cp + 2 n_docs |",
        "|---|---|---|---|---|",
    ]
    for n_docs in (4, 10, 40, 200):
        for cp in (2, 3, 4, 8, 16):
            worst, most = 0.0, 0
            for seed in range(5):
                cu = cu_of(lognormal_docs(total, n_docs, seed))
                plan = packed_tokens(tuple(cu), cp, 1, True)
                pairs = [pairs_per_token(t[t < total], cu) for t in plan]
                worst = max(worst, max(pairs) / (sum(pairs) / cp))
                most = max(most, max(int((t < total).sum()) for t in plan))
            rows.append(f"| {n_docs} | {cp} | {worst:.4f} | {most} | {total / cp + 2 * n_docs:.0f} |")
    return rows


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="S = 4096, 3 repeats")
    parser.add_argument("--seq", type=int, default=None, help="packed length S (default 16384)")
    parser.add_argument("--docs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip-cp", action="store_true", help="leave out the 2-rank table")
    parser.add_argument(
        "--cp-packed-only", action="store_true", help="only the 2-rank table's packed rows (nothing else)"
    )
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = parser.parse_args()
    total = args.seq or (4096 if args.quick else 16384)
    repeats = args.repeats or (3 if args.quick else 5)
    print(
        f"cpu_isa={ring_ext.build_info()['cpu_isa']} torch={torch.__version__} load={os.getloadavg()[0]:.2f}"
    )
    if args.cp_packed_only:
        print("\n".join(cp_table(total, args.docs, repeats, rows_of=(True,))))
        return
    rows = one_process_table(total, args.docs, repeats)
    if not args.skip_cp:
        rows += [""] + cp_table(total, args.docs, repeats)
    rows += [""] + balance_table(total)
    text = "\n".join(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
