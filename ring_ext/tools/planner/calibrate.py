"""`plan --calibrate`: this machine's rates for the planner's model, measured: the kernels' forward+backward
rate per rank (`calibrated_rates`) and one Gloo link between two local processes (`measure_link`)."""

from __future__ import annotations

import dataclasses
import math
import os
import time

import torch
import torch.distributed as dist

from ...attention import attention
from ...testing.spawn import run_distributed
from .model import DTYPES, Shape, attention_flops


def measure_flops(shape: Shape, threads: int = 1, repeats: int = 3) -> float:
    """flops/s of ring_ext's kernels, forward+backward on one process at a short slice of `shape`."""
    dtype = DTYPES[shape.dtype]
    seq = min(shape.seq, 2048)
    probe = dataclasses.replace(shape, seq=seq)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(shape.batch, seq, shape.heads, shape.head_dim, generator=g).to(dtype).requires_grad_()
    kv = [torch.randn(shape.batch, seq, shape.hkv, shape.head_dim, generator=g).to(dtype) for _ in range(2)]
    k, v = (t.requires_grad_() for t in kv)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            attention(q, k, v, causal=shape.causal).sum().backward()
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(old)
    return sum(attention_flops(probe)) / best


def _flops_worker(rank: int, world: int, job) -> float:
    shape, threads, repeats = job
    dist.barrier()  # every process measures at the same time
    rate = torch.tensor([measure_flops(shape, threads, repeats)], dtype=torch.float64)
    every = torch.ops.ring_ext.all_gather(rate, dist.group.WORLD.group_name)
    return float(torch.cat(list(every)).mean())


def measure_flops_together(shape: Shape, threads: int = 1, processes: int = 1, repeats: int = 3) -> float:
    """measure_flops in `processes` processes at once, their mean rate: ranks on one machine share its
    memory bandwidth and clock, so each of several runs slower than one alone (measured here: 2
    processes on 2 cores ~25 % slower each than one process)."""
    if processes <= 1:
        return measure_flops(shape, threads, repeats)
    jobs = [(shape, threads, repeats)]
    return run_distributed(_flops_worker, processes, jobs, timeout_s=None, threads=threads, collect=True)[0]


def calibrated_rates(shape: Shape, rank_counts, threads: int = 1, repeats: int = 3) -> dict[int, float]:
    """The kernel rate per rank when that many ranks of `threads` threads run on this machine, for each
    count: measured with as many processes at once as the cores hold (once per distinct number), then
    cut to each rank's share of the cores when the ranks outnumber them."""
    cores = machine_cores()
    together = {r: max(1, min(r, cores // threads)) for r in rank_counts}
    rate = {n: measure_flops_together(shape, threads, n, repeats) for n in set(together.values())}
    return {r: rate[together[r]] * shared_cores(r, threads, cores) for r in rank_counts}


def calibrated_flops(shape: Shape, ranks: int, threads: int = 1) -> tuple[float, str]:
    """calibrated_rates for one rank count, with how it was measured (for the plan's header)."""
    cores = machine_cores()
    together, share = max(1, min(ranks, cores // threads)), shared_cores(ranks, threads, cores)
    how = f"{threads} thread, {together} process{'es' if together > 1 else ''} at once"
    if share < 1:
        how += f", x {share:.2f}: {ranks} ranks share {cores} cores"
    return calibrated_rates(shape, [ranks], threads)[ranks], how


def machine_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def shared_cores(ranks: int, threads_per_rank: int, cores: int | None = None) -> float:
    """The share of its threads' cores one rank gets when `ranks` processes of threads_per_rank threads
    run on `cores` cores (this machine's by default): 1 when they fit, else cores / threads wanted. The
    calibrated kernel rate is one process's alone; ranks that outnumber the cores split them."""
    cores = machine_cores() if cores is None else cores
    return min(1.0, cores / (ranks * threads_per_rank))


def _bandwidth_worker(rank: int, world: int, sizes: list[int]) -> list[float]:
    times = []
    for n in sizes:
        buf = torch.empty(n, dtype=torch.uint8)
        best = math.inf
        for _ in range(5):
            start = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            best = min(best, (time.perf_counter() - start) / 2)
        times.append(best)
    return times


def measure_link(small: int = 8, large: int = 16 << 20) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) of a Gloo send/recv between two local processes (ping-pong)."""
    t_small, t_large = run_distributed(_bandwidth_worker, 2, [[small, large]], collect=True)[0]
    return (large - small) / max(t_large - t_small, 1e-9), t_small
