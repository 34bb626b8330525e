"""The mask model, once: which keys a query sees (docs/design.md, "Mask model").

A token of the packed sequence [0, S) has a global index g; its document is the d with
cu_seqlens[d] <= g < cu_seqlens[d + 1] and its position is g - cu_seqlens[d]. Key k is visible to
query q iff both are in the same document and

    causal    0 <= pos_q - pos_k   (and pos_q - pos_k < w with sliding_window=w)
    general   always               (and |pos_q - pos_k| < w with sliding_window=w)

and, with attention_chunk_size=c (Llama 4's chunked attention), pos_q // c == pos_k // c: a query
sees only the keys of its own chunk of c positions of its document.

Any other mask whose rows each see one or two intervals, in the same order (bidirectional image
blocks, prefix-LM, shared prompts): key_bounds, the caller's [lo(g), hi(g)) per token, or two of them
(KeyBounds), replaces the rule; then row_bounds and visible_keys give four rows, two per interval
(docs/design.md, "Two intervals per row").

A dense sequence is one document, cu_seqlens = [0, S]. Equivalently, and this is the one form the
code uses: query g sees the keys of one global interval [lo(g), hi(g)) (row_bounds). Every block of
tokens the kernels see lists its tokens in increasing g, padding (g >= S) last, so the keys one
query sees in a block are one interval of the block's rows, and the intervals never move backwards
from one query row to the next: visible_keys() gives those intervals, half-open [begin, end) in
int64, the form the kernels take (MaskKind::kRows in csrc/common/params.h). The placement
(ring_ext/placement.py), the float64 reference (ring_ext/testing/reference.py, through mask_matrix)
and the planner all count or draw the mask from row_bounds or pairs_before; tests/test_packed.py
holds both to the per-pair definition above, written out independently there.
"""

from __future__ import annotations

import torch


def check_cu_seqlens(cu_seqlens, total: int | None = None) -> tuple[int, ...]:
    """cu_seqlens as a tuple of ints after checking it: 1-D integers, 0 first, non-decreasing, and
    last == total (the packed length S) when total is given."""
    if isinstance(cu_seqlens, torch.Tensor):
        check_cu_seqlens_tensor(cu_seqlens)
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
        raise ValueError(
            f"cu_seqlens must end with the packed sequence length {total} (the total of the tokens "
            f"every rank's shards hold together), got {values[-1]}"
        )
    return values


def check_cu_seqlens_tensor(cu_seqlens: torch.Tensor) -> None:
    """What can be checked of a cu_seqlens tensor without reading its values (torch.compile never
    reads them: ring_ext/masked.py checks those inside the op): 1-D integers."""
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise ValueError(
            f"cu_seqlens must be a 1-D integer tensor [n_docs + 1], got {cu_seqlens.dtype} "
            f"of shape {tuple(cu_seqlens.shape)}"
        )


def check_window(sliding_window) -> int | None:
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window must be an int >= 1 or None, got {sliding_window!r}")
    return sliding_window


def check_chunk(attention_chunk_size) -> int | None:
    if attention_chunk_size is None:
        return None
    c = attention_chunk_size
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ValueError(f"attention_chunk_size must be an int >= 1 or None, got {c!r}")
    return c


class KeyBounds:
    """key_bounds, the caller's mask: query g of the sequence sees the keys [lo0[g], hi0[g]) (global
    indices) and, when it has four rows, also [lo1[g], hi1[g]), after the first (docs/design.md,
    "Two intervals per row"). Every row non-decreasing in g, so that every block's rows see monotone
    intervals (the kernels' rule, Note [Mask rule] in csrc/common/mask.h). Built from an int64
    [2, S] or [4, S] tensor on the host; hashable by value, so the placement's caches key on it."""

    def __init__(self, bounds: torch.Tensor):
        self.rows = bounds.to("cpu", torch.int64).contiguous()  # [2 * intervals, S]
        # A value hash that is the same in every process (the cross-rank signature compares it; not
        # hash(), which Python salts per process), in torch ops: no numpy, O(S) and vectorised.
        weight = torch.arange(1, self.rows.numel() + 1, dtype=torch.int64) * 0x9E3779B1  # wraps
        self._hash = int((self.rows.flatten() * weight).sum() ^ len(self.rows)) & (2**63 - 1)

    @property
    def intervals(self) -> int:
        """Key intervals per token: 1 or 2."""
        return len(self.rows) // 2

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, KeyBounds) and torch.equal(self.rows, other.rows)

    def __repr__(self) -> str:  # part of the cross-rank signature
        return f"KeyBounds({self._hash})"


def check_key_bounds(bounds: torch.Tensor, total: int) -> KeyBounds:
    """key_bounds' values (read inside the op, as cu_seqlens'): int64-like [2, S] or [4, S] with S the
    whole sequence, every value in [0, S], every row non-decreasing along the tokens, and a token's
    two intervals disjoint, the first before the second (or one of them empty)."""
    if bounds.dim() != 2 or bounds.shape[0] not in (2, 4) or bounds.shape[1] != total:
        raise ValueError(
            f"key_bounds must be [2, {total}] (lo and hi of every token) or [4, {total}] (two intervals "
            f"per token), got {tuple(bounds.shape)}"
        )
    b = bounds.to("cpu", torch.int64)
    if b.numel() and (b.min() < 0 or b.max() > total):
        raise ValueError(f"key_bounds must lie in [0, {total}]")
    if total > 1 and (b[:, 1:] < b[:, :-1]).any():
        raise ValueError(
            "key_bounds' rows must each be non-decreasing along the tokens (every row sees its intervals "
            "in order: the kernels skip blocks by it); an empty interval is [x, x) with an x that keeps "
            "its row in order (masks.shared_prefix builds such bounds)"
        )
    if len(b) == 4 and not ((b[1] <= b[2]) | (b[2] >= b[3]) | (b[0] >= b[1])).all():
        raise ValueError(
            "key_bounds' two intervals of a token must not overlap: the first must end where the second "
            "begins or before (key_bounds[1] <= key_bounds[2]), or one of them be empty"
        )
    return KeyBounds(b)


def check_key_bounds_tensor(bounds) -> None:
    """What can be checked of key_bounds without reading its values (torch.compile never reads them)."""
    if not isinstance(bounds, torch.Tensor):
        raise TypeError(
            f"key_bounds must be a torch.Tensor [2, S] or [4, S], or None, got {type(bounds).__name__}"
        )
    if (
        bounds.dim() != 2
        or bounds.shape[0] not in (2, 4)
        or bounds.dtype.is_floating_point
        or bounds.dtype == torch.bool
    ):
        raise ValueError(
            f"key_bounds must be an integer tensor [2, S] or [4, S], got {bounds.dtype} {tuple(bounds.shape)}"
        )


def bidirectional_blocks(cu_seqlens, blocks, causal: bool = True) -> torch.Tensor:
    """key_bounds (int64 [2, S]) of causal (or general) attention over the documents of cu_seqlens in
    which the tokens of each block [start, end) (global indices, inside one document) also see each
    other: Gemma 3's image tokens, a PaliGemma-style prefix. A block's rows see up to its end, rows
    after it see it as usual, so every row still sees one interval, in order."""
    cu = check_cu_seqlens(cu_seqlens)
    lo, hi = row_bounds(torch.arange(cu[-1]), cu, causal)
    for start, end in blocks:
        if not 0 <= start <= end <= cu[-1]:
            raise ValueError(f"blocks must lie in [0, {cu[-1]}], got [{start}, {end})")
        hi[start:end] = torch.maximum(hi[start:end], torch.tensor(end))
    return torch.stack([lo, hi])


def shared_prefix(groups) -> tuple[list[int], torch.Tensor]:
    """(cu_seqlens, key_bounds [4, S]) of a packed row of (prompt, answers) groups: groups is a list
    of (prompt_len, [answer_len, ...]); each group is one document of cu_seqlens, its prompt followed
    by its answers. The prompt is causal; every answer token sees the whole prompt and its own
    answer causally, never another answer (GRPO-style rollouts, best-of-n fine-tuning: the prompt
    is packed once, not once per answer). A prompt token's second interval is the empty [p, p) at its
    prompt's end p, which keeps every row of the bounds in order and lets the kernels skip the prompt's
    tiles in that interval's pass. O(S)."""
    cu, lo0, hi0, lo1, hi1 = [0], [], [], [], []
    for prompt_len, answer_lens in groups:
        prompt_len, answer_lens = int(prompt_len), [int(a) for a in answer_lens]
        if prompt_len < 0 or any(a < 0 for a in answer_lens):
            raise ValueError(f"prompt and answer lengths must be >= 0, got {prompt_len}, {answer_lens}")
        p0 = cu[-1]
        p1 = p0 + prompt_len
        g = torch.arange(p0, p1)
        lo0.append(torch.full_like(g, p0))
        hi0.append(g + 1)
        lo1.append(torch.full_like(g, p1))
        hi1.append(torch.full_like(g, p1))
        start = p1
        for length in answer_lens:
            g = torch.arange(start, start + length)
            lo0.append(torch.full_like(g, p0))
            hi0.append(torch.full_like(g, p1))
            lo1.append(torch.full_like(g, start))
            hi1.append(g + 1)
            start += length
        cu.append(start)
    rows = [torch.cat(x) if x else torch.zeros(0, dtype=torch.int64) for x in (lo0, hi0, lo1, hi1)]
    return cu, torch.stack(rows)


def row_bounds(
    index: torch.Tensor,
    cu_seqlens: tuple[int, ...],
    causal: bool,
    window: int | None = None,
    chunk: int | None = None,
    bounds: KeyBounds | None = None,
) -> torch.Tensor:
    """int64 [2, len(index)] (lo, hi): query g sees the global keys [lo, hi); [4, len(index)] with
    bounds of two intervals per token (lo0, hi0, lo1, hi1). Padding (g >= S) sees nothing: every
    bound is S. bounds (the caller's key_bounds) replaces every other part of the rule."""
    cu = torch.tensor(cu_seqlens, dtype=torch.int64)
    total, n_docs = cu_seqlens[-1], len(cu_seqlens) - 1
    real = index < total
    if bounds is not None:
        safe = index.clamp(max=max(total - 1, 0))
        return torch.where(real, bounds.rows[:, safe], total)
    doc = (torch.searchsorted(cu, index, right=True) - 1).clamp(0, n_docs - 1)
    lo = cu[doc]
    hi = index + 1 if causal else cu[doc + 1]
    if window is not None:
        lo = torch.maximum(lo, index - window + 1)
        if not causal:
            hi = torch.minimum(hi, index + window)
    if chunk is not None:  # the chunk of the query's position inside its document
        start = cu[doc] + (index - cu[doc]) // chunk * chunk
        lo = torch.maximum(lo, start)
        hi = torch.minimum(hi, start + chunk)
    return torch.where(real, torch.stack([lo, hi]), total)


def visible_keys(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    cu_seqlens: tuple[int, ...],
    causal: bool,
    window: int | None = None,
    chunk: int | None = None,
    bounds: KeyBounds | None = None,
) -> torch.Tensor:
    """int64 [2, len(q_index)]: query row i sees key rows [begin_i, end_i) of k_index ([4, ...]: and
    [begin2_i, end2_i), with bounds of two intervals per token).

    q_index and k_index are the global token indices of a query and a key block, each increasing,
    padding (>= S) last. A padding query sees nothing."""
    return torch.searchsorted(k_index, row_bounds(q_index, cu_seqlens, causal, window, chunk, bounds))


def mask_matrix(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    cu_seqlens: tuple[int, ...],
    causal: bool,
    window=None,
    chunk=None,
    bounds: KeyBounds | None = None,
) -> torch.Tensor:
    """[len(q_index), len(k_index)] bool, True where a query sees a key: the mask written out from
    row_bounds (for the float64 reference; O(s^2))."""
    ends = row_bounds(torch.as_tensor(q_index), cu_seqlens, causal, window, chunk, bounds)
    k = torch.as_tensor(k_index)[None, :]
    seen = torch.zeros(len(ends[0]), k.shape[1], dtype=torch.bool)
    for lo, hi in ends.view(len(ends) // 2, 2, ends.shape[-1]):
        seen |= (k >= lo[:, None]) & (k < hi[:, None])
    return seen


def visible_pairs(index: torch.Tensor, cu_seqlens: tuple[int, ...], causal: bool, window=None, chunk=None,
                  bounds: KeyBounds | None = None) -> torch.Tensor:  # fmt: skip
    """int64 [len(index)]: how many keys each query sees (the sum of its intervals' lengths)."""
    ends = row_bounds(index, cu_seqlens, causal, window, chunk, bounds)
    ends = ends.view(len(ends) // 2, 2, len(index))
    return (ends[:, 1] - ends[:, 0]).clamp(min=0).sum(0)


def pairs_before(x: int, length: int, causal: bool, window: int | None) -> int:
    """Visible (query, key) pairs of the queries at positions [0, x) of a document of `length`
    tokens: the sum of hi - lo of row_bounds over them, in closed form (the placement's balance and
    the planner count work with it)."""
    w = length if window is None else min(window, length)
    if causal:  # position p sees min(p + 1, w) keys
        return x * (x + 1) // 2 if x <= w else w * (w + 1) // 2 + (x - w) * w
    # position p sees keys [max(p - w + 1, 0), min(p + w, length))
    t = max(0, min(length - w, x))
    upper = t * (t - 1) // 2 + t * w + (x - t) * length
    lower = (x - w) * (x - w + 1) // 2 if x >= w else 0
    return upper - lower
