"""Every torch.ops.ring_ext operator passes torch.library.opcheck (schema, fake kernel, autograd
registration, AOT dispatch), and every operator in the namespace has samples here, so the rule
cannot decay when an op is added."""

from __future__ import annotations

import pytest
import torch

import ring_ext  # noqa: F401  (registers the ops)


def _qkv(requires_grad, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 4, 16, generator=g, dtype=dtype)
    k = torch.randn(2, 11, 2, 16, generator=g, dtype=dtype)
    v = torch.randn(2, 11, 2, 16, generator=g, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _fwd_samples(group):
    for grad in (False, True):
        q, k, v = _qkv(grad)
        yield (q, k, v, 0.25, True, 2, 0), {}
        yield (q, k, v, 0.25, False), {"out_fp32": True}
    q, k, v = _qkv(True, torch.bfloat16)
    yield (q.transpose(0, 1).contiguous().transpose(0, 1), k, v, 0.3, True), {}  # strided q


def _bwd_samples(group):
    q, k, v = _qkv(False)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.25, True)
    dout = torch.randn_like(out)
    yield (dout, q, k, v, out, lse, 0.25, True), {}
    yield (dout, q, k, v, out, lse, 0.25, True, 0, 0), {"dlse": torch.randn_like(lse)}


def _bwd_acc_samples(group):
    q, k, v = _qkv(False)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.25, False)
    dout = torch.randn_like(out)
    delta = (dout * out).sum(-1).transpose(1, 2).contiguous()
    acc = [torch.randn(t.shape) for t in (q, k, v)]
    yield (dout, q, k, v, lse, delta, 0.25, False, 0, 0, *acc), {}


def _merge_samples(group):
    q, k, v = _qkv(False)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.25, False, 0, 0, True)
    part, part_lse = torch.ops.ring_ext.fwd(q, k, v, 0.25, True, 0, 5, True)
    yield (out, lse, part, part_lse), {}


def _shards(requires_grad):
    """This rank's q, k, v shards: the same length (even, as zigzag needs), GQA."""
    q, k, v = _qkv(requires_grad)
    return [t[:, :8].detach().requires_grad_(requires_grad) for t in (q, k, v)]


def _attention_samples(group):
    for causal in (True, False):
        q, k, v = _shards(True)
        yield (q, k, v, 0.35, causal, "megatron_cp_algo", group), {}


def _attention_bwd_samples(group):
    for causal in (True, False):
        q, k, v = _shards(False)
        args = (q, k, v, 0.35, causal, "megatron_cp_algo", group)
        out, lse = torch.ops.ring_ext.attention(*args)
        yield (torch.randn_like(out), *args[:3], out, lse, *args[3:]), {}


def _ring_schedule_samples(group):
    yield ("megatron_cp_algo", 4, 1, 2, True), {}


# op -> (samples(group_name), opcheck's test_utils or None for all of them). The ring ops run over a
# one-rank Gloo group; ring_schedule has no tensors, so only its schema and fake kernel are checked.
SAMPLES = {
    "fwd": (_fwd_samples, None),
    "bwd": (_bwd_samples, None),
    "bwd_acc": (_bwd_acc_samples, None),
    "merge_": (_merge_samples, None),
    "attention": (_attention_samples, None),
    "attention_bwd": (_attention_bwd_samples, None),
    "ring_schedule": (_ring_schedule_samples, ("test_schema", "test_faketensor")),
}


def ring_ext_ops():
    return sorted(
        name.split("::")[1].split(".")[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("ring_ext::")
    )


def test_every_op_has_opcheck_samples():
    ops = ring_ext_ops()
    assert "fwd" in ops
    missing = [op for op in ops if op not in SAMPLES]
    assert not missing, f"ops without opcheck samples in tests/test_ops.py: {missing}"


@pytest.mark.parametrize("op", sorted(SAMPLES))
def test_opcheck(op, world):
    samples, test_utils = SAMPLES[op]
    extra = {} if test_utils is None else {"test_utils": test_utils}
    for args, kwargs in samples(world.group_name):
        torch.library.opcheck(getattr(torch.ops.ring_ext, op).default, args, kwargs, **extra)


def test_compile_fullgraph_matches_eager():
    q, k, v = _qkv(True)

    def block(q, k, v):
        out = ring_ext.attention(q, k, v, layout="bshd", causal=True)
        return (out * out).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss_eager = block(q, k, v)
    grads_eager = torch.autograd.grad(loss_eager, (q, k, v))
    loss_compiled = compiled(q, k, v)
    grads_compiled = torch.autograd.grad(loss_compiled, (q, k, v))
    torch.testing.assert_close(loss_compiled, loss_eager)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b)


def test_build_info():
    info = ring_ext.build_info()
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list)
    assert info["torch_version"] == torch.__version__
