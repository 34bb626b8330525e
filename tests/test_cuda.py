"""What only the CUDA kernels have: which kernel family an input takes, a 2^30-row block, the SIMT
kernels' float32 error, agreement with the CPU kernels, streams, the candidate tilings, CP attention over
NCCL. The cases both devices share (shapes, dtypes, masks, layouts, alignment, merge) are in
tests/test_kernels.py, parametrized over the devices.

Everything here needs a CUDA device and a build with the CUDA part; elsewhere the module is collected
and skipped with the reason ("no CUDA device" on a machine without a GPU). The oracle runs in float64 on
the GPU; the rule (ring_ext/testing/tolerances.py): at most twice the error of PyTorch's own attention in
the same dtype on the GPU, LSE tightly.
"""

from __future__ import annotations

import math

import pytest
import test_packed
import torch
from devices import CUDA_MARKS, assert_family, expect_family, kernels_launched, make_qkv
from test_kernels import PACKED_CU, PACKED_PAD, check_fwd_bwd, well_conditioned_rows

import ring_ext
from ring_ext import cuda_tilings
from ring_ext.testing.reference import attention_reference, dense_mask, packed_mask
from ring_ext.testing.spawn import free_port
from ring_ext.testing.tolerances import assert_attention, assert_close_to_oracle, assert_lse, torch_attention

pytestmark = CUDA_MARKS

DEV = "cuda"


def test_last_rows_of_a_2_30_row_block():
    """The forward's last CTA at rows near 2^30 with q_offset - k_offset = 2^30: its visible-key bound,
    row + diff, passes 2^31 and must be taken in int64. Forward only (the backward of a 2^30-row block
    walks every row in one CTA per key block: minutes); needs ~36 GB of GPU memory."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40e9:
        pytest.skip(f"needs 40 GB of free GPU memory, {free / 1e9:.0f} GB free")
    sq, scale, q_offset = (1 << 30) - 64, 0.35, 1 << 30
    g = torch.Generator(device=DEV).manual_seed(7)
    q = torch.randn(1, sq, 1, 8, generator=g, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, 96, 1, 8, generator=g, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(1, 96, 1, 8, generator=g, device=DEV, dtype=torch.bfloat16)
    out = lse = None
    try:
        out, lse = torch.ops.ring_ext.fwd(q, k, v, scale, True, q_offset, 0)
        for first in (0, sq - 300):
            rows = slice(first, first + 300)
            qs = q[:, rows]
            ref, ref_lse = attention_reference(
                qs.double(), k.double(), v.double(), causal=True, scale=scale, q_offset=q_offset + first
            )
            base = torch_attention(qs, k, v, causal=True, scale=scale, q_offset=q_offset + first)[0]
            assert_close_to_oracle(out[:, rows], ref, base, f"rows {first}..{first + 299}")
            assert_lse(lse[:, :, rows], ref_lse, f"lse rows {first}..{first + 299}")
    finally:  # the frame of a failure must not hold 36 GB through the later tests
        del q, out, lse
        torch.cuda.empty_cache()


def test_aligned_half_inputs_take_the_tensor_cores():
    """The counterpart of test_kernels.py's test_misaligned_views: the same shapes, aligned, in bf16 take
    the tensor-core kernels."""
    q, k, v = make_qkv(2, 150, 150, 4, 2, 64, torch.bfloat16, seed=13, device=DEV)
    with expect_family(DEV, "tensor_core"):
        check_fwd_bwd(q, k, v, causal=True)


def test_simt_float32_error(record_property):
    """The float32 SIMT kernels (built without --use_fast_math: IEEE expf, logf, division) are as
    accurate as PyTorch's float32 attention; the measured errors land in the JUnit report
    (tools/gpu_check.sh copies them into its summary)."""
    q, k, v = make_qkv(2, 257, 300, 4, 2, 64, torch.float32, seed=32, device=DEV)
    scale, dout = 0.125, torch.randn(2, 257, 4, 64, device=DEV)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    with kernels_launched() as names:
        out, lse = torch.ops.ring_ext.fwd(qg, kg, vg, scale, True, 43, 0)
        out.backward(dout)
    assert_family(names, "simt")
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(q64, k64, v64, causal=True, scale=scale, q_offset=43)
    expected = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]
    got = [out.detach(), qg.grad, kg.grad, vg.grad]
    baseline = torch_attention(q, k, v, dout, causal=True, scale=scale, q_offset=43)
    for name, ours, exp, theirs in zip(("out", "dq", "dk", "dv"), got, expected, baseline):
        err = ((ours.double() - exp).norm() / exp.norm()).item()
        torch_err = ((theirs.double() - exp).norm() / exp.norm()).item()
        record_property(f"simt_fp32_rel_l2_{name}", f"{err:.2e} (PyTorch float32: {torch_err:.2e})")
    assert_lse(lse, ref_lse.detach())
    assert_attention(got, expected, baseline, "SIMT float32")


def test_matches_cpu_kernels():
    """The CUDA and CPU kernels on the same inputs, both held to the oracle."""
    q, k, v = make_qkv(1, 100, 120, 4, 2, 64, torch.bfloat16, seed=31, device=DEV)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.125, True, 20, 0, True)
    out_cpu, lse_cpu = torch.ops.ring_ext.fwd(q.cpu(), k.cpu(), v.cpu(), 0.125, True, 20, 0, True)
    ref, ref_lse = attention_reference(q, k, v, causal=True, scale=0.125, q_offset=20)
    baseline = torch_attention(q, k, v, causal=True, scale=0.125, q_offset=20)[0]
    for where, o, lse_o in (("cuda", out, lse), ("cpu", out_cpu, lse_cpu)):
        assert_close_to_oracle(o.cpu(), ref.cpu(), baseline.cpu(), f"out {where}")
        assert_lse(lse_o.cpu(), ref_lse.cpu(), f"lse {where}")


def test_runs_on_the_current_stream():
    """Kernels are queued on the caller's current stream: results are ready after syncing it."""
    q, k, v = make_qkv(2, 1024, 1024, 8, 2, 128, torch.bfloat16, seed=17, device=DEV)
    expected, _ = torch.ops.ring_ext.fwd(q, k, v, 0.088, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out, _ = torch.ops.ring_ext.fwd(q, k, v, 0.088, True)
    stream.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("head_dim", [64, 128, 256, 512])
@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
def test_candidate_tilings(kernel, head_dim):
    """Every candidate tiling (Note [Candidate tilings] in csrc/cuda/flash_fwd.cu), chosen through its
    environment variable, against the oracle: a causal block at an offset with GQA and lengths that fill
    no tile, and packed documents with a window (per-row key intervals), forward and backward."""
    names = cuda_tilings.names(kernel, head_dim)
    assert names, f"no {kernel} tiling for head dim {head_dim}: {ring_ext.build_info()['cuda_tilings']}"
    for i, name in enumerate(names):
        seed = 300 + 10 * i + head_dim
        with cuda_tilings.chosen(kernel, name):
            q, k, v = make_qkv(2, 203, 250, 4, 2, head_dim, torch.bfloat16, seed, DEV)
            with expect_family(DEV, "tensor_core"):
                check_fwd_bwd(q, k, v, causal=True, q_offset=47)
            rows = PACKED_CU[-1] + PACKED_PAD
            q, k, v = make_qkv(1, rows, rows, 4, 2, head_dim, torch.float16, seed, DEV)
            test_packed.check_packed(q, k, v, PACKED_CU, True, 13, seed)


def test_unknown_tiling_names_the_choices():
    q, k, v = make_qkv(1, 64, 64, 2, 2, 64, torch.bfloat16, seed=1, device=DEV)
    with (
        cuda_tilings.chosen("fwd", "m1n1w1"),
        pytest.raises(
            (RuntimeError, ValueError), match=r"RING_EXT_CUDA_FWD_TILING=m1n1w1 is not a tiling.*m128n64w8"
        ),
    ):
        torch.ops.ring_ext.fwd(q, k, v, 0.125, True)


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
    "packed", [None, "window", "shared_prefix"], ids=["dense", "packed_window", "shared_prefix"]
)
@pytest.mark.parametrize(
    "algo,extra",
    [("ulysses_cp_algo", {}), ("megatron_cp_algo", {}), ("hybrid_cp_algo", {"ulysses_degree_in_cp": 1})],
)
def test_cp_attention_cp1_on_a_side_stream(nccl_group, algo, extra, packed):
    """Every algorithm through the CUDA ring driver on one rank equals the oracle, forward and backward,
    and its outputs are ready on the caller's (non-default) stream; packed: documents and a window, or
    shared prompts (two key intervals per answer row, masks.shared_prefix)."""
    cfg = ring_ext.CPConfig(context_parallel_size=1, context_parallel_algo=algo, **extra)
    ctx = ring_ext.initialize(cfg, group=nccl_group)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 256, 256, 4, 2, 128, torch.bfloat16, 51, DEV))
    index = torch.arange(256)
    mask, kwargs = None, {}
    if packed == "window":
        cu, window = (0, 3, 100, 101, 256), 40
        kwargs = {"cu_seqlens": torch.tensor(cu), "sliding_window": window}
        mask = packed_mask(index, index, cu, True, window).to(DEV)
    elif packed == "shared_prefix":
        cu, bounds = ring_ext.masks.shared_prefix([(100, (60, 0, 40)), (20, (36,))])
        kwargs = {"cu_seqlens": torch.tensor(cu), "key_bounds": bounds}
        mask = torch.zeros(256, 256, dtype=torch.bool)
        for lo, hi in bounds.view(2, 2, 256):
            mask |= (index[None, :] >= lo[:, None]) & (index[None, :] < hi[:, None])
        mask = mask.to(DEV)
    packed = packed is not None
    dout = torch.randn_like(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = ring_ext.attention(q, k, v, ctx, layout="bshd", **kwargs)
        out.backward(dout)
        result = [out.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone()]
    side.synchronize()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, causal=not packed, mask=mask)
    expected = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]
    baseline = torch_attention(q, k, v, dout, causal=not packed, mask=mask)
    dq_rows = mask.sum(1) >= test_packed.MIN_KEYS_FOR_ROW_CHECK if packed else None
    assert_attention(result, expected, baseline, algo, dq_rows=dq_rows)


# ---- softcap, sinks, a v head dim of its own, head dims up to 512 (issue 25) ----------------------------
# The kernels' rules: Note [Softcap and sinks] in csrc/common/params.h, Note [One bucket for q/k and v] in
# csrc/cuda/head_dim.h, Notes [Head dim 512 in the forward] and [... in the backward] in flash_*.cu.

# Bytes of shared memory the D = 512 tensor-core backward needs (m32n32w4, flash_bwd.cu); a GPU with
# less (sm_86/89/120: 99 KiB) takes the SIMT backward there.
BWD_512_SMEM = 135680


def expected_family(dtype, head_dim, head_dim_v) -> str:
    """The CUDA kernel family of aligned inputs (csrc/cuda/launch.cuh, tensor_core_dims): tensor cores for
    16-bit dtypes whose two head dims are multiples of 8 up to 512, if the backward fits the device."""
    dims_ok = all(d % 8 == 0 and d <= 512 for d in (head_dim, head_dim_v))
    if dtype == torch.float32 or not dims_ok:
        return "simt"
    smem = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    return "tensor_core" if max(head_dim, head_dim_v) <= 256 or smem >= BWD_512_SMEM else "simt"


def make_qkv_v(b, sq, sk, hq, hkv, d, dv, dtype, seed):
    """q [b, sq, hq, d], k [b, sk, hkv, d], v [b, sk, hkv, dv] on the GPU, standard normal."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g, device=DEV).to(dtype)
    k = torch.randn(b, sk, hkv, d, generator=g, device=DEV).to(dtype)
    v = torch.randn(b, sk, hkv, dv, generator=g, device=DEV).to(dtype)
    return q, k, v


def eager_attention(q, k, v, dout, *, causal, scale, q_offset=0, k_offset=0, softcap=None, sinks=None):
    """PyTorch's attention in q's dtype where SDPA has no softcap or sink: the models' own eager code
    (Hugging Face's Gemma 2 and gpt-oss): scores and the softcap in the dtype, a float32 softmax over the
    keys and the sink, P rounded to the dtype, P V in the dtype. [out, dq, dk, dv] ([b, s, h, d]), and
    dsinks last when sinks is given (in q's dtype, as the models hold them). The yardstick of the rule
    (ring_ext/testing/tolerances.py) for the softcap and sink cases."""
    hq, hkv = q.shape[2], k.shape[2]
    qs, ks, vs = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))  # [b, h, s, d]
    leaves = [qs, ks, vs]
    with torch.enable_grad():
        kr, vr = (t.repeat_interleave(hq // hkv, dim=1) for t in (ks, vs))  # [b, hq, sk, d]
        s = qs @ kr.transpose(-1, -2) * scale  # [b, hq, sq, sk]
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        mask = dense_mask(q.shape[1], k.shape[1], causal, q_offset, k_offset, q.device)
        s = s.float().masked_fill(~mask, -torch.inf)
        if sinks is not None:
            sink = sinks.detach().to(q.dtype).requires_grad_()
            leaves.append(sink)
            column = sink.float()[None, :, None, None].expand(*s.shape[:3], 1)
            s = torch.cat([s, column], dim=-1)  # [b, hq, sq, sk + 1]
        p = torch.softmax(s, dim=-1)
        if sinks is not None:
            p = p[..., :-1]
        out = p.nan_to_num(0.0).to(q.dtype) @ vr  # rows with no key and no sink: 0
        grads = torch.autograd.grad(out, leaves, dout.transpose(1, 2))
    return [out.detach().transpose(1, 2), *(g.transpose(1, 2) for g in grads[:3]), *grads[3:]]


def check_variant(q, k, v, *, causal, q_offset=0, k_offset=0, softcap=None, sinks=None, seed=0):
    """fwd (out, lse) and its backward (dq, dk, dv) with softcap / sinks / v's own head dim against the
    float64 oracle, held to 2x PyTorch's error in the same dtype (SDPA, or eager_attention where SDPA
    has no softcap or sink); the kernel family that ran is the one expected_family names."""
    dtype, scale = q.dtype, 1.0 / math.sqrt(q.shape[-1])
    g = torch.Generator(device=DEV).manual_seed(seed + 1)
    dout = torch.randn(*q.shape[:3], v.shape[-1], generator=g, device=DEV).to(dtype)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with expect_family(DEV, expected_family(dtype, q.shape[-1], v.shape[-1])):
        out, lse = torch.ops.ring_ext.fwd(
            qg, kg, vg, scale, causal, q_offset, k_offset, softcap=softcap or 0.0, sinks=sinks
        )
        out.backward(dout)
    assert out.shape == dout.shape and out.dtype == dtype
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(
        q64, k64, v64, causal=causal, scale=scale, q_offset=q_offset, k_offset=k_offset,
        softcap=softcap, sinks=sinks,
    )  # fmt: skip
    assert_lse(lse, ref_lse.detach())
    expected = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]
    if softcap or sinks is not None:
        baseline = eager_attention(
            q, k, v, dout, causal=causal, scale=scale, q_offset=q_offset, k_offset=k_offset,
            softcap=softcap, sinks=sinks,
        )[:4]  # fmt: skip
    else:
        baseline = torch_attention(
            q, k, v, dout, causal=causal, scale=scale, q_offset=q_offset, k_offset=k_offset
        )
    got = [out.detach(), qg.grad, kg.grad, vg.grad]
    dq_rows = well_conditioned_rows(q.shape[1], k.shape[1], causal, q_offset, k_offset, DEV)
    what = (
        f"{dtype} d={q.shape[-1]}/{v.shape[-1]} causal={causal} softcap={softcap} sinks={sinks is not None}"
    )
    assert_attention(got, expected, baseline, what, dq_rows=dq_rows)


# Both 16-bit dtypes causal, bf16 also not, float32 (the SIMT kernels) causal: what the mask and the
# dtype can get wrong, in 4 cases rather than 6 per shape.
DTYPE_CAUSAL = [
    pytest.param(torch.bfloat16, True, id="bf16-causal"),
    pytest.param(torch.bfloat16, False, id="bf16-full"),
    pytest.param(torch.float16, True, id="fp16-causal"),
    pytest.param(torch.float32, True, id="fp32-causal"),
]

HEAD_DIMS_QK_V = [
    (64, 64),
    (192, 128),  # multi-head latent attention (DeepSeek-V3): bucket 256
    (256, 256),
    (320, 320),  # bucket 512, the v dims in two CTAs
    (512, 512),
    (512, 128),  # bucket 512, the v dims in one CTA
    (96, 264),  # v wider than q/k: bucket 512 for both
    (100, 72),  # not a multiple of 8: SIMT
    (33, 500),  # odd q/k dim, SIMT at P = 16
]


@pytest.mark.parametrize("dtype,causal", DTYPE_CAUSAL)
@pytest.mark.parametrize("dims", HEAD_DIMS_QK_V, ids=lambda d: f"d{d[0]}v{d[1]}")
def test_head_dims_up_to_512_and_v_dims(dims, dtype, causal):
    """Every head-dim bucket (64 ... 512), a v head dim of its own, odd dims; GQA, lengths that fill no
    tile, causal at an offset."""
    d, dv = dims
    q, k, v = make_qkv_v(2, 131, 157, 4, 2, d, dv, dtype, seed=d * 1000 + dv)
    check_variant(q, k, v, causal=causal, q_offset=26 if causal else 0, seed=d + dv)


@pytest.mark.parametrize("dtype,causal", DTYPE_CAUSAL)
@pytest.mark.parametrize("dims", [(64, 64), (192, 128), (512, 512)], ids=lambda d: f"d{d[0]}v{d[1]}")
def test_softcap(dims, dtype, causal):
    """Scores c * tanh(scale q.k / c) with c small enough (1.5) that most scores bend; forward and the
    backward's 1 - tanh^2."""
    d, dv = dims
    q, k, v = make_qkv_v(1, 150, 170, 4, 1, d, dv, dtype, seed=7 * d + dv)
    check_variant(q, k, v, causal=causal, q_offset=20 if causal else 0, softcap=1.5, seed=d)


@pytest.mark.parametrize("dtype,causal", DTYPE_CAUSAL)
@pytest.mark.parametrize("dims", [(64, 64), (192, 128), (512, 512)], ids=lambda d: f"d{d[0]}v{d[1]}")
def test_sinks(dims, dtype, causal):
    """A sink per q head (float32, one far above the scores, one far below); causal with the keys 30
    positions ahead, so the first 30 rows see no key and end with out = 0, lse = sink."""
    d, dv = dims
    q, k, v = make_qkv_v(2, 140, 160, 4, 2, d, dv, dtype, seed=11 * d + dv)
    g = torch.Generator(device=DEV).manual_seed(d + dv)
    sinks = torch.randn(4, generator=g, device=DEV) * 3.0
    sinks[0] = 100.0  # e^100 overflows float32: out ~ 0, lse ~ 100 only in finish_row's order
    sinks[3] = -30.0  # as if there were none
    k_offset = 30 if causal else 0
    check_variant(q, k, v, causal=causal, k_offset=k_offset, sinks=sinks, seed=d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softcap_and_sinks_together(dtype):
    q, k, v = make_qkv_v(1, 97, 203, 8, 2, 192, 128, dtype, seed=25)
    sinks = torch.randn(8, generator=torch.Generator(device=DEV).manual_seed(26), device=DEV)
    check_variant(q, k, v, causal=True, q_offset=106, softcap=2.0, sinks=sinks, seed=25)


@pytest.mark.parametrize("dims", [(192, 128), (512, 512)], ids=lambda d: f"d{d[0]}v{d[1]}")
def test_public_attention_sink_gradient(dims):
    """ring_ext.attention without a context, softcap and learned sinks: out and every gradient, the sinks'
    included (autograd's -sum_i exp(sink - lse_i) delta_i from the kernels' lse), against the oracle."""
    d, dv = dims
    q, k, v = make_qkv_v(2, 120, 120, 4, 2, d, dv, torch.bfloat16, seed=d)
    sinks = torch.randn(4, generator=torch.Generator(device=DEV).manual_seed(d), device=DEV)
    dout = torch.randn(2, 120, 4, dv, generator=torch.Generator(device=DEV).manual_seed(d + 1), device=DEV)
    dout = dout.to(torch.bfloat16)
    scale = 1.0 / math.sqrt(d)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, sinks)]
    out = ring_ext.attention(*leaves[:3], causal=True, softmax_scale=scale, softcap=3.0, sinks=leaves[3])
    out.backward(dout)
    assert leaves[3].grad is not None and leaves[3].grad.shape == (4,)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    ref, _ = attention_reference(*ref_leaves[:3], causal=True, scale=scale, softcap=3.0, sinks=ref_leaves[3])
    expected = [ref.detach(), *torch.autograd.grad(ref, ref_leaves, dout.double())]
    baseline = eager_attention(q, k, v, dout, causal=True, scale=scale, softcap=3.0, sinks=sinks)
    got = [out.detach(), *(t.grad for t in leaves)]
    dq_rows = well_conditioned_rows(120, 120, True, device=DEV)
    assert_attention(got[:4], expected[:4], baseline[:4], f"attention d={d}/{dv}", dq_rows=dq_rows)
    assert_close_to_oracle(got[4], expected[4], baseline[4], "dsinks", grad=True)
