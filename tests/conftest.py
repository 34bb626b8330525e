"""Shared fixtures. Test modules import their helpers by plain name (tolerances, distributed,
ring_cases): pytest puts tests/ on sys.path, and spawned ranks find them the same way."""

from __future__ import annotations

import datetime

import pytest
import torch.distributed as dist

from distributed import free_port


@pytest.fixture(scope="session")
def world():
    """A one-rank Gloo world in the pytest process, for the ops that take a process group."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    yield dist.group.WORLD
    dist.destroy_process_group()
