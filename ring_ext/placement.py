"""Token placement: which global tokens each rank holds, for every kind of call, as index lists.

Every placement is, per rank, an int64 tensor of the global token indices it holds, increasing
within each ring block, padding (S + j) last. shard() is index_select over it and unshard() its
inverse (ring_ext/sharding.py); the key intervals the op needs come from it (block_intervals).

Dense sequences (cu_seqlens=None), a length divisible by the chunks:

    contiguous   rank r holds chunk r of cp equal chunks (general mask, Ulysses)
    zigzag       rank r holds chunks r and 2cp-1-r of 2cp equal chunks, in that order (causal ring;
                 csrc/cp/schedule.h, Note [Zigzag causal schedule])

    cp = 4, zigzag: chunks 0 1 2 3 4 5 6 7  ->  rank 0: [0 7]  rank 1: [1 6]  rank 2: [2 5]  rank 3: [3 4]

Hybrid (Ulysses degree u, ring size R = cp / u; Note [Hybrid rank layout] in context.py): the ring
member rr = r // u must see its zigzag shard (ring chunks rr and 2R-1-rr) once the all-to-all of its
Ulysses group has gathered it, so that shard is cut, in order, into u pieces and rank r holds piece
r % u. In chunks of 1/(2cp) of the sequence (ring chunk c = fine chunks c*u .. c*u+u-1):

    cp = 4, u = 2, R = 2: ring chunks 0..3 = fine chunks {0,1} {2,3} {4,5} {6,7}
      ring rank 0 holds ring chunks [0 3] = fine [0 1 6 7] -> rank 0: [0 1]  rank 1: [6 7]
      ring rank 1 holds ring chunks [1 2] = fine [2 3 4 5] -> rank 2: [2 3]  rank 3: [4 5]

With u = 1 this is the plain zigzag; with a general mask hybrid is contiguous.

Packed documents (packed_tokens). With ring size G (G = cp for the ring, cp / u for hybrid, 1 for
Ulysses) every document is cut into 2G near-equal pieces and ring member c takes pieces c and
2G-1-c (the zigzag applied per document), rotated per document to whichever start leaves the ring
best balanced so far. Each piece pair carries the same share of the document's visible pairs up to
rounding (ring_ext/masks.py, pairs_before), so work per ring member is balanced for any document
mix, and tokens per member are within S / G + 2 * n_docs. Members pad their token list at its end to
the longest member's length (rounded up to a multiple of u); a hybrid member's list is then cut into
u consecutive pieces, one per rank of its Ulysses group. Padding tokens see nothing and are seen by
nothing; they exist only inside the op's buffers (Note [Shards of unequal length] in
csrc/cp/attention.cpp): a rank's shard holds its real tokens only.

Under key_bounds given to shard (Note [Placement balanced by key_bounds]) the work along a document follows
the caller's mask (a shared prompt's answers each see the whole prompt), so every document is cut
into 8 near-equal pieces per ring member and the pieces are dealt out by their visible pairs, the
costliest first to the least loaded member with room (_place_by_cost): tokens per member as even as
the zigzag's, work within 1% of even on shared prompts (equal-length zigzag pieces: up to 1.28x).

Every layer windowed (--cp-sliding-window w): contiguous pieces of equal visible pairs instead of
the zigzag (_contiguous_plan), so a layer needs only its neighbours' edge tokens.
"""

from __future__ import annotations

import collections
import functools
from typing import NamedTuple

import torch

from . import masks


class Scheme(NamedTuple):
    """What decides which tokens each rank holds (hashable: the caches below must not key on
    tensors, which hash by identity)."""

    groups: int  # ring members G: cp for the ring, cp / u for hybrid, 1 for Ulysses
    members: int  # ranks per ring member u (a member's block is its u ranks' tokens, in rank order)
    sharding: str  # dense sequences: "zigzag" (causal ring) or "contiguous"
    causal: bool
    window: int | None  # --cp-sliding-window: contiguous placement (None: zigzag per document)

    @property
    def cp_size(self) -> int:
        return self.groups * self.members

    @property
    def needs_intervals(self) -> bool:
        """A dense call that cannot use the ring's offset masks: a causal ring over contiguous
        shards (--cp-sliding-window) goes by key intervals."""
        return self.causal and self.groups > 1 and self.sharding == "contiguous"


def ring_shape(algo: str, cp_size: int, ulysses_degree: int) -> tuple[int, int]:
    """(ring members G, ranks per member u) of an algorithm: the ring (cp, 1), Ulysses (1, cp),
    hybrid (cp / u, u)."""
    if algo == "ulysses_cp_algo":
        return 1, cp_size
    if algo == "hybrid_cp_algo":
        return cp_size // ulysses_degree, ulysses_degree
    return cp_size, 1


def scheme_of(algo: str, cp_size: int, ulysses_degree: int, causal: bool, window: int | None) -> Scheme:
    groups, members = ring_shape(algo, cp_size, ulysses_degree)
    zigzag = causal and algo != "ulysses_cp_algo" and window is None
    return Scheme(groups, members, "zigzag" if zigzag else "contiguous", causal, window)


def scheme(ctx) -> Scheme:
    """A context's scheme (its algorithm, mask and --cp-sliding-window)."""
    return scheme_of(ctx.algo, ctx.cp_size, ctx.ulysses_degree, ctx.causal, ctx.config.cp_sliding_window)


# ---- dense sequences -------------------------------------------------------------------------


def num_chunks(sharding: str, cp_size: int) -> int:
    return 2 * cp_size if sharding == "zigzag" else cp_size


def chunk_order(sharding: str, cp_size: int, rank: int, ulysses_degree: int = 1) -> list[int]:
    """Which global chunks rank holds, in local order; chunks are 1/cp (contiguous) or 1/(2cp) long."""
    if sharding not in ("contiguous", "zigzag"):
        raise ValueError(f"sharding must be 'contiguous' or 'zigzag', got {sharding!r}")
    if sharding == "contiguous":
        return [rank]
    u = ulysses_degree
    ring_size, ring_rank = cp_size // u, rank // u
    ring_shard = [c * u + j for c in (ring_rank, 2 * ring_size - 1 - ring_rank) for j in range(u)]
    return ring_shard[2 * (rank % u) : 2 * (rank % u) + 2]


def dense_tokens(
    sharding: str, cp_size: int, total: int, ulysses_degree: int = 1, where: str = ""
) -> tuple[torch.Tensor, ...]:
    """The global indices each rank holds of a dense sequence of `total` tokens, per rank. where:
    which dim of which tensor holds the sequence, for the error message (e.g. " (dim 1)")."""
    n = num_chunks(sharding, cp_size)
    if total % n != 0:
        raise ValueError(
            f"sequence length {total}{where} must be divisible by {n} ({sharding} sharding over "
            f"cp_size={cp_size}); for any length pass cu_seqlens=[0, {total}] (one document) to shard, "
            "attention and unshard"
        )
    size = total // n
    return tuple(
        torch.cat(
            [
                torch.arange(c * size, (c + 1) * size)
                for c in chunk_order(sharding, cp_size, r, ulysses_degree)
            ]
        )
        for r in range(cp_size)
    )


# ---- packed documents ------------------------------------------------------------------------


def _pieces(length: int, n: int) -> list[tuple[int, int]]:
    """n near-equal consecutive pieces [a, b) of range(length)."""
    return [(j * length // n, (j + 1) * length // n) for j in range(n)]


@functools.lru_cache(maxsize=64)
def packed_tokens(
    cu_seqlens: tuple[int, ...],
    groups: int,
    members: int = 1,
    causal: bool = True,
    window: int | None = None,
    bounds: masks.KeyBounds | None = None,
) -> tuple[torch.Tensor, ...]:
    """The packed placement (module docstring): for each of groups * members ranks (rank = group *
    members + member, Note [Hybrid rank layout] in context.py) an int64 [local_len] tensor of the
    global indices it holds, increasing, padding (S + j) last. Pure: every rank computes the same.
    window (the context's --cp-sliding-window): contiguous pieces instead of the zigzag. bounds (the
    calls' key_bounds): pieces placed by their visible pairs under them (_place_by_cost)."""
    total = cu_seqlens[-1]
    if window is not None:
        return _pad_plan(_contiguous_plan(cu_seqlens, groups, causal, window, bounds), members, total)
    owned: list[list[tuple[int, int]]] = [[] for _ in range(groups)]  # global [a, b) ranges
    cost = [0] * groups
    if bounds is None:
        _place_zigzag(cu_seqlens, groups, causal, owned, cost)
    else:
        _place_by_cost(cu_seqlens, groups, causal, bounds, owned, cost)
    lists = [
        torch.cat([torch.arange(a, b) for a, b in ranges]) if ranges else torch.zeros(0, dtype=torch.int64)
        for ranges in owned
    ]
    return _pad_plan(lists, members, total)


def _place_zigzag(
    cu_seqlens: tuple[int, ...],
    groups: int,
    causal: bool,
    owned: list[list[tuple[int, int]]],
    cost: list[int],
) -> None:
    """The packed placement's zigzag (module docstring): adds to owned and cost, per member."""
    for start, end in zip(cu_seqlens, cu_seqlens[1:]):
        length = end - start
        if length == 0:
            continue
        pieces = _pieces(length, 2 * groups)
        shares = []  # (cost, ranges) of zigzag pair c
        for c in range(groups):
            pair = (pieces[c], pieces[2 * groups - 1 - c])
            pair_cost = sum(
                masks.pairs_before(b, length, causal, None) - masks.pairs_before(a, length, causal, None)
                for a, b in pair
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


# Pieces per ring member and document when the placement balances key_bounds' work: enough for
# the greedy fill to even out any cost profile (within 1% on shared prompts at cp 2-16,
# benchmarks/bench_masks.py), few enough that pieces stay longer than a kernel tile at 1k tokens
# per rank.
PIECES_PER_MEMBER = 8


def _place_by_cost(
    cu_seqlens: tuple[int, ...],
    groups: int,
    causal: bool,
    bounds: masks.KeyBounds,
    owned: list[list[tuple[int, int]]],
    cost: list[int],
) -> None:
    """The packed placement under key_bounds (any profile of work along a document: shared prompts,
    image blocks): every document cut into PIECES_PER_MEMBER near-equal pieces per ring member, each
    member taking as many of them (so tokens stay balanced as in the zigzag), the costliest piece
    first to the member with the least work so far among those with room (a greedy longest-first
    fill, deterministic: ties go to the lower index). Adds to owned and cost, per member."""
    total = cu_seqlens[-1]
    pairs = masks.visible_pairs(torch.arange(total), cu_seqlens, causal, bounds=bounds)
    before = torch.cat([torch.zeros(1, dtype=torch.int64), pairs.cumsum(0)]).tolist()
    for start, end in zip(cu_seqlens, cu_seqlens[1:]):
        pieces = [(start + a, start + b) for a, b in _pieces(end - start, PIECES_PER_MEMBER * groups)]
        room = [PIECES_PER_MEMBER] * groups
        for a, b in sorted(pieces, key=lambda p: (before[p[0]] - before[p[1]], p[0])):  # costliest first
            g = min((g for g in range(groups) if room[g]), key=lambda g: (cost[g], g))
            room[g] -= 1
            cost[g] += before[b] - before[a]
            if b > a:
                owned[g].append((a, b))
    for ranges in owned:
        ranges.sort()


def _contiguous_plan(
    cu_seqlens: tuple[int, ...], groups: int, causal: bool, window: int, bounds: masks.KeyBounds | None = None
) -> list[torch.Tensor]:
    """Windowed placement: the packed sequence cut into `groups` consecutive pieces of equal visible
    pairs under a window of `window` tokens (or under bounds, the calls' key_bounds). A windowed
    layer then needs only its neighbours' edge tokens: Note [Moving only what is seen] in
    csrc/cp/ring.cpp."""
    total = cu_seqlens[-1]
    cost = masks.visible_pairs(torch.arange(total), cu_seqlens, causal, window, bounds=bounds)
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


def real_length(index: torch.Tensor, total: int) -> int:
    """How many of a rank's tokens are real (not padding)."""
    return int((index < total).sum())


# ---- a scheme's placement and the key intervals of its op ---------------------------------


@functools.lru_cache(maxsize=64)
def rank_tokens(
    s: Scheme,
    total: int,
    cu_seqlens: tuple[int, ...] | None,
    where: str = "",
    bounds: masks.KeyBounds | None = None,
) -> tuple[torch.Tensor, ...]:
    """The global indices every rank holds (padding last): the packed placement for cu_seqlens
    (balancing the visible pairs of bounds, the calls' key_bounds, when given), the dense one
    otherwise (where: as dense_tokens'). Cached: a model asks once per layer alike."""
    if cu_seqlens is None:
        return dense_tokens(s.sharding, s.cp_size, total, s.members, where)  # u matters to zigzag only
    return packed_tokens(cu_seqlens, s.groups, s.members, s.causal, s.window, bounds)


def _member_intervals(
    s: Scheme,
    member: int,
    total: int,
    cu_seqlens: tuple[int, ...] | None,
    window: int | None,
    chunk: int | None,
    bounds: masks.KeyBounds | None,
    placed: masks.KeyBounds | None,
) -> torch.Tensor:
    tokens = rank_tokens(s, total, cu_seqlens, bounds=placed)
    blocks = [torch.cat(tokens[g * s.members : (g + 1) * s.members]) for g in range(s.groups)]
    cu = cu_seqlens if cu_seqlens is not None else (0, total)
    return torch.stack(
        [masks.visible_keys(blocks[member], src, cu, s.causal, window, chunk, bounds) for src in blocks]
    )


@functools.lru_cache(maxsize=64)
def block_needed(
    s: Scheme,
    total: int,
    cu_seqlens: tuple[int, ...] | None,
    window: int | None,
    chunk: int | None = None,
    bounds: masks.KeyBounds | None = None,
    placed: masks.KeyBounds | None = None,
) -> torch.Tensor:
    """int64 [members, sources, 2]: the hull [lo, hi) of the rows of every source block that each ring
    member's rows see ([0, 0) for none): block_intervals' `needed`, and what the planner's window
    model reads."""
    needed = torch.zeros(s.groups, s.groups, 2, dtype=torch.int64)
    for member in range(s.groups):
        intervals = _member_intervals(s, member, total, cu_seqlens, window, chunk, bounds, placed)
        pairs = intervals.view(s.groups, intervals.shape[1] // 2, 2, intervals.shape[-1]).transpose(1, 2)
        begin, end = pairs.flatten(2).unbind(1)  # [sources, n * rows]: every interval of every row
        seen = end > begin
        lo = torch.where(seen, begin, begin.shape[-1]).amin(-1)
        hi = torch.where(seen, end, 0).amax(-1)
        needed[member] = torch.stack([lo, hi], -1) * (hi > lo)[:, None]
    return needed


@functools.lru_cache(maxsize=64)
def block_intervals(
    s: Scheme,
    rank: int,
    total: int,
    cu_seqlens: tuple[int, ...] | None,
    window: int | None,
    chunk: int | None = None,
    bounds: masks.KeyBounds | None = None,
    placed: masks.KeyBounds | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """(visible, needed, rows, count): the arguments of torch.ops.ring_ext.attention for `rank`.

    visible, int64 [sources, 2, query rows]: the key intervals of this rank's query rows against
    every source block (one per ring member; Ulysses has one block, the whole sequence). The query
    rows are this rank's real tokens for the plain ring, the gathered block (padding included) for
    Ulysses and hybrid. needed, int64 [members, sources, 2] (None for Ulysses): the rows [lo, hi)
    of every source block that each ring member's rows see, their hull ([0, 0) for none), which is
    all the ring moves (Note [Moving only what is seen] in csrc/cp/ring.cpp). rows: the length of
    every rank's shard in the blocks that move (the longest); count: this rank's real tokens.
    window, chunk and bounds (sliding_window, attention_chunk_size, key_bounds) shape the intervals,
    not the placement: such a layer runs on the shards of the model's other layers. placed: the
    key_bounds shard() balanced the packed placement by (placed_by), None for the plain placement."""
    tokens = rank_tokens(s, total, cu_seqlens, bounds=placed)
    rows, count = len(tokens[rank]), real_length(tokens[rank], total)
    visible = _member_intervals(s, rank // s.members, total, cu_seqlens, window, chunk, bounds, placed)
    if s.members == 1:
        visible = visible[:, :, :count].contiguous()  # the plain ring's queries: real tokens only
    if s.groups == 1:
        return visible, None, rows, count
    return visible, block_needed(s, total, cu_seqlens, window, chunk, bounds, placed), rows, count


# Note [Placement balanced by key_bounds]
# A packed placement balanced by a mask (shard(..., key_bounds=kb)) must be the placement of every
# call on those shards, also of the layers whose own mask differs (Gemma 3's sliding layers) or has
# none. So the placement is shard()'s choice, remembered here per (scheme, sequence length,
# cu_seqlens) in this process, and every later call on that packing (attention, unshard) reads it
# back, whatever its own key_bounds: a layer can never run on a placement other than its shards'.
# shard() records the plain placement too (None), so a later plain shard of the same packing
# replaces a balanced one. Bounded: the least recently recorded packings go first, 64 after (more
# packings between a shard and the backward of its step than any schedule keeps in flight).
_PLACED_BY: collections.OrderedDict = collections.OrderedDict()
_PLACED_BY_LIMIT = 64  # as the placement caches: they hold the same KeyBounds objects


def record_placement(
    s: Scheme, total: int, cu_seqlens: tuple[int, ...], bounds: masks.KeyBounds | None
) -> None:
    """shard()'s choice for this packing (Note [Placement balanced by key_bounds])."""
    key = (s, total, cu_seqlens)
    _PLACED_BY.pop(key, None)
    _PLACED_BY[key] = bounds
    while len(_PLACED_BY) > _PLACED_BY_LIMIT:
        _PLACED_BY.popitem(last=False)


def placed_by(s: Scheme, total: int, cu_seqlens: tuple[int, ...] | None) -> masks.KeyBounds | None:
    """The key_bounds shard() balanced this packing's placement by; None: the plain placement."""
    return None if cu_seqlens is None else _PLACED_BY.get((s, total, cu_seqlens))
