"""The CUDA kernels' candidate tilings (docs/cuda.md, "Candidate tilings"): which ones this build has,
and running a block of code with one of them. A benchmarking and tuning switch, not a model-facing API:
the choice is process-wide (an environment variable the launchers read at every launch)."""

from __future__ import annotations

import contextlib
import os

import torch

# The variable each kernel's launcher reads (csrc/cuda/tilings.h, chosen_tiling).
ENV = {"fwd": "RING_EXT_CUDA_FWD_TILING", "bwd": "RING_EXT_CUDA_BWD_TILING"}


def names(kernel: str, bucket: int) -> list[str]:
    """The tilings of `kernel` ("fwd" or "bwd") compiled for head-dim bucket `bucket` (64, 128, 256 or
    512: the larger of the q/k and v head dims up to 64, 128, 256, 512), the default first; [] in a build without CUDA."""
    prefix = f"{kernel}/{bucket}/"
    return [t[len(prefix) :] for t in torch.ops.ring_ext.cuda_tilings() if t.startswith(prefix)]


@contextlib.contextmanager
def chosen(kernel: str, name: str | None):
    """Runs the block with `kernel`'s launcher using tiling `name` (None: the default), restoring the
    variable after."""
    old = os.environ.pop(ENV[kernel], None)
    if name is not None:
        os.environ[ENV[kernel]] = name
    try:
        yield
    finally:
        os.environ.pop(ENV[kernel], None)
        if old is not None:
            os.environ[ENV[kernel]] = old
