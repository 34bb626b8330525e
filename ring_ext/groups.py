"""Process-group helpers: what a `group` argument names, and sub-groups that keep their parent's timeout.

Every ring_ext function that takes a group (ring_ext.initialize, the collectives, the training helpers'
data_parallel) accepts None (the world), a torch.distributed ProcessGroup or a 1-D DeviceMesh (one
dimension of a larger mesh, e.g. mesh["cp"] or mesh["dp"]) and resolves it here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


def process_group(group: dist.ProcessGroup | DeviceMesh | None) -> dist.ProcessGroup:
    """The process group that `group` names: the world for None, a 1-D mesh's group, or group itself.
    ValueError for a mesh of more than one dimension, TypeError for anything else."""
    if group is None:
        return dist.group.WORLD
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            names = group.mesh_dim_names or ()
            dims = f"dimensions {names}" if names else f"shape {tuple(group.shape)}"
            cp = next((n for n in names if "cp" in n.lower()), "cp")
            raise ValueError(
                f"ring_ext takes a 1-D DeviceMesh, one dimension of your mesh (for context parallelism "
                f'group=mesh["{cp}"]), or a process group; got a {group.ndim}-D DeviceMesh with {dims}'
            )
        return group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            'group must be a torch.distributed ProcessGroup or a 1-D DeviceMesh (mesh["cp"]), '
            f"got {type(group).__name__}"
        )
    return group


def subgroup(all_ranks: list[list[int]], mine: int, parent: dist.ProcessGroup) -> dist.ProcessGroup:
    """Creates the group all_ranks[mine] (this rank's; local synchronisation: the other groups' ranks
    need not take part) and returns it, with the parent group's timeout (new_group's default is
    torch's 30 minutes, which would let a rank whose peer never calls wait that long;
    docs/reliability.md, No hangs)."""
    return dist.new_group(all_ranks[mine], use_local_synchronization=True, timeout=_timeout_of(parent))


def _timeout_of(group: dist.ProcessGroup):
    """group's timeout (a timedelta), or None (torch's default) where the backend does not say."""
    try:
        device = str(dist.get_backend_config(group)).split(",")[0].split(":")[0]
        return group._get_backend(torch.device(device)).options._timeout
    except Exception:  # a backend without options: keep torch's default
        return None
