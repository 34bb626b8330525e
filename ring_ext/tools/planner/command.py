"""The `plan` subcommand: its arguments, and the cluster's rates from them (explicit rates, else the
hardware presets, else --calibrate's measurements)."""

from __future__ import annotations

import math

from .calibrate import calibrated_flops, measure_link
from .model import DTYPES, Cluster, Shape, rank_schemes
from .presets import ATTENTION_EFFICIENCY, GPUS, INTERCONNECTS
from .report import plot, table

INTRA = sorted(n for n, link in INTERCONNECTS.items() if link.level == "intra")
INTER = sorted(n for n, link in INTERCONNECTS.items() if link.level == "inter")


def add_plan_arguments(p) -> None:
    p.add_argument("--seq", type=int, required=True, help="total sequence length")
    p.add_argument("--heads", type=int, required=True, help="q heads of the layer")
    p.add_argument("--kv-heads", type=int, default=None, help="GQA: K/V heads; None: --heads")
    p.add_argument("--head-dim", type=int, default=128, help="head_dim")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="q, k, v dtype")
    p.add_argument(
        "--attention-mask-type", choices=("causal", "general"), default="causal", help="causal or no mask"
    )
    p.add_argument("--sliding-window", type=int, default=None, help="sliding_window of the layer")
    p.add_argument(
        "--doc-lengths", default=None, help="packed documents: comma list of lengths summing to --seq"
    )
    p.add_argument("--nodes", type=int, default=1, help="nodes of --gpus-per-node ranks")
    p.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node")
    p.add_argument("--cp", type=int, default=None, help="CP size; None: every rank of the cluster")
    p.add_argument(
        "--gpu",
        choices=sorted(GPUS),
        default=None,
        help=f"GPU preset: kernel rate (bf16 dense peak x {ATTENTION_EFFICIENCY}), memory bandwidth and "
        "the GPU's usual links (ring_ext/tools/planner/presets.py)",
    )
    p.add_argument(
        "--interconnect",
        default=None,
        help=f"link presets, comma list: one intra-node ({', '.join(INTRA)}) and/or one inter-node "
        f"({', '.join(INTER)}); default: the --gpu's",
    )
    p.add_argument("--intra-gbps", type=float, default=None, help="GB/s per rank within a node")
    p.add_argument("--inter-gbps", type=float, default=None, help="GB/s per rank between nodes")
    p.add_argument(
        "--intra-latency-us", type=float, default=5.0, help="latency of one transfer within a node"
    )
    p.add_argument(
        "--inter-latency-us", type=float, default=20.0, help="latency of one transfer between nodes"
    )
    p.add_argument("--tflops", type=float, default=None, help="attention kernel rate per rank, TFLOP/s")
    p.add_argument(
        "--mem-gbps",
        type=float,
        default=None,
        help="device memory bandwidth, GB/s (the LSE merges; default: the --gpu's, else free)",
    )
    p.add_argument(
        "--calibrate", action="store_true", help="measure this machine's kernel rate and Gloo link (CPU)"
    )
    p.add_argument("--threads-per-rank", type=int, default=1, help="for --calibrate's kernel rate")
    p.add_argument("--top", type=int, default=None, help="print only the best N schemes")
    p.add_argument("--plot", metavar="FILE.png", help="predicted time per scheme (matplotlib)")


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


def _shape(args) -> Shape:
    """The layer of the command line, checked."""
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
    return shape


def _links(args) -> dict[str, str]:
    """The link preset of each level ("intra", "inter"): --interconnect's, else the --gpu's."""
    links = {"intra": GPUS[args.gpu].intra, "inter": GPUS[args.gpu].inter} if args.gpu else {}
    named = {}
    for name in args.interconnect.split(",") if args.interconnect else []:
        if name not in INTERCONNECTS:
            raise ValueError(f"--interconnect: unknown {name!r}; intra-node {INTRA}, inter-node {INTER}")
        level = INTERCONNECTS[name].level
        if level in named:
            raise ValueError(f"--interconnect names two {level}-node links: {named[level]} and {name}")
        named[level] = name
    return links | named


# The cluster's rates: the flag that gives each, its unit, and how the plan's first line names it.
RATES = {
    "tflops": ("TFLOP/s per rank", "kernels"),
    "intra_gbps": ("GB/s", "intra-node"),
    "inter_gbps": ("GB/s", "inter-node"),
    "mem_gbps": ("GB/s", "memory"),
}


def _preset_rates(args) -> tuple[Cluster, str]:
    """The cluster from the explicit rates, else the presets, and a line saying where each value came
    from. Raises ValueError naming what is missing."""
    gpu = GPUS[args.gpu] if args.gpu else None
    links = _links(args)
    if gpu is not None and args.tflops is None and args.dtype == "fp32":
        raise ValueError("--gpu's kernel rate is for bf16/fp16 tensor cores: give --tflops for --dtype fp32")
    presets = {  # flag -> (value, its source) where a preset gives it
        "mem_gbps": (gpu.hbm_gbps, args.gpu) if gpu else (math.inf, "neither --mem-gbps nor --gpu"),
        **{f"{level}_gbps": (INTERCONNECTS[name].gbps, name) for level, name in links.items()},
    }
    if gpu is not None:
        peak = f"{args.gpu}: {gpu.bf16_tflops:g} bf16 dense x {ATTENTION_EFFICIENCY} attention efficiency"
        presets["tflops"] = (gpu.bf16_tflops * ATTENTION_EFFICIENCY, peak)
    rates = {}
    for flag in RATES:
        given = getattr(args, flag)
        if given is not None:
            rates[flag] = (given, "given")
        elif flag in presets:
            rates[flag] = presets[flag]
        elif flag == "inter_gbps" and args.nodes == 1 and "intra_gbps" in rates:
            rates[flag] = (rates["intra_gbps"][0], "one node: unused")
    missing = [f"--{flag.replace('_', '-')}" for flag in RATES if flag not in rates]
    if missing:
        raise ValueError(
            f"give {', '.join(missing)} (the cluster's rates), or presets (--gpu {{{','.join(sorted(GPUS))}}}, "
            "--interconnect), or --calibrate to measure this machine"
        )
    said = [
        f"{RATES[flag][1]} {'free' if value == math.inf else f'{value:g} {RATES[flag][0]}'} ({where})"
        for flag, (value, where) in rates.items()
    ]
    tflops, intra, inter, mem = (rates[flag][0] for flag in RATES)
    cluster = Cluster(
        args.nodes,
        args.gpus_per_node,
        intra * 1e9,
        inter * 1e9,
        tflops * 1e12,
        args.intra_latency_us * 1e-6,
        args.inter_latency_us * 1e-6,
        mem * 1e9,
    )
    return cluster, "rates: " + "; ".join(said) + " (links: per GPU and direction)"


def _calibrated_rates(args, shape: Shape) -> tuple[Cluster, str]:
    """The cluster at this machine's measured rates (--mem-gbps aside), and a line saying how they
    were measured."""
    if args.gpu or args.interconnect:
        raise ValueError("--calibrate measures this machine: it takes no --gpu or --interconnect")
    ranks = args.cp if args.cp is not None else args.nodes * args.gpus_per_node
    flops, how = calibrated_flops(shape, ranks, args.threads_per_rank)
    bw, lat = measure_link()
    mem = args.mem_gbps * 1e9 if args.mem_gbps is not None else math.inf
    cluster = Cluster(args.nodes, args.gpus_per_node, bw, bw, flops, lat, lat, mem)
    return cluster, (
        f"calibrated here: kernels {flops / 1e9:.1f} GFLOP/s per rank ({how}), "
        f"Gloo link {bw / 1e9:.2f} GB/s, latency {lat * 1e6:.0f} us (used for both links)"
    )


def run(args) -> str:
    """The plan subcommand: returns the printed text. Raises ValueError on bad arguments."""
    shape = _shape(args)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib (pip install matplotlib, or ring_ext[plot])") from None
    cluster, header = _calibrated_rates(args, shape) if args.calibrate else _preset_rates(args)
    preds = rank_schemes(shape, cluster, args.cp)
    lines = [header]
    if args.plot:
        plot(preds, args.plot)
        lines.append(f"plot: {args.plot}")
    shown = preds if args.top is None else preds[: args.top]
    return "\n".join([*lines, table(shown)])
