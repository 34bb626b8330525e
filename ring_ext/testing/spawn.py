"""Run a function on N local Gloo processes, many cases per spawn (spawning is the slow part).

    run_distributed(fn, world_size, cases)   # fn(rank, world_size, case) on every rank, for every case

Each worker is a fresh `spawn` process with `threads` intra-op threads, joined over TCP on a free local
port with a process-group timeout, so a rank that dies or diverges ends the run with an error rather
than a hang. The first exception of any rank is re-raised in the caller with the worker's traceback.
`fn` must be importable (a module-level function of a test, benchmark, example or ring_ext module).
Rank 0's results come back by value (pickled), tensors included.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import pickle
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for init_method="tcp://127.0.0.1:<port>")."""
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
            # By value: a tensor sent as shared memory would die with this process.
            results.put(pickle.dumps(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn,
    world_size: int,
    cases: list,
    *,
    timeout_s: float | None = 300.0,
    pg_timeout_s: float = 60.0,
    threads: int = 1,
    collect: bool = False,
):
    """Runs fn(rank, world_size, case) for every case on world_size Gloo ranks; returns rank 0's results
    (a list, one per case) when collect=True. timeout_s bounds the whole run (None: no bound); the
    ranks are killed and TimeoutError raised past it."""
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
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    out = None
    while not pc.join(timeout=0.2):
        if results is not None and out is None and not results.empty():
            out = pickle.loads(results.get())
        if deadline is not None and time.monotonic() > deadline:
            for p in pc.processes:
                if p.is_alive():
                    os.kill(p.pid, 9)
            raise TimeoutError(
                f"run_distributed({getattr(fn, '__name__', fn)}, world_size={world_size}) "
                f"did not finish within {timeout_s}s"
            )
    if results is not None and out is None and not results.empty():
        out = pickle.loads(results.get())
    return out
