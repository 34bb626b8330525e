"""Run a function on N real Gloo processes, many cases per spawn (spawning is the slow part).

    run_distributed(fn, world_size, cases)   # fn(rank, world_size, case) on every rank, for every case

Each worker is a fresh `spawn` process with one intra-op thread, joined over TCP on a free local port
with a short process-group timeout, so a rank that dies or diverges ends the run with an error rather
than a hang. The first exception of any rank is re-raised in pytest with the worker's traceback.
`fn` must be importable (a module-level function of a test or benchmark module).
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, fn, world_size, cases, port, pg_timeout_s, threads, results):
    faulthandler.enable(all_threads=True)  # a rank that aborts prints every thread's Python stack
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout_s),
    )
    try:
        out = [fn(rank, world_size, case) for case in cases]
        if results is not None and rank == 0:
            results.put(out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn,
    world_size: int,
    cases: list,
    *,
    timeout_s: float = 300.0,
    pg_timeout_s: float = 60.0,
    threads: int = 1,
    collect: bool = False,
):
    """Runs fn(rank, world_size, case) for every case on world_size Gloo ranks; returns rank 0's results
    (a list, one per case) when collect=True."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue() if collect else None
    port = free_port()
    pc = mp.start_processes(
        _worker,
        args=(fn, world_size, list(cases), port, pg_timeout_s, threads, results),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    out = None
    while not pc.join(timeout=0.2):
        if results is not None and out is None and not results.empty():
            out = results.get()
        if time.monotonic() > deadline:
            for p in pc.processes:
                if p.is_alive():
                    os.kill(p.pid, 9)
            raise TimeoutError(
                f"run_distributed({getattr(fn, '__name__', fn)}, world_size={world_size}) "
                f"did not finish within {timeout_s}s"
            )
    if results is not None and out is None and not results.empty():
        out = results.get()
    return out
