"""Context-parallel attention on CPU/Gloo against the alternatives, interleaved in one run.

    python benchmarks/bench_ring.py                       # cp=2, s=8k, fp32+bf16, causal (the issue's target row)
    python benchmarks/bench_ring.py --cp 2 4 --seq 8192 16384 --dtype fp32 bf16 --mask causal full --out t.md

One Gloo world of cp processes per (cp, s, dtype, mask); every method is set up in that world and the methods
are timed in rounds (fwd of every method, then fwd+bwd of every method, --reps rounds after a warm-up round), so
the noise of a shared machine hits every method alike. A time is the best round of the slowest rank. CP methods run
one intra-op thread per rank; "single" runs on rank 0 with all the machine's cores while the other ranks wait.

    ring_ext          ring_ext.attention, megatron_cp_algo (ring), overlap on
    double_ring       ring_ext, megatron_cp_algo with --cp-window-size 2 (cp >= 4)
    hybrid            ring_ext, hybrid_cp_algo with --ulysses-degree-in-cp 2 (cp >= 4)
    ulysses           ring_ext, ulysses_cp_algo (cp >= 4: at cp=2 it is not a ring contender)
    allgather_sdpa    (a) all-gather K/V (differentiable) + F.scaled_dot_product_attention with an explicit mask
    single            (b) F.scaled_dot_product_attention over the full sequence in one process, all cores
    torch_ring        (c) PyTorch's templated ring loop (_context_parallel._attention._templated_ring_attention
                      with the CPU flash kernel; its public context_parallel API fails on CPU)
    ring_attn_pytorch (d) the ring-attention-pytorch package (ring_flash_attn, ring_reduce_col=True, contiguous
                      shards), when installed in the benchmark environment

Columns: forward and forward+backward time; peak memory per rank (the rise of the peak RSS over the RSS before
one fwd+bwd, the largest rank; large buffers are mmap-ed so freed memory does not hide it); relative L2 error of
O, dQ, dK, dV on head 0 against a float64 oracle of the full sequence; overlap efficiency of the ring (forward, and
forward+backward): the time the ring op spends in its block ops (fwd and merge_; bwd_acc) / the ring op's wall time,
both from one profiled call (torch.profiler records the block ops the C++ driver calls through the dispatcher), so
both see the same interference; the smallest rank, the best of --reps profiled calls.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import time
import warnings

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # peak RSS per method: see the docstring

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ring_ext  # noqa: E402
from ring_ext.testing.spawn import run_distributed  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEADS, HEAD_DIM = 8, 64
PEERS = ("allgather_sdpa", "single", "torch_ring", "ring_attn_pytorch")  # (a)-(d)
ALGOS = {  # ring_ext methods: (algo, window, ulysses degree)
    "ring_ext": ("megatron_cp_algo", 1, None),
    "double_ring": ("megatron_cp_algo", 2, None),
    "hybrid": ("hybrid_cp_algo", 1, 2),
    "ulysses": ("ulysses_cp_algo", 1, None),
}


def inputs(seq, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, seq, HEADS, HEAD_DIM, generator=g).to(dtype) for _ in range(4)]  # q, k, v, dout


def oracle_head0(q, k, v, dout, causal, rows=1024):
    """Float64 O, dQ, dK, dV of head 0 ([s, d] each), one block of query rows at a time (O(rows * s) memory)."""
    q, k, v, do = (t[0, :, 0].double() for t in (q, k, v, dout))
    s, scale = q.shape[0], q.shape[-1] ** -0.5
    out, dq, dk, dv = torch.empty_like(q), torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i0 in range(0, s, rows):
        qi, doi = q[i0 : i0 + rows], do[i0 : i0 + rows]
        sc = qi @ k.T * scale  # [rows, s]
        if causal:
            hidden = torch.arange(s)[None, :] > torch.arange(i0, i0 + qi.shape[0])[:, None]
            sc.masked_fill_(hidden, -math.inf)
        p = torch.softmax(sc, dim=-1)
        oi = p @ v
        ds = p * (doi @ v.T - (doi * oi).sum(-1, keepdim=True))
        out[i0 : i0 + rows], dq[i0 : i0 + rows] = oi, ds @ k * scale
        dv += p.T @ doi
        dk += ds.T @ qi * scale
    return out, dq, dk, dv


def rel_l2(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def vm_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux)


def bshd(t):
    return t.transpose(1, 2)  # [b, h, s, d] <-> [b, s, h, d] (a view)


def gather_seq(t, cp):
    """Contiguous sequence shards [b, s/cp, h, d] -> the full [b, s, h, d] on every rank."""
    parts = [torch.empty_like(t) for _ in range(cp)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=1)


class Method:
    """fwd(); fwd_bwd() -> local (out, dq, dk, dv) [b, s_local, h, d]; full(x) -> [b, s, h, d];
    ring: a ring_ext ring whose overlap efficiency is measured."""

    ring = False

    def __init__(self, fwd, fwd_bwd, full, rank0_only=False):
        self.fwd, self.fwd_bwd, self.full, self.rank0_only = fwd, fwd_bwd, full, rank0_only


def grads_of(fn, tensors, dout):
    a = [t.detach().requires_grad_() for t in tensors]
    out = fn(*a)
    out.backward(dout)
    return out.detach(), *(t.grad for t in a)


def _ring_ext(name):
    algo, window, u = ALGOS[name]

    def setup(rank, cp, q, k, v, dout, causal):
        if name != "ring_ext" and cp < 4:
            raise NotImplementedError(f"{name} is compared at cp >= 4")
        ctx = ring_ext.initialize(
            ring_ext.CPConfig(
                context_parallel_size=cp,
                context_parallel_algo=algo,
                attention_mask_type="causal" if causal else "general",
                use_cp_send_recv_overlap=True,
                cp_window_size=window,
                ulysses_degree_in_cp=u,
            )
        )
        ql, kl, vl, dl = (ring_ext.shard(t, ctx, 1) for t in (q, k, v, dout))
        m = Method(
            lambda: ring_ext.attention(ql, kl, vl, ctx),
            lambda: grads_of(lambda a, b, c: ring_ext.attention(a, b, c, ctx), (ql, kl, vl), dl),
            lambda x: ring_ext.unshard(x, ctx, 1),
        )
        m.ring = algo == "megatron_cp_algo"
        return m

    return setup


def _allgather_sdpa(rank, cp, q, k, v, dout, causal):
    from torch.distributed.nn.functional import all_gather

    s = q.shape[1] // cp
    ql, kl, vl, dl = (
        t[:, rank * s : (rank + 1) * s].contiguous() for t in (q, k, v, dout)
    )  # [b, s/cp, h, d]
    mask = None
    if causal:  # local rows rank*s.. see keys <= their global position
        mask = torch.arange(cp * s)[None, :] <= (torch.arange(s)[:, None] + rank * s)

    def run(a, b, c):
        # Gathered along the sequence of [b, s, h, d] (b = 1), so every gradient slice the all-gather's backward
        # sends is contiguous: gathering [b, h, s, d] along s gave wrong dK/dV over Gloo (strided all-to-all).
        kk, vv = torch.cat(all_gather(b), dim=1), torch.cat(all_gather(c), dim=1)  # [b, s, h, d]
        return bshd(F.scaled_dot_product_attention(bshd(a), bshd(kk), bshd(vv), attn_mask=mask))

    return Method(
        lambda: run(ql, kl, vl), lambda: grads_of(run, (ql, kl, vl), dl), lambda x: gather_seq(x, cp)
    )


def _single(rank, cp, q, k, v, dout, causal):
    threads = os.cpu_count()
    qt, kt, vt, dt = (bshd(t) for t in (q, k, v, dout))

    def threaded(fn):
        def run():
            if rank != 0:
                return None
            torch.set_num_threads(threads)
            try:
                return fn()
            finally:
                torch.set_num_threads(1)

        return run

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=causal)

    def fwd_bwd():
        return tuple(bshd(t) for t in grads_of(sdpa, (qt, kt, vt), dt))

    return Method(threaded(lambda: sdpa(qt, kt, vt)), threaded(fwd_bwd), lambda x: x, rank0_only=True)


def _torch_ring(rank, cp, q, k, v, dout, causal):
    from torch.distributed.tensor.experimental._context_parallel import _attention as tca

    tca._cp_options.enable_load_balance = causal  # its head-tail order is the zigzag of ring_ext.shard
    ctx = ring_ext.initialize(
        ring_ext.CPConfig(
            context_parallel_size=cp,
            context_parallel_algo="megatron_cp_algo",
            attention_mask_type="causal" if causal else "general",
        )
    )
    ql, kl, vl, dl = (bshd(ring_ext.shard(t, ctx, 1)).contiguous() for t in (q, k, v, dout))
    group = dist.group.WORLD
    fwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    bwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default

    def fwd():
        return tca._templated_ring_attention(group, 2, fwd_op, ql, kl, vl, is_causal=causal)

    def fwd_bwd():
        out, lse = fwd()[:2]
        out = out.to(ql.dtype)
        dq, dk, dv = tca._templated_ring_attention_backward(
            group, 2, bwd_op, dl, "grad_out", ql, kl, vl, out, lse, is_causal=causal, dropout_p=0.0
        )[:3]
        return tuple(bshd(t) for t in (out, dq, dk, dv))

    return Method(fwd, fwd_bwd, lambda x: ring_ext.unshard(x.contiguous(), ctx, 1))


def _ring_attn_pytorch(rank, cp, q, k, v, dout, causal):
    from ring_attention_pytorch import ring_flash_attn

    s = q.shape[1] // cp
    ql, kl, vl, dl = (
        t[:, rank * s : (rank + 1) * s].contiguous() for t in (q, k, v, dout)
    )  # [b, s/cp, h, d]

    def run(a, b, c):
        return ring_flash_attn(a, b, c, causal=causal, ring_reduce_col=True)

    return Method(
        lambda: run(ql, kl, vl), lambda: grads_of(run, (ql, kl, vl), dl), lambda x: gather_seq(x, cp)
    )


METHODS = {name: _ring_ext(name) for name in ALGOS} | {
    "allgather_sdpa": _allgather_sdpa,
    "single": _single,
    "torch_ring": _torch_ring,
    "ring_attn_pytorch": _ring_attn_pytorch,
}


def short(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:90]}"


def timed_max(fn):
    """Wall time of fn on the slowest rank, ranks started together."""
    dist.barrier()
    t = time.perf_counter()
    fn()
    t = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


COMPUTE = {
    "ring_ext::attention": ("ring_ext::fwd", "ring_ext::merge_"),
    "ring_ext::attention_bwd": ("ring_ext::bwd_acc",),
}


def overlap_efficiency(fwd_bwd):
    """(forward, forward+backward) ring compute time / ring wall time of one profiled call, the smallest rank:
    compute = the block ops the ring op calls (fwd and merge_, bwd_acc), wall = the ring op itself."""
    dist.barrier()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fwd_bwd()
    wall, compute = dict.fromkeys(COMPUTE, 0.0), dict.fromkeys(COMPUTE, 0.0)
    for e in prof.events():
        for op, parts in COMPUTE.items():
            wall[op] += e.cpu_time_total if e.name == op else 0.0
            compute[op] += e.cpu_time_total if e.name in parts else 0.0
    fwd_op, bwd_op = COMPUTE
    effs = torch.tensor(
        [compute[fwd_op] / wall[fwd_op], sum(compute.values()) / sum(wall.values())], dtype=torch.float64
    )
    dist.all_reduce(effs, op=dist.ReduceOp.MIN)
    return tuple(effs.tolist())


def measure_first(m, cp, ref):
    """Warm-up fwd+bwd: peak memory rise on the largest rank, and the errors of O, dQ, dK, dV on head 0."""
    dist.barrier()
    reset_peak_rss()
    before = vm_kb("VmRSS")
    res = m.fwd_bwd()
    peak = torch.tensor([(vm_kb("VmHWM") - before) / 1024], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    errs = None
    if m.rank0_only:
        if dist.get_rank() == 0:
            errs = [rel_l2(t[0, :, 0], r) for t, r in zip(res, ref)]
    else:
        full = [m.full(t.contiguous()) for t in res]
        if dist.get_rank() == 0:
            errs = [rel_l2(t[0, :, 0], r) for t, r in zip(full, ref)]
    return peak.item(), errs


def cp_worker(rank, cp, case):
    warnings.filterwarnings("ignore")
    names, seq, dtype_name, causal, reps, ref = case
    q, k, v, dout = inputs(seq, DTYPES[dtype_name])
    results, methods = {}, {}
    for name in names:  # setup is collective (groups): every rank walks the same list
        try:
            methods[name] = METHODS[name](rank, cp, q, k, v, dout, causal)
        except (ImportError, NotImplementedError) as e:
            results[name] = dict(error=short(e))
    for name, m in list(methods.items()):  # warm-up round: memory and errors
        try:
            peak, errs = measure_first(m, cp, ref)
            m.fwd()
            results[name] = dict(peak=peak, errs=errs, fwd=math.inf, fb=math.inf)
        except (RuntimeError, TypeError, AssertionError, ValueError) as e:
            results[name] = dict(error=short(e))
            del methods[name]
            dist.barrier()  # a rank that raised resynchronises here (errors are rank-symmetric)
    for _ in range(reps):
        for name, m in methods.items():
            results[name]["fwd"] = min(results[name]["fwd"], timed_max(m.fwd))
        for name, m in methods.items():
            results[name]["fb"] = min(results[name]["fb"], timed_max(m.fwd_bwd))
        for name, m in methods.items():
            if m.ring:
                eff = overlap_efficiency(m.fwd_bwd)
                results[name]["eff"] = tuple(map(max, results[name].get("eff", (0.0, 0.0)), eff))
    return results


def fmt_row(cp, seq, dt, mask, name, r, best_peer):
    head = f"| {cp} | {seq // 1024}k | {dt} | {mask} | {name} "
    if "error" in r:
        return head + "| n/a " * 9 + f"| {r['error']} |"
    vs = f"{best_peer / r['fb']:.2f}x" if best_peer and name in ALGOS else "-"
    errs = " | ".join(f"{e:.1e}" for e in r["errs"])
    eff = "{:.2f} / {:.2f}".format(*r["eff"]) if "eff" in r else "-"
    return head + f"| {r['fwd']:.2f} | {r['fb']:.2f} | {vs} | {r['peak']:.0f} | {errs} | {eff} | |"


HEADER = (
    "| cp | s | dtype | mask | method | fwd s | fwd+bwd s | speed-up vs fastest of (a)-(d) | peak MB/rank "
    "| err O | err dQ | err dK | err dV | overlap eff fwd / fwd+bwd | note |\n|" + "---|" * 15
)


def comm_mb(name, cp, seq, dtype_name):
    """Forward bytes a rank sends (model): ring (cp-1) K/V blocks; Ulysses 4 all-to-alls of q, k, v, out,
    each keeping 1/cp local; hybrid with u=2 both; double ring as the ring."""
    elt = 4 if dtype_name == "fp32" else 2
    block = seq // cp * HEADS * HEAD_DIM * elt  # one tensor's local shard [s/cp, h, d]
    ring = (cp - 1) * 2 * block
    if name == "ulysses":
        return 4 * block * (cp - 1) / cp / 2**20
    if name == "hybrid":
        u = ALGOS[name][2]
        return (4 * block * (u - 1) / u + (cp // u - 1) * 2 * block) / 2**20
    return ring / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", type=int, nargs="+", default=[2])
    p.add_argument("--seq", type=int, nargs="+", default=[8192])
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--mask", nargs="+", default=["causal"], choices=["causal", "full"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", help="also write the markdown tables to this file")
    args = p.parse_args()
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    lines = [
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} cores, load average at start {load}",
        "",
    ]
    lines += [HEADER]
    print("\n".join(lines), flush=True)
    algo_rows = []
    for cp in args.cp:
        for seq in args.seq:
            for dt in args.dtype:
                for mask in args.mask:
                    causal = mask == "causal"
                    torch.set_num_threads(os.cpu_count())
                    ref = oracle_head0(*inputs(seq, DTYPES[dt]), causal)
                    names = [
                        m for m in args.methods if cp >= 4 or m not in ("double_ring", "hybrid", "ulysses")
                    ]
                    (res,) = run_distributed(
                        cp_worker,
                        cp,
                        [(names, seq, dt, causal, args.reps, ref)],
                        collect=True,
                        timeout_s=7200,
                        pg_timeout_s=3600,
                    )
                    peers = [res[m]["fb"] for m in PEERS if m in res and "fb" in res[m]]
                    best = min(peers) if peers else None
                    for name in names:
                        row = fmt_row(cp, seq, dt, mask, name, res[name], best)
                        lines.append(row)
                        print(row, flush=True)
                    if cp >= 4:
                        algo_rows.append((cp, seq, dt, mask, res))
    if algo_rows:
        lines += [
            "",
            "Algorithms at cp >= 4 (ring_ext; times relative to the plain ring, forward bytes sent per rank):",
            "",
        ]
        lines += [
            "| cp | s | dtype | mask | algorithm | fwd s | fwd+bwd s | fwd+bwd vs ring | fwd MB sent/rank |",
            "|" + "---|" * 9,
        ]
        for cp, seq, dt, mask, res in algo_rows:
            ring_fb = res.get("ring_ext", {}).get("fb")
            for name in ALGOS:
                r = res.get(name, {})
                if "fb" not in r:
                    continue
                vs = f"{ring_fb / r['fb']:.2f}x" if ring_fb else "-"
                lines.append(
                    f"| {cp} | {seq // 1024}k | {dt} | {mask} | {name} | {r['fwd']:.2f} | {r['fb']:.2f} | {vs} "
                    f"| {comm_mb(name, cp, seq, dt):.0f} |"
                )
        print("\n".join(lines[-len(algo_rows) * len(ALGOS) - 4 :]), flush=True)
    with open("/proc/loadavg") as f:
        lines += ["", f"load average at end {' '.join(f.read().split()[:3])}"]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
