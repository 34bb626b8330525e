"""python -m ring_ext demo: checks ring_ext against the float64 oracle and PyTorch's SDPA, prints a table.

For now a single-process demo of the block kernels; the context-parallel algorithms join it as they land.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import ring_ext
from ring_ext.reference import attention_reference


def _time(fn, repeats):
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def demo(args) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"ring_ext {ring_ext.build_info()} | threads={args.threads}")
    header = "| dtype | mask | shape (b, s, h, d) | ring_ext fwd+bwd ms | SDPA fwd+bwd ms | ratio | ring_ext err | SDPA err |"
    print(header)
    print("|---" * 8 + "|")
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (False, True):
            b, s, h, d = 1, args.seq, 8, 64
            q, k, v = (torch.randn(b, s, h, d).to(dtype).requires_grad_() for _ in range(3))
            dout = torch.randn(b, s, h, d).to(dtype)

            def ours():
                out = ring_ext.attention(q, k, v, causal=causal)
                out.backward(dout)
                return out

            def sdpa():
                out = F.scaled_dot_product_attention(
                    *(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal
                )
                out.transpose(1, 2).backward(dout)
                return out.transpose(1, 2)

            ref, _ = attention_reference(q.detach(), k.detach(), v.detach(), causal=causal)
            err_ours, err_sdpa = _rel(ours().detach(), ref), _rel(sdpa().detach(), ref)
            t_ours, t_sdpa = _time(ours, args.repeats), _time(sdpa, args.repeats)
            mask = "causal" if causal else "full"
            print(
                f"| {str(dtype).split('.')[-1]} | {mask} | ({b}, {s}, {h}, {d}) | {t_ours * 1e3:.1f} | "
                f"{t_sdpa * 1e3:.1f} | {t_ours / t_sdpa:.2f} | {err_ours:.1e} | {err_sdpa:.1e} |"
            )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ring_ext")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="check against the float64 oracle and SDPA, print a table")
    p_demo.add_argument("--seq", type=int, default=1024, help="sequence length")
    p_demo.add_argument("--threads", type=int, default=2)
    p_demo.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args)


if __name__ == "__main__":
    main()
