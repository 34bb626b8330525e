"""CPContext: the process groups of one context-parallel configuration, built by initialize().

Creating process groups is collective: every rank of `group` must call initialize() with the same
config, in the same order relative to its other group creations. Sub-groups are created with
use_local_synchronization, so ranks outside `group` need not take part (one CP group of a larger
data/tensor-parallel grid can initialise on its own). Nothing is kept at module level: the context
holds every group and is passed to ring_ext.attention, shard and unshard.

Rank layout (ranks of `group`, r = 0 .. cp-1):
    ring        all ranks, in order
    inner ring  windows of cp_window_size consecutive ranks: {0..w-1}, {w..2w-1}, ...   (w > 1)
    outer ring  ranks with the same position in their window: {i, i+w, i+2w, ...}       (w > 1)
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist

from .config import CPConfig


@dataclasses.dataclass(frozen=True)
class CPContext:
    config: CPConfig
    group: dist.ProcessGroup  # all cp ranks
    rank: int  # rank in group
    ring_group: dist.ProcessGroup | None = None
    inner_group: dist.ProcessGroup | None = None  # double ring only
    outer_group: dist.ProcessGroup | None = None  # double ring only
    ulysses_group: dist.ProcessGroup | None = None  # hybrid / Ulysses (issue 4)
    # Group names as the C++ op resolves them (c10d::resolve_process_group); "" when absent.
    ring_group_name: str = ""
    inner_group_name: str = ""
    outer_group_name: str = ""
    ulysses_group_name: str = ""

    @property
    def cp_size(self) -> int:
        return self.config.context_parallel_size

    @property
    def algo(self) -> str:
        return self.config.context_parallel_algo

    @property
    def causal(self) -> bool:
        return self.config.causal

    @property
    def sharding(self) -> str:
        """How shard() splits the sequence: zigzag for the causal ring, else contiguous."""
        return "zigzag" if self.causal and self.algo == "megatron_cp_algo" else "contiguous"


def initialize(config: CPConfig, group: dist.ProcessGroup | None = None) -> CPContext:
    """Checks config against `group` (default: the world) and builds its sub-groups. Collective."""
    if not isinstance(config, CPConfig):
        raise TypeError(f"config must be a ring_ext.CPConfig, got {type(config).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "ring_ext.initialize needs torch.distributed initialised (dist.init_process_group)"
        )
    group = group if group is not None else dist.group.WORLD
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if config.context_parallel_size != size:
        raise ValueError(
            f"context_parallel_size ({config.context_parallel_size}) must equal the size "
            f"of the process group ({size})"
        )
    ctx = dict(config=config, group=group, rank=rank)
    if config.context_parallel_algo == "megatron_cp_algo":
        ctx.update(_ring_groups(config, group))
    return CPContext(**ctx)


def _ring_groups(config: CPConfig, group: dist.ProcessGroup) -> dict:
    """The ring (the group itself) and, for the double ring, its inner and outer rings."""
    out = dict(ring_group=group, ring_group_name=group.group_name)
    cp, w = config.context_parallel_size, config.cp_window_size
    if w == 1 or w == cp:
        return out
    ranks = dist.get_process_group_ranks(group)  # global ranks, in group order
    me = dist.get_rank(group)
    inner = _my_group([ranks[o * w : (o + 1) * w] for o in range(cp // w)], me // w)
    outer = _my_group([ranks[i::w] for i in range(w)], me % w)
    out.update(
        inner_group=inner,
        outer_group=outer,
        inner_group_name=inner.group_name,
        outer_group_name=outer.group_name,
    )
    return out


def _my_group(all_ranks: list[list[int]], mine: int) -> dist.ProcessGroup:
    """Creates the group of this rank only (local synchronisation) and returns it."""
    return dist.new_group(all_ranks[mine], use_local_synchronization=True)
