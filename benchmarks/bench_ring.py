"""Ring attention on CPU/Gloo against the alternatives, in one run, side by side.

    python benchmarks/bench_ring.py                       # cp=2, s=8k, fp32+bf16, causal (the issue's target row)
    python benchmarks/bench_ring.py --cp 2 4 --seq 8192 16384 --dtype fp32 bf16 --mask causal full

Every CP method runs on cp Gloo processes with one intra-op thread each; "single" is one process with cp
threads and no CP. Columns: forward and forward+backward wall time (best of --reps after a warm-up), peak RSS per rank,
and the relative L2 error of the output against float64 on one head. Methods:

    ring_ext          ring_ext.attention, megatron_cp_algo, overlap on
    allgather_sdpa    (a) all-gather K/V (differentiable) + F.scaled_dot_product_attention with an explicit mask
    single            (b) F.scaled_dot_product_attention over the full sequence in one process, cp threads
    torch_ring        (c) PyTorch's templated ring loop (_context_parallel._attention._templated_ring_attention
                      with the CPU flash kernel; its public context_parallel API fails on CPU)
    ring_attn_pytorch (d) the ring-attention-pytorch package, when installed in the benchmark environment

Overlap efficiency = (this rank's ring compute alone, the same block calls without communication) / (ring wall
time), forward, the minimum over ranks.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import ring_ext  # noqa: E402
from ring_ext.reference import attention_reference  # noqa: E402
from ring_ext.ring import schedule  # noqa: E402

from distributed import run_distributed  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEADS, HEAD_DIM = 8, 64


def timed(fn, reps):
    """Best of reps after a warm-up: the least disturbed run on a shared machine."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def inputs(seq, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1, seq, HEADS, HEAD_DIM, generator=g).to(dtype) for _ in range(4)
    ]  # q, k, v, dout [b,s,h,d]


def error_one_head(out_full, q, k, v, causal):
    """rel L2 of head 0 of the full output against float64."""
    ref, _ = attention_reference(q[:, :, :1], k[:, :, :1], v[:, :, :1], causal=causal)
    o = out_full[:, :, :1].double()
    return ((o - ref).norm() / ref.norm()).item()


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ring_ext(rank, cp, q, k, v, dout, causal, reps):
    cfg = ring_ext.CPConfig(
        context_parallel_size=cp,
        context_parallel_algo="megatron_cp_algo",
        attention_mask_type="causal" if causal else "general",
        use_cp_send_recv_overlap=True,
    )
    ctx = ring_ext.initialize(cfg)
    ql, kl, vl, dl = (ring_ext.shard(t, ctx, 1) for t in (q, k, v, dout))
    fwd = timed(lambda: ring_ext.attention(ql, kl, vl, ctx), reps)

    def fwd_bwd():
        a, b, c = (t.detach().requires_grad_() for t in (ql, kl, vl))
        ring_ext.attention(a, b, c, ctx).backward(dl)

    fb = timed(fwd_bwd, reps)
    # Overlap efficiency: compute alone and the ring's wall time, measured back to back, best of each.
    effs = [
        timed(lambda: _local_compute(ql, kl, vl, cp, rank, causal), 1)
        / timed(lambda: ring_ext.attention(ql, kl, vl, ctx), 1)
        for _ in range(reps)
    ]
    out = ring_ext.unshard(ring_ext.attention(ql, kl, vl, ctx), ctx, 1)
    return fwd, fb, out, max(effs)


def _local_compute(q, k, v, cp, rank, causal):
    """This rank's forward block calls without any communication (every step uses the local K/V)."""
    chunk = q.shape[1] // (2 if causal else 1)
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"))
    for step in schedule("megatron_cp_algo", cp, rank, 1, causal):
        for it in step.items:
            qr = slice(it.q_chunk * chunk, (it.q_chunk + it.q_chunks) * chunk)
            kr = slice(it.kv_chunk * chunk, (it.kv_chunk + it.kv_chunks) * chunk)
            bo, bl = torch.ops.ring_ext.fwd(
                q[:, qr],
                k[:, kr],
                v[:, kr],
                q.shape[-1] ** -0.5,
                it.causal,
                it.q_offset * chunk,
                it.k_offset * chunk,
                True,
            )
            torch.ops.ring_ext.merge_(out[:, qr], lse[..., qr], bo, bl)
    return out.to(q.dtype)


def _allgather_sdpa(rank, cp, q, k, v, dout, causal, reps):
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    s = q.shape[1] // cp
    ql, kl, vl, dl = (t[:, rank * s : (rank + 1) * s].transpose(1, 2).contiguous() for t in (q, k, v, dout))
    mask = None
    if causal:  # local rows rank*s.. see keys <= their global position
        mask = torch.arange(cp * s)[None, :] <= (torch.arange(s)[:, None] + rank * s)

    def run(a, b, c):
        kk, vv = torch.cat(all_gather(b), dim=2), torch.cat(all_gather(c), dim=2)  # [b, h, s_full, d]
        return F.scaled_dot_product_attention(a, kk, vv, attn_mask=mask)

    fwd = timed(lambda: run(ql, kl, vl), reps)

    def fwd_bwd():
        a, b, c = (t.detach().requires_grad_() for t in (ql, kl, vl))
        run(a, b, c).backward(dl)

    fb = timed(fwd_bwd, reps)
    parts = [torch.empty_like(ql) for _ in range(cp)]
    dist.all_gather(parts, run(ql, kl, vl).contiguous())
    return fwd, fb, torch.cat(parts, dim=2).transpose(1, 2), None


def _torch_ring(rank, cp, q, k, v, dout, causal, reps):
    import torch.distributed as dist
    from torch.distributed.tensor.experimental._context_parallel import _attention as tca

    tca._cp_options.enable_load_balance = causal  # its own zigzag ("head-tail") order for causal
    ctx = ring_ext.initialize(
        ring_ext.CPConfig(
            context_parallel_size=cp,
            context_parallel_algo="megatron_cp_algo",
            attention_mask_type="causal" if causal else "general",
        )
    )
    ql, kl, vl, dl = (ring_ext.shard(t, ctx, 1).transpose(1, 2).contiguous() for t in (q, k, v, dout))
    group = dist.group.WORLD
    fwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    bwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default

    def fwd():
        return tca._templated_ring_attention(group, 2, fwd_op, ql, kl, vl, is_causal=causal)

    def fwd_bwd():
        out, lse = fwd()[:2]
        out = out.to(ql.dtype)
        tca._templated_ring_attention_backward(
            group, 2, bwd_op, dl, "grad_out", ql, kl, vl, out, lse, is_causal=causal, dropout_p=0.0
        )

    t_f, t_fb = timed(fwd, reps), timed(fwd_bwd, reps)
    out = ring_ext.unshard(fwd()[0].to(ql.dtype).transpose(1, 2).contiguous(), ctx, 1)
    return t_f, t_fb, out, None


def _ring_attn_pytorch(rank, cp, q, k, v, dout, causal, reps):
    import ring_attention_pytorch  # noqa: F401  (raises ImportError when not installed)

    raise NotImplementedError("ring_attention_pytorch driver not written; see the docs")


METHODS = {
    "ring_ext": _ring_ext,
    "allgather_sdpa": _allgather_sdpa,
    "torch_ring": _torch_ring,
    "ring_attn_pytorch": _ring_attn_pytorch,
}


def cp_worker(rank, cp, case):
    warnings.filterwarnings("ignore", category=FutureWarning)
    method, seq, dtype_name, causal, reps = case
    q, k, v, dout = inputs(seq, DTYPES[dtype_name])
    try:
        fwd, fb, out, eff = METHODS[method](rank, cp, q, k, v, dout, causal, reps)
    except (ImportError, NotImplementedError, RuntimeError, TypeError) as e:
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
    err = error_one_head(out, q, k, v, causal) if rank == 0 else None
    return dict(fwd=fwd, fb=fb, rss=rss_mb(), err=err, eff=eff)


def single(seq, dtype_name, causal, reps, threads):
    torch.set_num_threads(threads)
    q, k, v, dout = inputs(seq, DTYPES[dtype_name])
    qt, kt, vt, dt = (t.transpose(1, 2) for t in (q, k, v, dout))
    fwd = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal), reps)

    def fwd_bwd():
        a, b, c = (t.detach().requires_grad_() for t in (qt, kt, vt))
        F.scaled_dot_product_attention(a, b, c, is_causal=causal).backward(dt)

    fb = timed(fwd_bwd, reps)
    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
    return dict(fwd=fwd, fb=fb, rss=rss_mb(), err=error_one_head(out, q, k, v, causal), eff=None)


def fmt(r):
    if "error" in r:
        return f"| n/a | n/a | n/a | n/a | n/a | {r['error']} |"
    eff = f"{r['eff']:.2f}" if r.get("eff") is not None else "-"
    return f"| {r['fwd']:.3f} | {r['fb']:.3f} | {r['rss']:.0f} | {r['err']:.1e} | {eff} | |"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", type=int, nargs="+", default=[2])
    p.add_argument("--seq", type=int, nargs="+", default=[8192])
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--mask", nargs="+", default=["causal"], choices=["causal", "full"])
    p.add_argument("--methods", nargs="+", default=list(METHODS) + ["single"])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    print(
        "| cp | s | dtype | mask | method | fwd s | fwd+bwd s | peak RSS MB/rank | rel L2 (head 0) | overlap eff | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for cp in args.cp:
        for seq in args.seq:
            for dt in args.dtype:
                for mask in args.mask:
                    causal = mask == "causal"
                    for m in args.methods:
                        if m == "single":
                            r = single(seq, dt, causal, args.reps, cp)
                        else:
                            rs = run_distributed(
                                cp_worker,
                                cp,
                                [(m, seq, dt, causal, args.reps)],
                                collect=True,
                                timeout_s=3600,
                                pg_timeout_s=1800,
                            )
                            r = rs[0]
                        print(f"| {cp} | {seq} | {dt} | {mask} | {m} {fmt(r)}", flush=True)


if __name__ == "__main__":
    main()
