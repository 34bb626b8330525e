"""`python -m ring_ext generate`: long-prompt generation with context parallelism on this machine — a tiny
random Llama (transformers, nothing downloaded) prefilled and decoded by ring_ext.hf.generate at each CP
size (spawned Gloo ranks), with prefill time, decode ms per token, cache memory per rank and the bytes
one decode step moves; the tokens of every CP size are checked against CP size 1's (greedy: the same
tokens, PASS or FAIL). benchmarks/bench_inference.py runs the same measurement over prompt lengths."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from ..testing.spawn import run_distributed


@dataclasses.dataclass(frozen=True)
class GenerateCase:
    cp: int
    algo: str
    seq: int
    new_tokens: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    batch: int = 1
    seed: int = 0
    vocab: int = 1000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def decode_bytes(self) -> int:
        """Bytes one rank receives in one decode step: per layer the all-gather of every other rank's
        partial (float32 out and lse of batch x heads rows; Note [Merging partials across ranks] in
        ring_ext/inference.py), and the all-gather of the chosen tokens (int64)."""
        partial = self.batch * self.heads * (self.head_dim + 1) * 4
        return (self.cp - 1) * (self.layers * partial + self.batch * 8)


def tiny_llama(case: GenerateCase):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=case.vocab,
        hidden_size=case.hidden,
        intermediate_size=2 * case.hidden,
        num_hidden_layers=case.layers,
        num_attention_heads=case.heads,
        num_key_value_heads=case.kv_heads,
        max_position_embeddings=max(case.seq + case.new_tokens, 2048),
        eos_token_id=None,
        bos_token_id=None,
    )
    torch.manual_seed(case.seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def measure(rank: int, world_size: int, case: GenerateCase) -> dict:
    """Runs on every rank: one generate call; the slowest rank's times, the largest cache."""
    import ring_ext
    import ring_ext.hf

    ctx = ring_ext.initialize(
        ring_ext.CPConfig(context_parallel_size=world_size, context_parallel_algo=case.algo)
    )
    model = tiny_llama(case)
    ids = torch.randint(
        0, case.vocab, (case.batch, case.seq), generator=torch.Generator().manual_seed(case.seed)
    )
    warm = torch.randint(
        0, case.vocab, (case.batch, 16 * world_size), generator=torch.Generator().manual_seed(1)
    )
    ring_ext.hf.generate(model, warm, ctx, max_new_tokens=2)  # first calls: groups, placements, allocator
    stats: dict = {}
    tokens = ring_ext.hf.generate(model, ids, ctx, max_new_tokens=case.new_tokens, stats=stats)
    slowest = ring_ext.all_reduce(torch.tensor([stats["prefill_s"], stats["decode_s"]]), ctx, "max")
    cache = ring_ext.all_reduce(torch.tensor([stats["cache_bytes"], stats["cache_live_bytes"]]), ctx, "max")
    return {
        "cp": case.cp,
        "algo": case.algo,
        "seq": case.seq,
        "prefill_s": float(slowest[0]),
        "decode_ms_per_token": 1e3 * float(slowest[1]) / max(stats["steps"], 1),
        "cache_mib_per_rank": float(cache[0]) / 2**20,
        "cache_live_mib_per_rank": float(cache[1]) / 2**20,
        "decode_step_bytes": case.decode_bytes(),
        "tokens": tokens[:, case.seq :].tolist(),
    }


def run_cases(cases: list[GenerateCase], timeout_s: float = 1800) -> list[dict]:
    """Every case in its own spawned Gloo world of case.cp ranks, one thread each."""
    return [run_distributed(measure, c.cp, [c], timeout_s=timeout_s, collect=True)[0] for c in cases]


def check_tokens(rows: list[dict]) -> None:
    """Marks each row PASS when its tokens are those of CP size 1 at the same prompt, FAIL otherwise."""
    reference = {r["seq"]: r["tokens"] for r in rows if r["cp"] == 1}
    for r in rows:
        ref = reference.get(r["seq"])
        r["check"] = "-" if ref is None else ("PASS" if r["tokens"] == ref else "FAIL")


def table(rows: list[dict]) -> str:
    head = "| cp | algo | prompt | prefill s | decode ms/token | cache MiB/rank (live) | bytes/decode step | tokens = cp 1 |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['cp']} | {r['algo']} | {r['seq']} | {r['prefill_s']:.2f} | {r['decode_ms_per_token']:.1f} | "
            f"{r['cache_mib_per_rank']:.2f} ({r['cache_live_mib_per_rank']:.2f}) | {r['decode_step_bytes']} | "
            f"{r['check']} |"
        )
    return "\n".join(lines)


def add_generate_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--cp-sizes", default="1,2,4", help="comma list of CP sizes, one spawned Gloo world each")
    p.add_argument(
        "--context-parallel-algo",
        default="megatron_cp_algo",
        choices=("megatron_cp_algo", "ulysses_cp_algo"),
        help="the prefill's algorithm (decoding merges partials over the whole CP group either way)",
    )
    p.add_argument("--seq", type=int, default=4096, help="prompt length")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens to generate (greedy)")
    p.add_argument("--batch", type=int, default=1, help="prompts (rows) of that length")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny Llama")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the tiny Llama")
    p.add_argument("--heads", type=int, default=4, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="K/V heads (GQA)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    return p


def cases_of(args) -> list[GenerateCase]:
    sizes = [int(x) for x in str(args.cp_sizes).split(",") if x]
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"--cp-sizes must be a comma list of ints >= 1, got {args.cp_sizes!r}")
    if args.heads % args.kv_heads or args.hidden % args.heads:
        raise ValueError(
            f"--heads {args.heads} must divide --hidden {args.hidden} and be a multiple of --kv-heads"
        )
    return [
        GenerateCase(
            cp,
            args.context_parallel_algo,
            args.seq,
            args.new_tokens,
            args.layers,
            args.hidden,
            args.heads,
            args.kv_heads,
            args.batch,
        )  # fmt: skip
        for cp in sizes
    ]


def run_checked(cases: list[GenerateCase], as_json: bool = False) -> int:
    """The generate subcommand: prints the table (or JSON); returns the exit status (1 on a FAIL)."""
    import json

    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("generate needs transformers: pip install transformers (or ring_ext's extra: '.[hf]')")
    rows = run_cases(cases)
    check_tokens(rows)
    print(json.dumps(rows, indent=1) if as_json else table(rows))
    failed = [f"cp={r['cp']}" for r in rows if r["check"] == "FAIL"]
    if failed:
        print(f"generate FAILED: {', '.join(failed)} returned other tokens than cp=1", file=sys.stderr)
        return 1
    return 0
