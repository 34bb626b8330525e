"""blockwise_ffn equals the plain FFN (output and every gradient) and keeps only its input for backward."""

from __future__ import annotations

import pytest
import torch

from ring_ext.ffn import blockwise_ffn
from ring_ext.testing.tolerances import assert_rel_l2


def make_mlp(d_model, hidden, dropout=0.0):
    return torch.nn.Sequential(
        torch.nn.Linear(d_model, hidden),
        torch.nn.GELU(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(hidden, d_model),
    )


@pytest.mark.parametrize("chunk_size", [1, 7, 32, 100])
@pytest.mark.parametrize("dim", [0, 1])
def test_exact_output_and_gradients(chunk_size, dim):
    torch.manual_seed(chunk_size + dim)
    mlp = make_mlp(16, 64).double()
    x = (
        torch.randn(50, 3, 16, dtype=torch.float64)
        if dim == 0
        else torch.randn(3, 50, 16, dtype=torch.float64)
    )
    x.requires_grad_()
    ref = mlp(x)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x, *mlp.parameters()], grad)
    out = blockwise_ffn(x, mlp, chunk_size, dim=dim)
    grads = torch.autograd.grad(out, [x, *mlp.parameters()], grad)
    assert_rel_l2(out, ref, torch.float64, "out")
    for g, r in zip(grads, ref_grads):
        assert_rel_l2(g, r, torch.float64, "grad")


def test_dropout_is_replayed_in_backward():
    """Backward recomputes each chunk with the random state of the forward: the gradients are those of
    the very dropout masks the forward used (a chunk-by-chunk run from the same seed)."""
    torch.manual_seed(0)
    mlp = make_mlp(8, 32, dropout=0.5).double()
    x = torch.randn(40, 2, 8, dtype=torch.float64, requires_grad=True)
    state = torch.get_rng_state()
    manual = torch.cat([mlp(c) for c in x.split(8, 0)], 0)
    manual_grads = torch.autograd.grad(manual.square().sum(), [x, *mlp.parameters()])
    torch.set_rng_state(state)
    out = blockwise_ffn(x, mlp, 8)
    grads = torch.autograd.grad(out.square().sum(), [x, *mlp.parameters()])
    assert torch.equal(out, manual)
    for g, r in zip(grads, manual_grads):
        assert_rel_l2(g, r, torch.float64, "grad with dropout")


def test_forward_saves_only_the_input():
    mlp = make_mlp(16, 256)
    x = torch.randn(512, 1, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = blockwise_ffn(x, mlp, 64)
    out.sum().backward()
    # x plus the parameters; the [512, 256] hidden activation is never kept.
    params = sum(p.numel() * p.element_size() for p in mlp.parameters())
    assert sum(saved) <= x.numel() * 4 + params
    assert x.grad is not None and all(p.grad is not None for p in mlp.parameters())


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        blockwise_ffn(torch.randn(4, 2), torch.nn.Identity(), 0)
