"""CUDA kernels (tensor-core forward/backward, SIMT fallback, LSE merge) against the float64 oracle.

Everything here needs a CUDA device and a build with the CUDA part; elsewhere the module is collected
and skipped with the reason. The oracle runs in float64 on the GPU; the rule (tests/tolerances.py): at most
twice the error of PyTorch's own attention in the same dtype on the GPU, LSE tightly.
"""

from __future__ import annotations

import math

import pytest
import torch

import ring_ext
from ring_ext.layouts import from_bshd, to_bshd
from ring_ext.reference import attention_reference, merge_reference

from distributed import free_port
from tolerances import assert_attention, assert_close_to_oracle, assert_lse, assert_rel_l2, torch_attention


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not ring_ext.build_info()["cuda"]:
        return "ring_ext was built without its CUDA kernels"
    return None


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
]

DEV = "cuda"
HALF_DTYPES = [torch.bfloat16, torch.float16]


def make_qkv(b, sq, sk, hq, hkv, d, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g, device=DEV).to(dtype)
    k = torch.randn(b, sk, hkv, d, generator=g, device=DEV).to(dtype)
    v = torch.randn(b, sk, hkv, d, generator=g, device=DEV).to(dtype)
    return q, k, v


def check_fwd_bwd(q, k, v, *, causal, q_offset=0, k_offset=0, seed=0, out_fp32=False):
    """Forward (out, lse) and backward (dq, dk, dv) of the fwd op against the float64 oracle, with
    PyTorch's attention in the same dtype as the yardstick."""
    dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1])
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = torch.ops.ring_ext.fwd(qg, kg, vg, scale, causal, q_offset, k_offset, out_fp32)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_reference(
        q64, k64, v64, causal=causal, scale=scale, q_offset=q_offset, k_offset=k_offset
    )
    assert out.dtype == (torch.float32 if out_fp32 else dtype)
    assert out.device == q.device and lse.device == q.device
    assert_lse(lse, ref_lse.detach())
    g = torch.Generator(device=DEV).manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=g, device=DEV).to(dtype)
    out.backward(dout.to(out.dtype))
    ref_out.backward(dout.double())
    assert all(t.grad.dtype == dtype for t in (qg, kg, vg))
    baseline = torch_attention(
        q, k, v, dout, causal=causal, scale=scale, q_offset=q_offset, k_offset=k_offset
    )
    got = [out.detach(), qg.grad, kg.grad, vg.grad]
    assert_attention(
        got, [ref_out.detach(), q64.grad, k64.grad, v64.grad], baseline, f"{dtype} causal={causal}"
    )


@pytest.mark.parametrize("dtype", HALF_DTYPES + [torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fwd_bwd_dtypes_masks_gqa(dtype, causal, heads, head_dim):
    q, k, v = make_qkv(2, 203, 203, heads[0], heads[1], head_dim, dtype, seed=head_dim + heads[1])
    check_fwd_bwd(q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim", [8, 32, 40, 72, 96, 136, 192, 200, 256])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_head_dims(head_dim, dtype):
    q, k, v = make_qkv(1, 150, 150, 2, 1, head_dim, dtype, seed=head_dim)
    check_fwd_bwd(q, k, v, causal=True)


@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 300), (63, 64), (64, 64), (65, 65), (129, 127), (257, 1000)])
@pytest.mark.parametrize("causal", [False, True])
def test_odd_lengths(sq, sk, causal):
    q, k, v = make_qkv(1, sq, sk, 2, 1, 64, torch.bfloat16, seed=sq * 7 + sk)
    check_fwd_bwd(q, k, v, causal=causal)


@pytest.mark.parametrize(
    "sq,sk,q_offset,k_offset",
    [
        (48, 80, 64, 0),  # queries after part of the keys: partly visible
        (200, 300, 0, 0),  # top-left causal with more keys than queries
        (64, 64, 0, 64),  # keys entirely after the queries: every row sees nothing
        (140, 140, 10, 20),  # the first 10 rows see nothing
        (33, 129, 200, 0),  # every key visible
        (256, 256, 1 << 40, (1 << 40) + 128),  # huge global offsets
    ],
)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_causal_offsets(sq, sk, q_offset, k_offset, dtype):
    q, k, v = make_qkv(2, sq, sk, 2, 1, 64, dtype, seed=sq + sk)
    check_fwd_bwd(q, k, v, causal=True, q_offset=q_offset, k_offset=k_offset)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_out_fp32_partials(dtype):
    q, k, v = make_qkv(1, 130, 170, 4, 2, 128, dtype, seed=21)
    check_fwd_bwd(q, k, v, causal=True, q_offset=40, out_fp32=True)


def test_rows_without_keys_are_zero_not_nan():
    q, k, v = make_qkv(1, 200, 200, 2, 2, 64, torch.bfloat16, seed=3)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.125, True, 0, 150)  # rows 0..149 see no key
    assert torch.isneginf(lse[:, :, :150]).all() and torch.isfinite(lse[:, :, 150:]).all()
    assert (out[:, :150] == 0).all() and torch.isfinite(out).all()
    dq, dk, dv = torch.ops.ring_ext.bwd(torch.randn_like(out), q, k, v, out, lse, 0.125, True, 0, 150)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert (dq[:, :150] == 0).all()


@pytest.mark.parametrize("layout", ["sbhd", "bnsd", "sbh"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_layouts_through_strides(layout, dtype):
    """ring_ext.attention in strided layouts equals the oracle, with gradients in the input layout."""
    b, s, hq, hkv, d = 2, 150, 4, 2, 64
    q, k, v = make_qkv(b, s, s, hq, hkv, d, dtype, seed=11)
    ql, kl, vl = (from_bshd(t, layout).contiguous().requires_grad_() for t in (q, k, v))
    out = ring_ext.attention(ql, kl, vl, layout=layout, causal=True, num_heads=hq)
    dout = torch.randn_like(out)
    out.backward(dout)
    got = [to_bshd(t, layout, d) for t in (out.detach(), ql.grad, kl.grad, vl.grad)]
    dout = to_bshd(dout, layout, d)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, causal=True)
    expected = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]
    assert_attention(got, expected, torch_attention(q, k, v, dout, causal=True), f"{layout} {dtype}")


def test_unaligned_rows_take_the_fallback():
    """Row starts that are not 16-byte aligned (odd element offset) go to the SIMT kernels."""
    base = torch.randn(1, 90, 2, 64 * 3 + 1, device=DEV).to(torch.bfloat16)
    q, k, v = base[..., 1:65], base[..., 65:129], base[..., 129:193]
    check_fwd_bwd(q, k, v, causal=True)


def test_matches_cpu_kernels():
    """The CUDA and CPU kernels on the same inputs, both held to the oracle."""
    q, k, v = make_qkv(1, 100, 120, 4, 2, 64, torch.bfloat16, seed=31)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.125, True, 20, 0, True)
    out_cpu, lse_cpu = torch.ops.ring_ext.fwd(q.cpu(), k.cpu(), v.cpu(), 0.125, True, 20, 0, True)
    ref, ref_lse = attention_reference(q, k, v, causal=True, scale=0.125, q_offset=20)
    baseline = torch_attention(q, k, v, causal=True, scale=0.125, q_offset=20)[0]
    for where, o, lse_o in (("cuda", out, lse), ("cpu", out_cpu, lse_cpu)):
        assert_close_to_oracle(o.cpu(), ref.cpu(), baseline.cpu(), f"out {where}")
        assert_lse(lse_o.cpu(), ref_lse.cpu(), f"lse {where}")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_bwd_acc_adds_into_accumulators(dtype):
    q, k, v = make_qkv(1, 150, 150, 4, 1, 128, dtype, seed=12)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.09, True)
    dout = torch.randn_like(out)
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    acc = [torch.full(t.shape, 1.5, device=DEV) for t in (q, k, v)]
    torch.ops.ring_ext.bwd_acc(dout, q, k, v, lse, delta, 0.09, True, 0, 0, *acc)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, causal=True, scale=0.09)
    expected = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    baseline = torch_attention(q, k, v, dout, causal=True, scale=0.09)[1:]
    for name, a, e, b in zip(("dq", "dk", "dv"), acc, expected, baseline):
        assert_close_to_oracle(a - 1.5, e, b, f"bwd_acc {name}", grad=True)


@pytest.mark.parametrize("dtype", HALF_DTYPES + [torch.float32])
def test_merge_matches_reference(dtype):
    b, s, h, d = 2, 333, 3, 72
    g = torch.Generator(device=DEV).manual_seed(5)
    o1 = torch.randn(b, s, h, d, generator=g, device=DEV)
    o2 = torch.randn(b, s, h, d, generator=g, device=DEV).to(dtype)
    l1, l2 = torch.randn(b, h, s, generator=g, device=DEV), torch.randn(b, h, s, generator=g, device=DEV)
    l1[:, :, :5] = -math.inf  # first side saw no key
    l2[:, :, 3:8] = -math.inf  # second side saw no key; rows 3, 4: neither
    o1[:, :5] = 0
    o2[:, 3:8] = 0
    ref_o, ref_l = merge_reference(o1.double(), l1.double(), o2.double(), l2.double())
    out, lse = o1.clone(), l1.clone()
    torch.ops.ring_ext.merge_(out, lse, o2, l2)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.isneginf(lse[:, :, 3:5]).all() and (out[:, 3:5] == 0).all()
    assert_rel_l2(out, ref_o, torch.float32, "merged out")
    assert_lse(lse, ref_l, "merged lse")


def test_merge_of_two_halves_is_full_attention():
    """Attention over keys [0, s) equals the merge of attention over two disjoint key blocks."""
    q, k, v = make_qkv(1, 300, 500, 4, 2, 128, torch.bfloat16, seed=9)
    full, full_lse = torch.ops.ring_ext.fwd(q, k, v, 0.1, True, 300, 0, True)
    out, lse = torch.ops.ring_ext.fwd(q, k[:, :250], v[:, :250], 0.1, True, 300, 0, True)
    part, part_lse = torch.ops.ring_ext.fwd(q, k[:, 250:], v[:, 250:], 0.1, True, 300, 250, True)
    torch.ops.ring_ext.merge_(out, lse, part, part_lse)
    ref, ref_lse = attention_reference(q, k, v, causal=True, scale=0.1, q_offset=300)
    baseline = torch_attention(q, k, v, causal=True, scale=0.1, q_offset=300)[0]
    for what, o, lse_o in (("merged halves", out, lse), ("full", full, full_lse)):
        assert_close_to_oracle(o, ref, baseline, what)
        assert_lse(lse_o, ref_lse, f"{what} lse")


def test_runs_on_the_current_stream():
    """Kernels are queued on the caller's current stream: results are ready after syncing it."""
    q, k, v = make_qkv(2, 1024, 1024, 8, 2, 128, torch.bfloat16, seed=17)
    expected, _ = torch.ops.ring_ext.fwd(q, k, v, 0.088, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out, _ = torch.ops.ring_ext.fwd(q, k, v, 0.088, True)
    stream.synchronize()
    assert torch.equal(out, expected)


def test_sdpa_agreement_large():
    """A long causal row block, forward and backward: the float64 oracle on the GPU, PyTorch's SDPA in
    bf16 (its flash kernel) as the yardstick."""
    q, k, v = make_qkv(1, 2048, 2048, 4, 4, 128, torch.bfloat16, seed=41)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = ring_ext.attention(qg, kg, vg, causal=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, causal=True)
    expected = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]
    got = [out.detach(), qg.grad, kg.grad, vg.grad]
    assert_attention(got, expected, torch_attention(q, k, v, dout, causal=True), "s=2048 vs SDPA bf16")


@pytest.fixture(scope="module")
def nccl_group():
    """A one-rank NCCL group (inside the Gloo world of conftest.py if one exists)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.new_group([0], backend="nccl")
        return
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "algo,extra",
    [("ulysses_cp_algo", {}), ("megatron_cp_algo", {}), ("hybrid_cp_algo", {"ulysses_degree_in_cp": 1})],
)
def test_cp_attention_cp1_on_a_side_stream(nccl_group, algo, extra):
    """Every algorithm through the CUDA ring driver on one rank equals the oracle, forward and backward,
    and its outputs are ready on the caller's (non-default) stream."""
    cfg = ring_ext.CPConfig(context_parallel_size=1, context_parallel_algo=algo, **extra)
    ctx = ring_ext.initialize(cfg, group=nccl_group)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 256, 256, 4, 2, 128, torch.bfloat16, seed=51))
    dout = torch.randn_like(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = ring_ext.attention(q, k, v, ctx, layout="bshd")
        out.backward(dout)
        result = [out.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone()]
    side.synchronize()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, causal=True)
    expected = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]
    assert_attention(result, expected, torch_attention(q, k, v, dout, causal=True), algo)
