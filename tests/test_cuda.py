"""CUDA kernels (tensor-core forward/backward, SIMT fallback, LSE merge) against the float64 oracle.

Everything here needs a CUDA device and a build with the CUDA part; elsewhere the module is collected
and skipped with the reason ("no CUDA device" on a machine without a GPU). The oracle runs in float64 on
the GPU; the rule (tests/tolerances.py): at most twice the error of PyTorch's own attention in the same
dtype on the GPU, LSE tightly. Tests that target one kernel family (tensor cores or SIMT) also check,
with the profiler, that this family is the one that ran.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import test_packed
import torch

import ring_ext
from ring_ext.layouts import from_bshd, to_bshd
from ring_ext.reference import attention_reference, merge_reference, packed_visible

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


@contextlib.contextmanager
def kernels_launched():
    """Yields a list that, after the block, holds the names of the ring_ext CUDA kernels launched in it."""
    names: list[str] = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        yield names
        torch.cuda.synchronize()
    names += sorted({e.name for e in prof.events() if "ring_ext" in e.name and "_kernel" in e.name})


KERNEL_FAMILIES = {
    "tensor_core": ("flash_fwd_kernel", "flash_bwd_kernel"),
    "simt": ("simt_fwd_kernel", "simt_bwd_kernel"),
}


def assert_family(names: list[str], family: str) -> None:
    """The forward and backward kernels of `family` ran, and none of the other family."""
    if not names:
        pytest.skip("the profiler saw no ring_ext kernel (CUPTI unavailable?): the path taken is unknown")
    other = "simt" if family == "tensor_core" else "tensor_core"
    for kernel in KERNEL_FAMILIES[family]:
        assert any(kernel in n for n in names), f"expected {kernel}, the kernels were {names}"
    for kernel in KERNEL_FAMILIES[other]:
        assert not any(kernel in n for n in names), f"{kernel} ran, expected {family} only: {names}"


def misaligned_qkv(b, s, hq, hkv, d, dtype, seed):
    """q, k, v as views at an odd element offset into wider tensors (not copied): their first rows are
    not 16-byte aligned and their head strides are odd (rows start at every alignment), so only the SIMT
    kernels may read them."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    qbase = torch.randn(b, s, hq, d + 1, generator=g, device=DEV).to(dtype)
    kvbase = torch.randn(b, s, hkv, 2 * d + 1, generator=g, device=DEV).to(dtype)
    q, k, v = qbase[..., 1:], kvbase[..., 1 : d + 1], kvbase[..., d + 1 :]
    assert all(
        t.storage_offset() % 2 == 1 and t.data_ptr() % 16 != 0 and t.stride(2) % 2 == 1 for t in (q, k, v)
    )
    return q, k, v


def check_fwd_bwd(q, k, v, *, causal, q_offset=0, k_offset=0, seed=0, out_fp32=False, family=None):
    """Forward (out, lse) and backward (dq, dk, dv) of the fwd op against the float64 oracle, with
    PyTorch's attention in the same dtype as the yardstick. q, k, v reach the op as given (views stay
    views: a misaligned input stays misaligned). family: the kernel family that must have run."""
    dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1])
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    g = torch.Generator(device=DEV).manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=g, device=DEV).to(dtype)
    with kernels_launched() if family else contextlib.nullcontext([]) as names:
        out, lse = torch.ops.ring_ext.fwd(qg, kg, vg, scale, causal, q_offset, k_offset, out_fp32)
        out.backward(dout.to(out.dtype))
    if family:
        assert_family(names, family)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_reference(
        q64, k64, v64, causal=causal, scale=scale, q_offset=q_offset, k_offset=k_offset
    )
    assert out.dtype == (torch.float32 if out_fp32 else dtype)
    assert out.device == q.device and lse.device == q.device
    assert_lse(lse, ref_lse.detach())
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
        (200, 300, (1 << 30) - 50, 0),  # difference just below the 2^30 clamp: every key visible
        (130, 260, 1 << 30, 0),  # difference at the clamp
        (150, 150, (1 << 31) + 5, 1 << 31),  # offsets past int32, small difference
        (100, 300, 0, (1 << 30) - 100),  # keys far after the queries: every row sees nothing
        (100, 300, 0, (1 << 31) + 100),  # the same past int32 (the difference is clamped at -2^30)
    ],
)
@pytest.mark.parametrize(
    "dtype,head_dim", [(torch.bfloat16, 64), (torch.float16, 64), (torch.float32, 64), (torch.bfloat16, 33)]
)
def test_causal_offsets(sq, sk, q_offset, k_offset, dtype, head_dim):
    """Tensor-core kernels (bf16/fp16, head_dim 64) and SIMT kernels (float32; bf16 with head_dim 33)."""
    q, k, v = make_qkv(2, sq, sk, 2, 1, head_dim, dtype, seed=sq + sk)
    check_fwd_bwd(q, k, v, causal=True, q_offset=q_offset, k_offset=k_offset)


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


# Packed documents and sliding windows (MaskKind::kRows): documents across the tensor-core tiles (64 and
# 128 rows, 64/128-key blocks), lengths 0, 1 and more than a tile, padding rows that see nothing.
PACKED_DOCS = (1, 0, 130, 2, 64, 65, 0, 190, 7)
PACKED_CU = test_packed.cu_of(PACKED_DOCS)
PACKED_PAD = 9
# dq rows of queries that see fewer keys are ill-conditioned (tolerances.assert_attention, dq_rows).
MIN_KEYS_FOR_ROW_CHECK = test_packed.MIN_KEYS_FOR_ROW_CHECK


def check_packed(q, k, v, cu, causal, window, seed, family=None):
    """tests/test_packed.py's check on CUDA tensors; family: the kernel family that must have run."""
    with kernels_launched() if family else contextlib.nullcontext([]) as names:
        test_packed.check_packed(q, k, v, cu, causal, window, seed)
    if family:
        assert_family(names, family)


@pytest.mark.parametrize("dtype", HALF_DTYPES + [torch.float32])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 13, 200])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_packed_and_windowed_masks(dtype, causal, window, head_dim):
    """Block-diagonal and banded masks on the tensor-core kernels (half dtypes) and the SIMT kernels
    (float32), GQA, every head-dim bucket."""
    cu = PACKED_CU
    seed = 1000 + 7 * head_dim + (window or 0) + causal
    q, k, v = make_qkv(1, cu[-1] + PACKED_PAD, cu[-1] + PACKED_PAD, 4, 2, head_dim, dtype, seed)
    family = "simt" if dtype == torch.float32 else "tensor_core"
    check_packed(q, k, v, cu, causal, window, seed, family=family if head_dim == 128 else None)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("window", [None, 13])
def test_packed_masks_on_misaligned_views_take_the_simt_kernels(dtype, window):
    cu = PACKED_CU
    q, k, v = misaligned_qkv(1, cu[-1] + PACKED_PAD, 4, 2, 64, dtype, seed=77)
    check_packed(q, k, v, cu, True, window, 77, family="simt")


def test_packed_attention_api_thd():
    """ring_ext.attention(layout="thd", cu_seqlens=...) on CUDA tensors, forward and backward."""
    cu = PACKED_CU
    q, k, v = (t[0].requires_grad_() for t in make_qkv(1, cu[-1], cu[-1], 4, 2, 64, torch.bfloat16, 91))
    out = ring_ext.attention(q, k, v, layout="thd", causal=True, cu_seqlens=torch.tensor(cu))
    dout = torch.randn_like(out)
    out.backward(dout)
    index = torch.arange(cu[-1])
    mask = packed_visible(index, index, cu, True).to(DEV)
    q64, k64, v64 = (t.detach().double()[None].requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, causal=False, mask=mask)
    expected = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double()[None])]
    got = [out.detach()[None], q.grad[None], k.grad[None], v.grad[None]]
    baseline = torch_attention(q[None], k[None], v[None], dout[None], causal=False, mask=mask)
    assert_attention(got, expected, baseline, "thd packed", dq_rows=mask.sum(1) >= MIN_KEYS_FOR_ROW_CHECK)


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


@pytest.mark.parametrize("dtype", HALF_DTYPES + [torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_misaligned_views_take_the_simt_kernels(dtype, causal):
    """Views at an odd element offset (rows not 16-byte aligned), passed as views: the SIMT kernels run
    (head_dim 64 would take the tensor cores if aligned) and match the oracle, GQA included."""
    q, k, v = misaligned_qkv(2, 150, 4, 2, 64, dtype, seed=13)
    check_fwd_bwd(q, k, v, causal=causal, family="simt")


def test_aligned_half_inputs_take_the_tensor_cores():
    """The counterpart: the same shapes, aligned, in bf16 take the tensor-core kernels."""
    q, k, v = make_qkv(2, 150, 150, 4, 2, 64, torch.bfloat16, seed=13)
    check_fwd_bwd(q, k, v, causal=True, family="tensor_core")


@pytest.mark.parametrize("head_dim", [7, 33, 100])
@pytest.mark.parametrize("dtype", HALF_DTYPES + [torch.float32])
def test_head_dims_not_multiple_of_8(head_dim, dtype):
    """Head dims the tensor cores cannot take (not a multiple of 8) run on the SIMT kernels, in every
    dtype, with GQA, causal, and lengths that are not multiples of any tile."""
    q, k, v = make_qkv(2, 157, 203, 4, 2, head_dim, dtype, seed=head_dim)
    check_fwd_bwd(q, k, v, causal=True, q_offset=46, family="simt")


@pytest.mark.parametrize("dtype", HALF_DTYPES + [torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_256_batched(dtype, causal):
    """D = 256 (the largest tiles: 4-warp forward, 64-key backward) with batch > 1 and GQA; float32 on
    the SIMT kernels (8 dims per lane, 16 keys per CTA)."""
    q, k, v = make_qkv(3, 211, 333, 4, 2, 256, dtype, seed=256)
    family = "simt" if dtype == torch.float32 else "tensor_core"
    check_fwd_bwd(q, k, v, causal=causal, family=family)


def test_long_sequence():
    """A 16k-token causal block (bf16, GQA, head_dim 128) forward and backward against the oracle."""
    q, k, v = make_qkv(1, 16384, 16384, 2, 1, 128, torch.bfloat16, seed=16)
    check_fwd_bwd(q, k, v, causal=True, family="tensor_core")


def test_simt_float32_error(record_property):
    """The float32 SIMT kernels (built without --use_fast_math: IEEE expf, logf, division) are as
    accurate as PyTorch's float32 attention; the measured errors land in the JUnit report
    (tools/gpu_check.sh copies them into its summary)."""
    q, k, v = make_qkv(2, 257, 300, 4, 2, 64, torch.float32, seed=32)
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


@pytest.mark.parametrize(
    "dtype,head_dim,family",
    [(torch.bfloat16, 128, "tensor_core"), (torch.float32, 64, "simt"), (torch.bfloat16, 33, "simt")],
)
def test_backward_dk_dv_deterministic(dtype, head_dim, family):
    """dK and dV are written once by the CTA that owns their keys (no atomics): bitwise identical over
    runs, in both kernel families. dq is accumulated with atomics and only close."""
    q, k, v = make_qkv(2, 300, 300, 4, 1, head_dim, dtype, seed=5)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.1, True)
    dout = torch.randn_like(out)
    with kernels_launched() as names:
        first = torch.ops.ring_ext.bwd(dout, q, k, v, out, lse, 0.1, True)
    if names:  # else the profiler saw nothing; the determinism below still holds whichever ran
        assert any(KERNEL_FAMILIES[family][1] in n for n in names), names
    for _ in range(3):
        again = torch.ops.ring_ext.bwd(dout, q, k, v, out, lse, 0.1, True)
        assert torch.equal(again[1], first[1]) and torch.equal(again[2], first[2])
        torch.testing.assert_close(again[0], first[0], rtol=1e-2, atol=1e-3)


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


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed_window"])
@pytest.mark.parametrize(
    "algo,extra",
    [("ulysses_cp_algo", {}), ("megatron_cp_algo", {}), ("hybrid_cp_algo", {"ulysses_degree_in_cp": 1})],
)
def test_cp_attention_cp1_on_a_side_stream(nccl_group, algo, extra, packed):
    """Every algorithm through the CUDA ring driver on one rank equals the oracle, forward and backward,
    and its outputs are ready on the caller's (non-default) stream; packed: documents and a window."""
    cfg = ring_ext.CPConfig(context_parallel_size=1, context_parallel_algo=algo, **extra)
    ctx = ring_ext.initialize(cfg, group=nccl_group)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 256, 256, 4, 2, 128, torch.bfloat16, seed=51))
    cu, window = ((0, 3, 100, 101, 256), 40) if packed else (None, None)
    kwargs = {"cu_seqlens": torch.tensor(cu), "sliding_window": window} if packed else {}
    dout = torch.randn_like(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = ring_ext.attention(q, k, v, ctx, layout="bshd", **kwargs)
        out.backward(dout)
        result = [out.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone()]
    side.synchronize()
    index = torch.arange(256)
    mask = packed_visible(index, index, cu, True, window).to(DEV) if packed else None
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, causal=not packed, mask=mask)
    expected = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]
    baseline = torch_attention(q, k, v, dout, causal=not packed, mask=mask)
    dq_rows = mask.sum(1) >= MIN_KEYS_FOR_ROW_CHECK if packed else None
    assert_attention(result, expected, baseline, algo, dq_rows=dq_rows)
