"""Every torch.ops.ring_ext operator passes torch.library.opcheck (schema, fake kernel, autograd
registration, AOT dispatch), and every operator in the namespace has samples here, so the rule
cannot decay when an op is added."""

from __future__ import annotations

import os

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
    q, k, v = _qkv(True)
    yield (q, k, v, 0.25, False), {"visible": _visible(q, k)}  # packed documents, a window
    sinks = torch.randn(q.shape[2], requires_grad=True)
    yield (q, k, v[..., :12], 0.25, True), {"softcap": 2.0, "sinks": sinks}  # MLA, softcap, sinks


def _visible(q, k):
    """Key intervals of two documents with a sliding window (ring_ext/masks.py)."""
    from ring_ext.masks import visible_keys

    return visible_keys(torch.arange(q.shape[1]), torch.arange(k.shape[1]), (0, 4, k.shape[1]), True, 3)


def _bwd_samples(group):
    q, k, v = _qkv(False)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.25, True)
    dout = torch.randn_like(out)
    yield (dout, q, k, v, out, lse, 0.25, True), {}
    yield (dout, q, k, v, out, lse, 0.25, True, 0, 0), {"dlse": torch.randn_like(lse)}
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.25, False, visible=_visible(q, k))
    yield (dout, q, k, v, out, lse, 0.25, False), {"visible": _visible(q, k)}
    v12 = v[..., :12].contiguous()
    out, lse = torch.ops.ring_ext.fwd(q, k, v12, 0.25, True, softcap=2.0, sinks=torch.randn(q.shape[2]))
    yield (torch.randn_like(out), q, k, v12, out, lse, 0.25, True), {"softcap": 2.0}


def _bwd_acc_samples(group):
    q, k, v = _qkv(False)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.25, False)
    dout = torch.randn_like(out)
    delta = (dout * out).sum(-1).transpose(1, 2).contiguous()
    acc = [torch.randn(t.shape) for t in (q, k, v)]
    yield (dout, q, k, v, lse, delta, 0.25, False, 0, 0, *acc), {}
    yield (dout, q, k, v, lse, delta, 0.25, False, 0, 0, *acc), {"visible": _visible(q, k)}
    yield (dout, q, k, v, lse, delta, 0.25, False, 0, 0, *acc), {"softcap": 3.0}


def _merge_samples(group):
    q, k, v = _qkv(False)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.25, False, 0, 0, True)
    part, part_lse = torch.ops.ring_ext.fwd(q, k, v, 0.25, True, 0, 5, True)
    yield (out, lse, part, part_lse), {}


ALGOS = ("megatron_cp_algo", "ulysses_cp_algo", "hybrid_cp_algo")
LAYOUTS = ("bshd", "sbhd", "bnsd", "sbh")


def _layout_view(x, layout):
    """x [b, s, h, d] re-laid out in memory as `layout` (sbh: one third of a fused QKV projection, as
    Megatron's proj(x).chunk(3, -1) gives), returned as the [b, s, h, d] view the op takes."""
    b, s, h, d = x.shape
    if layout == "bshd":
        return x.clone()
    if layout == "sbhd":
        return x.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    if layout == "bnsd":
        return x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    fused = torch.cat([x.permute(1, 0, 2, 3).flatten(-2)] * 3, dim=-1)  # [s, b, 3 * h * d]
    return fused.chunk(3, dim=-1)[1].unflatten(-1, (h, d)).permute(1, 0, 2, 3)


def _shards(requires_grad, layout="bshd"):
    """This rank's q, k, v shards in `layout`'s memory: the same length (even, as zigzag needs), GQA."""
    q, k, v = _qkv(False)
    return [_layout_view(t[:, :8], layout).requires_grad_(requires_grad) for t in (q, k, v)]


def _attention_args(group, algo, layout, causal, requires_grad):
    """Arguments of ring_ext::attention for a one-rank world: every group is that rank's group."""
    q, k, v = _shards(requires_grad, layout)
    ulysses = group if algo != "megatron_cp_algo" else ""
    return (q, k, v, 0.35, causal, algo, group, "", "", ulysses), {"layout": layout}


def _attention_samples(group):
    """Every algorithm x layout (the output strides are part of the contract), causal and not; and
    packed documents (per-source key intervals) for every algorithm."""
    for algo in ALGOS:
        for i, layout in enumerate(LAYOUTS):
            yield _attention_args(group, algo, layout, causal=i % 2 == 0, requires_grad=True)
        args, kwargs = _attention_args(group, algo, "bshd", causal=False, requires_grad=True)
        yield args, {**kwargs, "visible": _visible(args[0], args[1])[None]}
        if algo != "ulysses_cp_algo":  # the ring's rows to move: one rank sees rows [0, s)
            needed = torch.tensor([[[0, args[0].shape[1]]]])
            yield args, {**kwargs, "visible": _visible(args[0], args[1])[None], "needed": needed}
        # Blocks longer than the shard (Note [Shards of unequal length]) and the cross-rank check.
        rows = args[0].shape[1] + 3
        queries = rows if algo != "megatron_cp_algo" else args[0].shape[1]  # gathered, or real rows
        visible = torch.stack(
            [torch.zeros(queries, dtype=torch.int64), torch.arange(queries).clamp(max=8) + 1]
        )
        yield args, {**kwargs, "visible": visible[None], "rows": rows, "check_group": group, "signature": 7}
        # today's models: a v head dim of its own (MLA), softcap, sinks (docs/design.md)
        q, k, v = args[:3]
        mla = (q, k, v.detach()[..., :12].clone().requires_grad_(), *args[3:])
        sinks = torch.randn(q.shape[2], requires_grad=True)
        yield mla, {**kwargs, "softcap": 2.5, "sinks": sinks}


def _attention_bwd_samples(group):
    for algo in ALGOS:
        for i, layout in enumerate(LAYOUTS):
            args, kwargs = _attention_args(group, algo, layout, causal=i % 2 == 1, requires_grad=False)
            out, lse = torch.ops.ring_ext.attention(*args, **kwargs)
            q, k, v, *rest = args
            yield (_layout_view(torch.randn(out.shape), layout), q, k, v, out, lse, *rest), {}
        args, kwargs = _attention_args(group, algo, "bshd", causal=True, requires_grad=False)
        out, lse = torch.ops.ring_ext.attention(
            *args, **kwargs, softcap=2.0, sinks=torch.randn(args[0].shape[2])
        )
        q, k, v, *rest = args
        yield (torch.randn(out.shape), q, k, v, out, lse, *rest), {"softcap": 2.0}


def _masked_args(group, algo, layout, causal, requires_grad, cu, window):
    """Arguments of ring_ext::masked_attention: one process (algo "") or a one-rank world."""
    q, k, v = _shards(requires_grad, layout)
    ulysses = group if algo == "ulysses_cp_algo" or algo == "hybrid_cp_algo" else ""
    ring = group if algo and algo != "ulysses_cp_algo" else ""
    mask = (cu, window, 0.35, causal, algo, 0, 1, 1, 0)
    return (q, k, v, *mask, ring, "", "", ulysses, True, layout, group if algo else ""), {}


def _masked_attention_samples(group):
    """Packed documents (cu_seqlens as a tensor) and/or a sliding window, in one process and through
    every algorithm, every layout."""
    cu = torch.tensor([0, 3, 8])
    for algo in ("", *ALGOS):
        for i, layout in enumerate(LAYOUTS):
            yield _masked_args(group, algo, layout, i % 2 == 0, True, cu, 0)
        yield _masked_args(group, algo, "bshd", True, True, None, 3)
        yield _masked_args(group, algo, "bnsd", False, True, cu, 2)
        args, kwargs = _masked_args(group, algo, "bshd", True, True, cu, 3)
        q, k, v = args[:3]
        v = v.detach()[..., :12].clone().requires_grad_()
        sinks = torch.randn(q.shape[2], requires_grad=True)
        yield (q, k, v, *args[3:], 2.0, sinks), kwargs


def _masked_attention_bwd_samples(group):
    cu = torch.tensor([0, 5, 8])
    for algo in ("", *ALGOS):
        args, _ = _masked_args(group, algo, "bshd", True, False, cu, 3)
        out, lse = torch.ops.ring_ext.masked_attention(*args)
        q, k, v, *mask = args[:12]
        groups = args[12:17]
        yield (torch.randn(out.shape), q, k, v, out, lse, None, *mask, *groups), {}


def test_attention_output_is_dense_in_layout(world):
    """Note [Output contract]: out is contiguous in the caller's layout for every algorithm, whatever
    q's strides (sbh from a fused projection included), and the fake kernel says the same."""
    from ring_ext.layouts import from_bshd

    for algo in ALGOS:
        for layout in LAYOUTS:
            args, kwargs = _attention_args(world.group_name, algo, layout, True, False)
            out, _ = torch.ops.ring_ext.attention(*args, **kwargs)
            assert from_bshd(out, layout).is_contiguous(), (algo, layout, out.stride())
            with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
                fake_args = [mode.from_tensor(a) if torch.is_tensor(a) else a for a in args]
                fake, _ = torch.ops.ring_ext.attention(*fake_args, **kwargs)
            assert fake.stride() == out.stride(), (algo, layout, fake.stride(), out.stride())


def test_ring_reads_out_of_range_intervals_as_the_kernels_do(world):
    """A direct call's key intervals past the block's rows (no `needed`) mean what the kernels make of
    them, the interval clamped to the block: the ring gives the clamped intervals' result."""
    args, kwargs = _attention_args(world.group_name, "megatron_cp_algo", "bshd", False, False)
    rows = args[0].shape[1]
    clamped = _visible(args[0], args[1])
    wide = clamped.clone()
    wide[0, 0], wide[1, -1] = (
        -3,
        rows + (1 << 40),
    )  # the first row begins before 0, the last ends past the block
    want, _ = torch.ops.ring_ext.attention(*args, **kwargs, visible=clamped[None])
    got, _ = torch.ops.ring_ext.attention(*args, **kwargs, visible=wide[None])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _ring_schedule_samples(group):
    yield ("megatron_cp_algo", 4, 1, 2, True), {}


def _all_gather_samples(group):
    yield (torch.randn(3, 4), group), {}
    yield (torch.randn(4, 3).t(), group), {}  # non-contiguous


def _all_reduce_samples(group):
    yield ([torch.randn(3, 4), torch.randn(5)], group), {}
    yield ([torch.randn(2, dtype=torch.float64)], group, "max"), {}


# op -> (samples(group_name), opcheck's test_utils or None for all of them). The ring ops run over a
# one-rank Gloo group; ring_schedule has no tensors, so only its schema and fake kernel are checked.
SAMPLES = {
    "fwd": (_fwd_samples, None),
    "bwd": (_bwd_samples, None),
    "bwd_acc": (_bwd_acc_samples, None),
    "merge_": (_merge_samples, None),
    "attention": (_attention_samples, None),
    "attention_bwd": (_attention_bwd_samples, None),
    "masked_attention": (_masked_attention_samples, None),
    "masked_attention_bwd": (_masked_attention_bwd_samples, None),
    "all_gather": (_all_gather_samples, None),
    "all_reduce_": (_all_reduce_samples, None),
    "ring_schedule": (_ring_schedule_samples, ("test_schema", "test_faketensor")),
    "cpu_isa": (lambda group: iter([((), {})]), ("test_schema", "test_faketensor")),
    "sent_bytes": (lambda group: iter([((), {})]), ("test_schema", "test_faketensor")),
    "cuda_tilings": (lambda group: iter([((), {})]), ("test_schema", "test_faketensor")),
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


def test_compile_fullgraph_softcap_sinks_mla():
    """softcap, sinks and a v head dim of its own trace with fullgraph and match eager, output and every
    gradient (the sinks' included), dense and packed."""
    q, k, v = _qkv(True)
    v = v.detach()[..., :12].clone().requires_grad_()
    sinks = torch.randn(q.shape[2], requires_grad=True)

    def block(q, k, v, sinks, **mask):
        out = ring_ext.attention(q, k, v, causal=True, softcap=5.0, sinks=sinks, **mask)
        return (out * out).sum()

    for mask in ({}, {"cu_seqlens": torch.tensor([0, 4, 9]), "layout": "bshd"}):
        qs = [t[:1, :9] for t in (q, k, v)] if mask else [q, k, v]
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        results = []
        for fn in (block, compiled):
            loss = fn(*qs, sinks, **mask)
            results.append([loss, *torch.autograd.grad(loss, (*qs, sinks))])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b)


def test_build_info():
    info = ring_ext.build_info()
    assert info["cpu_isa"] in ("avx512", "avx512f", "avx2", "baseline")
    assert isinstance(info["emulated_avx512"], bool)
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list)
    # The candidate tilings of the CUDA kernels: none without CUDA; with it, "fwd|bwd/<bucket>/<name>"
    # for every head-dim bucket of both kernels (.ci/cuda_build_check.sh counts them).
    tilings = info["cuda_tilings"]
    assert isinstance(tilings, list)
    if not info["cuda"]:
        assert tilings == []
    else:
        buckets = {tuple(t.split("/")[:2]) for t in tilings}
        assert buckets == {(k, d) for k in ("fwd", "bwd") for d in ("64", "128", "256", "512")}, tilings
    assert info["torch_version"] == torch.__version__


def test_cuda_tilings_chosen_restores_the_environment(monkeypatch):
    """ring_ext.cuda_tilings: the names of a bucket are the build's list ([] without CUDA), and chosen()
    sets its kernel's variable for the block only, restoring what was there (set or unset)."""
    from ring_ext import cuda_tilings

    listed = ring_ext.build_info()["cuda_tilings"]
    assert cuda_tilings.names("fwd", 128) == [t.split("/")[2] for t in listed if t.startswith("fwd/128/")]
    monkeypatch.delenv(cuda_tilings.ENV["fwd"], raising=False)
    monkeypatch.setenv(cuda_tilings.ENV["bwd"], "outer")
    with cuda_tilings.chosen("fwd", "m128n64w8p"), cuda_tilings.chosen("bwd", None):
        assert os.environ[cuda_tilings.ENV["fwd"]] == "m128n64w8p"
        assert cuda_tilings.ENV["bwd"] not in os.environ
    assert cuda_tilings.ENV["fwd"] not in os.environ
    assert os.environ[cuda_tilings.ENV["bwd"]] == "outer"


@pytest.mark.parametrize(
    "mask",
    [
        {"cu_seqlens": torch.tensor([0, 3, 8, 12])},
        {"cu_seqlens": [0, 3, 8, 12]},
        {"sliding_window": 3},
        {"cu_seqlens": torch.tensor([0, 5, 12]), "sliding_window": 2},
        # shared prompts: two key intervals per answer row (masks.shared_prefix), packed and dense
        dict(zip(("cu_seqlens", "key_bounds"), ring_ext.masks.shared_prefix([(3, (2, 0)), (2, (4, 1))]))),
        {"key_bounds": ring_ext.masks.shared_prefix([(4, (3, 5))])[1]},
    ],
    ids=["cu_tensor", "cu_list", "window", "cu_and_window", "shared_prefix", "shared_prefix_dense"],
)
def test_compile_fullgraph_packed_and_windowed(mask):
    """One process: packed documents and sliding windows trace with fullgraph and match eager (output
    and gradients); with a tensor cu_seqlens, other document lengths of the same total run the same
    graph (ring_ext/masked.py)."""
    g = torch.Generator().manual_seed(3)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def block(q, k, v, mask):
        out = ring_ext.attention(q, k, v, layout="thd", causal=True, **mask)
        return (out * out).sum()

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    masks = [mask]
    if isinstance(mask.get("cu_seqlens"), torch.Tensor) and "key_bounds" not in mask:
        other = [0, 1, 9, 12] if len(mask["cu_seqlens"]) == 4 else [0, 9, 12]  # same total and shape
        masks.append({**mask, "cu_seqlens": torch.tensor(other)})
    for m in masks:
        q, k, v = (torch.randn(12, 4, 8, generator=g) for _ in range(3))
        results = []
        for fn in (block, compiled):
            inputs = [t.clone().requires_grad_() for t in (q, k, v)]
            loss = fn(*inputs, m)
            results.append([loss.detach(), *torch.autograd.grad(loss, inputs)])
        for want, got in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert len(graphs) == 1
