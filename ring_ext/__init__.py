"""ring_ext: context-parallel attention (ring, double ring, Ulysses, hybrid) for PyTorch.

Importing the package loads the C++ library, which registers the torch.ops.ring_ext operators.
"""

from __future__ import annotations

import torch

from . import ops  # noqa: F401  (fake kernels and autograd of the block ops)
from .attention import attention
from .collectives import all_reduce, reduce_gradients
from .config import CPConfig, add_arguments
from .context import CPContext, initialize
from .ffn import blockwise_ffn
from .sharding import shard, unshard

__all__ = [
    "CPConfig",
    "CPContext",
    "add_arguments",
    "all_reduce",
    "attention",
    "blockwise_ffn",
    "build_info",
    "initialize",
    "reduce_gradients",
    "shard",
    "unshard",
]


def build_info() -> dict:
    """What this installation was built with and runs on: {'cuda', 'cuda_archs', 'cuda_tilings',
    'torch_version', 'built_with_torch', 'cpu_isa', 'emulated_avx512'} (cpu_isa: the CPU kernels' instruction
    set here: avx512 (AVX-512 with BF16), avx512f (AVX-512 without BF16), avx2 or baseline; emulated_avx512:
    a test build whose AVX-512 levels run emulated on AVX2, whose speed means nothing (setup.py); cuda_tilings:
    the CUDA kernels' candidate tilings, "fwd/<head dim bucket>/<name>", the default of each bucket first,
    docs/cuda.md)."""
    from . import _build_info

    cuda_registered = torch._C._dispatch_has_kernel_for_dispatch_key("ring_ext::fwd", "CUDA")
    return {
        "cuda": bool(_build_info.CUDA and cuda_registered),
        "cuda_archs": list(_build_info.CUDA_ARCHS),
        "cuda_tilings": list(torch.ops.ring_ext.cuda_tilings()),
        "torch_version": torch.__version__,
        "built_with_torch": _build_info.BUILT_WITH_TORCH,
        "cpu_isa": torch.ops.ring_ext.cpu_isa(),
        "emulated_avx512": _build_info.EMULATED_AVX512,
    }
