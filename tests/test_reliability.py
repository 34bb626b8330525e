"""Reliability (docs/reliability.md): no hangs, the cross-rank check, bitwise determinism
on CPU, no memory growth over 200 iterations, and bf16 error that does not grow with the ring size.

Tiny shapes, one spawn per world: the whole file is meant to take well under two minutes on 2 cores.
"""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ring_ext
from ring_ext.peak_memory import exact_peaks
from ring_ext.testing.reference import attention_reference
from ring_ext.testing.spawn import free_port, run_distributed
from ring_ext.testing.tolerances import rel_l2

from ring_cases import Case, context, run_case

ALGOS = {
    "ring": Case(algo="megatron_cp_algo"),
    "double_ring": Case(algo="megatron_cp_algo", window=2),
    "ulysses": Case(algo="ulysses_cp_algo"),
    "hybrid": Case(algo="hybrid_cp_algo", ulysses_degree=2),
}


def local_inputs(case: Case, rank: int, seed: int = 0):
    """This rank's q, k, v, dout shards drawn directly (no full-sequence tensor), [b, s, h, d]."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    sq = (case.batch, case.seq_per_rank, case.heads_q, case.head_dim)
    skv = (case.batch, case.seq_per_rank, case.heads_kv, case.head_dim)
    return [torch.randn(s, generator=g).to(case.dtype) for s in (sq, skv, skv, sq)]


def fwd_bwd(ctx, inputs, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in inputs[:3])
    out = ring_ext.attention(q, k, v, ctx, layout="bshd", **kw)
    out.backward(inputs[3])
    return [out.detach(), q.grad, k.grad, v.grad]


# ---- no hangs -----------------------------------------------------------------------------------

PG_TIMEOUT_S = 5.0
START_TIMEOUT_S = 120.0


def _all_started(rank: int, world: int, port: int) -> dist.TCPStore:
    """A store every rank of the world has reached, with a generous deadline: 11 processes start at
    once on 2 cores, and the short process-group timeout under test must not also bound start-up
    (it did: a rank still importing torch after 5 s failed the rendezvous, not the scenario)."""
    timeout = datetime.timedelta(seconds=START_TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timeout)
    store.add("started", 1)
    deadline = time.monotonic() + START_TIMEOUT_S
    while store.add("started", 0) < world:
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: not every rank of {world} started within {START_TIMEOUT_S}s")
        time.sleep(0.05)
    return store


def _hang_worker(rank, world, port, algo, mode, results):
    torch.set_num_threads(1)
    store = _all_started(rank, world, port)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S)
    )
    case = ALGOS[algo]
    ctx = context(case, world)
    inputs = local_inputs(case, rank)
    if rank == world - 1:  # the faulty rank
        if mode == "dies":
            os._exit(3)
        time.sleep(4 * PG_TIMEOUT_S)  # never calls (the test kills it before this ends)
        os._exit(0)
    t0 = time.monotonic()
    try:
        fwd_bwd(ctx, inputs)
        results.put((rank, "no error", "", time.monotonic() - t0))
    except Exception as e:  # noqa: BLE001  (the point is which exception, reported to the test)
        results.put((rank, type(e).__name__, str(e)[:300], time.monotonic() - t0))
    os._exit(0)  # no destroy_process_group: the peer is gone


# (algo, world size, what the last rank does); all worlds run at once (they mostly wait).
HANG_SCENARIOS = [
    ("ring", 3, "dies"),
    ("ulysses", 2, "dies"),
    ("double_ring", 4, "never_calls"),
    ("hybrid", 2, "never_calls"),  # its Ulysses sub-group inherits the timeout
]


def test_no_hang_when_a_rank_dies_or_never_calls():
    ctx = mp.get_context("spawn")
    started = []
    for algo, world, mode in HANG_SCENARIOS:
        results = ctx.SimpleQueue()
        port = free_port()
        procs = [
            ctx.Process(target=_hang_worker, args=(r, world, port, algo, mode, results)) for r in range(world)
        ]
        for p in procs:
            p.start()
        started.append((algo, world, mode, results, procs))
    deadline = time.monotonic() + START_TIMEOUT_S + 2 * PG_TIMEOUT_S  # start-up of 11 processes on 2 cores
    try:
        for algo, world, mode, results, _procs in started:
            got = []
            while len(got) < world - 1 and time.monotonic() < deadline:
                if results.empty():
                    time.sleep(0.1)
                    continue
                got.append(results.get())
            assert len(got) == world - 1, f"{algo} world {world} ({mode}): ranks hung: {got}"
            for rank, kind, msg, seconds in got:
                assert kind != "no error", f"{algo}: rank {rank} returned although a peer {mode}"
                assert seconds < PG_TIMEOUT_S + 5, (
                    f"{algo}: rank {rank} raised only after {seconds:.1f}s: {msg}"
                )
    finally:
        for *_, procs in started:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)
    assert not any(p.is_alive() for *_, procs in started for p in procs)


# ---- the cross-rank check (on by default) ----------------------------------------------------------


def consistency_case(rank, world, what):
    case = ALGOS[what[0]]
    ctx = context(case, world)
    inputs = local_inputs(case, rank)
    if what[1] == "length" and rank == 1:
        inputs = local_inputs(Case(seq_per_rank=case.seq_per_rank + 2), rank)
    kw = dict(softmax_scale=0.3 if (what[1] == "scale" and rank == 1) else 0.25)
    with pytest.raises(ValueError, match=rf"passed different attention calls: .*{what[2]} \(ranks 1 differ"):
        fwd_bwd(ctx, inputs, **kw)
    fwd_bwd(ctx, local_inputs(case, rank))  # agreeing ranks pass
    run_case(rank, world, case)  # and the group still works, exactly


def test_cross_rank_check_names_the_disagreement():
    items = [
        ("ring", "length", "sequence length"),
        ("ulysses", "length", "sequence length"),
        ("hybrid", "scale", "softmax_scale"),
    ]
    run_distributed(consistency_case, 2, items, timeout_s=120, pg_timeout_s=20)


# ---- determinism ----------------------------------------------------------------------------------


def determinism_case(rank, world, name):
    """Bitwise: the same call twice, overlap on and off, 1 and 2 intra-op threads."""
    base = ALGOS[name]
    results = []
    for overlap in (True, False):
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            case = Case(**{**base.__dict__, "overlap": overlap, "dtype": torch.bfloat16, "seq_per_rank": 16})
            results.append(fwd_bwd(context(case, world), local_inputs(case, rank)))
    torch.set_num_threads(1)
    for n, got in enumerate(results[1:], 1):
        for what, a, b in zip(("out", "dq", "dk", "dv"), results[0], got):
            assert torch.equal(a, b), f"{name} rank {rank}: {what} of run {n} differs bitwise from run 0"


# ---- soak -----------------------------------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


SOAK_GROWTH_MIB = 4.0


def soak_case(rank, world, name, iterations=200):
    """RSS after iteration 200 is within SOAK_GROWTH_MIB of RSS after iteration 20."""
    exact_peaks()
    case = ALGOS[name]
    ctx = context(case, world)
    inputs = local_inputs(case, rank)
    for it in range(1, iterations + 1):
        fwd_bwd(ctx, inputs)
        if it == 20:
            after_20 = _rss_mib()
    growth = _rss_mib() - after_20
    assert growth <= SOAK_GROWTH_MIB, (
        f"{name} rank {rank}: RSS grew {growth:.2f} MiB from it 20 to {iterations}"
    )
    return growth


def determinism_and_soak(rank, world, item):
    kind, name = item
    return determinism_case(rank, world, name) if kind == "determinism" else soak_case(rank, world, name)


def test_determinism_and_soak_world4():
    items = [("determinism", n) for n in ALGOS] + [("soak", n) for n in ("ring", "ulysses", "hybrid")]
    run_distributed(determinism_and_soak, 4, items, timeout_s=240)


# ---- numerics across ring sizes -------------------------------------------------------------------

NUMERICS = Case(dtype=torch.bfloat16, seq_per_rank=16, heads_q=8, heads_kv=2, head_dim=32, seed=3)


def errors_vs_oracle(rank, world, case, ctx):
    """Relative L2 errors (out, dq, dk, dv) of one bf16 forward+backward against float64: at cp=world
    through ctx, and at cp=1 (the local kernel on the whole sequence, what cp=1 runs)."""
    from ring_cases import full_inputs

    q, k, v, dout = full_inputs(case, world)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, causal=case.causal)
    expected = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]
    local = [ring_ext.shard(t, ctx, 1) for t in (q, k, v, dout)]
    got = [ring_ext.unshard(t, ctx, 1) for t in fwd_bwd(ctx, local)]
    single = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out1 = ring_ext.attention(*single, causal=case.causal)
    out1.backward(dout)
    got1 = [out1.detach()] + [t.grad for t in single]
    return [rel_l2(a, e) for a, e in zip(got, expected)], [rel_l2(a, e) for a, e in zip(got1, expected)]


def numerics_case(rank, world, name):
    case = Case(
        **{**NUMERICS.__dict__, **{f: getattr(ALGOS[name], f) for f in ("algo", "ulysses_degree", "window")}}
    )
    if case.algo == "megatron_cp_algo" and case.window == 2:
        case = Case(**{**case.__dict__, "window": 4})
    err_cp, err_1 = errors_vs_oracle(rank, world, case, context(case, world))
    for what, e, e1 in zip(("out", "dq", "dk", "dv"), err_cp, err_1):
        assert e <= 1.2 * e1, f"{name} {what}: bf16 error at cp={world} {e:.3e} > 1.2 x cp=1 {e1:.3e}"
    return err_cp, err_1


def test_bf16_error_does_not_grow_with_ring_size_world8():
    run_distributed(numerics_case, 8, list(ALGOS), timeout_s=240)


if __name__ == "__main__":  # the measured errors and soak growth, for docs/reliability.md
    print(run_distributed(numerics_case, 8, list(ALGOS), timeout_s=240, collect=True))
    print(run_distributed(soak_case, 4, ["ring", "ulysses", "hybrid"], timeout_s=240, collect=True))
