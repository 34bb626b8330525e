"""The sharded-cache decode path on CUDA tensors over NCCL (ring_ext/inference.py): a one-rank NCCL
group runs prefill, decode, pass-Q and pass-KV steps in bf16 against the float64 oracle, and
ring_ext.hf.generate on a CUDA model equals the model's own generate. Skipped without a GPU; run by
tools/gpu_check.sh (its "cp" part). The multi-rank logic is the same code, tested over Gloo in
tests/test_inference_dist.py."""

from __future__ import annotations

import pytest
import torch
from devices import CUDA_MARKS

import ring_ext
from ring_ext.inference import ShardedKVCache
from ring_ext.testing.reference import attention_reference, packed_mask
from ring_ext.testing.spawn import free_port
from ring_ext.testing.tolerances import assert_close_to_oracle, torch_attention

pytestmark = CUDA_MARKS
DEV = "cuda"


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


@pytest.mark.parametrize("window", [None, 24])
def test_sharded_cache_decode_and_chunks_on_cuda(nccl_group, window):
    ctx = ring_ext.initialize(
        ring_ext.CPConfig(context_parallel_size=1, context_parallel_algo="megatron_cp_algo"), group=nccl_group
    )
    prompt, steps = (40, 0, 57), (("decode", 1), ("pass_q", 9), ("pass_kv", 17), ("decode", 1))
    added = sum(n for _, n in steps)
    cu_final = [0]
    for n in prompt:
        cu_final.append(cu_final[-1] + n + added)
    g = torch.Generator().manual_seed(3)
    total = cu_final[-1]
    q = torch.randn(1, total, 8, 128, generator=g).to(DEV, torch.bfloat16)
    k, v = (torch.randn(1, total, 2, 128, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    cu_prompt = [0, 40, 40, 97]
    index = torch.cat([torch.arange(cu_final[d], cu_final[d] + n) for d, n in enumerate(prompt)])
    cache = ShardedKVCache(ctx, 1, cu_seqlens=cu_prompt)
    got = [(index, cache.prefill(0, q[:, index], k[:, index], v[:, index], sliding_window=window))]
    for mode, n in steps:
        step = cache.step(n, mode)
        rows = torch.tensor(cu_final)[step.docs] + step.positions
        got.append((rows, cache.attend(0, q[:, rows], k[:, rows], v[:, rows], step, sliding_window=window)))
    torch.cuda.synchronize()
    mask = packed_mask(torch.arange(total), torch.arange(total), cu_final, True, window).to(DEV)
    expected, _ = attention_reference(q, k, v, causal=False, mask=mask)
    (baseline,) = torch_attention(q, k, v, causal=False, mask=mask)
    rows = torch.cat([r for r, _ in got]).to(DEV)
    actual = torch.cat([o for _, o in got], 1)
    assert actual.device.type == "cuda"
    assert_close_to_oracle(actual, expected[:, rows], baseline[:, rows], f"cuda window={window}")


def test_sharded_cache_generate_on_cuda(nccl_group):
    pytest.importorskip("transformers")
    from inference_models import own_generate, prompt, tiny_model

    import ring_ext.hf

    ctx = ring_ext.initialize(
        ring_ext.CPConfig(context_parallel_size=1, context_parallel_algo="megatron_cp_algo"), group=nccl_group
    )
    model = tiny_model("mistral").to(DEV)
    ids = prompt(2, 11).to(DEV)
    expected = own_generate(model, ids, max_new_tokens=8, do_sample=False)
    got = ring_ext.hf.generate(model, ids, ctx, max_new_tokens=8)
    assert torch.equal(got, expected)
