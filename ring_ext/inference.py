"""Long-context inference under context parallelism: a prefill that keeps every rank's shard of each
layer's K/V, exact decoding over that sharded cache, and chunked prefill (docs/design.md, Inference).

    cache = ShardedKVCache(ctx, num_layers, seq_len=S)               # or cu_seqlens=cu (packed prompts)
    out_l = cache.prefill(layer, q_l, k_l, v_l)                      # shards in the context's placement
    step = cache.step(1)                                             # one new token per document
    out = cache.attend(layer, q, k, v, step)                         # q, k, v: the step's tokens, every rank
    step = cache.step(4096, mode="auto")                             # a chunk: each rank its step.local share
    out_l = cache.attend(layer, q_l, k_l, v_l, step)

Note [Sharded cache]
Every rank keeps the K/V rows of the tokens it holds, never anyone else's. Prefill leaves each rank the
tokens the context's placement gave it (ring_ext/placement.py: zigzag, contiguous or packed); each new
token goes to the rank that holds the fewest tokens so far (ties: the lowest rank), decided from counts
every rank keeps alike, so no rank asks another. Dense shards are equal after prefill, so new tokens go
round-robin; packed shards that differ by a few are evened out first. The rule balances memory and, since
a decode step reads every held key once, the per-rank decode work too.

A layer's rows live in two buffers, K [batch, capacity, heads_kv, head_dim] and V [..., head_dim_v]
(multi-head latent attention gives v a head dim of its own), in document slots: document d's rows are
rows [start_d, start_d + fill_d) in increasing position, then the slot's free rows. `keys`
(int64 [capacity]) gives each row its sort key: d * BIG + pos + 1 for a live row, d * BIG for a row a
window no longer reaches (dead), d * BIG + BIG - 1 for a free row. The keys are increasing, so the rows
a query of document d at position p sees (its document, positions [p - w + 1, p]) are one interval
[searchsorted(d * BIG + lo + 1), searchsorted(d * BIG + p + 2)), and the intervals of queries sorted by
(document, position) never move backwards: exactly the kernels' per-row key intervals (docs/design.md,
Mask model). Free rows are zeros and never visible. A slot that fills up re-lays the buffer out with
twice its live rows; a windowed layer marks rows its window can no longer reach as dead after every
step and re-lays out (dropping them) once they outnumber the live ones.

Note [Merging partials across ranks]
A query's keys are spread over the ranks, so each rank computes its partial (float32 out, lse) over its
own rows with torch.ops.ring_ext.fwd and the partials merge by LSE, exactly (docs/design.md, Math):
  - decode (every rank holds the step's queries): ONE all-gather of (out, lse) per layer, then every
    rank folds the partials in rank order with torch.ops.ring_ext.merge_ (the -inf-safe merge), so every
    rank gets bit-identical outputs. One collective is what a decode step's latency wants: its bytes are
    cp x tokens x heads x (head_dim_v + 1) floats, tiny.
  - pass-Q (a chunk, queries sharded): every rank gathers the chunk's queries, computes them all against
    its rows, and the partials are reduced by an all-reduce of the row maxima and one of the rescaled
    sums (bandwidth-optimal for many rows), after which each rank keeps its own rows.
  - pass-KV (a chunk, queries sharded): every rank gathers every rank's live K/V rows of the layer and
    merges the partials of its own queries (the bytes of a ring pass of the cache; see chunk_mode).
Every per-rank fwd gets the layer's softcap (it acts on each score, so on each partial alike) and no
sinks (Note [Sinks: once per row]).

Note [Sinks: once per row]
A sink adds exp(sink_h) once to each row's softmax denominator. Passed to every rank's fwd it would be
added once per partial, cp times per row in every mode, and a rank that holds none of a row's keys
would return (0, lse = sink) instead of the empty partial (0, -inf). So the partials are computed
without sinks, merged by LSE exactly as without them, and the sink is folded in once into the merged
float32 (out, lse), before rounding to q's dtype:
    lse' = logaddexp(lse, sink_h),   out' = out * exp(lse - lse')
(fold_sinks; a row that saw no key stays 0, as the kernels leave it). This is the kernels' own last
step (Note [Softcap and sinks] in csrc/common/params.h) applied after the merge instead of inside.

Note [Pass-Q or pass-KV]
A chunk of n new tokens (a new turn, or a long prompt fed in pieces) against c cached ones: pass-KV
moves the cache's and chunk's K/V, pass-Q the chunk's queries and the partial results. Per rank,
received bytes (P = cp - 1 over cp, e = the K/V element size, d the q/k head dim, dv v's (MLA: its
own); what this module's collectives move):

    pass-KV   P * (c + n) * h_kv * (d + dv) * e
    pass-Q    P * n * h_q * d * e  +  2 P * n * h_q * (dv + 2) * 4   (queries; max and sums, float32)

chunk_mode picks the smaller. With bf16, dv = d and h_q / h_kv = 8 pass-Q wins below n / (c + n) ~
2.4%; Meta's paper (arXiv 2411.01783) returns partial outputs in bf16 by all-to-all, which lowers its
threshold's pass-Q side to about n * h_q * d * e and gives the rule n / (c + n) < 2 h_kv / h_q; we keep
partials in float32 (Math: rounding partials before the merge is the error that grows with the ranks).
"""

from __future__ import annotations

import dataclasses

import torch

from . import masks, placement, validation
from .attention import resolve_scale

BIG = 1 << 40  # one document's key range in a layer's sort keys (Note [Sharded cache])
MODES = ("decode", "pass_q", "pass_kv", "auto")


def chunk_mode(
    new: int,
    cached: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    elem: int,
    head_dim_v: int | None = None,
) -> str:
    """'pass_q' or 'pass_kv', whichever receives fewer bytes per rank (Note [Pass-Q or pass-KV]).
    head_dim is q's and k's, head_dim_v v's and the output's (MLA; default head_dim)."""
    dv = head_dim if head_dim_v is None else head_dim_v
    pass_kv = (cached + new) * heads_kv * (head_dim + dv) * elem
    pass_q = new * heads_q * head_dim * elem + 2 * new * heads_q * (dv + 2) * 4
    return "pass_q" if pass_q < pass_kv else "pass_kv"


def merge_partials(out: torch.Tensor, lse: torch.Tensor, group_name: str, cp_size: int):
    """The exact merge of every rank's partial (out float32 [b, n, h, d], lse [b, h, n]) of the same
    queries: one all-gather, then the partials folded in rank order (Note [Merging partials across
    ranks]). Returns float32 (out, lse), identical on every rank. Traceable."""
    b, n, h, d = out.shape
    flat = torch.cat([out.reshape(-1), lse.reshape(-1)])  # one buffer: one collective
    parts = torch.ops.ring_ext.all_gather(flat, group_name)
    size = b * n * h * d
    acc_out = parts[0][:size].reshape(b, n, h, d).clone()
    acc_lse = parts[0][size:].reshape(b, h, n).clone()
    for part in parts[1:cp_size]:
        torch.ops.ring_ext.merge_(
            acc_out, acc_lse, part[:size].reshape(b, n, h, d), part[size:].reshape(b, h, n)
        )
    return acc_out, acc_lse


def fold_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """The sinks folded into merged float32 (out [b, n, h, dv], lse [b, h, n]) once per row: lse' =
    logaddexp(lse, sink_h), out * exp(lse - lse') (Note [Sinks: once per row]). Returns the new out
    (float32); a row that saw no key stays 0. Traceable."""
    if sinks is None:
        return out
    sink = sinks.float()[None, :, None]  # [1, h, 1]
    total = torch.logaddexp(lse, sink)
    weight = torch.where(torch.isinf(total), torch.zeros_like(lse), torch.exp(lse - total))  # [b, h, n]
    return out * weight.transpose(1, 2)[..., None]


def decode_attention(
    q, k, v, visible, scale: float, group_name: str, cp_size: int, softcap: float = 0.0, sinks=None
) -> torch.Tensor:
    """One decode step's attention over a sharded cache: this rank's partial over its rows k ([b, rows,
    h_kv, d]) and v ([b, rows, h_kv, dv]) with key intervals `visible` (int64 [2, n]), merged over the
    group, the sinks ([h_q] or None) folded in once; [b, n, h_q, dv] in q's dtype. The same q on
    every rank. Traceable (tests/test_inference_dist.py compiles it)."""
    out, lse = torch.ops.ring_ext.fwd(q, k, v, scale, False, 0, 0, True, visible, softcap)  # no sinks here
    out, lse = merge_partials(out, lse, group_name, cp_size)
    return fold_sinks(out, lse, sinks).to(q.dtype)


@dataclasses.dataclass(frozen=True)
class Step:
    """The tokens one step adds, sorted by (document, position), the same on every rank."""

    mode: str  # "decode" (every rank holds every token), "pass_q" or "pass_kv" (each rank its share)
    docs: torch.Tensor  # int64 [n]: each token's document
    positions: torch.Tensor  # int64 [n]: its position in the document (RoPE's position id)
    owners: torch.Tensor  # int64 [n]: the rank that caches its K/V
    rank: int
    index: int  # the cache's step counter when it was made

    @property
    def local(self) -> torch.Tensor:
        """The indices (into the step's tokens) of the tokens this rank caches; in a chunk step, also
        the tokens whose queries it holds."""
        return (self.owners == self.rank).nonzero().flatten()

    def __len__(self) -> int:
        return len(self.docs)


class _Layer:
    """One layer's rows on this rank (Note [Sharded cache])."""

    def __init__(self, k, v, docs, positions, n_docs, window, reserve):
        self.window = window
        self.n_docs = n_docs
        counts = torch.bincount(docs, minlength=n_docs).tolist()
        self.caps = [c + reserve for c in counts]
        self.fill = [0] * n_docs
        self._allocate(k.shape[3], v.shape[3], k.shape[0], k.shape[2], k.dtype, k.device)
        rows = self._slot_rows(docs)
        self.k.index_copy_(1, rows.to(k.device), k)
        self.v.index_copy_(1, rows.to(k.device), v)
        self.keys[rows] = docs * BIG + positions + 1

    def _allocate(self, head_dim, head_dim_v, b, h, dtype, device):
        self.start = [0]
        for c in self.caps[:-1]:
            self.start.append(self.start[-1] + c)
        total = sum(self.caps)
        self.k = torch.zeros(b, total, h, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(b, total, h, head_dim_v, dtype=dtype, device=device)  # MLA: dv != d
        doc_of_row = torch.repeat_interleave(torch.arange(self.n_docs), torch.tensor(self.caps))
        self.keys = doc_of_row * BIG + (BIG - 1)

    def _slot_rows(self, docs: torch.Tensor) -> torch.Tensor:
        """Rows for appending `docs` (sorted) at the end of their slots, advancing fill."""
        rows = torch.empty(len(docs), dtype=torch.int64)
        for d, n in enumerate(torch.bincount(docs, minlength=self.n_docs).tolist()):
            if n:
                at = (docs == d).nonzero().flatten()
                rows[at] = torch.arange(self.start[d] + self.fill[d], self.start[d] + self.fill[d] + n)
                self.fill[d] += n
        return rows

    def live(self) -> torch.Tensor:
        """Row indices of the live rows, in key order."""
        key_pos = self.keys % BIG
        return ((key_pos > 0) & (key_pos < BIG - 1)).nonzero().flatten()

    def append(self, k, v, docs, positions) -> None:
        need = torch.bincount(docs, minlength=self.n_docs).tolist()
        if any(f + n > c for f, n, c in zip(self.fill, need, self.caps)):
            live = torch.bincount(self.keys[self.live()] // BIG, minlength=self.n_docs).tolist()
            self._relayout([max(2 * (a + n), 16) for a, n in zip(live, need)])
        rows = self._slot_rows(docs)
        dev = self.k.device
        self.k.index_copy_(1, rows.to(dev), k)
        self.v.index_copy_(1, rows.to(dev), v)
        self.keys[rows] = docs * BIG + positions + 1

    def drop(self, lengths: list[int]) -> None:
        """Windowed layers: rows no later query can see are dead; re-lay out once they outnumber the live."""
        if self.window is None:
            return
        doc, pos = self.keys // BIG, self.keys % BIG - 1
        first_seen = torch.tensor(lengths)[doc.clamp(max=self.n_docs - 1)] - self.window + 1
        dead = (pos >= 0) & (pos < BIG - 2) & (pos < first_seen)
        self.keys[dead] = doc[dead] * BIG
        n_dead, n_live = int(((self.keys % BIG) == 0).sum()), len(self.live())
        if n_dead > max(n_live, 16):
            live = torch.bincount(self.keys[self.live()] // BIG, minlength=self.n_docs).tolist()
            self._relayout([a + max(a // 2, 8) for a in live])

    def _relayout(self, caps: list[int]) -> None:
        rows = self.live()
        keys, k, v = self.keys[rows], self.k[:, rows.to(self.k.device)], self.v[:, rows.to(self.k.device)]
        self.caps, self.fill = caps, [0] * self.n_docs
        self._allocate(k.shape[3], v.shape[3], k.shape[0], k.shape[2], k.dtype, k.device)
        docs = keys // BIG
        new_rows = self._slot_rows(docs)
        self.k.index_copy_(1, new_rows.to(k.device), k)
        self.v.index_copy_(1, new_rows.to(k.device), v)
        self.keys[new_rows] = keys

    def visible(self, docs: torch.Tensor, positions: torch.Tensor, window: int | None, keys=None):
        """int64 [2, n]: the rows (of this layer's buffer, or of `keys`' rows) each query sees."""
        keys = self.keys if keys is None else keys
        lo = positions - window + 1 if window is not None else torch.zeros_like(positions)
        lo = lo.clamp(min=0)
        base = docs * BIG + 1
        return torch.stack(
            [torch.searchsorted(keys, base + lo), torch.searchsorted(keys, base + positions + 1)]
        )

    def nbytes(self, live_only: bool = False) -> int:
        rows = len(self.live()) if live_only else self.k.shape[1]
        per_row = (self.k[:, :1].nelement() + self.v[:, :1].nelement()) * self.k.element_size()
        return rows * per_row + (0 if live_only else self.keys.nelement() * 8)


class ShardedKVCache:
    """One rank's share of every layer's K/V for one prompt (a dense sequence, a batch of equal-length
    sequences, or a packed row of documents) and what the steps after it add (Note [Sharded cache]).

    seq_len: the prompt's length S (dense: divisible as the context's placement needs); or cu_seqlens
    (packed documents, batch 1, any lengths; `[0, S]` is one document of any length). reserve: rows per
    document slot allocated ahead for appends (decoding without re-layouts). Every rank builds it with
    the same arguments; nothing here communicates but attend() (one collective per call, or two)."""

    def __init__(
        self, ctx, num_layers: int, *, seq_len: int | None = None, cu_seqlens=None, reserve: int = 0
    ):
        if ctx is None or not hasattr(ctx, "group"):
            raise ValueError("ctx must be a ring_ext.CPContext (ring_ext.initialize)")
        if not ctx.causal:
            raise ValueError(
                "a KV cache needs causal attention: the context has --attention-mask-type general, "
                "where every token would also see the tokens generated after it"
            )
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
            raise ValueError(f"reserve must be an int >= 0, got {reserve!r}")
        if (seq_len is None) == (cu_seqlens is None):
            raise ValueError("give exactly one of seq_len (a dense prompt) and cu_seqlens (packed documents)")
        self.ctx, self.num_layers, self.reserve = ctx, num_layers, reserve
        self.cu = None if cu_seqlens is None else masks.check_cu_seqlens(cu_seqlens)
        if self.cu is None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        total = self.cu[-1] if self.cu is not None else seq_len
        cu = self.cu if self.cu is not None else (0, total)
        s = placement.scheme(ctx)
        tokens = placement.rank_tokens(s, total, self.cu, " (seq_len)")  # raises if S does not split
        self.n_docs = len(cu) - 1
        self.lengths = [b - a for a, b in zip(cu, cu[1:])]
        cu_t = torch.tensor(cu)
        self._prompt = []  # per rank: (docs, positions) of its prompt tokens
        for t in tokens:
            g = t[: placement.real_length(t, total)]
            d = torch.searchsorted(cu_t, g, right=True) - 1
            self._prompt.append((d, g - cu_t[d]))
        self.held = [len(d) for d, _ in self._prompt]  # tokens assigned to each rank so far
        self.layers: list[_Layer | None] = [None] * num_layers
        self.steps = 0
        self._step: Step | None = None

    # ---- prefill ---------------------------------------------------------------------------------

    @property
    def local_prompt_len(self) -> int:
        return len(self._prompt[self.ctx.rank][0])

    def prompt_tokens(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(documents, positions), int64 [local_len] each: the prompt tokens `rank` (default: this rank)
        holds, in its shard's order."""
        return self._prompt[self.ctx.rank if rank is None else rank]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None = None) -> None:
        """Keeps this rank's prompt rows k ([b, local_len, h_kv, d]) and v ([b, local_len, h_kv, dv]; dv
        may differ from d: MLA), what ring_ext.shard gave it, as the model's attention layer computed
        them, as `layer`'s cache."""
        self._check_layer(layer)
        window = masks.check_window(sliding_window)
        if self.layers[layer] is not None:
            raise ValueError(f"layer {layer} already holds its prompt: build a new cache for a new prompt")
        n = self.local_prompt_len
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or t.shape[1] != n:
                raise ValueError(
                    f"{name} must be [batch, {n}, heads_kv, head_dim] (this rank's prompt shard), "
                    f"got {tuple(t.shape)}"
                )
        if v.shape[::2] != k.shape[::2] or v.dtype != k.dtype or v.device != k.device:
            raise ValueError(
                f"v must be [{k.shape[0]}, {n}, {k.shape[2]}, head_dim_v] in {k.dtype} on {k.device} like "
                f"k, got {tuple(v.shape)} {v.dtype} on {v.device}"
            )
        if self.cu is not None and k.shape[0] != 1:
            raise ValueError(f"cu_seqlens packs documents into one row: batch must be 1, got {k.shape[0]}")
        docs, positions = self._prompt[self.ctx.rank]
        entry = _Layer(k.detach(), v.detach(), docs, positions, self.n_docs, window, self.reserve)
        entry.drop(self.lengths)
        self.layers[layer] = entry

    def prefill(
        self, layer, q, k, v, *, softmax_scale=None, sliding_window=None, softcap=None, sinks=None
    ) -> torch.Tensor:
        """CP attention of the prompt shards ([b, local_len, h, d], v's last dim dv; bshd) with the
        context's algorithm (softcap, sinks: as ring_ext.attention's), keeping k, v as `layer`'s cache;
        returns this rank's output shard [b, local_len, h_q, dv]."""
        from .attention import attention

        self.store(layer, k, v, sliding_window)
        packing = {} if self.cu is None else {"cu_seqlens": torch.tensor(self.cu)}
        return attention(
            q,
            k,
            v,
            self.ctx,
            layout="bshd",
            softmax_scale=softmax_scale,
            sliding_window=sliding_window,
            softcap=softcap,
            sinks=sinks,
            **packing,
        )

    # ---- steps -----------------------------------------------------------------------------------

    def step(self, new_tokens, mode: str = "decode") -> Step:
        """Starts a step that adds new_tokens (an int: that many to every document; or one count per
        document) and assigns each to a rank (Note [Sharded cache]). mode: "decode" (every rank computes
        every new token's q/k/v and gets every output), "pass_q"/"pass_kv" (each rank computes and gets
        its step.local tokens; Note [Pass-Q or pass-KV]) or "auto" (chunk_mode's choice at attend)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if any(entry is None for entry in self.layers):
            missing = [i for i, e in enumerate(self.layers) if e is None]
            raise ValueError(f"layers {missing[:8]} hold no prompt yet: prefill every layer before a step")
        counts = [new_tokens] * self.n_docs if isinstance(new_tokens, int) else list(new_tokens)
        if len(counts) != self.n_docs or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts
        ):
            raise ValueError(
                f"new_tokens must be an int >= 0 or {self.n_docs} such ints (one per document), got {new_tokens!r}"
            )
        docs = torch.repeat_interleave(torch.arange(self.n_docs), torch.tensor(counts))
        positions = torch.cat(
            [torch.arange(self.lengths[d], self.lengths[d] + c) for d, c in enumerate(counts)]
        )
        owners = []
        for _ in range(len(docs)):
            r = min(range(self.ctx.cp_size), key=lambda i: (self.held[i], i))
            self.held[r] += 1
            owners.append(r)
        self.lengths = [n + c for n, c in zip(self.lengths, counts)]
        self.steps += 1
        self._step = Step(
            mode, docs, positions.long(), torch.tensor(owners, dtype=torch.int64), self.ctx.rank, self.steps
        )
        return self._step

    def attend(
        self, layer, q, k, v, step: Step, *, softmax_scale=None, sliding_window=None, softcap=None, sinks=None
    ) -> torch.Tensor:
        """Attention of the step's new tokens over every cached token (of every rank) and the step's own
        (causal, within their documents, `sliding_window`), after appending this rank's new K/V rows to
        `layer`. Tensors [b, n, h, d] (bshd; v's last dim dv may differ: MLA): decode n = len(step),
        every rank the same; a chunk n = len(step.local), this rank's share. softcap, sinks ([h_q]): as
        ring_ext.attention's, the sink counted once per row (Note [Sinks: once per row]). Returns the
        output rows of q [b, n, h_q, dv], in q's dtype."""
        entry = self._check_attend(layer, q, k, v, step)
        window = masks.check_window(sliding_window)
        cap = validation.check_softcap(softcap)
        validation.check_sinks(sinks, q.shape[2], q.device)
        scale = resolve_scale(softmax_scale, q.shape[-1])
        mine = step.local
        rows = mine if step.mode == "decode" else torch.arange(len(mine))
        entry.append(k[:, rows.to(k.device)], v[:, rows.to(k.device)], step.docs[mine], step.positions[mine])
        mode = step.mode
        if mode == "auto":
            cached = sum(self.lengths) - len(step)
            mode = chunk_mode(
                len(step), cached, q.shape[2], k.shape[2], q.shape[3], k.element_size(), v.shape[3]
            )
        if mode == "decode":
            visible = entry.visible(step.docs, step.positions, window).to(q.device)
            group, cp = self.ctx.group.group_name, self.ctx.cp_size
            out = decode_attention(q, entry.k, entry.v, visible, scale, group, cp, cap, sinks)
        elif mode == "pass_q":
            out = self._pass_q(entry, q, step, window, scale, cap, sinks)
        else:
            out = self._pass_kv(entry, q, step, window, scale, cap, sinks)
        entry.drop(self.lengths)
        return out

    def _pass_q(self, entry, q, step, window, scale, softcap, sinks):
        """Every rank gathers the chunk's queries and computes them over its rows; the partials are
        reduced by max and sums; each rank keeps its own rows (Note [Merging partials across ranks])."""
        group, cp = self.ctx.group.group_name, self.ctx.cp_size
        longest = int(torch.bincount(step.owners, minlength=cp).max())
        pad = q.new_zeros(q.shape[0], longest - q.shape[1], *q.shape[2:])
        parts = torch.ops.ring_ext.all_gather(torch.cat([q, pad], 1).contiguous(), group)
        order = torch.cat([(step.owners == r).nonzero().flatten() for r in range(cp)])  # gathered -> token
        gathered = torch.cat([p[:, : int((step.owners == r).sum())] for r, p in enumerate(parts)], 1)
        q_all = torch.empty_like(gathered).index_copy_(
            1, order.to(q.device), gathered
        )  # [b, n, hq, d], sorted
        visible = entry.visible(step.docs, step.positions, window).to(q.device)
        out, lse = torch.ops.ring_ext.fwd(q_all, entry.k, entry.v, scale, False, 0, 0, True, visible, softcap)
        top = lse.clone()
        torch.ops.ring_ext.all_reduce_([top], group, "max")
        top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # rows no rank sees: weights 0
        weight = torch.exp(lse - top)  # [b, h, n]
        num = out * weight.transpose(1, 2)[..., None]
        torch.ops.ring_ext.all_reduce_([num, weight], group, "sum")
        merged = num / weight.transpose(1, 2)[..., None].clamp_min(torch.finfo(torch.float32).tiny)
        mine = step.local.to(q.device)
        lse = top[..., mine] + torch.log(weight[..., mine])  # the merged lse; -inf where no rank saw a key
        return fold_sinks(merged[:, mine], lse, sinks).to(q.dtype)

    def _pass_kv(self, entry, q, step, window, scale, softcap, sinks):
        """Every rank gathers every rank's live rows of the layer (keys included) and merges the
        partials of its own queries in rank order."""
        group, cp = self.ctx.group.group_name, self.ctx.cp_size
        live = entry.live()
        n_live = torch.ops.ring_ext.all_gather(torch.tensor([len(live)], device=q.device), group)
        longest = max(int(n) for n in n_live)
        k, v = entry.k[:, live.to(q.device)], entry.v[:, live.to(q.device)]
        pad = longest - len(live)
        k, v = (torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], 1) for t in (k, v))
        keys = torch.cat([entry.keys[live], torch.full((pad,), (self.n_docs + 1) * BIG)]).to(q.device)
        ks, vs, keyss = (
            torch.ops.ring_ext.all_gather(t.contiguous(), group) for t in (k, v, keys)
        )  # NCCL: on q's device
        mine = step.local
        out = lse = None
        for r in range(cp):
            visible = entry.visible(step.docs[mine], step.positions[mine], window, keyss[r].cpu()).to(
                q.device
            )
            part_out, part_lse = torch.ops.ring_ext.fwd(
                q, ks[r], vs[r], scale, False, 0, 0, True, visible, softcap
            )
            if out is None:
                out, lse = part_out, part_lse.contiguous()
            else:
                torch.ops.ring_ext.merge_(out, lse, part_out, part_lse)
        return fold_sinks(out, lse, sinks).to(q.dtype)

    # ---- checks and sizes ------------------------------------------------------------------------

    def _check_layer(self, layer) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def _check_attend(self, layer, q, k, v, step) -> _Layer:
        self._check_layer(layer)
        entry = self.layers[layer]
        if not isinstance(step, Step) or step is not self._step:
            raise ValueError("step must be the Step that this cache's latest step() returned")
        n = len(step) if step.mode == "decode" else len(step.local)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != n:
                what = "the step's tokens" if step.mode == "decode" else "this rank's share, len(step.local)"
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be [batch, {n}, heads, head_dim] ({what}), got {got}")
        if k.dtype != entry.k.dtype or v.dtype != entry.k.dtype or q.dtype != entry.k.dtype:
            raise ValueError(
                f"q, k and v must be {entry.k.dtype} like the cache, got {q.dtype}, {k.dtype}, {v.dtype}"
            )
        for name, t, cached in (("k", k, entry.k), ("v", v, entry.v)):
            if tuple(t.shape[::2]) != tuple(cached.shape[::2]) or t.shape[3] != cached.shape[3]:
                b, _, h, d = cached.shape
                raise ValueError(f"{name} must be [{b}, n, {h}, {d}] like the cache, got {tuple(t.shape)}")
        if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
            raise ValueError(
                f"q must be [{k.shape[0]}, n, a multiple of {k.shape[2]} heads, {k.shape[3]}], got {tuple(q.shape)}"
            )
        if q.device != entry.k.device or k.device != entry.k.device or v.device != entry.k.device:
            raise ValueError(f"q, k and v must be on the cache's device {entry.k.device}")
        return entry

    def nbytes(self, live_only: bool = False) -> int:
        """Bytes this rank's cache holds: K/V buffers and sort keys (live_only: K/V of live rows only)."""
        return sum(entry.nbytes(live_only) for entry in self.layers if entry is not None)
