"""Packed documents and sliding windows: the per-token mask and which tokens each rank holds.

Mask model (docs/design.md, "Mask model"). A token of the packed sequence [0, S) has a global index g;
its document is the d with cu_seqlens[d] <= g < cu_seqlens[d + 1] and its position is g - cu_seqlens[d].
Key k is visible to query q iff both are in the same document and

    causal    0 <= pos_q - pos_k   (and pos_q - pos_k < w with sliding_window=w)
    general   always               (and |pos_q - pos_k| < w with sliding_window=w)

A dense sequence is one document, cu_seqlens = [0, S].

Every block of tokens the kernels see lists its tokens in increasing g, padding (g >= S) last. Then the
keys one query sees are one interval of the key block's rows, and the intervals never move backwards
from one query row to the next: visible_keys() turns the per-token description into those intervals,
which is the form the kernels take (MaskKind::kRows in csrc/common/params.h).

Token plan (plan_tokens). With ring size G (G = cp for the ring, cp / u for hybrid, 1 for Ulysses)
every document is cut into 2G near-equal pieces and ring member c takes pieces c and 2G-1-c (the zigzag
of docs/design.md applied per document), rotated per document to whichever start leaves the ring best
balanced so far. Each piece pair carries the same share of the document's visible pairs up to rounding,
so work per ring member is balanced for any document mix, and tokens per member are within
S / G + 2 * n_docs. Members pad their token list at its end to the longest member's length (rounded up
to a multiple of u); a hybrid member's list is then cut into u consecutive pieces, one per rank of its
Ulysses group. Padding tokens see nothing and are seen by nothing; they cost at most 2 * n_docs rows.
"""

from __future__ import annotations

import functools

import torch


def check_cu_seqlens(cu_seqlens, total: int | None = None) -> tuple[int, ...]:
    """cu_seqlens as a tuple of ints after checking it: 1-D integers, 0 first, non-decreasing, and
    last == total (the packed length S) when total is given."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
            raise ValueError(
                f"cu_seqlens must be a 1-D integer tensor [n_docs + 1], got {cu_seqlens.dtype} "
                f"of shape {tuple(cu_seqlens.shape)}"
            )
        values = tuple(int(x) for x in cu_seqlens.tolist())
    else:
        values = tuple(int(x) for x in cu_seqlens)
    if len(values) < 2 or values[0] != 0:
        raise ValueError(
            f"cu_seqlens must start with 0 and hold at least one document, got {list(values)[:8]}"
        )
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError("cu_seqlens must be non-decreasing (document lengths >= 0)")
    if total is not None and values[-1] != total:
        raise ValueError(f"cu_seqlens must end with the packed sequence length {total}, got {values[-1]}")
    return values


def check_window(sliding_window) -> int | None:
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window must be an int >= 1 or None, got {sliding_window!r}")
    return sliding_window


def visible_keys(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    cu_seqlens: tuple[int, ...],
    causal: bool,
    window: int | None = None,
) -> torch.Tensor:
    """int64 [2, len(q_index)]: query row i sees key rows [begin_i, end_i) of k_index.

    q_index and k_index are the global token indices of a query and a key block, each increasing,
    padding (>= S) last. A padding query sees nothing."""
    cu = torch.tensor(cu_seqlens, dtype=torch.int64)
    total, n_docs = cu_seqlens[-1], len(cu_seqlens) - 1
    real = q_index < total
    doc = (torch.searchsorted(cu, q_index, right=True) - 1).clamp(0, n_docs - 1)
    lo = cu[doc]
    hi = q_index + 1 if causal else cu[doc + 1]
    if window is not None:
        lo = torch.maximum(lo, q_index - window + 1)
        if not causal:
            hi = torch.minimum(hi, q_index + window)
    lo = torch.where(real, lo, total)
    hi = torch.where(real, hi, total)
    return torch.stack([torch.searchsorted(k_index, lo), torch.searchsorted(k_index, hi)])


def pairs_before(x: int, length: int, causal: bool, window: int | None) -> int:
    """Visible (query, key) pairs of the queries at positions [0, x) of a document of `length` tokens."""
    w = length if window is None else min(window, length)
    if causal:  # position p sees min(p + 1, w) keys
        return x * (x + 1) // 2 if x <= w else w * (w + 1) // 2 + (x - w) * w
    # position p sees keys [max(p - w + 1, 0), min(p + w, length))
    t = max(0, min(length - w, x))
    upper = t * (t - 1) // 2 + t * w + (x - t) * length
    lower = (x - w) * (x - w + 1) // 2 if x >= w else 0
    return upper - lower


def _pieces(length: int, n: int) -> list[tuple[int, int]]:
    """n near-equal consecutive pieces [a, b) of range(length)."""
    return [(j * length // n, (j + 1) * length // n) for j in range(n)]


@functools.lru_cache(maxsize=64)
def plan_tokens(
    cu_seqlens: tuple[int, ...], groups: int, members: int = 1, causal: bool = True, window: int | None = None
) -> tuple[torch.Tensor, ...]:
    """The token plan (module docstring): for each of groups * members ranks (rank = group * members +
    member, Note [Hybrid rank layout] in context.py) an int64 [local_len] tensor of the global indices
    it holds, increasing, padding (S + j) last. Pure: every rank computes the same plan. window (the
    context's --cp-sliding-window): contiguous pieces instead of the zigzag (_contiguous_plan)."""
    total = cu_seqlens[-1]
    if window is not None:
        return _pad_plan(_contiguous_plan(cu_seqlens, groups, causal, window), members, total)
    owned: list[list[tuple[int, int]]] = [[] for _ in range(groups)]  # global [a, b) ranges
    cost = [0] * groups
    for start, end in zip(cu_seqlens, cu_seqlens[1:]):
        length = end - start
        if length == 0:
            continue
        pieces = _pieces(length, 2 * groups)
        shares = []  # (cost, ranges) of zigzag pair c
        for c in range(groups):
            pair = (pieces[c], pieces[2 * groups - 1 - c])
            pair_cost = sum(
                pairs_before(b, length, causal, None) - pairs_before(a, length, causal, None) for a, b in pair
            )
            shares.append((pair_cost, [(start + a, start + b) for a, b in pair if b > a]))

        def worst(rot: int) -> tuple[int, int]:
            after = [cost[(c + rot) % groups] + shares[c][0] for c in range(groups)]
            return max(after), rot

        rot = min(range(groups), key=worst)
        for c, (pair_cost, ranges) in enumerate(shares):
            g = (c + rot) % groups
            cost[g] += pair_cost
            owned[g].extend(ranges)
    lists = [
        torch.cat([torch.arange(a, b) for a, b in ranges]) if ranges else torch.zeros(0, dtype=torch.int64)
        for ranges in owned
    ]
    return _pad_plan(lists, members, total)


def _contiguous_plan(
    cu_seqlens: tuple[int, ...], groups: int, causal: bool, window: int
) -> list[torch.Tensor]:
    """Windowed placement: the packed sequence cut into `groups` consecutive pieces of equal visible
    pairs under a window of `window` tokens (a token at position p of a document of n tokens sees
    min(p + 1, w) keys, causal, or min(p + w, n) - max(p - w + 1, 0), general). A windowed layer then
    needs only its neighbours' edge tokens: Note [Moving only what is seen] in csrc/cp/ring.cpp."""
    total = cu_seqlens[-1]
    cu = torch.tensor(cu_seqlens, dtype=torch.int64)
    index = torch.arange(total)
    doc = torch.searchsorted(cu, index, right=True) - 1
    pos, length = index - cu[doc], cu[doc + 1] - cu[doc]
    if causal:
        cost = torch.clamp(pos + 1, max=window)
    else:
        cost = torch.minimum(pos + window, length) - torch.clamp(pos - window + 1, min=0)
    before = torch.cumsum(cost, 0) - cost  # pairs of the tokens before each one
    targets = torch.arange(1, groups) * int(cost.sum()) // groups
    cuts = [0, *torch.searchsorted(before, targets).tolist(), total]
    return [torch.arange(a, b) for a, b in zip(cuts, cuts[1:])]


def _pad_plan(lists: list[torch.Tensor], members: int, total: int) -> tuple[torch.Tensor, ...]:
    """Each member's tokens padded to the longest (a multiple of members), cut into members pieces."""
    longest = max(len(x) for x in lists)
    padded_len = -(-max(longest, 1) // members) * members
    local_len = padded_len // members
    out = []
    for tokens in lists:
        pad = torch.arange(total, total + padded_len - len(tokens))
        full = torch.cat([tokens, pad])
        out.extend(full[m * local_len : (m + 1) * local_len] for m in range(members))
    return tuple(out)


def dense_tokens(sharding: str, cp_size: int, members: int, total: int) -> tuple[torch.Tensor, ...]:
    """The global indices each rank holds under the dense sharding (sharding.py), per rank."""
    from .sharding import chunk_order, num_chunks

    n = num_chunks(sharding, cp_size)
    size = total // n
    return tuple(
        torch.cat(
            [torch.arange(c * size, (c + 1) * size) for c in chunk_order(sharding, cp_size, r, members)]
        )
        for r in range(cp_size)
    )


def real_length(index: torch.Tensor, total: int) -> int:
    """How many of a rank's tokens are real (not padding)."""
    return int((index < total).sum())


# ---- a context's view: which tokens each rank holds, and the key intervals its attention call needs


def ring_shape(ctx) -> tuple[int, int]:
    """(ring members G, ranks per member u) of a context: the ring (cp, 1), Ulysses (1, cp), hybrid
    (cp / u, u). A member's block is its u ranks' tokens, gathered in rank order."""
    if ctx.algo == "ulysses_cp_algo":
        return 1, ctx.cp_size
    if ctx.algo == "hybrid_cp_algo":
        return ctx.cp_size // ctx.ulysses_degree, ctx.ulysses_degree
    return ctx.cp_size, 1


def _layout(ctx) -> tuple:
    """What decides which tokens each rank of ctx holds, as a hashable key (the caches below must not
    key on tensors: those hash by identity)."""
    groups, members = ring_shape(ctx)
    hybrid = ctx.algo == "hybrid_cp_algo"
    return groups, members, ctx.sharding, hybrid, ctx.causal, ctx.config.cp_sliding_window


@functools.lru_cache(maxsize=64)
def _tokens(layout: tuple, total: int, cu_seqlens: tuple[int, ...] | None) -> tuple[torch.Tensor, ...]:
    groups, members, sharding, hybrid, causal, window = layout
    if cu_seqlens is None:
        return dense_tokens(sharding, groups * members, members if hybrid else 1, total)
    return plan_tokens(cu_seqlens, groups, members, causal, window)


def rank_tokens(ctx, total: int, cu_seqlens: tuple[int, ...] | None) -> tuple[torch.Tensor, ...]:
    """The global indices every rank of ctx holds (padding last): the token plan for packed documents,
    the dense sharding (sharding.py) otherwise. Cached."""
    return _tokens(_layout(ctx), total, cu_seqlens)


def _member_intervals(
    layout: tuple, member: int, total: int, cu_seqlens: tuple[int, ...] | None, window: int | None
) -> torch.Tensor:
    groups, members, _, _, causal, _ = layout
    tokens = _tokens(layout, total, cu_seqlens)
    blocks = [torch.cat(tokens[g * members : (g + 1) * members]) for g in range(groups)]
    cu = cu_seqlens if cu_seqlens is not None else (0, total)
    return torch.stack([visible_keys(blocks[member], src, cu, causal, window) for src in blocks])


_block_intervals = functools.lru_cache(maxsize=64)(_member_intervals)


@functools.lru_cache(maxsize=64)
def _block_needed(
    layout: tuple, total: int, cu_seqlens: tuple[int, ...] | None, window: int | None
) -> torch.Tensor:
    groups = layout[0]
    needed = torch.zeros(groups, groups, 2, dtype=torch.int64)
    for member in range(groups):
        begin, end = _member_intervals(layout, member, total, cu_seqlens, window).unbind(1)
        seen = end > begin
        lo = torch.where(seen, begin, begin.shape[-1]).amin(-1)
        hi = torch.where(seen, end, 0).amax(-1)
        needed[member] = torch.stack([lo, hi], -1) * (hi > lo)[:, None]
    return needed


def block_intervals(
    ctx, total: int, cu_seqlens: tuple[int, ...] | None, window: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `visible` and `needed` arguments of torch.ops.ring_ext.attention for this rank.

    visible, int64 [sources, 2, rows]: the key intervals of this rank's ring block against every
    source block (one per ring member; Ulysses has one block, the whole sequence). needed, int64
    [members, sources, 2] (None for Ulysses): the rows [lo, hi) of every source block that each ring
    member's rows see, their hull ([0, 0) for none), which is all the ring moves (Note [Moving only
    what is seen] in csrc/cp/ring.cpp). Cached: a model calls it once per layer alike."""
    layout = _layout(ctx)
    visible = _block_intervals(layout, ctx.rank // layout[1], total, cu_seqlens, window)
    if ctx.algo == "ulysses_cp_algo":
        return visible, None
    return visible, _block_needed(layout, total, cu_seqlens, window)
