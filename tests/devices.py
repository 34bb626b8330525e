"""The devices the kernel suite runs on, and how a CUDA test knows which kernel family ran.

tests/test_kernels.py parametrizes its cases over DEVICES: every case runs on CPU and, where a GPU and
a CUDA build are present, on CUDA; elsewhere the CUDA variant is collected and skipped with the reason
("no CUDA device" on a machine without a GPU). tests/test_cuda.py holds what only CUDA has (kernel
families, streams, NCCL, candidate tilings) and skips the same way. On CPU the suite runs in-process
with the best instruction-set level this machine has, and in a subprocess at every lower level it can
run (run_at_cpu_level), so the AVX2 kernels stay tested on AVX-512 machines."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import ring_ext


def cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not ring_ext.build_info()["cuda"]:
        return "ring_ext was built without its CUDA kernels"
    return None


CUDA_MARKS = [
    pytest.mark.cuda,
    pytest.mark.skipif(cuda_skip_reason() is not None, reason=str(cuda_skip_reason())),
]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]

# The CPU kernels' instruction-set levels, best first (csrc/cpu/dispatch.cpp); each runs on every CPU
# that runs the one before it. The levels below the best can be forced with RING_EXT_CPU_ISA.
CPU_LEVELS = ["avx512", "avx512f", "avx2", "baseline"]
LOWER_CPU_LEVELS = CPU_LEVELS[1:]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lower_cpu_level_skip_reason(level: str) -> str | None:
    """Why `level` cannot run as a lower level here: not built, or not below this machine's best level
    (the in-process tests run the best one; a level above it would not run at all)."""
    from ring_ext import _build_info

    best = ring_ext.build_info()["cpu_isa"]
    if level not in _build_info.CPU_ISAS:
        return f"{level} was not built (built: {', '.join(_build_info.CPU_ISAS)})"
    if CPU_LEVELS.index(level) <= CPU_LEVELS.index(best):
        return f"{level} is this machine's best level ({best}) or above it"
    return None


def run_at_cpu_level(level: str, code: str, timeout: float) -> None:
    """Runs `code` in a fresh Python process (repository root, tests/ on sys.path) whose CPU kernels are
    those of `level` (RING_EXT_CPU_ISA), after checking that the dispatcher picked it; fails if it fails."""
    reason = lower_cpu_level_skip_reason(level)
    if reason is not None:
        pytest.skip(reason)
    env = {**os.environ, "RING_EXT_CPU_ISA": level}
    prelude = (
        "import sys; sys.path.insert(0, 'tests'); import ring_ext; "
        f"assert ring_ext.build_info()['cpu_isa'] == {level!r}, ring_ext.build_info()['cpu_isa']; "
    )
    subprocess.run([sys.executable, "-c", prelude + code], check=True, env=env, cwd=ROOT, timeout=timeout)


KERNEL_FAMILIES = {
    "tensor_core": ("flash_fwd_kernel", "flash_bwd_kernel"),
    "simt": ("simt_fwd_kernel", "simt_bwd_kernel"),
}


@contextlib.contextmanager
def kernels_launched():
    """Yields a list that, after the block, holds the names of the ring_ext CUDA kernels launched in it."""
    names: list[str] = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        yield names
        torch.cuda.synchronize()
    names += sorted({e.name for e in prof.events() if "ring_ext" in e.name and "_kernel" in e.name})


def assert_family(names: list[str], family: str) -> None:
    """The forward and backward kernels of `family` ran, and none of the other family."""
    if not names:
        pytest.skip("the profiler saw no ring_ext kernel (CUPTI unavailable?): the path taken is unknown")
    other = "simt" if family == "tensor_core" else "tensor_core"
    for kernel in KERNEL_FAMILIES[family]:
        assert any(kernel in n for n in names), f"expected {kernel}, the kernels were {names}"
    for kernel in KERNEL_FAMILIES[other]:
        assert not any(kernel in n for n in names), f"{kernel} ran, expected {family} only: {names}"


@contextlib.contextmanager
def expect_family(device: str, family: str | None):
    """On CUDA, checks that the block ran the forward and backward kernels of `family` (None: either);
    on CPU there is one family and nothing to check."""
    if device != "cuda" or family is None:
        yield
        return
    with kernels_launched() as names:
        yield
    assert_family(names, family)


def make_qkv(b, sq, sk, hq, hkv, d, dtype, seed, device="cpu"):
    """q [b, sq, hq, d], k, v [b, sk, hkv, d] on `device`, standard normal (drawn on the device)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g, device=device).to(dtype)
    k = torch.randn(b, sk, hkv, d, generator=g, device=device).to(dtype)
    v = torch.randn(b, sk, hkv, d, generator=g, device=device).to(dtype)
    return q, k, v


def misaligned_qkv(b, s, hq, hkv, d, dtype, seed, device="cpu"):
    """q, k, v as views at an odd element offset into wider tensors (not copied): their first rows are
    not 16-byte aligned and their head strides are odd (rows start at every alignment), so on CUDA only
    the SIMT kernels may read them."""
    g = torch.Generator(device=device).manual_seed(seed)
    qbase = torch.randn(b, s, hq, d + 1, generator=g, device=device).to(dtype)
    kvbase = torch.randn(b, s, hkv, 2 * d + 1, generator=g, device=device).to(dtype)
    q, k, v = qbase[..., 1:], kvbase[..., 1 : d + 1], kvbase[..., d + 1 :]
    assert all(
        t.storage_offset() % 2 == 1 and t.data_ptr() % 16 != 0 and t.stride(2) % 2 == 1 for t in (q, k, v)
    )
    return q, k, v
