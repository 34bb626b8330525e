"""examples/llama_cp.py: a tiny Llama trained with context parallelism tracks the same model trained
without it, for every algorithm (a short run of the example)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import llama_cp  # noqa: E402

# fp32 throughout: the CP run differs from cp=1 only by summation order, so after a few Adam steps the
# losses agree to ~1e-6; 1e-4 relative leaves room for that drift and nothing else.
REL_TOL = 1e-4
STEPS, SEQ = 4, 32


@pytest.fixture(scope="module")
def reference():
    return llama_cp.train(STEPS, SEQ)


@pytest.mark.parametrize(
    "cp,algo", [(2, "ring"), (4, "ulysses"), (4, "ring"), (4, "double_ring"), (4, "hybrid")]
)
def test_cp_loss_tracks_cp1(reference, cp, algo):
    losses = llama_cp.train_cp(cp, algo, STEPS, SEQ)
    assert len(losses) == STEPS
    for step, (a, b) in enumerate(zip(reference, losses)):
        assert abs(a - b) <= REL_TOL * abs(a), f"step {step}: cp=1 loss {a}, {algo} cp={cp} loss {b}"
    assert losses[-1] < losses[0], "the model should learn something in a few steps"
