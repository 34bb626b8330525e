"""`python -m ring_ext`: the demo and the benchmark of every context-parallel algorithm, and the planner.

    python -m ring_ext demo                      # 4 Gloo ranks on this machine, every algorithm, verified
    python -m ring_ext bench --cp-sizes 1,2,4 --plot cp.png --json
    python -m ring_ext generate --cp-sizes 1,2,4 --seq 4096   # prefill + decode over a sharded KV cache
    python -m ring_ext plan --seq 131072 --heads 32 --nodes 2 --intra-gbps 400 --inter-gbps 50 --tflops 400
    torchrun --nproc-per-node 8 -m ring_ext demo # the launched group (NCCL on CUDA), CP size 8

Without a launcher the command spawns --context-parallel-size CPU processes over Gloo (default 4; bench:
one world per --cp-sizes entry, default 1,2,4). Under torchrun it uses the launched processes, and the
CP size is the launched world unless given; a CP size other than the world, or an --algos choice that
cannot run at it, is an error that names both numbers. Every algorithm that CPConfig and the head count
allow at a CP size runs (the others are listed as skipped, with the reason), forward + backward on the
same inputs. Its output and gradients are checked against an independent reference when the sequence
is short enough (--verify-max-seq): PyTorch's SDPA in float64 on the full sequence, with the test
suite's tolerance rule (TOLERANCE_RULE below); each row says PASS or FAIL, and a FAIL exits non-zero.
The table shows time, tokens/s, peak memory per rank and the error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..attention import attention
from ..config import CPConfig, add_arguments, launched_by_torchrun
from ..context import initialize
from ..peak_memory import PeakRSS, exact_peaks
from ..sharding import shard, unshard
from ..testing.spawn import run_distributed
from ..testing.tolerances import FACTOR
from ..testing.tolerances import FLOOR as _FLOOR
from . import generate, planner

DTYPES = planner.DTYPES

# The check of every row, the test suite's rule (ring_ext/testing/tolerances.py, whole-tensor
# measure): the relative L2 error of out, dq, dk and dv against the float64 reference is at most
# FACTOR x PyTorch's own error in the same dtype on the same inputs, plus FLOOR.
TOLERANCE_RULE = "{factor:g} x PyTorch's own {dtype} error ({pytorch:.1e}) + {floor:.1e}"
FLOOR = {name: _FLOOR[dtype] for name, dtype in DTYPES.items() if dtype in _FLOOR}


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


def candidates(cp: int, args) -> list[tuple[Case, str | None]]:
    """Every algorithm at cp, each with the reason it cannot run there (None: it runs). CPConfig decides
    which configurations exist (the CLI accepts exactly what it accepts); the heads must split as
    ring_ext.attention requires of Ulysses (ring_ext/validation.py). The double ring's window and
    hybrid's Ulysses degree are --cp-window-size and --ulysses-degree-in-cp when given, else the smallest
    that can run at cp."""
    window = args.cp_window_size if args.cp_window_size > 1 else _smallest_divisor(cp)
    degree = args.ulysses_degree_in_cp or _smallest_divisor(cp, lambda d: _heads_split(d, args) is None)
    cases = [
        (Case("ulysses", cp, "ulysses_cp_algo"), cp),  # with the degree its heads split over
        (Case("ring", cp, "megatron_cp_algo"), 1),
        (Case(f"double ring w={window}", cp, "megatron_cp_algo", window=window), 1),
        (Case(f"hybrid u={degree}", cp, "hybrid_cp_algo", ulysses_degree=degree), degree),
    ]
    out = []
    for case, split in cases:
        try:
            case.config(args)
        except ValueError as e:
            out.append((case, str(e)))
            continue
        out.append((case, _heads_split(split, args)))
    return out


def _smallest_divisor(n: int, ok=lambda d: True) -> int:
    """The smallest d > 1 dividing n for which ok(d) holds, else the smallest d > 1 dividing n, else 2
    (n = 1); the checks in candidates() then say why it cannot run."""
    divisors = [d for d in range(2, n + 1) if n % d == 0]
    return next((d for d in divisors if ok(d)), divisors[0] if divisors else 2)


def _heads_split(degree: int, args) -> str | None:
    """Why q and K/V heads cannot be split over `degree` Ulysses ranks (None: they can)."""
    heads = args.heads
    if heads < degree:  # any other count splits (Note [Ulysses head split] in csrc/cp/ulysses.cpp)
        return f"--heads ({heads}) must be at least the Ulysses degree ({degree})"
    return None


def _wanted(case: Case, args) -> bool:
    wanted = args.algos.split(",")
    return "all" in wanted or case.name.split()[0] in wanted


def cases_for(cp: int, args) -> list[Case]:
    """The algorithms of --algos that run at cp."""
    return [c for c, reason in candidates(cp, args) if reason is None and _wanted(c, args)]


def skipped(sizes: list[int], args) -> list[str]:
    """One line for every algorithm of --algos that cannot run at one of the sizes, saying why."""
    return [
        f"skipped at cp {cp}: {c.name} ({reason})"
        for cp in sizes
        for c, reason in candidates(cp, args)
        if reason is not None and _wanted(c, args)
    ]


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
        reasons = dict.fromkeys(
            f"{c.name} at cp {cp}: {reason}"
            for cp in at
            for c, reason in candidates(cp, args)
            if reason is not None and c.name.split()[0] in names
        )
        raise UsageError(
            f"--algos {args.algos}: {', '.join(names)} cannot run at CP size{'s' * (len(at) > 1)} "
            f"{_join(at)} (--heads {args.heads}): " + "; ".join(reasons)
        )
    return [c for cp in sizes for c in per_size[cp]]


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


@dataclasses.dataclass
class Check:
    """The independent check every row is held to (rank 0): out, dq, dk, dv of PyTorch's SDPA in float64
    on the full sequence, on the CPU, and the tolerance: TOLERANCE_RULE, pytorch_err being the largest
    relative L2 error of PyTorch's SDPA in the input dtype on the same inputs."""

    expected: list[torch.Tensor]
    pytorch_err: float
    tolerance: float


def sdpa(inputs, dtype: torch.dtype, causal: bool) -> list[torch.Tensor]:
    """PyTorch's attention in dtype: [out, dq, dk, dv], [b, s, h, d] in and out (K/V may have fewer heads)."""
    q, k, v, dout = (t.to(dtype).transpose(1, 2) for t in inputs)  # [b, h, s, d]
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return [t.transpose(1, 2) for t in (out.detach(), *grads)]


def reference_check(args, inputs) -> Check:
    causal = args.attention_mask_type == "causal"
    expected = sdpa([t.cpu() for t in inputs], torch.float64, causal)
    pytorch = sdpa(inputs, DTYPES[args.dtype], causal)
    pytorch_err = max(rel_err(a.cpu(), e) for a, e in zip(pytorch, expected))
    return Check(expected, pytorch_err, FACTOR * pytorch_err + FLOOR[args.dtype])


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def run_case(case: Case, args, inputs, check: Check | None, device) -> dict:
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
    error = verdict = None
    if args.seq <= args.verify_max_seq:  # unshard is collective; rank 0 holds the reference
        ours = [unshard(t, ctx, seq_dim=1) for t in (out.detach(), q.grad, k.grad, v.grad)]
        if check is not None:
            error = max(rel_err(a.cpu(), e) for a, e in zip(ours, check.expected))
            verdict = "PASS" if error <= check.tolerance else "FAIL"
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
        max_rel_err=error,
        tolerance=check.tolerance if check is not None else None,
        pytorch_rel_err=check.pytorch_err if check is not None else None,
        check=verdict,
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
    if verify and dist.get_rank() == 0:
        _progress(0, len(cases), "reference: float64 SDPA")
    check = reference_check(args, inputs) if verify and dist.get_rank() == 0 else None
    rows = []
    for i, case in enumerate(cases):
        if dist.get_rank() == 0:
            _progress(i, len(cases), f"{case.name} cp={case.cp}")
        rows.append(run_case(case, args, inputs, check, device))
    if dist.get_rank() == 0:
        _progress(len(cases), len(cases), "done")
    return rows


def _progress(done: int, total: int, label: str) -> None:
    width = 24
    filled = width * done // max(total, 1)
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<32}", end="", file=sys.stderr)
    if done == total:
        print(file=sys.stderr)


def _spawned_rank(rank: int, world: int, job) -> list[dict]:
    args, cases = job
    exact_peaks()
    return run_rank(args, cases, torch.device("cpu"))


def run_spawned(args, cp: int, cases: list[Case]) -> list[dict]:
    """cp Gloo processes on this machine (CPU), by the one spawn helper (ring_ext/testing/spawn.py)."""
    jobs = [(args, cases)]
    return run_distributed(
        _spawned_rank,
        cp,
        jobs,
        timeout_s=None,
        pg_timeout_s=args.timeout,
        threads=args.threads_per_rank,
        collect=True,
    )[0]


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
        sizes = cp_sizes(args, dist.get_world_size())
        cases = plan(args, sizes)
    except UsageError as e:
        if dist.get_rank() == 0:
            print(f"python -m ring_ext {args.command}: error: {e}", file=sys.stderr, flush=True)
        dist.barrier()  # rank 0 has said why before any rank exits (torchrun then stops the rest)
        dist.destroy_process_group()
        sys.exit(2)
    if dist.get_rank() == 0:
        print_skipped(args, sizes)
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
        "check",
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default; descriptions keep their line breaks."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ring_ext", description=__doc__, formatter_class=HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        (
            "demo",
            "every algorithm at one CP size (--context-parallel-size; None: 4 spawned Gloo ranks, or "
            "the world torchrun launched), checked against float64 SDPA",
        ),
        ("bench", "every algorithm at several CP sizes (--cp-sizes); --plot, --json"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        add_arguments(p)
        # cp_sizes(): the launched world under torchrun, else 4
        p.set_defaults(context_parallel_size=None)
        p.add_argument(
            "--algos",
            default="all",
            help="all, or a comma list of ulysses,ring,double,hybrid (double ring and hybrid use "
            "--cp-window-size and --ulysses-degree-in-cp when given, else the smallest that runs)",
        )
        p.add_argument(
            "--seq", type=int, default=4096 if name == "demo" else 8192, help="total sequence length"
        )
        p.add_argument("--batch", type=int, default=1, help="sequences per batch")
        p.add_argument("--heads", type=int, default=8, help="query heads")
        p.add_argument("--kv-heads", type=int, default=None, help="GQA: K/V heads (None: --heads)")
        p.add_argument("--head-dim", type=int, default=64, help="dimension of each head")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="q, k, v dtype")
        p.add_argument("--repeats", type=int, default=2, help="timed runs per algorithm (the fastest counts)")
        p.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
        p.add_argument("--threads-per-rank", type=int, default=1, help="torch threads of each spawned rank")
        p.add_argument(
            "--verify-max-seq",
            type=int,
            default=16384,
            help="check against float64 SDPA on the full sequence up to this length",
        )
        p.add_argument("--timeout", type=float, default=600, help="seconds before a stuck rank errors out")
        p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
        p.add_argument(
            "--plot",
            metavar="FILE.png",
            help="time and memory per rank against CP size (needs matplotlib: pip install matplotlib)",
        )
        if name == "bench":
            p.add_argument(
                "--cp-sizes",
                default=None,
                help="comma list of CP sizes, one spawned Gloo world each (None: 1,2,4; under torchrun "
                "the launched world)",
            )
    generate.add_generate_arguments(
        sub.add_parser(
            "generate",
            help="prefill and decode a tiny Llama with CP over a sharded KV cache (ring_ext.hf.generate)",
            description=generate.__doc__,
            formatter_class=HelpFormatter,
        )
    )
    planner.add_plan_arguments(
        sub.add_parser(
            "plan",
            help="predict the best CP layout for a cluster (docs/planner.md)",
            formatter_class=HelpFormatter,
        )
    )
    return parser


def print_skipped(args, sizes: list[int]) -> None:
    """The algorithms that cannot run at a size, and why: before the table (on stderr under --json)."""
    for line in skipped(sizes, args):
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)


def print_header(args, rows: list[dict]) -> None:
    print(
        f"b={args.batch} h={args.heads} kv_heads={args.kv_heads or args.heads} d={args.head_dim} "
        f"cpu_isa={torch.ops.ring_ext.cpu_isa()}"
    )
    checked = [r for r in rows if r["tolerance"] is not None]
    if not checked:
        print(f"check: none (--seq {args.seq} > --verify-max-seq {args.verify_max_seq})")
        return
    rule = TOLERANCE_RULE.format(
        factor=FACTOR, dtype=args.dtype, pytorch=checked[0]["pytorch_rel_err"], floor=FLOOR[args.dtype]
    )
    print(
        "check: max_rel_err is the largest relative L2 error of out, dq, dk, dv against PyTorch's SDPA "
        f"in float64 on the full sequence; PASS when <= {checked[0]['tolerance']:.1e} = {rule}"
    )


def require_matplotlib(parser: argparse.ArgumentParser, args) -> None:
    """--plot: matplotlib must import before any work is done."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error(
            f"{args.command} --plot needs matplotlib: pip install matplotlib (or ring_ext's extra: "
            "pip install --no-build-isolation '.[plot]')"
        )


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "plot", None):
        require_matplotlib(parser, args)
    if args.command == "generate":
        try:
            cases = generate.cases_of(args)
        except ValueError as e:
            parser.error(f"generate: {e}")
        sys.exit(generate.run_checked(cases, args.json))
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
        print_skipped(args, sizes)
        rows = []
        for cp in sizes:
            rows += run_spawned(args, cp, [c for c in cases if c.cp == cp])
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_header(args, rows)
        print_table(rows)
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    failed = [r["algo"] + f" cp={r['cp']}" for r in rows if r["check"] == "FAIL"]
    if failed:
        sys.exit(f"verification FAILED: {', '.join(failed)} (error above the tolerance)")
