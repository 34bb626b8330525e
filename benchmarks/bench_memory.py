"""Peak memory per rank of context-parallel attention, forward+backward, versus cp (docs/reliability.md).

One fresh spawned Gloo world per (algorithm, total length s, cp). Each rank draws its own local
shards (bf16, [1, s/cp, heads, dim]) directly, so no full-sequence tensor ever exists, then measures
the peak resident memory above that point (ring_ext.peak_memory.PeakRSS with exact_peaks, so every
large buffer is its own mmap and returned when freed) over one forward and backward. The table
shows the largest per-rank peak; the fit per algorithm is peak = a * (s / cp) + c over every point,
and each point's deviation from it, which stays within 10% when memory falls as 1/cp plus a constant.

    python benchmarks/bench_memory.py                       # s = 8k..64k, cp = 1, 2, 4 (long)
    python benchmarks/bench_memory.py --sizes 8192 16384    # quicker
    python benchmarks/bench_memory.py --soak 200 --sizes 4096 --cps 2   # memory over 200 iterations
    python benchmarks/bench_memory.py --chunk-cost --sizes 8192         # what Ulysses' row chunks cost

--chunk-cost times, in one process and one thread, what a Ulysses rank's CPU backward does for one
gathered head (Note [Ulysses row chunks] in csrc/cp/attention.cpp): one kernel call over the whole
sequence against the same gradients in calls of 1024 rows, interleaved, median of 7.

Algorithm "sdpa" is the baseline: one process (cp = 1 only) running F.scaled_dot_product_attention
over the whole sequence; "local" is ring_ext's own kernels over the whole sequence in one process
(cp = 1 only, no context: every head in one call, the kernels' own working set). Columns "/ sdpa"
and "x cp / cp=1" compare each peak with that baseline and with the same algorithm's cp = 1 peak
scaled by 1/cp, when those ran in the same invocation.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ring_ext
from ring_ext.peak_memory import PeakRSS, exact_peaks
from ring_ext.testing.spawn import run_distributed


def algo_config(name: str, cp: int) -> ring_ext.CPConfig:
    kw = dict(context_parallel_size=cp, use_cp_send_recv_overlap=True)
    if name == "ring":
        kw.update(context_parallel_algo="megatron_cp_algo")
    elif name == "ulysses":
        kw.update(context_parallel_algo="ulysses_cp_algo")
    else:
        kw.update(context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2 if cp >= 2 else 1)
    return ring_ext.CPConfig(**kw)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def measure(rank, world, job):
    name, seq, heads, dim, iterations = job
    exact_peaks()
    torch.set_num_threads(max(1, 2 // world))
    if name == "sdpa":  # [b, s, h, d] tensors seen as [b, h, s, d], as a model calls SDPA

        def attend(q, k, v):
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)
    elif name == "local":

        def attend(q, k, v):
            return ring_ext.attention(q, k, v, layout="bshd", causal=True)
    else:
        ctx = ring_ext.initialize(algo_config(name, world))

        def attend(q, k, v):
            return ring_ext.attention(q, k, v, ctx, layout="bshd")

    g = torch.Generator().manual_seed(rank)
    shape = (1, seq // world, heads, dim)
    q, k, v, dout = (torch.randn(shape, generator=g, dtype=torch.bfloat16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    warm = [t[:, :256].detach().clone().requires_grad_() for t in (q, k, v)]  # one-time set-up (threads,
    attend(*warm).backward(dout[:, :256])  # lazy inits) is not the peak
    del warm
    rss = []
    with PeakRSS() as m:
        for _ in range(iterations):
            out = attend(q, k, v)
            out.backward(dout)
            del out
            q.grad = k.grad = v.grad = None
            rss.append(_rss_mib())
    row = [m.peak_mib, m.seconds, rss[min(19, len(rss) - 1)], rss[-1]]
    rows = [None] * world
    dist.all_gather_object(rows, row)
    return rows


ONE_PROCESS = ("sdpa", "local")  # run at cp = 1 only


def chunk_cost(seq: int, dim: int, chunk: int = 1024) -> None:
    """Whole-sequence backward of one causal head against the same in row chunks, one thread."""
    torch.set_num_threads(1)
    scale = dim**-0.5
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v, dout = (torch.randn(1, seq, 1, dim, dtype=dtype) for _ in range(4))
        out, lse = torch.ops.ring_ext.fwd(q, k, v, scale, True)
        delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()

        def whole():
            dq, dk, dv = (torch.zeros(1, seq, 1, dim) for _ in range(3))
            torch.ops.ring_ext.bwd_acc(dout, q, k, v, lse, delta, scale, True, 0, 0, dq, dk, dv)
            return dk

        def chunked():
            dk, dv = (torch.zeros(1, seq, 1, dim) for _ in range(2))
            acc = torch.empty(1, chunk, 1, dim)
            for r in range(0, seq, chunk):
                rows = slice(r, r + chunk)
                torch.ops.ring_ext.bwd_acc(
                    dout[:, rows],
                    q[:, rows],
                    k,
                    v,
                    lse[..., rows],
                    delta[..., rows],
                    scale,
                    True,
                    r,
                    0,
                    acc[:, : min(chunk, seq - r)].zero_(),
                    dk,
                    dv,
                )
            return dk

        torch.testing.assert_close(chunked(), whole(), rtol=1e-4, atol=1e-4)  # the same gradients
        times = {whole: [], chunked: []}
        for _ in range(7):
            for fn in times:
                start = time.perf_counter()
                fn()
                times[fn].append(time.perf_counter() - start)
        a, b = (statistics.median(times[fn]) * 1e3 for fn in (whole, chunked))
        print(f"| {str(dtype).split('.')[-1]} | {seq} | {dim} | {a:.1f} | {b:.1f} | {b / a:.3f} |")


def fit(points):
    """Least squares peak = a * x + c over (x, peak) points."""
    x = torch.tensor([p[0] for p in points], dtype=torch.float64)
    y = torch.tensor([p[1] for p in points], dtype=torch.float64)
    A = torch.stack([x, torch.ones_like(x)], 1)
    a, c = torch.linalg.lstsq(A, y[:, None]).solution[:, 0].tolist()
    return a, c


def refit(path: str) -> None:
    by_algo: dict = {}
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) in (6, 8) and cells[1].isdigit() and cells[0] != "sdpa":
            s, cp, peak = int(cells[1]), int(cells[2]), float(cells[4])
            by_algo.setdefault(cells[0], []).append((s // cp, peak, s, cp))
    for name, points in by_algo.items():
        report_fit(name, points)


def report_fit(name: str, points: list) -> None:
    """Fits peak = a * s/cp + c over all points and over cp >= 2 (where the ring's transfer buffers
    exist), printing each point's deviation from the fit."""
    for label, pts in (("all cp", points), ("cp >= 2", [p for p in points if p[3] >= 2])):
        if len(pts) < 2:
            continue
        a_, c_ = fit([(x, y) for x, y, *_ in pts])
        print(f"\nfit {name} ({label}): peak_MiB = {a_ * 1024:.3f} * (s/cp in k tokens) + {c_:.1f}")
        for x, y, s, cp in pts:
            pred = a_ * x + c_
            print(f"  s={s} cp={cp}: measured {y:.0f}, fit {pred:.0f}, {100 * (y - pred) / pred:+.1f}%")
    print(flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--algos", nargs="+", default=["sdpa", "ring", "ulysses", "hybrid"], help="also: local (see above)"
    )
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--soak", type=int, default=0, help="iterations per world (memory growth mode)")
    p.add_argument("--refit", help="a file holding this script's table: print the fits only")
    p.add_argument("--chunk-cost", action="store_true", help="time Ulysses' row chunks (see above)")
    a = p.parse_args()
    if a.chunk_cost:
        print("| dtype | s | d | whole ms | 1024-row chunks ms | chunks / whole |")
        print("|---|---|---|---|---|---|")
        for s in a.sizes:
            chunk_cost(s, a.dim)
        return None
    iterations = max(1, a.soak)
    if a.refit:
        return refit(a.refit)
    local_mib = lambda s, cp: 4 * s // cp * a.heads * a.dim * 2 / 2**20  # noqa: E731  q, k, v, dout
    print(
        f"bf16, causal, heads={a.heads}, d={a.dim}, forward+backward x{iterations}; peak RSS above the inputs"
    )
    if a.soak:
        print("| algorithm | s | cp | RSS after it 20 (MiB) | after last | growth |")
        print("|---|---|---|---|---|---|")
    else:
        print(
            "| algorithm | s | cp | inputs/rank (MiB) | peak/rank (MiB) | time (s) | / sdpa | x cp / cp=1 |"
        )
        print("|---|---|---|---|---|---|---|---|")
    peaks = {}  # (algorithm, s, cp) -> peak MiB
    for name in a.algos:
        points = []
        for s in a.sizes:
            for cp in [1] if name in ONE_PROCESS else a.cps:
                job = (name, s, a.heads, a.dim, iterations)
                rows = run_distributed(measure, cp, [job], collect=True, timeout_s=3600, pg_timeout_s=1800)[0]
                if a.soak:
                    for r, row in enumerate(rows):
                        print(
                            f"| {name} | {s} | {cp} (rank {r}) | {row[2]:.1f} | {row[3]:.1f} | {row[3] - row[2]:+.1f} |"
                        )
                    continue
                peak = peaks[name, s, cp] = max(r[0] for r in rows)
                points.append((s // cp, peak, s, cp))
                vs_sdpa = f"{peak / peaks['sdpa', s, 1]:.2f}" if ("sdpa", s, 1) in peaks else "-"
                vs_cp1 = f"{peak * cp / peaks[name, s, 1]:.2f}" if (name, s, 1) in peaks else "-"
                print(
                    f"| {name} | {s} | {cp} | {local_mib(s, cp):.0f} | {peak:.0f} | {max(r[1] for r in rows):.1f}"
                    f" | {vs_sdpa} | {vs_cp1} |",
                    flush=True,
                )
        if name not in ONE_PROCESS:
            report_fit(name, points)
        time.sleep(0.5)


if __name__ == "__main__":
    main()
