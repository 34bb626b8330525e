"""Teardown right after the last collective: a rank that finishes CP training and exits at once (the end
of examples/llama_cp.py's worker, and of most users' training scripts) must exit cleanly.

The race (docs/reliability.md, Teardown): a collective's Work is released by the backend's worker
thread (Gloo's pt_gloo_runloop) a moment after the caller's wait() returns. If the process group
outlives destroy_process_group (a cached context holds it, or torch._dynamo, which the optimizer
imports) and the rank exits before that thread has run again, the thread frees the Work during
interpreter finalisation; if the Work holds the last reference to a tensor Python has seen, freeing it
takes the GIL, CPython ends the thread with pthread_exit inside a noexcept destructor, and the process
aborts: "terminate called without an active exception".

Each run here makes that race likely instead of rare: both ranks share one CPU and their Gloo worker
threads run at SCHED_IDLE, so a worker that completed a collective waits until the main thread blocks,
and the main thread goes straight from its last collective to exit with its context (and so its
process group) still cached. With torch's own collectives on Python tensors this loses a rank in about
two runs of five (`python tests/test_teardown.py` measures both); ring_ext's collectives give c10d
only tensors Python never saw (Note [Tensors handed to c10d], csrc/cp/comm.h), so no run may lose
a rank.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import llama_cp  # noqa: E402

import ring_ext  # noqa: E402
from ring_ext.testing.spawn import free_port  # noqa: E402

RUNS = 12
CP = 2
ALGOS = ("ring", "ulysses", "hybrid")  # every algorithm that runs at cp = 2 (hybrid: u = 2, ring of 1)
DEADLINE_S = 120.0  # per run; a hang fails the test instead of stalling the suite
_CACHED = []  # contexts kept past destroy_process_group, as a user's cache (or the tests') keeps them


def _starve_backend_threads() -> bool:
    """This process on one CPU (the lowest it may use: both ranks share it) and its Gloo worker threads
    at SCHED_IDLE. False where the scheduler refuses (the race is then only as likely as in real use)."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == "pt_gloo_runloop":
                    os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        return False
    return True


def _worker(rank: int, world: int, port: int, algo: str, collectives: str) -> None:
    """Trains two steps with a context, unshards the logits, and exits right after the last
    collective (no barrier), the context still cached. collectives="torch" does the same reductions
    with torch.distributed on Python tensors instead (the measurement's control)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ctx = ring_ext.initialize(ring_ext.CPConfig(context_parallel_size=world, **llama_cp.ALGOS[algo]))
        _CACHED.append(ctx)
        _starve_backend_threads()
        if collectives == "ring_ext":
            llama_cp.train(2, 16, ctx)  # ring_ext.reduce_gradients and ring_ext.all_reduce
            x = ring_ext.shard(torch.randn(1, 16, 4, 8), ctx, seq_dim=1)
            ring_ext.attention(x, x, x, ctx, check_consistency=True)
            ring_ext.unshard(x, ctx, seq_dim=1)
        else:
            for _ in range(5):
                parts = [torch.empty(1000) for _ in range(world)]
                dist.all_gather(parts, torch.randn(1000))
    finally:
        dist.destroy_process_group()


def _spawn_run(algo: str, collectives: str) -> list[int | None]:
    """Exit codes of the ranks of one run (negative: killed by that signal; None: did not finish)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, CP, port, algo, collectives)) for r in range(CP)]
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


def test_exit_right_after_ring_ext_collectives_never_loses_a_rank():
    failures = []
    for run in range(RUNS):
        algo = ALGOS[run % len(ALGOS)]
        codes = _spawn_run(algo, "ring_ext")
        if codes != [0] * CP:
            failures.append(f"run {run} ({algo}): exit codes {codes}")
    assert not failures, f"{len(failures)}/{RUNS} runs lost a rank:\n" + "\n".join(failures)


if __name__ == "__main__":  # the measurement: runs lost per kind of collective, same conditions
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    print("| collectives | runs | runs that lost a rank |\n|---|---|---|")
    for collectives in ("torch", "ring_ext"):
        lost = sum(_spawn_run(ALGOS[r % len(ALGOS)], collectives) != [0] * CP for r in range(runs))
        print(f"| {collectives} | {runs} | {lost} |", flush=True)


_AFTER_DESTROY = """
import sys, torch, torch.distributed as dist, ring_ext
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
ctx = ring_ext.initialize(ring_ext.CPConfig(context_parallel_size=1, context_parallel_algo=sys.argv[2]))
dist.destroy_process_group()
x = torch.randn(1, 4, 2, 8)
try:
    ring_ext.attention(x, x, x, ctx, layout="bshd")
except RuntimeError as e:
    print(e)
"""


def test_a_context_after_destroy_process_group_says_so(tmp_path):
    """A context outlives its process groups only as a name: the call says what happened, in ring_ext's
    words, instead of c10d's "Could not resolve the process group registered under the name"."""
    import subprocess

    for algo in ("megatron_cp_algo", "ulysses_cp_algo"):
        store = tmp_path / f"store_{algo}"
        run = subprocess.run(
            [sys.executable, "-c", _AFTER_DESTROY, str(store), algo],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "no longer exists: was torch.distributed.destroy_process_group() called?" in run.stdout, (
            run.stdout + run.stderr
        )
