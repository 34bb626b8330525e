"""`python -m ring_ext plan`: predicts, for one attention layer on a cluster, the forward+backward time,
the bytes each rank sends and the peak memory per rank of every context-parallel layout ring_ext can
run, best first. The model is docs/planner.md; every function here is pure except `calibrate`.

    python -m ring_ext plan --heads 32 --kv-heads 8 --head-dim 128 --seq 131072 \\
        --nodes 2 --gpus-per-node 8 --intra-gbps 400 --inter-gbps 50 --tflops 400
    python -m ring_ext plan --calibrate --nodes 1 --gpus-per-node 2   # this machine's rates (Gloo, CPU)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One attention layer: q [batch, seq, heads, head_dim], k/v with kv_heads heads."""

    seq: int
    heads: int
    head_dim: int
    kv_heads: int | None = None
    batch: int = 1
    dtype: str = "bf16"
    causal: bool = True
    window: int | None = None  # sliding_window (docs/design.md, Mask model)
    doc_lengths: tuple[int, ...] | None = None  # packed documents, summing to seq (None: one)

    @property
    def hkv(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def elem(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Ranks are numbered node by node (ranks r and r+1 share a node unless r+1 starts the next one).
    Bandwidths are per rank and direction, in bytes/s; latencies in seconds; flops_per_s is the rate
    the attention kernels attain per rank (forward and backward alike)."""

    nodes: int
    gpus_per_node: int
    intra_bw: float
    inter_bw: float
    flops_per_s: float
    intra_latency: float = 5e-6
    inter_latency: float = 2e-5
    mem_bw: float = math.inf  # device memory bytes/s, for the forward's LSE merges (inf: free)

    @property
    def size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclasses.dataclass(frozen=True)
class Layout:
    """One configuration: algo (ulysses / ring / double_ring / hybrid), Ulysses degree u (1 for the
    rings), ring size cp // u, double-ring window (1: plain ring), overlap of transfers and compute, and
    the token placement (docs/design.md, Token placement)."""

    algo: str
    cp: int
    ulysses_degree: int = 1
    window: int = 1
    overlap: bool = True
    placement: str = "zigzag"  # token placement of a causal ring: zigzag, or contiguous (--cp-sliding-window)

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses_degree


@dataclasses.dataclass(frozen=True)
class Prediction:
    layout: Layout
    seconds: float  # forward + backward of the layer
    compute_s: float
    exposed_comm_s: float  # the part of the time transfers add to compute
    bytes_sent: int  # per rank, forward + backward
    peak_bytes: int  # per rank, the layer's tensors and buffers (no activations of other layers)


# ---- configurations ----------------------------------------------------------------------------------


def layouts(shape: Shape, cp: int) -> list[Layout]:
    """Every layout ring_ext runs for this shape at this CP size (docs/planner.md, Configurations)."""
    out = [Layout("ring", cp, overlap=o) for o in (True, False)] if cp > 1 else [Layout("ring", 1)]
    for w in range(2, cp):
        if cp % w == 0:
            out += [Layout("double_ring", cp, window=w, overlap=o) for o in (True, False)]
    if cp > 1 and shape.heads % cp == 0:
        out.append(Layout("ulysses", cp, ulysses_degree=cp))
    for u in range(2, cp):
        if cp % u == 0 and shape.heads % u == 0:
            ring = cp // u
            windows = [1] + [w for w in range(2, ring) if ring % w == 0]
            out += [Layout("hybrid", cp, u, w, o) for w in windows for o in (True, False)]
    if shape.window is not None and shape.causal:  # every ring layout again on contiguous shards
        out += [
            dataclasses.replace(x, placement="contiguous") for x in out if x.algo != "ulysses" and x.ring > 1
        ]
    return out


# ---- the model ----------------------------------------------------------------------------------------


def attention_flops(shape: Shape) -> tuple[float, float]:
    """(forward, backward) flops of the whole layer: QK^T and PV are 2 * S^2 * d each per head and batch
    (2 flops per multiply-add); the backward recomputes P and does dV, dP, dQ, dK: 2.5x the forward.
    Causal: half the pairs. With a window or packed documents: 4 d flops per visible pair, counted
    exactly per document (the kernels skip what no query sees, up to tile edges)."""
    if shape.window is None and shape.doc_lengths is None:
        pairs = shape.seq**2 / (2 if shape.causal else 1)
    else:
        from .masks import pairs_before  # torch-free arithmetic, but masks imports torch

        docs = shape.doc_lengths or (shape.seq,)
        pairs = sum(pairs_before(n, n, shape.causal, shape.window) for n in docs)
    fwd = 4.0 * shape.batch * shape.heads * pairs * shape.head_dim
    return fwd, 2.5 * fwd


def _link(cluster: Cluster, a: int, b: int) -> tuple[float, float]:
    """(bandwidth, latency) between ranks a and b."""
    same = a // cluster.gpus_per_node == b // cluster.gpus_per_node
    return (cluster.intra_bw, cluster.intra_latency) if same else (cluster.inter_bw, cluster.inter_latency)


def _hop_time(cluster: Cluster, pairs, nbytes: float) -> float:
    """Time of the slowest of the (src, dst) transfers of nbytes that happen at the same time (none:
    0)."""
    if nbytes <= 0:
        return 0.0
    return max(lat + nbytes / bw for bw, lat in (_link(cluster, a, b) for a, b in pairs))


def _ring_phase(cluster, layout, step_compute, hops, first_rank=0, stride=1, tail=0.0) -> tuple[float, float]:
    """(time, exposed transfer time) of one pass of a (double) ring over `layout.ring` members that
    are `stride` ranks apart, each step computing step_compute. hops = (inner, outer): the bytes per
    rank of what moves during each step (ring entries, 0 where nothing) and of each round's outer hop
    (ring/w entries). A plain ring has ring - 1 inner hops; a double ring of window w has w - 1 inner
    hops per round and ring/w - 1 outer hops (between windows, each overlapping the w steps of its
    inner round when overlap is on). tail: bytes sent after the last step, with nothing to hide
    behind (the last gradient home)."""
    ring = layout.ring
    w = layout.window if layout.window > 1 else ring  # the plain ring: one round of the whole ring
    members = [first_rank + i * stride for i in range(ring)]
    if ring == 1:
        return step_compute, 0.0
    inner_bytes, outer_bytes = hops
    inner = [(members[i], members[(i // w) * w + (i + 1) % w]) for i in range(ring)]
    outer = [(members[i], members[(i + w) % ring]) for i in range(ring)]

    def step(t: int) -> float:  # the step's compute and the hop that brings the next block
        hop = _hop_time(cluster, inner, inner_bytes[t])
        return max(step_compute, hop) if layout.overlap else step_compute + hop

    rounds = [sum(step(so * w + si) for si in range(w)) for so in range(ring // w)]
    outer_hops = [_hop_time(cluster, outer, n) for n in outer_bytes[: len(rounds) - 1]]  # the last: none
    if layout.overlap:  # round so's outer hop brings the next round's block while round so runs
        total = sum(max(r, o) for r, o in zip(rounds, outer_hops)) + rounds[-1]
    else:
        total = sum(rounds) + sum(outer_hops)
    total += _hop_time(cluster, inner, tail)
    return total, max(0.0, total - ring * step_compute)  # max: no -0.00 from rounding


# ---- what the ring moves under a window (Note [Moving only what is seen] in csrc/cp/ring.cpp) --------


def _member_ranges(placement: str, ring: int, seq: int) -> list[list[tuple[int, int]]]:
    """The global token ranges [a, b) of each ring member's block, in block order."""
    if placement == "contiguous":
        n = seq // ring
        return [[(m * n, (m + 1) * n)] for m in range(ring)]
    c = seq // (2 * ring)
    return [[(m * c, (m + 1) * c), ((2 * ring - 1 - m) * c, (2 * ring - m) * c)] for m in range(ring)]


def _seen_rows(queries, keys, causal: bool, window: int) -> tuple[int, int]:
    """The hull [lo, hi) of the rows of a block of `keys` ranges (in block order) that some query of the
    `queries` ranges sees under the window ((0, 0): none)."""
    lo, hi, base = None, None, 0
    for c, d in keys:
        for a, b in queries:  # queries [a, b) see keys [a - w + 1, b - 1] (causal) or to b + w - 2
            first, last = max(c, a - window + 1), min(d - 1, b - 1 if causal else b + window - 2)
            if first <= last:
                lo = base + first - c if lo is None else min(lo, base + first - c)
                hi = base + last - c + 1 if hi is None else max(hi, base + last - c + 1)
        base += d - c
    return (lo, hi) if lo is not None else (0, 0)


def window_rows(shape: Shape, layout: Layout) -> dict[str, list]:
    """The rows (tokens) the ring moves under shape.window, from the same rule as ring_ext's driver:
    a hop carries the hull of what the holders it feeds see, a K/V gradient goes home from each holder
    that saw some of it. Over the ring's members (dense sequence, the layout's placement):
        inner[t]   the most rows any member sends at step t's inner hop (0: none)
        outer[so]  the same for round so's outer hop
        grad[t]    the most gradient rows any member sends home after step t
        total[m]   member m's K/V rows over the forward's hops and its gradient rows, (kv, grad)"""
    placement = layout.placement if shape.causal else "contiguous"  # a general mask is never zigzag
    window = layout.window if layout.window > 1 else layout.ring
    return _window_rows(shape.seq, shape.causal, shape.window, layout.ring, window, placement)


@functools.lru_cache(maxsize=256)
def _window_rows(seq: int, causal: bool, window: int, ring: int, w: int, placement: str) -> dict[str, list]:
    n_out = ring // w
    blocks = _member_ranges(placement, ring, seq)
    need = [[_seen_rows(blocks[r], blocks[s], causal, window) for s in range(ring)] for r in range(ring)]

    def source(r: int, t: int) -> int:  # Note [Double ring schedule]
        return ((r // w - t // w) % n_out) * w + (r % w - t % w) % w

    def holder(s: int, t: int) -> int:
        return ((s // w + t // w) % n_out) * w + (s % w + t % w) % w

    def carried(s: int, steps) -> int:  # the hull of what src's holders at `steps` see
        spans = [span for span in (need[holder(s, u)][s] for u in steps) if span[1] > span[0]]
        return max(h for _, h in spans) - min(lo for lo, _ in spans) if spans else 0

    inner, outer, grad = [0] * ring, [0] * n_out, [0] * ring
    kv_total, grad_total = [0] * ring, [0] * ring
    for r in range(ring):
        for t in range(ring):
            round_end = (t // w + 1) * w
            if t % w + 1 < w:
                rows = carried(source(r, t), range(t + 1, round_end))
                inner[t], kv_total[r] = max(inner[t], rows), kv_total[r] + rows
            if t % w == 0 and t // w + 1 < n_out:
                rows = carried(source(r, t), range(round_end, ring))
                outer[t // w], kv_total[r] = max(outer[t // w], rows), kv_total[r] + rows
            if t > 0:
                lo, hi = need[r][source(r, t)]
                grad[t], grad_total[r] = max(grad[t], hi - lo), grad_total[r] + hi - lo
    return {"inner": inner, "outer": outer, "grad": grad, "total": list(zip(kv_total, grad_total))}


def _all_to_all(cluster: Cluster, layout: Layout, nbytes: float, rank: int = 0) -> float:
    """Time of one all-to-all over the Ulysses group of `rank` (u consecutive ranks) in which each rank
    holds nbytes and sends (u - 1)/u of it: chunks to other nodes go over the inter-node link, the rest
    over the intra-node one, both at once."""
    u = layout.ulysses_degree
    if u == 1:
        return 0.0
    group = [rank - rank % u + i for i in range(u)]
    chunk = nbytes / u
    far = sum(1 for r in group if r // cluster.gpus_per_node != rank // cluster.gpus_per_node)
    near = u - 1 - far
    t_near = near * chunk / cluster.intra_bw + (cluster.intra_latency if near else 0.0)
    t_far = far * chunk / cluster.inter_bw + (cluster.inter_latency if far else 0.0)
    return max(t_near, t_far)


def predict(shape: Shape, cluster: Cluster, layout: Layout) -> Prediction:
    """The model of docs/planner.md for one layout."""
    cp, u, ring = layout.cp, layout.ulysses_degree, layout.ring
    b, d, e = shape.batch, shape.head_dim, shape.elem
    fwd_flops, bwd_flops = attention_flops(shape)
    fwd_c, bwd_c = fwd_flops / cp / cluster.flops_per_s, bwd_flops / cp / cluster.flops_per_s

    tokens = shape.seq // cp  # per rank before any all-to-all
    q_bytes = b * tokens * shape.heads * d * e
    kv_heads_after = max(shape.hkv, u)  # Ulysses repeats K/V heads when there are fewer than u
    kv_bytes = 2 * b * tokens * kv_heads_after * d * e  # k and v, as each rank holds them (pre all-to-all)

    # Ulysses (u > 1): q, k, v in and out back, forward; dout, q, k, v, out in and dq, dk, dv back.
    a2a_fwd = _all_to_all(cluster, layout, q_bytes + kv_bytes) + _all_to_all(cluster, layout, q_bytes)
    a2a_bwd = _all_to_all(cluster, layout, 3 * q_bytes + kv_bytes) + _all_to_all(
        cluster, layout, q_bytes + kv_bytes
    )
    a2a_sent = (u - 1) / u * (q_bytes + kv_bytes + q_bytes + 3 * q_bytes + kv_bytes + q_bytes + kv_bytes)

    # The ring over cp/u members u apart, on blocks of cp/ring... after the all-to-all each rank holds
    # seq*u/cp tokens of heads/u heads: the K/V block it passes has the plain ring's size.
    row_kv = 2 * b * max(1, kv_heads_after // u) * d * e  # one token of the K/V block
    row_dkv = row_kv // e * 4  # its float32 gradient
    block_kv, block_dkv = (shape.seq // ring) * row_kv, (shape.seq // ring) * row_dkv
    n_out = ring // (layout.window if layout.window > 1 else ring)
    if shape.window is None:  # every block moves whole (packed documents too: each spans the ring)
        inner = [block_kv if (t + 1) % (ring // n_out) else 0 for t in range(ring)]
        fwd_hops = (inner, [block_kv] * n_out)
        bwd_hops = ([n and n + block_dkv for n in inner], [block_kv] * n_out)
        ring_sent = (
            (ring - 1) * block_kv + (ring - 1) * (block_kv + block_dkv) + (block_dkv if ring > 1 else 0)
        )
        bwd_tail = 0.0
    else:  # only the rows the window lets some rank see
        rows = window_rows(shape, layout)
        fwd_hops = ([n * row_kv for n in rows["inner"]], [n * row_kv for n in rows["outer"]])
        grad_prev = [0] + rows["grad"][:-1]  # step t's gradient goes home while step t + 1 computes
        bwd_hops = ([n * row_kv + g * row_dkv for n, g in zip(rows["inner"], grad_prev)], fwd_hops[1])
        bwd_tail = rows["grad"][-1] * row_dkv  # the last step's, waited at the end
        ring_sent = max(2 * kv * row_kv + g * row_dkv for kv, g in rows["total"])
    # Each forward step but the first folds its partial into the running output: ring_ext's merge_
    # reads the float32 output and partial and writes the output (12 bytes per element, plus the LSEs),
    # memory-bound work on the compute side of the step.
    q_elems = b * (shape.seq // ring) * (shape.heads // u) * d
    merge = (12 * q_elems + 12 * q_elems // d) / cluster.mem_bw if ring > 1 else 0.0
    fwd_ring, fwd_exposed = _ring_phase(cluster, layout, fwd_c / ring + merge, fwd_hops, 0, u)
    fwd_ring -= merge  # the first step has nothing to merge
    bwd_ring, bwd_exposed = _ring_phase(cluster, layout, bwd_c / ring, bwd_hops, 0, u, bwd_tail)

    seconds = fwd_ring + bwd_ring + a2a_fwd + a2a_bwd
    # Peak per rank in the backward: q, k, v, out, dout, lse, the float32 dq/dk/dv accumulators of the
    # ring's share, the K/V blocks in flight (two with overlap) and their gradients.
    q_local = b * (shape.seq // ring) * (shape.heads // u) * d
    kv_local = 2 * b * (shape.seq // ring) * max(1, kv_heads_after // u) * d
    in_flight = 2 if layout.overlap and ring > 1 else 1 if ring > 1 else 0
    peak = (
        (3 * q_local + kv_local) * e  # q, out, dout; k, v
        + (q_local + kv_local) * 4  # float32 dq, dk/dv accumulators
        + b * (shape.heads // u) * (shape.seq // ring) * 4 * 2  # lse, delta
        + in_flight * (kv_local * e + kv_local * 4)  # travelling K/V and dK/dV
        + (2 * (q_bytes + kv_bytes) if u > 1 else 0)  # all-to-all send/receive buffers
    )
    return Prediction(
        layout=layout,
        seconds=seconds,
        compute_s=fwd_c + bwd_c,
        exposed_comm_s=fwd_exposed + bwd_exposed + a2a_fwd + a2a_bwd,
        bytes_sent=int(a2a_sent + ring_sent),
        peak_bytes=int(peak),
    )


def rank_layouts(shape: Shape, cluster: Cluster, cp: int | None = None) -> list[Prediction]:
    """Every layout at CP size cp (default: the whole cluster), fastest first (ties: less memory)."""
    cp = cluster.size if cp is None else cp
    if cp < 1 or cp > cluster.size:
        raise ValueError(f"cp must be between 1 and the cluster's {cluster.size} ranks, got {cp}")
    if shape.doc_lengths is None and shape.seq % (2 * cp) != 0:  # packed rows take any length
        raise ValueError(f"seq {shape.seq} must be divisible by 2 * cp = {2 * cp} (zigzag shards)")
    preds = [predict(shape, cluster, layout) for layout in layouts(shape, cp)]
    return sorted(preds, key=lambda p: (p.seconds, p.peak_bytes))


# ---- calibration (measures this machine) ------------------------------------------------------------


def measure_flops(shape: Shape, threads: int = 1, repeats: int = 3) -> float:
    """flops/s of ring_ext's kernels, forward+backward on one process at a short slice of `shape`."""
    import torch

    import ring_ext

    from .cli import DTYPES  # cli imports this module at load time, so not at the top

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
            ring_ext.attention(q, k, v, causal=shape.causal).sum().backward()
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(old)
    return sum(attention_flops(probe)) / best


def _flops_worker(rank: int, shape: Shape, threads: int, repeats: int, start, out) -> None:
    start.wait()  # every process measures at the same time
    out.put(measure_flops(shape, threads, repeats))


def measure_flops_together(shape: Shape, threads: int = 1, processes: int = 1, repeats: int = 3) -> float:
    """measure_flops in `processes` processes at once, their mean rate: ranks on one machine share its
    memory bandwidth and clock, so each of several runs slower than one alone (measured here: 2
    processes on 2 cores ~25 % slower each than one process)."""
    if processes <= 1:
        return measure_flops(shape, threads, repeats)
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(processes), ctx.SimpleQueue()
    procs = mp.start_processes(
        _flops_worker,
        args=(shape, threads, repeats, start, out),
        nprocs=processes,
        join=False,
        start_method="spawn",
    )
    rates = [out.get() for _ in range(processes)]
    procs.join()
    return sum(rates) / len(rates)


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
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def shared_cores(ranks: int, threads_per_rank: int, cores: int | None = None) -> float:
    """The share of its threads' cores one rank gets when `ranks` processes of threads_per_rank threads
    run on `cores` cores (this machine's by default): 1 when they fit, else cores / threads wanted. The
    calibrated kernel rate is one process's alone; ranks that outnumber the cores split them."""
    cores = machine_cores() if cores is None else cores
    return min(1.0, cores / (ranks * threads_per_rank))


def _bandwidth_worker(rank: int, port: int, sizes: list[int], out) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
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
        if rank == 0:
            out.put(times)
    finally:
        dist.destroy_process_group()


def measure_link(small: int = 8, large: int = 16 << 20) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) of a Gloo send/recv between two local processes (ping-pong)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_bandwidth_worker, args=(port, [small, large], out), nprocs=2, start_method="spawn")
    t_small, t_large = out.get()
    return (large - small) / max(t_large - t_small, 1e-9), t_small


# ---- output ---------------------------------------------------------------------------------------------


def describe(layout: Layout) -> str:
    if layout.algo == "ulysses":
        return f"ulysses u={layout.ulysses_degree}"
    parts = [layout.algo]
    if layout.algo == "hybrid":
        parts.append(f"u={layout.ulysses_degree} ring={layout.ring}")
    if layout.window > 1:
        parts.append(f"window={layout.window}")
    if layout.placement != "zigzag":
        parts.append(layout.placement)
    if layout.algo != "ulysses" and layout.ring > 1:
        parts.append("overlap" if layout.overlap else "no overlap")
    return " ".join(parts)


def table(preds: list[Prediction]) -> str:
    best = preds[0].seconds
    lines = [
        "| layout | fwd+bwd ms | vs best | compute ms | exposed comm ms | MB sent/rank | peak MiB/rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in preds:
        lines.append(
            f"| {describe(p.layout)} | {p.seconds * 1e3:.2f} | {p.seconds / best:.2f}x | "
            f"{p.compute_s * 1e3:.2f} | {p.exposed_comm_s * 1e3:.2f} | {p.bytes_sent / 1e6:.1f} | "
            f"{p.peak_bytes / 2**20:.1f} |"
        )
    return "\n".join(lines)


def plot(preds: list[Prediction], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [describe(p.layout) for p in preds][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(preds) + 1.2))
    compute = [p.compute_s * 1e3 for p in preds][::-1]
    comm = [(p.seconds - p.compute_s) * 1e3 for p in preds][::-1]
    ax.barh(names, compute, label="compute")
    ax.barh(names, comm, left=compute, label="exposed communication")
    ax.set_xlabel("predicted forward+backward ms per layer")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_plan_arguments(p) -> None:
    p.add_argument("--seq", type=int, required=True, help="total sequence length")
    p.add_argument("--heads", type=int, required=True)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA: K/V heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    p.add_argument("--attention-mask-type", choices=("causal", "general"), default="causal")
    p.add_argument("--sliding-window", type=int, default=None, help="sliding_window of the layer")
    p.add_argument(
        "--doc-lengths", default=None, help="packed documents: comma list of lengths summing to --seq"
    )
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node")
    p.add_argument("--cp", type=int, default=None, help="CP size (default: every rank of the cluster)")
    p.add_argument("--intra-gbps", type=float, default=None, help="GB/s per rank within a node")
    p.add_argument("--inter-gbps", type=float, default=None, help="GB/s per rank between nodes")
    p.add_argument("--intra-latency-us", type=float, default=5.0)
    p.add_argument("--inter-latency-us", type=float, default=20.0)
    p.add_argument("--tflops", type=float, default=None, help="attention kernel rate per rank, TFLOP/s")
    p.add_argument(
        "--mem-gbps",
        type=float,
        default=None,
        help="device memory bandwidth, GB/s (the LSE merges; default: free)",
    )
    p.add_argument(
        "--calibrate", action="store_true", help="measure this machine's kernel rate and Gloo link (CPU)"
    )
    p.add_argument("--threads-per-rank", type=int, default=1, help="for --calibrate's kernel rate")
    p.add_argument("--top", type=int, default=None, help="print only the best N layouts")
    p.add_argument("--plot", metavar="FILE.png", help="predicted time per layout (matplotlib)")


def _doc_lengths(text: str | None, seq: int) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        lengths = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--doc-lengths must be a comma list of integers, got {text!r}") from None
    if min(lengths) < 0 or sum(lengths) != seq:
        raise ValueError(
            f"--doc-lengths must be >= 0 and sum to --seq {seq}, got {text} (sum {sum(lengths)})"
        )
    return lengths


def run(args) -> str:
    """The plan subcommand: returns the printed text. Raises ValueError on bad arguments."""
    shape = Shape(
        seq=args.seq,
        heads=args.heads,
        head_dim=args.head_dim,
        kv_heads=args.kv_heads,
        batch=args.batch,
        dtype=args.dtype,
        causal=args.attention_mask_type == "causal",
        window=args.sliding_window,
        doc_lengths=_doc_lengths(args.doc_lengths, args.seq),
    )
    if args.sliding_window is not None and args.sliding_window < 1:
        raise ValueError(f"--sliding-window must be >= 1, got {args.sliding_window}")
    for name in ("seq", "heads", "head_dim", "batch", "nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if shape.heads % shape.hkv != 0:
        raise ValueError(f"--heads {shape.heads} must be a multiple of --kv-heads {shape.hkv}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib (pip install matplotlib, or ring_ext[plot])") from None
    header = []
    if args.calibrate:
        ranks = args.cp if args.cp is not None else args.nodes * args.gpus_per_node
        flops, how = calibrated_flops(shape, ranks, args.threads_per_rank)
        bw, lat = measure_link()
        header.append(
            f"calibrated here: kernels {flops / 1e9:.1f} GFLOP/s per rank ({how}), "
            f"Gloo link {bw / 1e9:.2f} GB/s, latency {lat * 1e6:.0f} us (used for both links)"
        )
        intra = inter = bw
        intra_lat = inter_lat = lat
    else:
        missing = [
            f"--{n}"
            for n in ("intra-gbps", "inter-gbps", "tflops")
            if getattr(args, n.replace("-", "_")) is None
        ]
        if args.nodes == 1 and "--inter-gbps" in missing:
            missing.remove("--inter-gbps")
        if missing:
            raise ValueError(
                f"give {', '.join(missing)} (the cluster's rates), or --calibrate to measure this machine"
            )
        intra = args.intra_gbps * 1e9
        inter = (args.inter_gbps if args.inter_gbps is not None else args.intra_gbps) * 1e9
        flops = args.tflops * 1e12
        intra_lat, inter_lat = args.intra_latency_us * 1e-6, args.inter_latency_us * 1e-6
    mem = args.mem_gbps * 1e9 if args.mem_gbps is not None else math.inf
    cluster = Cluster(args.nodes, args.gpus_per_node, intra, inter, flops, intra_lat, inter_lat, mem)
    preds = rank_layouts(shape, cluster, args.cp)
    if args.plot:
        plot(preds, args.plot)
        header.append(f"plot: {args.plot}")
    shown = preds if args.top is None else preds[: args.top]
    return "\n".join([*header, table(shown)])
