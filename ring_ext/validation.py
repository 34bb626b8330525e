"""Every check on user input, in one place (docs/design.md, Bad input; the table is docs/reliability.md).

Each check looks only at what every rank of a CP group has alike (shapes, dtypes, devices, the
config, the group's size and backend), so every rank reaches the same verdict, and raises before
any communication. Exception types:

    ValueError    a bad value or shape: the message names the argument and the expected value
    TypeError     an argument of the wrong kind (not a tensor, not a CPConfig)
    RuntimeError  torch.distributed not initialised

The C++ op (csrc/cp/attention.cpp, csrc/common/block_ops.cpp) repeats the checks it can make from
its own arguments, as a second line of defence for callers of torch.ops.ring_ext.attention. Nothing
here communicates: the cross-rank check (ranks that were handed different calls) runs inside the op,
Note [Cross-rank check] in csrc/cp/consistency.h; the values of cu_seqlens are checked inside the op
too (ring_ext/masked.py), so that torch.compile never reads them.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import placement
from .layouts import THREE_D

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_HEAD_DIM_MAX = 512  # the CUDA kernels' limit (csrc/common/block_ops.cpp); the CPU's take any

# Device types each c10d backend serves for ring_ext's send/recv/all-to-all. Gloo reports a CUDA
# entry too, but its send/recv read host memory, so CUDA tensors over Gloo are refused.
_BACKEND_DEVICES = {"gloo": ("cpu",), "nccl": ("cuda",)}


# ---- config and group --------------------------------------------------------------------------


def check_group(config, group: dist.ProcessGroup) -> None:
    """initialize(): the CP size must be the group's size."""
    size = dist.get_world_size(group)
    if config.context_parallel_size != size:
        raise ValueError(
            f"context_parallel_size ({config.context_parallel_size}) must equal the size "
            f"of the process group ({size})"
        )


def backend_devices(group: dist.ProcessGroup) -> tuple[str, ...] | None:
    """The device types group's backend(s) can serve, or None when unknown (then nothing is refused)."""
    try:
        config = dist.get_backend_config(group)
    except Exception:  # a group torch cannot describe: leave the decision to the backend
        return None
    devices = []
    for entry in str(config).split(","):
        if ":" in entry:
            device, backend = entry.split(":", 1)
        else:
            device, backend = None, entry
        allowed = _BACKEND_DEVICES.get(backend.strip().lower())
        if allowed is None:
            return None
        if device is None:
            devices.extend(allowed)
        elif device.strip() in allowed:
            devices.append(device.strip())
    return tuple(dict.fromkeys(devices))


def check_device(t: torch.Tensor, name: str, ctx) -> None:
    """t's device must be one the context's group can communicate."""
    allowed = backend_devices(ctx.group)
    if allowed is not None and t.device.type not in allowed:
        raise ValueError(
            f"{name} is on {t.device}, but the context's process group "
            f"({dist.get_backend(ctx.group)}) serves {' or '.join(allowed)} tensors; "
            f"expected {name} on {allowed[0]}"
        )


# ---- attention ---------------------------------------------------------------------------------


def check_scale(softmax_scale) -> float:
    try:
        scale = float(softmax_scale)
    except (TypeError, ValueError):
        raise ValueError(f"softmax_scale must be a finite non-zero number, got {softmax_scale!r}") from None
    if not math.isfinite(scale) or scale == 0.0:
        raise ValueError(f"softmax_scale must be a finite non-zero number, got {softmax_scale!r}")
    return scale


def check_causal(causal, ctx) -> None:
    """With a context the mask is the one its shards were cut for."""
    if causal is not None and bool(causal) != ctx.causal:
        raise ValueError(
            f"causal={causal} contradicts the context's attention_mask_type "
            f"{ctx.config.attention_mask_type!r} (its shards were cut for causal={ctx.causal}); "
            f"expected causal=None or causal={ctx.causal}"
        )


def check_qkv_tensors(q, k, v, layout: str) -> None:
    """Kinds, ranks (dims), dtypes and devices of q, k, v in `layout`, before any view is taken."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    expected = 3 if layout in THREE_D else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != expected:
            raise ValueError(f"{name} must be {expected}-D in layout {layout!r}, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"k and v must have q's dtype {q.dtype}, got k {k.dtype}, v {v.dtype}")
    if q.dtype not in DTYPES:
        raise ValueError(f"q, k, v must be one of {DTYPES}, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"k and v must be on q's device {q.device}, got k {k.device}, v {v.device}")


def check_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """[b, s, h, d] views of q, k, v against one another, with or without a context: v with k's
    batch, length and heads (its head dim may differ: MLA), k with q's batch and head_dim, kv heads
    dividing q heads, head dims the kernels take. (Without a context k and v may be longer or
    shorter than q.)"""
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"v must have k's batch, length and heads {tuple(k.shape[:3])} ([b, s, heads_kv, d_v]; its "
            f"head dim may differ from k's), got {tuple(v.shape)}"
        )
    for i, what in ((0, "batch"), (3, "head_dim")):
        if k.shape[i] != q.shape[i]:
            raise ValueError(f"k must have q's {what} {q.shape[i]}, got {k.shape[i]}")
    heads_q, heads_kv = q.shape[2], k.shape[2]
    if heads_kv < 1 or heads_q % heads_kv != 0:
        raise ValueError(f"kv heads ({heads_kv}) must divide q heads ({heads_q})")
    limit = CUDA_HEAD_DIM_MAX if q.is_cuda else None
    for name, d in (("q/k head_dim", q.shape[3]), ("v head_dim", v.shape[3])):
        if d < 1 or (limit is not None and d > limit):
            raise ValueError(f"{name} must be in [1, {limit or 'any'}] on {q.device.type}, got {d}")


def check_softcap(softcap) -> float:
    """softcap: None (none) or a positive finite number; 0.0 for the ops when none."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
    if softcap <= 0:
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
    return float(softcap)


def check_sinks(sinks, heads_q: int, device: torch.device) -> None:
    """sinks: None or a floating-point tensor [heads_q] on q's device (any float dtype; used in float32)."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a torch.Tensor [q heads] or None, got {type(sinks).__name__}")
    if sinks.dim() != 1 or sinks.shape[0] != heads_q or not sinks.is_floating_point():
        raise ValueError(
            f"sinks must be a float tensor [q heads] = [{heads_q}], got {sinks.dtype} {tuple(sinks.shape)}"
        )
    if sinks.device != device:
        raise ValueError(f"sinks must be on q's device {device}, got {sinks.device}")


def check_shards(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx, packed: bool = False) -> None:
    """[b, s, h, d] views of the local shards, against one another and the context's algorithm.
    packed: the shards follow a packed or windowed placement, whose lengths the masked op checks itself."""
    check_device(q, "q", ctx)
    check_bshd(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k and v must have q's local sequence length {q.shape[1]}, got {k.shape[1]}")
    heads_q = q.shape[2]
    u = ctx.ulysses_degree
    if u > 1:
        if heads_q < u:  # any other count splits (Note [Ulysses head split] in csrc/cp/ulysses.cpp)
            raise ValueError(
                f"q heads ({heads_q}) must be at least the Ulysses degree ({u}) of {ctx.algo}: "
                "a rank without heads would idle"
            )
    # The ring sees u local shards at once (hybrid) and, causal, splits them into 2 zigzag chunks.
    if not packed and placement.scheme(ctx).sharding == "zigzag" and (q.shape[1] * u) % 2 != 0:
        raise ValueError(
            f"local sequence length {q.shape[1]} must be divisible by 2 (zigzag sharding); "
            "shard with ring_ext.shard"
        )


def check_num_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, num_heads
) -> tuple[int, int]:
    """(q/k head_dim, v head_dim) in `layout`: the last dims, or for sbh ([s, b, heads * head_dim])
    q's hidden / num_heads, which must split k into whole heads; v's head dim is then v's hidden /
    k's heads (MLA: v's may differ). The [b, s, h, d] views are checked against one another by
    check_bshd."""
    if layout != "sbh":
        return q.shape[-1], v.shape[-1]
    if num_heads is None:
        raise ValueError("num_heads is required with layout 'sbh' ([s, b, heads * head_dim])")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
    if q.shape[-1] % num_heads != 0:
        raise ValueError(f"num_heads must divide q's hidden size {q.shape[-1]}, got num_heads={num_heads}")
    head_dim = q.shape[-1] // num_heads
    if k.shape[-1] % head_dim != 0:
        raise ValueError(
            f"k's hidden size {k.shape[-1]} must be a multiple of head_dim {head_dim} "
            f"(q's hidden {q.shape[-1]} / num_heads {num_heads})"
        )
    heads_kv = k.shape[-1] // head_dim
    if v.shape[-1] % heads_kv != 0:
        raise ValueError(
            f"v's hidden size {v.shape[-1]} must be a multiple of k's heads {heads_kv} "
            f"(k's hidden {k.shape[-1]} / head_dim {head_dim})"
        )
    return head_dim, v.shape[-1] // heads_kv


# ---- shard / unshard ---------------------------------------------------------------------------


def check_seq_dim(x, seq_dim: int, what: str = "x") -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(seq_dim, bool) or not isinstance(seq_dim, int) or not -x.dim() <= seq_dim < x.dim():
        raise ValueError(
            f"seq_dim must be an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-D tensor, got {seq_dim!r}"
        )
    return seq_dim % x.dim()
