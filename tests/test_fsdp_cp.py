"""examples/llama_fsdp_cp.py: FSDP2 (fully_shard over mesh["dp"]) with ring_ext over mesh["cp"] trains the
tiny Llama exactly like one process on the same global batches: the loss of every step and every parameter
after the last step, float32, dense rows and packed documents, every algorithm, on 4 Gloo ranks as
dp 2 x cp 2 and dp 1 x cp 4 (one spawn for all cases)."""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import llama_fsdp_cp  # noqa: E402

from ring_ext.testing.spawn import run_distributed  # noqa: E402

STEPS, SEQ = 4, 32
# float32 throughout: the runs differ from one process only in summation order, so losses and parameters
# agree to ~1e-6 after a few SGD steps (the example uses SGD: its step is proportional to the gradient,
# so a loss scaled by the wrong replica count or a missing CP sum moves the parameters by ~1e-2).
LOSS_REL_TOL = 1e-4
PARAM_ABS_TOL = 2e-5

CASES = [(dp, algo, packed) for dp in (2, 1) for algo in llama_fsdp_cp.ALGOS for packed in (False, True)]

_MESHES: dict = {}  # one mesh per shape per rank process: init_device_mesh creates groups


def run_case(rank: int, world_size: int, case) -> tuple[list[float], dict]:
    """The losses and the final parameters of one run (rank 0's reach pytest by value)."""
    dp, algo, packed = case
    if dp not in _MESHES:
        _MESHES[dp] = init_device_mesh("cpu", (dp, world_size // dp), mesh_dim_names=("dp", "cp"))
    return llama_fsdp_cp.train_fsdp_cp(_MESHES[dp], algo, STEPS, SEQ, packed)


@functools.cache
def reference(dp: int, packed: bool):
    return llama_fsdp_cp.reference(STEPS, dp, SEQ, packed)


@pytest.fixture(scope="module")
def results():
    return dict(zip(CASES, run_distributed(run_case, 4, CASES, timeout_s=400, collect=True)))


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"dp{c[0]}xcp{4 // c[0]}-{c[1]}-{'packed' if c[2] else 'dense'}"
)
def test_fsdp_cp_equals_one_process(results, case):
    dp, algo, packed = case
    losses, params = results[case]
    ref_losses, ref_params = reference(dp, packed)
    assert len(losses) == STEPS
    for step, (got, want) in enumerate(zip(losses, ref_losses)):
        assert abs(got - want) <= LOSS_REL_TOL * abs(want), f"step {step}: loss {got}, one process {want}"
    assert ref_losses[-1] < ref_losses[0], "the model should learn something in a few steps"
    assert params.keys() == ref_params.keys()
    for name, want in ref_params.items():
        torch.testing.assert_close(
            params[name], want, rtol=0, atol=PARAM_ABS_TOL, msg=lambda m: f"{name}: {m}"
        )
