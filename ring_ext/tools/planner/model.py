"""The planner's model (docs/planner.md): an attention layer (`Shape`), a cluster (`Cluster`), every
context-parallel scheme ring_ext runs for them (`Scheme`, `schemes`), and the predicted forward+backward
time, bytes sent and peak memory of each (`predict`, `rank_schemes`). Pure functions; the ring's steps
and hops come from ring_ext's own schedule (csrc/cp/schedule.h through `ring_ext.ring.schedule`)."""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ... import placement
from ...masks import pairs_before
from ...ring import schedule

# The --dtype names of the planner and of `python -m ring_ext bench`, and the element they stand for.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        return DTYPES[self.dtype].itemsize


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
class Scheme:
    """One way to run the layer with context parallelism: algo (ulysses / ring / double_ring / hybrid),
    Ulysses degree u (1 for the rings), ring size cp // u, double-ring window (--cp-window-size; 1: plain
    ring), overlap of transfers and compute, and the token placement (docs/design.md, Token
    placement)."""

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
    scheme: Scheme
    seconds: float  # forward + backward of the layer
    compute_s: float
    exposed_comm_s: float  # the part of the time transfers add to compute
    bytes_sent: int  # per rank, forward + backward
    peak_bytes: int  # per rank, the layer's tensors and buffers (no activations of other layers)


# ---- schemes --------------------------------------------------------------------------------------------


def schemes(shape: Shape, cp: int) -> list[Scheme]:
    """Every scheme ring_ext runs for this shape at this CP size (docs/planner.md, Schemes)."""
    out = [Scheme("ring", cp, overlap=o) for o in (True, False)] if cp > 1 else [Scheme("ring", 1)]
    for w in range(2, cp):
        if cp % w == 0:
            out += [Scheme("double_ring", cp, window=w, overlap=o) for o in (True, False)]
    if cp > 1 and shape.heads % cp == 0:
        out.append(Scheme("ulysses", cp, ulysses_degree=cp))
    for u in range(2, cp):
        if cp % u == 0 and shape.heads % u == 0:
            ring = cp // u
            windows = [1] + [w for w in range(2, ring) if ring % w == 0]
            out += [Scheme("hybrid", cp, u, w, o) for w in windows for o in (True, False)]
    if shape.window is not None and shape.causal:  # every ring scheme again on contiguous shards
        out += [
            dataclasses.replace(x, placement="contiguous") for x in out if x.algo != "ulysses" and x.ring > 1
        ]
    return out


# ---- the ring's steps, read from ring_ext's schedule ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RingSteps:
    """The steps and K/V hops of one ring of `size` members (ring ranks 0 .. size-1) as ring_ext runs
    it: read from its schedule, not re-derived (Note [Double ring schedule] in csrc/cp/schedule.h)."""

    size: int
    src: tuple[tuple[int, ...], ...]  # src[m][t]: the member whose K/V block member m holds at step t
    inner_to: tuple[int, ...]  # inner_to[m]: where member m's inner K/V hops go (m: it posts none)
    outer_to: tuple[int, ...]  # outer_to[m]: where its outer K/V hops go (m: it posts none)
    inner_steps: frozenset[int]  # the steps that post an inner K/V hop (the next step's block)
    outer_steps: frozenset[int]  # the steps that post an outer K/V hop (the next round's first block)
    rounds: tuple[range, ...]  # the steps of each round: a round ends at a step without an inner hop

    def holder(self, block: int, step: int) -> int:
        """The member that holds `block` at `step`."""
        return next(m for m in range(self.size) if self.src[m][step] == block)

    def fed(self, step: int, outer: bool) -> list[int]:
        """The steps at which the block that an inner (outer) hop posted at `step` is held: the next
        step (the next round's first), and wherever the hops posted there take it on."""
        todo, out = [self._next_round(step) if outer else step + 1], set()
        while todo:
            t = todo.pop()
            out.add(t)
            if t in self.inner_steps:
                todo.append(t + 1)
            if t in self.outer_steps:
                todo.append(self._next_round(t))
        return sorted(out)

    def _next_round(self, step: int) -> int:
        return next(r.start for r in self.rounds if r.start > step)


@functools.lru_cache(maxsize=64)
def ring_steps(size: int, window: int) -> RingSteps:
    """The ring of `size` members with double-ring window `window` (--cp-window-size; 1: the plain
    ring), from torch.ops.ring_ext.ring_schedule. Which member holds which block, and who sends to
    whom, do not depend on the mask (only the work items do, which the planner does not read)."""
    w = window if window > 1 else size
    table = [schedule("megatron_cp_algo", size, m, window, True) for m in range(size)]

    def peer(m: int, hop) -> int:  # a hop's peer as a ring rank (the groups of ring_ext/context.py)
        return (m // w) * w + hop.send_to if hop.link == "inner" else hop.send_to * w + m % w

    inner_to, outer_to, inner_steps, outer_steps = {}, {}, set(), set()
    for m, steps in enumerate(table):
        for t, step in enumerate(steps):
            for hop in step.hops:
                if hop.what == "kv":
                    inner_to[m] = peer(m, hop)
                    inner_steps.add(t)
                elif hop.what == "outer_kv":
                    outer_to[m] = peer(m, hop)
                    outer_steps.add(t)
    ends = [t + 1 for t in range(size) if t not in inner_steps]
    return RingSteps(
        size=size,
        src=tuple(tuple(step.src for step in steps) for steps in table),
        inner_to=tuple(inner_to.get(m, m) for m in range(size)),
        outer_to=tuple(outer_to.get(m, m) for m in range(size)),
        inner_steps=frozenset(inner_steps),
        outer_steps=frozenset(outer_steps),
        rounds=tuple(range(a, b) for a, b in zip([0, *ends[:-1]], ends)),
    )


# ---- the model ----------------------------------------------------------------------------------------


def attention_flops(shape: Shape) -> tuple[float, float]:
    """(forward, backward) flops of the whole layer: QK^T and PV are 2 * S^2 * d each per head and batch
    (2 flops per multiply-add); the backward recomputes P and does dV, dP, dQ, dK: 2.5x the forward.
    Causal: half the pairs. With a window or packed documents: 4 d flops per visible pair, counted
    exactly per document (the kernels skip what no query sees, up to tile edges)."""
    if shape.window is None and shape.doc_lengths is None:
        pairs = shape.seq**2 / (2 if shape.causal else 1)
    else:
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


def _ring_phase(cluster, scheme, step_compute, hops, stride=1, tail=0.0) -> tuple[float, float]:
    """(time, exposed transfer time) of one pass of the scheme's (double) ring over members `stride`
    ranks apart, each step computing step_compute. hops = (inner, outer): per step, the bytes per rank
    of the inner hop and of the outer hop posted at that step (0: none). An inner hop brings the next
    step's block; an outer hop, posted at a round's first step, brings the next round's first block
    and travels during that whole round (with overlap on). Which steps post which hop, who sends to
    whom and where rounds end: `ring_steps`. tail: bytes sent after the last step, with nothing to
    hide behind (the last gradient home)."""
    ring = scheme.ring
    if ring == 1:
        return step_compute, 0.0
    steps = ring_steps(ring, scheme.window)
    inner_bytes, outer_bytes = hops
    inner = [(m * stride, steps.inner_to[m] * stride) for m in range(ring)]
    outer = [(m * stride, steps.outer_to[m] * stride) for m in range(ring)]

    def step(t: int) -> float:  # the step's compute and the hop that brings the next block
        hop = _hop_time(cluster, inner, inner_bytes[t])
        return max(step_compute, hop) if scheme.overlap else step_compute + hop

    rounds = [sum(step(t) for t in r) for r in steps.rounds]
    outer_hops = [_hop_time(cluster, outer, outer_bytes[r.start]) for r in steps.rounds[:-1]]  # last: none
    if scheme.overlap:  # a round's outer hop brings the next round's block while the round runs
        total = sum(max(r, o) for r, o in zip(rounds, outer_hops)) + rounds[-1]
    else:
        total = sum(rounds) + sum(outer_hops)
    total += _hop_time(cluster, inner, tail)
    return total, max(0.0, total - ring * step_compute)  # max: no -0.00 from rounding


# ---- what the ring moves under a window (Note [Moving only what is seen] in csrc/cp/ring.cpp) --------


def window_rows(shape: Shape, scheme: Scheme) -> dict[str, list]:
    """The rows (tokens) the ring moves under shape.window, by the rule of ring_ext's driver (Note
    [Moving only what is seen] in csrc/cp/ring.cpp) on its schedule (`ring_steps`): a hop carries the
    hull of what the holders it feeds see, a K/V gradient goes home from each holder that saw some of
    it. Over the ring's members (dense sequence, the scheme's placement):
        inner[t]   the most rows any member sends at step t's inner hop (0: none)
        outer[t]   the same for the outer hop posted at step t
        grad[t]    the most gradient rows any member sends home after step t
        total[m]   member m's K/V rows over the forward's hops and its gradient rows, (kv, grad)"""
    placement = scheme.placement if shape.causal else "contiguous"  # a general mask is never zigzag
    return _window_rows(shape.seq, shape.causal, shape.window, scheme.ring, scheme.window, placement)


@functools.lru_cache(maxsize=256)
def _window_rows(seq: int, causal: bool, window: int, ring: int, cp_window: int, sharding: str) -> dict:
    steps = ring_steps(ring, cp_window)
    # The rows of every block each member sees, by ring_ext's own placement and mask rule (a length
    # the sharding cannot split is cut to one it can: a few tokens in a long sequence).
    s = placement.Scheme(ring, 1, sharding, causal, None)
    chunks = placement.num_chunks(sharding, ring)
    need = placement.block_needed(s, seq - seq % chunks, None, window).tolist()

    def carried(block: int, step: int, outer: bool) -> int:  # the hull of what the hop's holders see
        spans = [need[steps.holder(block, u)][block] for u in steps.fed(step, outer)]
        spans = [span for span in spans if span[1] > span[0]]
        return max(h for _, h in spans) - min(lo for lo, _ in spans) if spans else 0

    inner, outer, grad = [0] * ring, [0] * ring, [0] * ring
    kv_total, grad_total = [0] * ring, [0] * ring
    for r in range(ring):
        for t in range(ring):
            src = steps.src[r][t]
            if t in steps.inner_steps:
                rows = carried(src, t, outer=False)
                inner[t], kv_total[r] = max(inner[t], rows), kv_total[r] + rows
            if t in steps.outer_steps:
                rows = carried(src, t, outer=True)
                outer[t], kv_total[r] = max(outer[t], rows), kv_total[r] + rows
            if t > 0:
                lo, hi = need[r][src]
                grad[t], grad_total[r] = max(grad[t], hi - lo), grad_total[r] + hi - lo
    return {"inner": inner, "outer": outer, "grad": grad, "total": list(zip(kv_total, grad_total))}


def _all_to_all(cluster: Cluster, scheme: Scheme, nbytes: float, rank: int = 0) -> float:
    """Time of one all-to-all over the Ulysses group of `rank` (u consecutive ranks) in which each rank
    holds nbytes and sends (u - 1)/u of it: chunks to other nodes go over the inter-node link, the rest
    over the intra-node one, both at once."""
    u = scheme.ulysses_degree
    if u == 1:
        return 0.0
    group = [rank - rank % u + i for i in range(u)]
    chunk = nbytes / u
    far = sum(1 for r in group if r // cluster.gpus_per_node != rank // cluster.gpus_per_node)
    near = u - 1 - far
    t_near = near * chunk / cluster.intra_bw + (cluster.intra_latency if near else 0.0)
    t_far = far * chunk / cluster.inter_bw + (cluster.inter_latency if far else 0.0)
    return max(t_near, t_far)


def predict(shape: Shape, cluster: Cluster, scheme: Scheme) -> Prediction:
    """The model of docs/planner.md for one scheme."""
    cp, u, ring = scheme.cp, scheme.ulysses_degree, scheme.ring
    b, d, e = shape.batch, shape.head_dim, shape.elem
    fwd_flops, bwd_flops = attention_flops(shape)
    fwd_c, bwd_c = fwd_flops / cp / cluster.flops_per_s, bwd_flops / cp / cluster.flops_per_s

    tokens = shape.seq // cp  # per rank before any all-to-all
    q_bytes = b * tokens * shape.heads * d * e
    kv_heads_after = max(shape.hkv, u)  # Ulysses repeats K/V heads when there are fewer than u
    kv_bytes = 2 * b * tokens * kv_heads_after * d * e  # k and v, as each rank holds them (pre all-to-all)

    # Ulysses (u > 1): q, k, v in and out back, forward; dout, q, k, v, out in and dq, dk, dv back.
    a2a_fwd = _all_to_all(cluster, scheme, q_bytes + kv_bytes) + _all_to_all(cluster, scheme, q_bytes)
    a2a_bwd = _all_to_all(cluster, scheme, 3 * q_bytes + kv_bytes) + _all_to_all(
        cluster, scheme, q_bytes + kv_bytes
    )
    a2a_sent = (u - 1) / u * (q_bytes + kv_bytes + q_bytes + 3 * q_bytes + kv_bytes + q_bytes + kv_bytes)

    # The ring over cp/u members u apart, on blocks of cp/ring... after the all-to-all each rank holds
    # seq*u/cp tokens of heads/u heads: the K/V block it passes has the plain ring's size.
    row_kv = 2 * b * max(1, kv_heads_after // u) * d * e  # one token of the K/V block
    row_dkv = row_kv // e * 4  # its float32 gradient
    block_kv, block_dkv = (shape.seq // ring) * row_kv, (shape.seq // ring) * row_dkv
    if shape.window is None:  # every block moves whole (packed documents too: each spans the ring)
        steps = ring_steps(ring, scheme.window)
        inner = [block_kv if t in steps.inner_steps else 0 for t in range(ring)]
        outer = [block_kv if t in steps.outer_steps else 0 for t in range(ring)]
        fwd_hops = (inner, outer)
        bwd_hops = ([n and n + block_dkv for n in inner], outer)
        ring_sent = (
            (ring - 1) * block_kv + (ring - 1) * (block_kv + block_dkv) + (block_dkv if ring > 1 else 0)
        )
        bwd_tail = 0.0
    else:  # only the rows the window lets some rank see
        rows = window_rows(shape, scheme)
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
    fwd_ring, fwd_exposed = _ring_phase(cluster, scheme, fwd_c / ring + merge, fwd_hops, u)
    fwd_ring -= merge  # the first step has nothing to merge
    bwd_ring, bwd_exposed = _ring_phase(cluster, scheme, bwd_c / ring, bwd_hops, u, bwd_tail)

    seconds = fwd_ring + bwd_ring + a2a_fwd + a2a_bwd
    # Peak per rank in the backward: q, k, v, out, dout, lse, the float32 dq/dk/dv accumulators of the
    # ring's share, the K/V blocks in flight (two with overlap) and their gradients.
    q_local = b * (shape.seq // ring) * (shape.heads // u) * d
    kv_local = 2 * b * (shape.seq // ring) * max(1, kv_heads_after // u) * d
    in_flight = 2 if scheme.overlap and ring > 1 else 1 if ring > 1 else 0
    peak = (
        (3 * q_local + kv_local) * e  # q, out, dout; k, v
        + (q_local + kv_local) * 4  # float32 dq, dk/dv accumulators
        + b * (shape.heads // u) * (shape.seq // ring) * 4 * 2  # lse, delta
        + in_flight * (kv_local * e + kv_local * 4)  # travelling K/V and dK/dV
        + (2 * (q_bytes + kv_bytes) if u > 1 else 0)  # all-to-all send/receive buffers
    )
    return Prediction(
        scheme=scheme,
        seconds=seconds,
        compute_s=fwd_c + bwd_c,
        exposed_comm_s=fwd_exposed + bwd_exposed + a2a_fwd + a2a_bwd,
        bytes_sent=int(a2a_sent + ring_sent),
        peak_bytes=int(peak),
    )


def rank_schemes(shape: Shape, cluster: Cluster, cp: int | None = None) -> list[Prediction]:
    """Every scheme at CP size cp (default: the whole cluster), fastest first (ties: less memory)."""
    cp = cluster.size if cp is None else cp
    if cp < 1 or cp > cluster.size:
        raise ValueError(f"cp must be between 1 and the cluster's {cluster.size} ranks, got {cp}")
    if shape.doc_lengths is None and shape.seq % (2 * cp) != 0:  # packed rows take any length
        raise ValueError(f"seq {shape.seq} must be divisible by 2 * cp = {2 * cp} (zigzag shards)")
    preds = [predict(shape, cluster, scheme) for scheme in schemes(shape, cp)]
    return sorted(preds, key=lambda p: (p.seconds, p.peak_bytes))
