"""Error against a float64 oracle versus the ring size (docs/reliability.md).

For cp = 1, 2, 4, 8 and each algorithm, one fresh Gloo world runs forward and backward of the same
inputs (bf16 or fp32, sharded with ring_ext.shard), unshards, and rank 0 compares out, dq, dk, dv with
the float64 oracle by relative L2 error. cp=1 is the same call on a one-rank world. The first row is
PyTorch's own attention (F.scaled_dot_product_attention, one process) on the same inputs: the last
column is each row's largest error ratio to it.

    python benchmarks/bench_numerics.py [--seq 2048] [--heads 8] [--dim 64] [--cps 1 2 4 8] [--dtype fp32]
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import ring_ext
from ring_ext.testing.reference import attention_reference
from ring_ext.testing.spawn import run_distributed
from ring_ext.testing.tolerances import rel_l2

NAMES = ("out", "dq", "dk", "dv")


def algo_config(name: str, cp: int) -> ring_ext.CPConfig | None:
    kw = dict(context_parallel_size=cp)
    if name == "ring":
        kw.update(context_parallel_algo="megatron_cp_algo", use_cp_send_recv_overlap=True)
    elif name == "double_ring":
        if cp < 4:
            return None
        kw.update(context_parallel_algo="megatron_cp_algo", cp_window_size=2, use_cp_send_recv_overlap=True)
    elif name == "ulysses":
        kw.update(context_parallel_algo="ulysses_cp_algo")
    elif name == "hybrid":
        u = 2 if cp >= 2 else 1
        kw.update(context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=u)
    return ring_ext.CPConfig(**kw)


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def inputs(seq: int, heads: int, dim: int, seed: int, dtype: str):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, seq, heads, dim)] * 4
    return [torch.randn(s, generator=g).to(DTYPES[dtype]) for s in shapes]


def expected(q, k, v, dout):
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, causal=True)
    return [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]


def sdpa_errors(job) -> list[float]:
    """PyTorch's attention on the whole sequence in this process, same inputs."""
    _, seq, heads, dim, seed, dtype = job
    q, k, v, dout = inputs(seq, heads, dim, seed, dtype)
    qs, ks, vs = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    got = [out, *torch.autograd.grad(out, (qs, ks, vs), dout.transpose(1, 2))]
    return [rel_l2(a.transpose(1, 2), e) for a, e in zip(got, expected(q, k, v, dout))]


def measure(rank, world, job):
    name, seq, heads, dim, seed, dtype = job
    ctx = ring_ext.initialize(algo_config(name, world))
    q, k, v, dout = inputs(seq, heads, dim, seed, dtype)
    local = [ring_ext.shard(t, ctx, 1) for t in (q, k, v, dout)]
    ql, kl, vl = (t.requires_grad_() for t in local[:3])
    out = ring_ext.attention(ql, kl, vl, ctx, layout="bshd")
    out.backward(local[3])
    got = [ring_ext.unshard(t.detach(), ctx, 1) for t in (out, ql.grad, kl.grad, vl.grad)]
    errors = None
    if rank == 0:
        errors = [rel_l2(a, e) for a, e in zip(got, expected(q, k, v, dout))]
    dist.barrier()
    return errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--algos", nargs="+", default=["ring", "double_ring", "ulysses", "hybrid"])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"{a.dtype}, causal, s={a.seq}, heads={a.heads}, d={a.dim}: relative L2 error vs float64 oracle")
    print("| algorithm | cp | out | dq | dk | dv | max ratio to cp=1 | max ratio to SDPA |")
    print("|---|---|---|---|---|---|---|---|")
    sdpa = sdpa_errors(("sdpa", a.seq, a.heads, a.dim, a.seed, a.dtype))
    print("| SDPA (one process) | 1 | " + " | ".join(f"{e:.3e}" for e in sdpa) + " | | 1.000 |", flush=True)
    for name in a.algos:
        base = None
        for cp in a.cps:
            if algo_config(name, cp) is None:
                continue
            job = (name, a.seq, a.heads, a.dim, a.seed, a.dtype)
            errs = run_distributed(measure, cp, [job], collect=True, timeout_s=1200, pg_timeout_s=600)[0]
            base = errs if cp == 1 else base
            ratio = "" if base is None else f"{max(e / b for e, b in zip(errs, base)):.3f}"
            vs_sdpa = max(e / b for e, b in zip(errs, sdpa))
            row = " | ".join(f"{e:.3e}" for e in errs)
            print(f"| {name} | {cp} | {row} | {ratio} | {vs_sdpa:.3f} |", flush=True)


if __name__ == "__main__":
    main()
