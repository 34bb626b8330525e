"""Shared fixtures. Test modules import the test-only helpers of tests/ by plain name (ring_cases,
packed_cases, devices): pytest puts tests/ on sys.path, and spawned ranks find them the same way. What
tests share with benchmarks, examples and the CLI (the oracle, the tolerance rule, the spawn helper)
is ring_ext.testing."""

from __future__ import annotations

import datetime

import pytest
import torch.distributed as dist

from ring_ext.testing.spawn import free_port


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
