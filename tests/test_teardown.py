"""Teardown without a barrier: ranks that finish CP training and tear down while their peers still run
(the end of examples/llama_cp.py's worker, and of most users' training scripts) must all exit cleanly,
whatever order they leave in. RUNS pairs of fresh processes each go through CYCLES rounds of
init_process_group -> initialize -> train -> destroy_process_group, each rank leaving after its own
random delay, then exit the interpreter: TEARDOWNS = RUNS * CYCLES teardowns, every algorithm. A rank
lost to a signal (the SIGABRT of "terminate called without an active exception"), a non-zero exit or a
hang fails the test with the run that lost it (docs/design.md, Teardown; docs/reliability.md)."""

from __future__ import annotations

import os
import random
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import llama_cp  # noqa: E402

import ring_ext  # noqa: E402

from distributed import free_port  # noqa: E402

RUNS, CYCLES = 10, 5
TEARDOWNS = RUNS * CYCLES
CP = 2
ALGOS = ("ring", "ulysses", "hybrid")  # every algorithm that runs at cp = 2 (hybrid: u = 2, ring of 1)
DEADLINE_S = 120.0  # per run; a hang fails the test instead of stalling the suite


def _worker(rank, world, ports, algo, delays):
    """The example's worker, CYCLES times: train with a context, then tear down at once (after this
    rank's delay of the cycle); the last teardown is followed by the interpreter's exit."""
    torch.set_num_threads(1)
    for port, delay_s in zip(ports, delays):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        try:
            cfg = ring_ext.CPConfig(context_parallel_size=world, **llama_cp.ALGOS[algo])
            llama_cp.train(1, 16, ring_ext.initialize(cfg))
            time.sleep(delay_s)
        finally:
            dist.destroy_process_group()


def _spawn_run(algo: str, delays: list[list[float]]) -> list[int | None]:
    """Exit codes of the ranks of one run (negative: killed by that signal; None: did not finish)."""
    ctx = mp.get_context("spawn")
    ports = [free_port() for _ in range(CYCLES)]
    procs = [ctx.Process(target=_worker, args=(r, CP, ports, algo, delays[r])) for r in range(CP)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


def test_teardown_without_barrier_never_loses_a_rank():
    rng = random.Random(20261130)
    failures = []
    for run in range(RUNS):
        algo = ALGOS[run % len(ALGOS)]
        delays = [[rng.choice((0.0, 0.0, 0.002, 0.02, 0.1)) for _ in range(CYCLES)] for _ in range(CP)]
        codes = _spawn_run(algo, delays)
        if codes != [0] * CP:
            failures.append(f"run {run} ({algo}, delays {delays}): exit codes {codes}")
    assert not failures, f"{len(failures)}/{RUNS} runs ({TEARDOWNS} teardowns) lost a rank:\n" + "\n".join(
        failures
    )
