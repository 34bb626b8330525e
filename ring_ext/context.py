"""CPContext: the process groups of one context-parallel configuration, built by initialize().

`group` is a process group or a 1-D DeviceMesh (the CP dimension of a larger mesh, `mesh["cp"]`); with
a mesh, the CP group is that dimension's group and every sub-group is built from its ranks.

Creating process groups is collective: every rank of `group` must call initialize() with the same
config, in the same order relative to its other group creations. Sub-groups are created with
use_local_synchronization, so ranks outside `group` need not take part (one CP group of a larger
data/tensor-parallel grid can initialise on its own). Nothing is kept at module level: the context
holds every group and is passed to ring_ext.attention, shard and unshard.

Rank layout (ranks of `group`, r = 0 .. cp-1):
    megatron_cp_algo  ring: all ranks, in order
                      inner ring: windows of cp_window_size consecutive ranks (w > 1)
                      outer ring: ranks with the same position in their window (w > 1)
    ulysses_cp_algo   one all-to-all group: all ranks
    hybrid_cp_algo    Note [Hybrid rank layout] below
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from . import validation
from .config import CPConfig
from .groups import process_group, subgroup


@dataclasses.dataclass(frozen=True)
class CPContext:
    config: CPConfig
    group: dist.ProcessGroup  # all cp ranks
    rank: int  # rank in group
    ring_group: dist.ProcessGroup | None = None
    inner_group: dist.ProcessGroup | None = None  # double ring only
    outer_group: dist.ProcessGroup | None = None  # double ring only
    ulysses_group: dist.ProcessGroup | None = None  # hybrid and Ulysses
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
    def ulysses_degree(self) -> int:
        """Ranks of one all-to-all: the CP size for Ulysses, --ulysses-degree-in-cp for hybrid, else 1."""
        if self.algo == "ulysses_cp_algo":
            return self.cp_size
        if self.algo == "hybrid_cp_algo":
            return self.config.ulysses_degree_in_cp
        return 1


def initialize(config: CPConfig, group: dist.ProcessGroup | DeviceMesh | None = None) -> CPContext:
    """Checks config against `group` (default: the world; a process group or a 1-D DeviceMesh such as
    mesh["cp"]) and builds its sub-groups. Collective over the ranks of `group`."""
    if not isinstance(config, CPConfig):
        raise TypeError(f"config must be a ring_ext.CPConfig, got {type(config).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "ring_ext.initialize needs torch.distributed initialised (dist.init_process_group)"
        )
    group = process_group(group)
    validation.check_group(config, group)
    rank = dist.get_rank(group)
    ctx = dict(config=config, group=group, rank=rank)
    ranks = dist.get_process_group_ranks(group)  # global ranks, in group order
    algo = config.context_parallel_algo
    if algo == "megatron_cp_algo":
        ctx.update(_ring_groups(ranks, rank, group, config.cp_window_size))
    elif algo == "ulysses_cp_algo":
        ctx.update(ulysses_group=group, ulysses_group_name=group.group_name)
    else:
        ctx.update(_hybrid_groups(ranks, rank, config, group))
    return CPContext(**ctx)


def _ring_groups(ranks: list[int], me: int, ring: dist.ProcessGroup, w: int) -> dict:
    """The ring (ranks, in order; `ring` is its group) and, for the double ring, the inner ring of
    this rank's window of w consecutive ring ranks and the outer ring across windows."""
    out = dict(ring_group=ring, ring_group_name=ring.group_name)
    n = len(ranks)
    if w == 1 or w == n:
        return out
    inner = subgroup([ranks[o * w : (o + 1) * w] for o in range(n // w)], me // w, ring)
    outer = subgroup([ranks[i::w] for i in range(w)], me % w, ring)
    out.update(
        inner_group=inner,
        outer_group=outer,
        inner_group_name=inner.group_name,
        outer_group_name=outer.group_name,
    )
    return out


def _hybrid_groups(ranks: list[int], me: int, config: CPConfig, group: dist.ProcessGroup) -> dict:
    """Note [Hybrid rank layout]: Ulysses over u consecutive ranks, the ring strided across them.

        cp = 8, u = 2 (ring size 4):   rank      0  1  2  3  4  5  6  7
                                       Ulysses   0  0  1  1  2  2  3  3   (group; rank in it = r % u)
                                       ring      0  1  0  1  0  1  0  1   (group; rank in it = r // u)

    Ulysses groups stay inside fast domains (consecutive ranks share a node); with
    --cp-window-size w the ring splits into inner rings of w consecutive ring ranks and an outer
    ring across them, exactly as the plain double ring.
    """
    u = config.ulysses_degree_in_cp
    ulysses = subgroup([ranks[g * u : (g + 1) * u] for g in range(len(ranks) // u)], me // u, group)
    ring_ranks = ranks[me % u :: u]
    ring = subgroup([ranks[j::u] for j in range(u)], me % u, group)
    out = dict(ulysses_group=ulysses, ulysses_group_name=ulysses.group_name)
    out.update(_ring_groups(ring_ranks, me // u, ring, config.cp_window_size))
    return out
