"""`python -m ring_ext`: the demo and the benchmark of every context-parallel algorithm, and the planner.

    python -m ring_ext demo                      # 4 Gloo ranks on this machine, every algorithm, verified
    python -m ring_ext bench --cp-sizes 1,2,4 --plot cp.png --json
    python -m ring_ext plan --seq 131072 --heads 32 --nodes 2 --intra-gbps 400 --inter-gbps 50 --tflops 400
    torchrun --nproc-per-node 8 -m ring_ext demo # the launched group (NCCL on CUDA), CP size 8

Without a launcher the command spawns --context-parallel-size CPU processes over Gloo (default 4; bench:
one world per --cp-sizes entry, default 1,2,4). Under torchrun it uses the launched processes, and the
CP size is the launched world unless given; a CP size other than the world, or an --algos choice that
cannot run at it, is an error that names both numbers. Each algorithm runs forward + backward on the
same inputs; its output and gradients are checked against full attention on one process when the
sequence is short enough (--verify-max-seq), and the table shows time, tokens/s, peak memory per rank
and the error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .. import planner
from ..attention import attention
from ..config import CPConfig, add_arguments, launched_by_torchrun
from ..context import initialize
from ..peak_memory import PeakRSS, exact_peaks
from ..sharding import shard, unshard

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the table: an algorithm at a CP size."""

    name: str
    cp: int
    algo: str
    window: int = 1
    ulysses_degree: int | None = None

    def config(self, args) -> CPConfig:
        return CPConfig(
            context_parallel_size=self.cp,
            context_parallel_algo=self.algo,
            cp_window_size=self.window,
            ulysses_degree_in_cp=self.ulysses_degree,
            attention_mask_type=args.attention_mask_type,
            use_cp_send_recv_overlap=args.use_cp_send_recv_overlap,
        )


ALGO_NAMES = ("ulysses", "ring", "double", "hybrid")


class UsageError(ValueError):
    """A command line that cannot run as given (the message says why, with the numbers)."""


def cases_for(cp: int, args) -> list[Case]:
    """Every algorithm that fits cp and the head count: Ulysses, ring, double ring, hybrid."""
    window = args.cp_window_size if args.cp_window_size > 1 else 2
    degree = args.ulysses_degree_in_cp or 2
    out = []
    if args.heads % cp == 0:
        out.append(Case("ulysses", cp, "ulysses_cp_algo"))
    out.append(Case("ring", cp, "megatron_cp_algo"))
    if cp > window and cp % window == 0:
        out.append(Case(f"double ring w={window}", cp, "megatron_cp_algo", window=window))
    if 1 < degree < cp and cp % degree == 0 and args.heads % degree == 0:
        out.append(Case(f"hybrid u={degree}", cp, "hybrid_cp_algo", ulysses_degree=degree))
    wanted = args.algos.split(",")
    return [c for c in out if "all" in wanted or c.name.split()[0] in wanted]


def cp_sizes(args, world: int | None) -> list[int]:
    """The CP sizes to run: --context-parallel-size (demo) or --cp-sizes (bench); when not given, the
    launched world under torchrun (world), else 4 (demo) or 1,2,4 (bench). Under torchrun every size
    must be the world."""
    flag, given = "--context-parallel-size", args.context_parallel_size
    if args.command == "bench":
        flag, given = "--cp-sizes", args.cp_sizes
    if given is None:
        return [world] if world is not None else ([4] if args.command == "demo" else [1, 2, 4])
    sizes = [given] if isinstance(given, int) else _int_list(given, flag)
    if any(cp < 1 for cp in sizes):
        raise UsageError(f"{flag} {given}: CP sizes must be >= 1")
    wrong = [cp for cp in sizes if world is not None and cp != world]
    if wrong:
        need = f"a world of {wrong[0]} ranks" if len(wrong) == 1 else f"worlds of {_join(wrong)} ranks"
        raise UsageError(
            f"{flag} {given} needs {need}, torchrun launched {world}: under torchrun the CP "
            f"size is the launched world; leave {flag} out to run at {world}, launch --nproc-per-node "
            f"{wrong[0]}, or run without torchrun (it spawns a world per size)"
        )
    return sizes


def plan(args, sizes: list[int]) -> list[Case]:
    """Every case of every size, in order; a UsageError rather than an empty table when --algos names
    an algorithm no size can run, or a size runs nothing."""
    wanted = args.algos.split(",")
    unknown = [a for a in wanted if a not in ("all", *ALGO_NAMES)]
    if unknown:
        raise UsageError(
            f"--algos {args.algos}: unknown {unknown}; choose all or from {', '.join(ALGO_NAMES)}"
        )
    per_size = {cp: cases_for(cp, args) for cp in sizes}
    ran = {c.name.split()[0] for cases in per_size.values() for c in cases}
    missing = [a for a in wanted if a != "all" and a not in ran]
    empty = [cp for cp, cases in per_size.items() if not cases]  # only with --algos: ring runs anywhere
    if missing or empty:
        names = missing or [a for a in wanted if a != "all"]
        at = sizes if missing else empty
        raise UsageError(
            f"--algos {args.algos}: {', '.join(names)} cannot run at CP size{'s' * (len(at) > 1)} "
            f"{_join(at)} (--heads {args.heads}): " + "; ".join(_requirement(a, args) for a in names)
        )
    return [c for cp in sizes for c in per_size[cp]]


def _requirement(algo: str, args) -> str:
    window = args.cp_window_size if args.cp_window_size > 1 else 2
    degree = args.ulysses_degree_in_cp or 2
    return {
        "ulysses": f"ulysses needs --heads ({args.heads}) divisible by the CP size",
        "ring": "ring runs at every CP size",
        "double": f"double needs a CP size larger than the window ({window}) and divisible by it",
        "hybrid": f"hybrid needs a CP size larger than the Ulysses degree ({degree}) and divisible by it, "
        f"and --heads ({args.heads}) divisible by the degree",
    }[algo]


def _join(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes[:-1])) + " and " * (len(sizes) > 1) + str(sizes[-1])


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {text}: expected a comma list of integers") from None


def full_inputs(args, device) -> list[torch.Tensor]:
    """q, k, v, dout [b, s, h, d], identical on every rank."""
    g = torch.Generator().manual_seed(args.seed)
    shape_q = (args.batch, args.seq, args.heads, args.head_dim)
    shape_kv = (args.batch, args.seq, args.kv_heads or args.heads, args.head_dim)
    dtype = DTYPES[args.dtype]
    return [
        torch.randn(s, generator=g).to(device=device, dtype=dtype)
        for s in (shape_q, shape_kv, shape_kv, shape_q)
    ]


def reference(args, inputs):
    """Full attention on one process in float32: (out, dq, dk, dv)."""
    q, k, v, dout = (t.float().requires_grad_(i < 3) for i, t in enumerate(inputs))
    out = attention(q, k, v, causal=args.attention_mask_type == "causal")
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def run_case(case: Case, args, inputs, ref, device) -> dict:
    """Forward + backward of one case on every rank; rank 0's dict has the row."""
    ctx = initialize(case.config(args))
    q, k, v = (shard(t, ctx, seq_dim=1).detach().requires_grad_() for t in inputs[:3])
    dout = shard(inputs[3], ctx, seq_dim=1)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as mem:  # the first (cold) run carries the peak
        out = attention(q, k, v, ctx, layout="bshd")
        out.backward(dout)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if on_cuda else mem.peak_mib
    errors = None
    if args.seq <= args.verify_max_seq:  # unshard is collective; rank 0 holds the reference
        ours = [unshard(t, ctx, seq_dim=1) for t in (out.detach(), q.grad, k.grad, v.grad)]
        if ref is not None:
            errors = max(rel_err(a, b) for a, b in zip(ours, ref))
    fwd, bwd = [], []
    for _ in range(args.repeats):
        q.grad = k.grad = v.grad = None
        fwd.append(_timed(lambda: attention(q, k, v, ctx, layout="bshd"), device))
        out = attention(q, k, v, ctx, layout="bshd")
        bwd.append(_timed(lambda: out.backward(dout), device))
    row = dict(
        algo=case.name,
        cp=case.cp,
        seq=args.seq,
        dtype=args.dtype,
        mask=args.attention_mask_type,
        fwd_ms=_slowest_rank(min(fwd)) * 1e3,
        bwd_ms=_slowest_rank(min(bwd)) * 1e3,
        peak_mib_per_rank=_slowest_rank(peak),
        max_rel_err=errors,
    )
    row["tokens_per_s"] = args.batch * args.seq / ((row["fwd_ms"] + row["bwd_ms"]) / 1e3)
    return row


def _timed(fn, device) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _slowest_rank(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    # ring_ext's own collective, not dist.all_reduce: docs/reliability.md, Teardown.
    torch.ops.ring_ext.all_reduce_([t], dist.group.WORLD.group_name, "max")
    return t.item()


def run_rank(args, cases: list[Case], device) -> list[dict]:
    """Every case, in order, on this world (each case's cp is the world size)."""
    inputs = full_inputs(args, device)
    verify = args.seq <= args.verify_max_seq
    ref = reference(args, inputs) if verify and dist.get_rank() == 0 else None
    rows = []
    for i, case in enumerate(cases):
        if dist.get_rank() == 0:
            _progress(i, len(cases), f"{case.name} cp={case.cp}")
        rows.append(run_case(case, args, inputs, ref, device))
    if dist.get_rank() == 0:
        _progress(len(cases), len(cases), "done")
    return rows


def _progress(done: int, total: int, label: str) -> None:
    width = 24
    filled = width * done // max(total, 1)
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<32}", end="", file=sys.stderr)
    if done == total:
        print(file=sys.stderr)


def _spawned_rank(rank: int, world: int, port: int, args, cases, queue) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=args.timeout),
    )
    torch.set_num_threads(args.threads_per_rank)
    exact_peaks()
    try:
        rows = run_rank(args, cases, torch.device("cpu"))
        if rank == 0:
            queue.put(rows)
    finally:
        dist.destroy_process_group()


def run_spawned(args, cp: int, cases: list[Case]) -> list[dict]:
    """cp Gloo processes on this machine (CPU)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_spawned_rank, args=(cp, port, args, cases, queue), nprocs=cp)
    return queue.get()


def run_torchrun(args) -> list[dict] | None:
    """The processes torchrun launched: NCCL and one GPU each when CUDA is present, else Gloo; the CP
    size is the world's unless given (then it must be the world). Returns the rows on rank 0, None
    elsewhere; a command line the world cannot run exits non-zero on every rank, rank 0 saying why."""
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = (
        torch.device("cuda", dist.get_rank() % torch.cuda.device_count()) if cuda else torch.device("cpu")
    )
    if cuda:
        torch.cuda.set_device(device)
    else:
        exact_peaks()
    try:
        cases = plan(args, cp_sizes(args, dist.get_world_size()))
    except UsageError as e:
        if dist.get_rank() == 0:
            print(f"python -m ring_ext {args.command}: error: {e}", file=sys.stderr, flush=True)
        dist.barrier()  # rank 0 has said why before any rank exits (torchrun then stops the rest)
        dist.destroy_process_group()
        sys.exit(2)
    try:
        rows = run_rank(args, cases, device)
        return rows if dist.get_rank() == 0 else None
    finally:
        dist.destroy_process_group()


def print_table(rows: list[dict]) -> None:
    cols = [
        "algo",
        "cp",
        "seq",
        "dtype",
        "mask",
        "fwd_ms",
        "bwd_ms",
        "tokens_per_s",
        "peak_mib_per_rank",
        "max_rel_err",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            value = r[c]
            if value is None:
                cells.append("-")
            elif isinstance(value, float):
                cells.append(
                    f"{value:.1e}"
                    if c == "max_rel_err"
                    else f"{value:.0f}"
                    if value >= 100
                    else f"{value:.1f}"
                )
            else:
                cells.append(str(value))
        print("| " + " | ".join(cells) + " |")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for algo in dict.fromkeys(r["algo"] for r in rows):
        mine = sorted((r for r in rows if r["algo"] == algo), key=lambda r: r["cp"])
        cps = [r["cp"] for r in mine]
        ax_t.plot(cps, [r["fwd_ms"] + r["bwd_ms"] for r in mine], marker="o", label=algo)
        ax_m.plot(cps, [r["peak_mib_per_rank"] for r in mine], marker="o", label=algo)
    first = rows[0]
    title = f"s={first['seq']}, {first['dtype']}, {first['mask']}"
    for ax, ylabel in ((ax_t, "forward + backward, ms"), (ax_m, "peak memory per rank, MiB")):
        ax.set_xlabel("context-parallel size")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ring_ext", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("demo", "every algorithm at one CP size, verified"),
        ("bench", "every algorithm at several CP sizes; --plot, --json"),
    ):
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(context_parallel_size=None)  # cp_sizes(): the launched world, else 4
        p.add_argument("--algos", default="all", help="all, or a comma list of ulysses,ring,double,hybrid")
        p.add_argument(
            "--seq", type=int, default=4096 if name == "demo" else 8192, help="total sequence length"
        )
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--heads", type=int, default=8)
        p.add_argument("--kv-heads", type=int, default=None, help="GQA: K/V heads (default: --heads)")
        p.add_argument("--head-dim", type=int, default=64)
        p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
        p.add_argument("--repeats", type=int, default=2)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads-per-rank", type=int, default=1)
        p.add_argument(
            "--verify-max-seq", type=int, default=16384, help="check against full attention up to this length"
        )
        p.add_argument("--timeout", type=float, default=600, help="seconds before a stuck rank errors out")
        p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
        p.add_argument(
            "--plot", metavar="FILE.png", help="time and memory per rank against CP size (matplotlib)"
        )
        if name == "bench":
            p.add_argument(
                "--cp-sizes",
                default=None,
                help="comma list of CP sizes, one spawned Gloo world each (default 1,2,4); "
                "under torchrun the launched world (the default)",
            )
    planner.add_plan_arguments(
        sub.add_parser("plan", help="predict the best CP layout for a cluster (docs/planner.md)")
    )
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "plan":
        try:
            print(planner.run(args))
        except ValueError as e:
            parser.error(f"plan: {e}")
        return
    if launched_by_torchrun():
        rows = run_torchrun(args)
        if rows is None:
            return
    else:
        try:
            sizes = cp_sizes(args, None)
            cases = plan(args, sizes)
        except UsageError as e:
            parser.error(f"{args.command}: {e}")
        rows = []
        for cp in sizes:
            rows += run_spawned(args, cp, [c for c in cases if c.cp == cp])
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(
            f"b={args.batch} h={args.heads} kv_heads={args.kv_heads or args.heads} d={args.head_dim} "
            f"cpu_isa={torch.ops.ring_ext.cpu_isa()}; "
            f"max_rel_err: output and gradients vs full attention on one process (fp32)"
        )
        print_table(rows)
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    bad = [r for r in rows if r["max_rel_err"] is not None and r["max_rel_err"] > TOLERANCE[args.dtype]]
    if bad:
        sys.exit(f"verification failed: {[r['algo'] for r in bad]}")


# Relative L2 bounds of the test suite (tests/tolerances.py), per input dtype.
TOLERANCE = {"fp32": 2e-5, "bf16": 1e-2, "fp16": 2e-3}
