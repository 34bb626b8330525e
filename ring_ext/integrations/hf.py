"""Hugging Face transformers integration: ring_ext as an attention implementation (users import it
as ring_ext.hf, which also holds the training helpers of ring_ext/training.py).

    import ring_ext.hf
    ring_ext.hf.register()                               # once per process
    model.set_attn_implementation("ring_ext")            # or config._attn_implementation = "ring_ext"
    logits = model(ids_local, position_ids=pos_local, cp_context=ctx).logits

With `cp_context` (a ring_ext.CPContext) each rank feeds its shard of the sequence — input ids,
position ids (so RoPE sees global positions) and labels, all cut by ring_ext.shard along the sequence
dim — and attention runs context-parallel with the context's algorithm. Without it this is plain
single-process attention. The causal/full choice comes from the model (`is_causal`, else
module.is_causal), the scale from `scaling`.

Note [Nothing silently wrong]
ring_ext computes causal or full attention over the whole (global) sequence, optionally restricted to
packed documents and a sliding window (docs/design.md, Mask model). Every other pattern transformers
asks for raises ValueError naming the setting, so a model is either right or refused:

    attention argument / mask           honoured                             otherwise
    sliding_window, sliding mask        as ring_ext's sliding_window (a      -
      (config.sliding_window)             query sees itself and w-1 keys
                                          before it), with and without CP
    chunked mask (attention_chunk_size) as ring_ext's attention_chunk_size,  ValueError in packed rows
                                          dense rows, with and without CP      (transformers chunks the
                                                                               row, ring_ext each document)
    dropout                             0 (eval, or attention_dropout=0)     ValueError
    attention_mask                      None / 2-D all ones                  ValueError (padding, 4-D)
    position_ids                        one plain sequence per row, or one   ValueError (jumps, packed
                                          packed row (batch 1) whose           rows with CP but without
                                          positions restart at 0 per           cu_seqlens, unsharded
                                          document; with CP exactly the        positions)
                                          shard of those positions
    cu_seqlens (ring_ext's name), or    the packing of the whole row          ValueError if q and k
      cu_seq_lens_q == cu_seq_lens_k                                          packings differ
      (DataCollatorWithFlattening)
    mask overlays (or/and functions,    one process: as ring_ext's           ValueError with CP, and
      token-type / image blocks)          key_bounds, read off the evaluated   for a row that does not
                                          mask (Gemma 3's image tokens)        see one interval
    softcap (attn_logit_softcapping)    as ring_ext's softcap (Gemma 2)       -
    s_aux (learned sinks)               as ring_ext's sinks (gpt-oss)         -
    value head dim != query head dim    as given (MLA: DeepSeek-V2/V3, ...)   -
    position_bias, head_mask, output_attentions, any unknown argument       ValueError when not None/False
    keys longer than queries (KV cache decoding)                             ValueError

Packed rows with CP: shard input_ids, position_ids and labels with ring_ext.hf.shard_packed_batch
(which also shifts the labels inside each document first) and pass cu_seqlens=batch["cu_seqlens"] to
the model with cp_context; the loss helpers are in ring_ext/training.py.

The mask builder registered with the attention function sees the mask transformers wants but not the
CP context, so anything but a plain causal/full mask goes to the attention function as a _MaskCheck,
judged there once per forward: the window and chunk against the global length, the positions against
the shard, and the mask itself, evaluated and compared with the attention ring_ext will compute on those
positions. Under CP a zigzag shard looks like two packed documents to transformers; the check compares
only pairs inside one contiguous run of positions and relies on the position check for the rest.
Data-dependent checks (positions, mask evaluation, packing derived from positions) are skipped while
torch.compile traces: pass cu_seqlens explicitly to compile packed rows.
"""

from __future__ import annotations

import torch

from .. import masks
from ..attention import attention
from ..sharding import shard
from ..training import cu_seqlens_from_positions

NAME = "ring_ext"

# Arguments that cannot change the attention result (position_ids and the packing are checked
# separately; max_length_* only size flash-attention's varlen launch).
_HARMLESS = frozenset(
    {
        "position_ids",
        "use_cache",
        "output_hidden_states",
        "output_router_logits",
        "max_length_q",
        "max_length_k",
    }
)
_UNSUPPORTED = {
    "position_bias": "an additive position bias",
    "head_mask": "a head mask",
    "output_attentions": "returning attention weights",
}
_OTHER_IMPLEMENTATION = "use another attn_implementation (e.g. 'eager') for this model"
WINDOW_SETTING = "config.sliding_window"


def ring_ext_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    cp_context=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [b, h, s, d], key [b, h_kv, s, d], value
    [b, h_kv, s, d_v]; returns ([b, s, h, d_v], None). Raises ValueError on whatever it cannot honour
    (Note above)."""
    seq = query.shape[2]
    if key.shape[2] != seq:
        raise ValueError(
            f"ring_ext attention needs as many keys as queries, got {key.shape[2]} keys for {seq} queries "
            f"(decoding with a KV cache); {_OTHER_IMPLEMENTATION} to generate"
        )
    cu = _packing(
        kwargs.pop("cu_seqlens", None), kwargs.pop("cu_seq_lens_q", None), kwargs.pop("cu_seq_lens_k", None)
    )
    softcap, sinks = kwargs.pop("softcap", None), kwargs.pop("s_aux", None)
    _check_arguments(kwargs)
    if dropout:
        raise ValueError(
            f"ring_ext attention has no attention dropout, got dropout={dropout} "
            "(set config.attention_dropout=0.0 or call model.eval())"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    positions = kwargs.get("position_ids")
    if cu is None and cp_context is None:
        cu = cu_seqlens_from_positions(positions, seq)
    total = cu[-1] if cu is not None else seq * (cp_context.cp_size if cp_context is not None else 1)
    window, chunk, bounds = sliding_window, None, None
    if isinstance(attention_mask, _MaskCheck):
        window, chunk, bounds = attention_mask.check(
            causal, positions, seq, cp_context, query.device, cu, window
        )
        if bounds is not None:  # the mask's own key intervals hold everything
            window = chunk = None
    elif attention_mask is not None:
        raise ValueError(
            "ring_ext attention supports causal or full masks only, not an attention_mask tensor "
            f"of shape {tuple(attention_mask.shape)}: pass no attention_mask (or an all-ones one)"
        )
    elif cp_context is not None:
        _check_positions(positions, seq, cp_context, cu)
    if window is not None and window >= total:
        window = None  # the window covers the whole sequence: plain attention
    out = attention(
        query,
        key,
        value,
        cp_context,
        layout="bnsd",
        causal=causal,
        softmax_scale=scaling,
        cu_seqlens=cu,
        sliding_window=window,
        softcap=softcap,
        sinks=sinks,
        attention_chunk_size=chunk,
        key_bounds=bounds,
    )
    return out.transpose(1, 2), None  # [b, h, s, d] -> [b, s, h, d]


def _packing(cu_seqlens, cu_q, cu_k) -> tuple[int, ...] | None:
    """The packing of the whole row: ring_ext's cu_seqlens, or flash-attention's varlen arguments
    (queries and keys packed alike)."""
    if cu_seqlens is not None:
        return masks.check_cu_seqlens(cu_seqlens)
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or cu_k is None or not torch.equal(cu_q.cpu(), cu_k.cpu()):
        raise ValueError(
            "ring_ext attention needs cu_seq_lens_q == cu_seq_lens_k (queries and keys packed alike), "
            f"got {cu_q} and {cu_k}"
        )
    return masks.check_cu_seqlens(cu_q)


def _check_arguments(kwargs: dict) -> None:
    for name, value in kwargs.items():
        if name in _HARMLESS or value is None or value is False:
            continue
        what = _UNSUPPORTED.get(name, f"the attention argument {name!r}")
        shown = f"tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        raise ValueError(
            f"ring_ext attention does not support {what}: got {name}={shown}; {_OTHER_IMPLEMENTATION}"
        )


def _check_chunk(setting: str, chunk: int, total: int, cu) -> int | None:
    """The chunk to compute with: None when it holds the whole sequence (a no-op). transformers chunks a
    packed row by its token index across documents, ring_ext each document from its start: packed rows
    with a chunk that splits them raise."""
    if total <= chunk:
        return None
    if cu is not None and len(cu) > 2:
        raise ValueError(
            f"{setting} splits a packed row into chunks of the row's token index (across documents), and "
            "ring_ext chunks each document from its start: pass one document per row, or "
            f"{_OTHER_IMPLEMENTATION}"
        )
    return chunk


def _expected_positions(seq: int, ctx, device, cu=None) -> torch.Tensor:
    """[seq] positions of this rank's tokens: within their document, in the whole sequence."""
    if cu is not None:
        index = torch.arange(cu[-1])
        starts = torch.tensor(cu)[torch.searchsorted(torch.tensor(cu), index, right=True) - 1]
        within = (index - starts).to(device)
        return within if ctx is None else shard(within, ctx, seq_dim=0, cu_seqlens=cu)
    if ctx is None:
        return torch.arange(seq, device=device)
    return shard(torch.arange(seq * ctx.cp_size, device=device), ctx, seq_dim=0)


def _check_positions(positions: torch.Tensor | None, seq: int, ctx, cu=None) -> None:
    """Without CP: one plain sequence per row (any start) or the packed row of cu. With CP: exactly this
    rank's shard of the positions of 0..S-1 (restarting per document of cu)."""
    if positions is None or torch.compiler.is_compiling():
        return
    offset = positions - _expected_positions(seq, ctx, positions.device, cu)  # [b or 1, seq]
    if ctx is None and cu is None and not (offset == offset[..., :1]).all():
        raise ValueError(
            "position_ids restart or jump inside a row (packed documents): pass cu_seqlens (or one "
            f"sequence per row), or {_OTHER_IMPLEMENTATION}"
        )
    if (ctx is not None or cu is not None) and (offset != 0).any():
        what = "its documents' positions (restarting at 0 per document of cu_seqlens)" if cu else "0..S-1"
        raise ValueError(
            f"with cp_context, position_ids must be this rank's shard of {what}: ring_ext.shard(positions, "
            "ctx, seq_dim=1[, cu_seqlens=cu]) of the whole row (for packed rows with CP pass cu_seqlens; "
            "ring_ext.hf.shard_packed_batch does both)"
        )


class _MaskCheck:
    """A mask transformers built that may not be plain causal/full: judged by the attention function,
    which knows the CP context (Note [Nothing silently wrong])."""

    def __init__(self, mask_function, local_size, setting, batch_size, q_offset, kv_offset, use_vmap=False):
        self.mask_function, self.local_size, self.setting = mask_function, local_size, setting
        self.batch_size, self.q_offset, self.kv_offset = batch_size, q_offset, kv_offset
        self.use_vmap = use_vmap  # the mask has or/and overlays (transformers evaluates them by vmap)
        self.passed = {}  # (causal, window, chunk) -> key_bounds or None: once per forward, not per layer

    def check(self, causal: bool, positions, seq: int, ctx, device, cu, window):
        """Checks the mask once per forward; returns (the sliding window, the attention chunk, key
        bounds) to compute with: the attention argument's window, or the mask's own when only the mask
        has one; key bounds (int64 [2, seq] or [4, seq]) when the mask is none of ring_ext's rules but
        each of its rows sees one or two intervals of keys (in one process only: image blocks, shared
        prompts and other overlays)."""
        total = cu[-1] if cu is not None else seq * (ctx.cp_size if ctx else 1)
        chunk = None
        if self.local_size is not None and self.setting != WINDOW_SETTING:
            chunk = _check_chunk(f"{self.setting}={self.local_size}", self.local_size, total, cu)
        elif self.local_size is not None:
            if window is not None and window != self.local_size:
                raise ValueError(
                    f"the sliding-window mask ({self.setting}={self.local_size}) and the attention's "
                    f"sliding_window={window} disagree"
                )
            window = self.local_size
        key = (causal, window, chunk)
        if key in self.passed:
            return window, chunk, self.passed[key]
        bounds = None
        if not torch.compiler.is_compiling():
            _check_positions(positions, seq, ctx, cu)
            if positions is None:
                positions = _expected_positions(seq, ctx, device, cu)
            # Under CP transformers evaluates a chunked mask on the shard's own token indices, which
            # are not the row's: only the one-process mask can be compared (the positions are checked
            # above either way; padding raised when the mask was built).
            if (chunk is None or ctx is None) and not self._is_plain(
                causal, positions.expand(self.batch_size, seq), window, chunk
            ):
                if ctx is not None:
                    raise ValueError(
                        "the model asks for an attention mask that is not plain "
                        f"{'causal' if causal else 'full'} attention (e.g. token-type or image blocks, or a "
                        "custom mask function); ring_ext attention computes such a mask in one process only "
                        f"(as key_bounds), not with context parallelism: {_OTHER_IMPLEMENTATION}"
                    )
                bounds = self._key_bounds(seq, device)
        self.passed[key] = bounds
        return window, chunk, bounds

    def _blocks(self, batch: int, seq: int, device):
        """The mask as transformers evaluates it, in query blocks: (q0, bool [b, q1 - q0, seq])."""
        from transformers.masking_utils import sdpa_mask

        step = max(1, 2**24 // (batch * seq))
        for q0 in range(0, seq, step):
            q1 = min(q0 + step, seq)
            yield (
                q0,
                sdpa_mask(
                    batch_size=batch,
                    q_length=q1 - q0,
                    kv_length=seq,
                    q_offset=self.q_offset + q0,
                    kv_offset=self.kv_offset,
                    mask_function=self.mask_function,
                    allow_is_causal_skip=False,
                    use_vmap=self.use_vmap,
                    device=device,
                )[:, 0],
            )

    def _key_bounds(self, seq: int, device) -> torch.Tensor:
        """int64 [2, seq] (or [4, seq]): each row's visible keys as one interval [lo, hi) (or two, as
        a shared prompt's answers see the prompt and themselves), read off the mask; raises ValueError
        when a row's keys are more than two intervals or the batch rows' masks differ (key_bounds
        holds one mask for the batch), or when its two-interval rows cannot be put in order."""
        parts = []
        keys = torch.arange(seq, device=device)
        for _, mask in self._blocks(self.batch_size, seq, device):
            if not bool((mask == mask[:1]).all()):
                raise ValueError(
                    "the model's attention mask differs between the rows of the batch (e.g. images at "
                    f"other positions); ring_ext computes one such mask per call: use batch 1, or {_OTHER_IMPLEMENTATION}"
                )
            row = mask[0]  # [rows, seq]
            after_false = torch.nn.functional.pad(row, (1, 0))[:, :-1].logical_not()
            before_false = torch.nn.functional.pad(row, (0, 1))[:, 1:].logical_not()
            starts = torch.where(row & after_false, keys, seq)  # a run of visible keys begins here
            ends = torch.where(row & before_false, keys + 1, seq)  # ... and ends before here
            runs = (starts < seq).sum(-1)
            if bool((runs > 2).any()):
                raise ValueError(
                    "the model's attention mask has a row whose keys are more than two intervals; "
                    f"ring_ext computes up to two per row: {_OTHER_IMPLEMENTATION}"
                )
            k = min(2, seq)
            first_two = starts.topk(k, -1, largest=False).values, ends.topk(k, -1, largest=False).values
            parts.append(
                torch.stack(
                    [runs, first_two[0][:, 0], first_two[1][:, 0], first_two[0][:, -1], first_two[1][:, -1]]
                )
            )
        runs, start0, end0, start1, end1 = torch.cat(parts, 1).to("cpu", torch.int64)
        # A row of one run [a, b) is split at c into [a, c) + [c, b) so that every row stays in order:
        # c is the least first-interval end of the two-run rows after it (a shared prompt's end), or b.
        forced = torch.where(runs == 2, end0, seq)
        after = forced.flip(0).cummin(0).values.flip(0)
        cut = torch.minimum(end0, after).maximum(start0)
        one = runs == 1
        lo0 = torch.where(runs > 0, start0, 0)
        hi0 = torch.where(one, cut, torch.where(runs > 0, end0, 0))
        lo1 = torch.where(one, cut, torch.where(runs == 2, start1, hi0))
        hi1 = torch.where(one, end0, torch.where(runs == 2, end1, hi0))
        bounds = torch.stack([lo0, hi0, lo1, hi1])
        if bool((lo1 == hi1).all()):
            return bounds[:2].contiguous()
        if seq > 1 and bool((bounds[:, 1:] < bounds[:, :-1]).any()):
            raise ValueError(
                "the model's attention mask has rows of two key intervals that ring_ext cannot put in "
                "order (every row's intervals must move forward along the rows, as a shared prompt's "
                f"answers do): {_OTHER_IMPLEMENTATION}"
            )
        return bounds

    def _is_plain(self, causal: bool, pos: torch.Tensor, window: int | None, chunk: int | None) -> bool:
        """Evaluates the mask in query blocks; compares it with causal/full attention (within `window`, a
        chunk) on the positions `pos` [b, s], on pairs inside one contiguous run of positions (a CP shard
        and a packed row hold several runs)."""
        batch, seq = pos.shape
        run = (torch.diff(pos, dim=-1, prepend=pos[:, :1] - 1) != 1).cumsum(-1)  # [b, s] run index
        for q0, mask in self._blocks(batch, seq, pos.device):  # [b, q1 - q0, s]
            q1 = q0 + mask.shape[1]
            diff = pos[:, q0:q1, None] - pos[:, None, :]
            want = diff >= 0 if causal else torch.ones_like(mask)
            if window is not None:
                want = want & (diff.abs() < window)
            if chunk is not None:
                want = want & (pos[:, q0:q1, None] // chunk == pos[:, None, :] // chunk)
            same_run = run[:, q0:q1, None] == run[:, None, :]
            if ((mask != want) & same_run).any():
                return False
        return True


def _mask(
    *,
    batch_size,
    mask_function,
    q_offset=0,
    kv_offset=0,
    attention_mask=None,
    allow_is_causal_skip=True,
    allow_is_bidirectional_skip=False,
    local_size=None,
    use_vmap=False,
    config=None,
    **kwargs,
):
    """transformers' mask-builder interface: None for a plain causal/full mask (the kernels apply it),
    a _MaskCheck for anything else (mask overlays included: judged when the attention runs), ValueError
    for padding."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "ring_ext attention does not support padding: the 2-D attention_mask has zeros; pack or "
            f"trim the batch to equal lengths, or {_OTHER_IMPLEMENTATION}"
        )
    if local_size is None and not use_vmap and (allow_is_causal_skip or allow_is_bidirectional_skip):
        return None
    window = getattr(config, "sliding_window", None)
    setting = WINDOW_SETTING if window == local_size else "config.attention_chunk_size"
    # use_vmap: transformers sets it exactly when the model adds or_mask/and_mask functions (Gemma 3's
    # image blocks, bidirectional overlays); judged, and in one process read off as key intervals, by
    # the attention function
    return _MaskCheck(mask_function, local_size, setting, batch_size, q_offset, kv_offset, use_vmap)


def register(name: str = NAME) -> str:
    """Registers the attention function and its mask builder under `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, ring_ext_attention_forward)
    AttentionMaskInterface.register(name, _mask)
    return name
