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

import pytest
import test_packed
import torch
from devices import CUDA_MARKS, assert_family, expect_family, kernels_launched, make_qkv
from test_kernels import PACKED_CU, PACKED_PAD, check_fwd_bwd

import ring_ext
from ring_ext import cuda_tilings
from ring_ext.testing.reference import attention_reference, packed_mask
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


@pytest.mark.parametrize("head_dim", [64, 128, 256])
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
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 256, 256, 4, 2, 128, torch.bfloat16, 51, DEV))
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
    mask = packed_mask(index, index, cu, True, window).to(DEV) if packed else None
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, causal=not packed, mask=mask)
    expected = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]
    baseline = torch_attention(q, k, v, dout, causal=not packed, mask=mask)
    dq_rows = mask.sum(1) >= test_packed.MIN_KEYS_FOR_ROW_CHECK if packed else None
    assert_attention(result, expected, baseline, algo, dq_rows=dq_rows)
