"""Blockwise feed-forward: the FFN applied to sequence chunks, recomputed chunk by chunk in backward.

Attention is blockwise thanks to the flash kernels; the FFN is the other activation that grows with the
sequence ([seq, hidden], hidden ~ 4x model). blockwise_ffn keeps only the input for backward and
recomputes one chunk at a time, so peak activation memory is O(chunk_size * hidden) instead of
O(seq * hidden), with results identical to ffn(x).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class _BlockwiseFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ffn, chunk_size, dim, *params):
        ctx.ffn, ctx.chunk_size, ctx.dim, ctx.num_params = ffn, chunk_size, dim, len(params)
        # Recomputation must replay the same random numbers (dropout inside ffn).
        ctx.devices = [x.device] if x.device.type == "cuda" else []
        ctx.rng = _rng_state(ctx.devices)
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return torch.cat([ffn(chunk) for chunk in x.split(chunk_size, dim)], dim)

    @staticmethod
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        wants = [p.requires_grad for p in params]
        param_grads = [torch.zeros_like(p) if w else None for p, w in zip(params, wants)]
        x_grads = []
        with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():
            _set_rng_state(ctx.rng, ctx.devices)
            for chunk, grad_chunk in zip(
                x.split(ctx.chunk_size, ctx.dim), grad_out.split(ctx.chunk_size, ctx.dim)
            ):
                chunk = chunk.detach().requires_grad_(x.requires_grad)
                y = ctx.ffn(chunk)
                inputs = ([chunk] if x.requires_grad else []) + [p for p, w in zip(params, wants) if w]
                grads = list(torch.autograd.grad(y, inputs, grad_chunk, allow_unused=True))
                if x.requires_grad:
                    x_grads.append(grads.pop(0))
                for i, w in enumerate(wants):
                    if w:
                        g = grads.pop(0)
                        if g is not None:
                            param_grads[i] += g
        dx = torch.cat(x_grads, ctx.dim) if x.requires_grad else None
        return (dx, None, None, None, *param_grads)


def _rng_state(devices):
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state, devices):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda):
        torch.cuda.set_rng_state(s, d)


def blockwise_ffn(
    x: torch.Tensor, ffn: Callable[[torch.Tensor], torch.Tensor], chunk_size: int, dim: int = 0
) -> torch.Tensor:
    """ffn(x), computed on chunks of `chunk_size` along `dim` (the sequence dim; 0 for sbh, 1 for bsh).

    `ffn` must act on each position independently (an MLP does). If it is an nn.Module its parameters
    get gradients; backward recomputes each chunk, replaying the random state for dropout.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must index x's {x.dim()} dims, got {dim}")
    params = tuple(ffn.parameters()) if isinstance(ffn, torch.nn.Module) else ()
    return _BlockwiseFFN.apply(x, ffn, chunk_size, dim % x.dim(), *params)
