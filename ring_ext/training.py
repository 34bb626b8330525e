"""Training-loop helpers for packed rows under context parallelism; they need no transformers.

    parts = ring_ext.training.shard_packed_batch(row, ctx)     # labels shifted inside documents, sharded
    logits = model(parts["input_ids"], parts["position_ids"], ...)   # cu_seqlens=parts["cu_seqlens"]
    loss = ring_ext.training.packed_loss(logits, parts["labels"], ctx, data_parallel=mesh["dp"])
    loss.backward()
    ring_ext.reduce_gradients(model.parameters(), ctx)                # gradients summed over CP
    log(ring_ext.training.reported_loss(loss, ctx, data_parallel=mesh["dp"]))

shard_packed_batch shards input_ids, position_ids and labels of one packed row (shifting the labels inside
each document first); packed_loss gives each rank its share of the mean over the whole row (over the
global batch with data_parallel=mesh["dp"]: FSDP2 / DDP replicas), reported_loss the value to log. They
are also ring_ext.hf's names (ring_ext/hf.py); examples/llama_fsdp_cp.py uses them for its own model.
"""

from __future__ import annotations

import torch

from . import masks
from .collectives import all_reduce, all_reduce_over
from .groups import process_group
from .sharding import shard


def cu_seqlens_from_positions(positions: torch.Tensor | None, seq: int) -> tuple[int, ...] | None:
    """The packing (cu_seqlens) that position_ids [b, seq] of whole, unsharded rows describe: None for
    one plain sequence per row (any start), else that of one packed row (batch 1, positions 0, 1, ..
    restarting at 0 for every document, as DataCollatorWithFlattening gives). None while torch.compile
    traces (the values are data)."""
    if positions is None or torch.compiler.is_compiling():
        return None
    steps = torch.diff(positions, dim=-1)
    if (steps == 1).all():
        return None
    restarts = positions[..., 1:] == 0
    if positions.shape[0] != 1 or positions[0, 0] != 0 or ((steps != 1) & ~restarts).any():
        raise ValueError(
            "position_ids jump inside a row: ring_ext attention takes one plain sequence per row, or one "
            "packed row (batch 1) whose positions restart at 0 for every document; with transformers, "
            "use another attn_implementation (e.g. 'eager') for this model"
        )
    starts = (torch.nonzero(restarts[0]).flatten() + 1).tolist()
    return (0, *starts, seq)


def shard_packed_batch(batch: dict, ctx, cu_seqlens=None, ignore_index: int = -100) -> dict:
    """This rank's part of one packed row (batch 1): input_ids, position_ids and labels [1, S], as
    DataCollatorWithFlattening gives them (positions restarting at 0 per document; cu_seqlens derived
    from them when not given). Labels are shifted *before* sharding, inside each document (the last
    token of a document predicts nothing: ignore_index), so no label crosses a shard or a document.
    Returns input_ids, position_ids, labels (already shifted: use packed_loss, not the model's own loss)
    and cu_seqlens (pass it to the model with cp_context). ctx=None: the whole row, labels shifted."""
    ids, positions = batch["input_ids"], batch["position_ids"]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"a packed batch is one row: input_ids must be [1, S], got {tuple(ids.shape)}")
    total = ids.shape[1]
    cu = masks.check_cu_seqlens(cu_seqlens, total) if cu_seqlens is not None else None
    if cu is None:
        cu = cu_seqlens_from_positions(positions, total) or (0, total)
    labels = batch.get("labels", ids)
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    last = torch.tensor(cu[1:], device=labels.device) - 1  # each document's last token
    shifted[:, last[last >= 0]] = ignore_index
    out = {
        name: t if ctx is None else shard(t, ctx, seq_dim=1, cu_seqlens=cu)
        for name, t in (("input_ids", ids), ("position_ids", positions), ("labels", shifted))
    }
    out["cu_seqlens"] = torch.tensor(cu)
    return out


def packed_loss(
    logits: torch.Tensor, labels: torch.Tensor, ctx, ignore_index: int = -100, data_parallel=None
) -> torch.Tensor:
    """This rank's share of the mean cross-entropy over every non-ignored token of the whole row:
    sum over local tokens / the global count (one all-reduce of the count). Summed over the ranks (the
    gradients by ring_ext.reduce_gradients) it equals the loss without CP for any token split; a mean of
    per-rank means would not. labels as shard_packed_batch gives them (already shifted); any model, any
    batch (the mean is over every token of every row).

    data_parallel (a process group or 1-D DeviceMesh of the data-parallel replicas, e.g. mesh["dp"];
    each replica its own rows): the count is taken over every replica too, and the loss multiplied by
    the replica count, which undoes the mean that FSDP2 and DDP take over it. Their averaged gradients,
    summed over CP by ring_ext.reduce_gradients, are then the gradients of the mean over every token of
    the global batch, however unevenly the tokens (or ignored labels) fall on replicas and ranks."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    summed = torch.nn.functional.cross_entropy(
        flat, labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    count = (labels != ignore_index).sum().to(torch.float32).reshape(1)
    if ctx is not None:
        count = all_reduce(count, ctx)
    if data_parallel is not None:
        count = all_reduce_over(count, data_parallel)
    return summed * _replicas(data_parallel) / count.clamp_min(1.0)


def reported_loss(loss: torch.Tensor, ctx, data_parallel=None) -> float:
    """The loss of the whole global batch, the same on every rank (for logging): packed_loss summed
    over the CP group, averaged over the data-parallel replicas."""
    total = loss.detach().float().reshape(1)
    if ctx is not None:
        total = all_reduce(total, ctx)
    if data_parallel is not None:
        total = all_reduce_over(total, data_parallel) / _replicas(data_parallel)
    return total.item()


def _replicas(data_parallel) -> int:
    """How many data-parallel replicas FSDP2 / DDP average over (1 without a group)."""
    return 1 if data_parallel is None else torch.distributed.get_world_size(process_group(data_parallel))
