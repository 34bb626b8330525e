"""Kernel benchmark on one GPU: ring_ext's block fwd/bwd against PyTorch's SDPA backends.

TFLOP/s of forward and backward (through autograd, as a model would call them), bf16, [batch, seq,
heads, head_dim] with batch * seq = 16k tokens and heads * head_dim = 2048, for head_dim 64/128,
seq 2k..16k, causal and full. FLOPs follow the FlashAttention convention: forward 4 b h s^2 d (half
of it when causal), backward 2.5x the forward. Writes bench_cuda.md and bench_cuda.json to --out.

    python benchmarks/bench_cuda.py --out /tmp/bench [--seqs 2048 8192] [--dims 128] [--budget 240]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import ring_ext  # noqa: F401  (registers torch.ops.ring_ext)

TOKENS, MODEL_DIM = 16384, 2048
SDPA_BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
}


def time_ms(fn, min_time_s: float = 0.2, max_iters: int = 50) -> float:
    """Mean time of fn() in ms over enough iterations to fill min_time_s (after warmup)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    iters = int(min(max_iters, max(3, min_time_s * 1e3 / once)))
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def make_inputs(seq: int, head_dim: int):
    batch, heads = max(1, TOKENS // seq), MODEL_DIM // head_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(
            batch, seq, heads, head_dim, generator=g, device="cuda", dtype=torch.bfloat16
        ).requires_grad_()
        for _ in range(3)
    )
    return q, k, v


def attention_fn(name: str, causal: bool, scale: float):
    """fn(q, k, v) -> out, all [batch, seq, heads, head_dim]."""
    if name == "ring_ext":
        return lambda q, k, v: torch.ops.ring_ext.fwd(q, k, v, scale, causal)[0]

    def sdpa(q, k, v):
        with sdpa_kernel([SDPA_BACKENDS[name]]):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale
            )
        return out.transpose(1, 2)

    return sdpa


def bench_one(name: str, seq: int, head_dim: int, causal: bool) -> dict:
    q, k, v = make_inputs(seq, head_dim)
    batch, heads = q.shape[0], q.shape[2]
    fn = attention_fn(name, causal, 1.0 / math.sqrt(head_dim))
    flops = 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    row = {"impl": name, "seq": seq, "head_dim": head_dim, "causal": causal}
    try:
        with torch.no_grad():
            fwd_ms = time_ms(lambda: fn(q, k, v))
        out = fn(q, k, v)
        dout = torch.randn_like(out)
        bwd_ms = time_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
        row.update(
            fwd_ms=fwd_ms,
            bwd_ms=bwd_ms,
            fwd_tflops=flops / fwd_ms / 1e9,
            bwd_tflops=2.5 * flops / bwd_ms / 1e9,
        )
    except Exception as e:  # an SDPA backend that does not take this shape
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return row


def markdown(rows: list, impls: list) -> str:
    head = "| head_dim | seq | mask | " + " | ".join(f"{i} fwd | {i} bwd" for i in impls) + " |"
    lines = [
        f"TFLOP/s, bf16, batch*seq = {TOKENS}, heads*head_dim = {MODEL_DIM}, {torch.cuda.get_device_name()}",
        "",
        head,
        "|" + "---|" * (3 + 2 * len(impls)),
    ]
    keys = sorted({(r["head_dim"], r["seq"], r["causal"]) for r in rows})
    for d, s, c in keys:
        cells = []
        for impl in impls:
            r = next(
                (r for r in rows if (r["impl"], r["head_dim"], r["seq"], r["causal"]) == (impl, d, s, c)),
                None,
            )
            if r is None or "error" in r:
                cells += ["n/a", "n/a"]
            else:
                cells += [f"{r['fwd_tflops']:.0f}", f"{r['bwd_tflops']:.0f}"]
        lines.append(f"| {d} | {s} | {'causal' if c else 'full'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for bench_cuda.md and bench_cuda.json")
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--impls", nargs="+", default=["ring_ext", *SDPA_BACKENDS])
    parser.add_argument("--budget", type=float, default=240.0, help="seconds; later shapes are skipped")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    start, rows = time.monotonic(), []
    # Most important first: d=128, s=8k, causal is the target shape.
    shapes = [(d, s, c) for d in sorted(args.dims, reverse=True) for s in args.seqs for c in (True, False)]
    shapes.sort(key=lambda x: (x != (128, 8192, True), x))
    for d, s, c in shapes:
        if time.monotonic() - start > args.budget:
            print(f"budget of {args.budget:.0f} s spent: skipping d={d} s={s} causal={c} and later shapes")
            break
        for impl in args.impls:
            row = bench_one(impl, s, d, c)
            rows.append(row)
            torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
    table = markdown(rows, args.impls)
    print(table)
    with open(os.path.join(args.out, "bench_cuda.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "bench_cuda.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
