"""The four public layouts as views of the kernels' [batch, seq, heads, head_dim] shape (no copies).

bshd  [b, s, h, d]
sbhd  [s, b, h, d]
bnsd  [b, h, s, d]      (--megatron-cp-in-bnsd)
sbh   [s, b, h * d]     (MindSpeed's default; needs num_heads for q: k's heads follow from q's
                         head dim, v's head dim from k's heads)
thd   [t, h, d]         (packed documents: tokens of one row, batch 1; ring_ext/masks.py)
"""

from __future__ import annotations

import torch

LAYOUTS = ("bshd", "sbhd", "bnsd", "sbh", "thd")

# Which dim of each layout holds the sequence.
SEQ_DIM = {"bshd": 1, "sbhd": 0, "bnsd": 2, "sbh": 0, "thd": 0}

# Layouts whose tensors are 3-D.
THREE_D = ("sbh", "thd")

# The memory order of each layout, outermost first, in dims of [b, s, h, d]; the C++ op allocates
# its output the same way (Note [Output contract] in csrc/cp/attention.cpp).
MEMORY_ORDER = {
    "bshd": (0, 1, 2, 3),
    "sbhd": (1, 0, 2, 3),
    "sbh": (1, 0, 2, 3),
    "bnsd": (0, 2, 1, 3),
    "thd": (0, 1, 2, 3),  # batch 1: the memory of bshd
}


def resolve_layout(layout: str | None, q: torch.Tensor, ctx, packed: bool = False) -> str:
    """The layout a call means: the one given, else "thd" for 3-D packed inputs, "bshd" without a
    context, and with one "bnsd" under --megatron-cp-in-bnsd, else "sbh" (3-D) or "bshd" (4-D)."""
    if layout is not None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        return layout
    if packed and q.dim() == 3:
        return "thd"
    if ctx is None:
        return "bshd"
    if ctx.config.megatron_cp_in_bnsd:
        return "bnsd"
    return "sbh" if q.dim() == 3 else "bshd"


def to_bshd(t: torch.Tensor, layout: str, head_dim: int) -> torch.Tensor:
    """A [b, s, h, d] view of t."""
    expected = 3 if layout in THREE_D else 4
    if t.dim() != expected:
        raise ValueError(f"layout {layout!r} expects {expected}-D tensors, got shape {tuple(t.shape)}")
    if layout == "bshd":
        return t
    if layout == "thd":
        return t.unsqueeze(0)  # [t, h, d] -> [1, t, h, d]
    if layout == "sbhd":
        return t.permute(1, 0, 2, 3)  # [s, b, h, d] -> [b, s, h, d]
    if layout == "bnsd":
        return t.permute(0, 2, 1, 3)  # [b, h, s, d] -> [b, s, h, d]
    if t.shape[-1] % head_dim != 0:
        raise ValueError(f"sbh hidden size {t.shape[-1]} is not a multiple of head_dim {head_dim}")
    return t.unflatten(-1, (-1, head_dim)).permute(1, 0, 2, 3)  # [s, b, h*d] -> [b, s, h, d]


def empty_in_layout(q: torch.Tensor, layout: str, head_dim: int | None = None) -> torch.Tensor:
    """An uninitialised tensor of q's [b, s, h, d] shape (with head_dim as d if given: the output's
    is v's), dtype and device whose memory is dense in `layout` (so from_bshd of it is contiguous)."""
    order = MEMORY_ORDER[layout]
    back = [order.index(i) for i in range(4)]
    shape = list(q.shape[:3]) + [q.shape[3] if head_dim is None else head_dim]
    return q.new_empty([shape[i] for i in order]).permute(back)  # layout memory, viewed as bshd


def from_bshd(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of to_bshd: a [b, s, h, d] tensor viewed in layout."""
    if layout == "bshd":
        return t
    if layout == "thd":
        return t.squeeze(0)  # [1, t, h, d] -> [t, h, d]
    if layout == "sbhd":
        return t.permute(1, 0, 2, 3)  # [b, s, h, d] -> [s, b, h, d]
    if layout == "bnsd":
        return t.permute(0, 2, 1, 3)  # [b, s, h, d] -> [b, h, s, d]
    return t.permute(1, 0, 2, 3).flatten(-2)  # [b, s, h, d] -> [s, b, h*d]
