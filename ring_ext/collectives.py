"""The collectives of the Python API over a context's CP group: unshard's all-gather, the cross-rank
check, and the training-loop helpers (all_reduce, reduce_gradients).

They run as the C++ ops ring_ext::all_gather and ring_ext::all_reduce_, which give c10d only tensors
Python never sees (Note [Tensors handed to c10d] in csrc/cp/comm.h). A `dist.all_gather` or
`dist.all_reduce` on Python tensors instead can abort a rank at exit: the backend's thread may drop
the last reference to such a tensor while the interpreter is finalising (docs/reliability.md,
Teardown). Use these for the CP group's reductions in a training loop.

    loss = ring_ext.all_reduce(loss.detach(), ctx)     # the full-sequence loss, for logging
    ring_ext.reduce_gradients(model.parameters(), ctx)   # after backward: gradients summed over CP
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor

from .groups import process_group


def all_gather(x: torch.Tensor, ctx) -> list[torch.Tensor]:
    """Every CP rank's x (same shape and dtype on every rank), in group-rank order."""
    return list(torch.ops.ring_ext.all_gather(x, ctx.group.group_name))


def all_reduce(x: torch.Tensor, ctx, op: str = "sum") -> torch.Tensor:
    """x reduced over the CP group ("sum" or "max"), as a new tensor; x is left as it was."""
    return all_reduce_over(x, ctx.group, op)


def all_reduce_over(x: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """x reduced over `group` (a process group or a 1-D DeviceMesh, e.g. mesh["dp"]), as a new
    tensor, through ring_ext's own collective (the Teardown note above)."""
    out = x.detach().clone()
    torch.ops.ring_ext.all_reduce_([out], process_group(group).group_name, op)
    return out


def reduce_gradients(parameters: Iterable[torch.Tensor], ctx) -> None:
    """Sums the .grad of every parameter over the CP group, in place: each CP rank's loss is its
    share of the full-sequence loss, so the sum is the full sequence's gradient. One collective per
    (dtype, device); parameters without a gradient are skipped (every rank must agree on which).
    A DTensor gradient (FSDP2's fully_shard over a data-parallel mesh dimension) has its local shard
    summed: the CP ranks of one data-parallel coordinate hold the same shards."""
    grads: dict[tuple, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            grads.setdefault((grad.dtype, grad.device), []).append(grad)
    for group in grads.values():
        torch.ops.ring_ext.all_reduce_(group, ctx.group.group_name, "sum")
