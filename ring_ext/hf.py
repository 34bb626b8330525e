"""Hugging Face transformers integration: ring_ext as an attention implementation.

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
ring_ext computes plain causal or full attention over the whole (global) sequence. Every other pattern
transformers asks for raises ValueError naming the setting, so a model is either right or refused:

    attention argument / mask           honoured when                        otherwise
    sliding_window, sliding/chunked     window >= whole sequence (local      ValueError (no window yet)
      mask (config.sliding_window,        length x cp_size): a no-op
      attention_chunk_size)
    dropout                             0 (eval, or attention_dropout=0)     ValueError
    attention_mask                      None / 2-D all ones                  ValueError (padding, 4-D)
    position_ids                        one plain sequence per row; with     ValueError (packed documents,
                                          CP exactly shard(arange(S))          unsharded positions)
    mask overlays (or/and functions,    never                                ValueError
      token-type / image blocks)
    softcap, s_aux (sinks), cu_seq_lens_*, max_length_*, position_bias,     ValueError when not None/False
      head_mask, output_attentions, any unknown argument
    keys longer than queries (KV cache decoding)                             ValueError

The mask builder registered with the attention function sees the mask transformers wants but not the
CP context, so anything but a plain causal/full mask goes to the attention function as a _MaskCheck,
judged there once per forward: the window against the global length, the positions against the shard,
and the mask itself, evaluated and compared with causal/full attention on those positions. Under CP a
zigzag shard looks like two packed documents to transformers; the check compares only pairs inside one
contiguous run of positions and relies on the position check for the rest. Data-dependent checks
(positions, mask evaluation) are skipped while torch.compile traces.
"""

from __future__ import annotations

import torch

from .attention import attention
from .sharding import shard

NAME = "ring_ext"

# Arguments that cannot change the attention result (position_ids is checked separately).
_HARMLESS = frozenset({"position_ids", "use_cache", "output_hidden_states", "output_router_logits"})
_UNSUPPORTED = {
    "softcap": "attention logit soft-capping (config.attn_logit_softcapping)",
    "s_aux": "attention sinks (gpt-oss)",
    "position_bias": "an additive position bias",
    "head_mask": "a head mask",
    "output_attentions": "returning attention weights",
    **dict.fromkeys(
        ["cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"],
        "packed sequences (flash-attention varlen arguments, e.g. from DataCollatorWithFlattening)",
    ),
}
_OTHER_IMPLEMENTATION = "use another attn_implementation (e.g. 'eager') for this model"


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
    """transformers' attention-function signature: query [b, h, s, d], key/value [b, h_kv, s, d];
    returns ([b, s, h, d], None). Raises ValueError on whatever it cannot honour (Note above)."""
    seq = query.shape[2]
    if key.shape[2] != seq:
        raise ValueError(
            f"ring_ext attention needs as many keys as queries, got {key.shape[2]} keys for {seq} queries "
            f"(decoding with a KV cache); {_OTHER_IMPLEMENTATION} to generate"
        )
    _check_arguments(kwargs)
    if dropout:
        raise ValueError(
            f"ring_ext attention has no attention dropout, got dropout={dropout} "
            "(set config.attention_dropout=0.0 or call model.eval())"
        )
    total = seq * (cp_context.cp_size if cp_context is not None else 1)  # the whole sequence
    if sliding_window is not None:
        _check_window(f"config.sliding_window={sliding_window}", sliding_window, total)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    positions = kwargs.get("position_ids")
    if isinstance(attention_mask, _MaskCheck):
        attention_mask.check(causal, positions, seq, cp_context, query.device)
    elif attention_mask is not None:
        raise ValueError(
            "ring_ext attention supports causal or full masks only, not an attention_mask tensor "
            f"of shape {tuple(attention_mask.shape)}: pass no attention_mask (or an all-ones one)"
        )
    elif cp_context is not None:
        _check_positions(positions, seq, cp_context)
    out = attention(query, key, value, cp_context, layout="bnsd", causal=causal, softmax_scale=scaling)
    return out.transpose(1, 2), None  # [b, h, s, d] -> [b, s, h, d]


def _check_arguments(kwargs: dict) -> None:
    for name, value in kwargs.items():
        if name in _HARMLESS or value is None or value is False:
            continue
        what = _UNSUPPORTED.get(name, f"the attention argument {name!r}")
        shown = f"tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        raise ValueError(
            f"ring_ext attention does not support {what}: got {name}={shown}; {_OTHER_IMPLEMENTATION}"
        )


def _check_window(setting: str, window: int, total: int) -> None:
    """A window (or chunk) of at least the whole sequence changes nothing; any smaller one raises."""
    if total > window:
        raise ValueError(
            f"ring_ext attention has no sliding-window or chunked attention yet, and {setting} restricts "
            f"attention over this {total}-token sequence (local length x cp_size). Set it to None "
            "(Qwen2: use_sliding_window=False; models with config.layer_types: every layer "
            f"'full_attention'), use a model without windowed layers, or {_OTHER_IMPLEMENTATION}"
        )


def _expected_positions(seq: int, ctx, device) -> torch.Tensor:
    """[seq] positions of this rank's tokens in the whole sequence."""
    if ctx is None:
        return torch.arange(seq, device=device)
    return shard(torch.arange(seq * ctx.cp_size, device=device), ctx, seq_dim=0)


def _check_positions(positions: torch.Tensor | None, seq: int, ctx) -> None:
    """Without CP: one plain sequence per row (any start). With CP: exactly this rank's shard of 0..S-1."""
    if positions is None or torch.compiler.is_compiling():
        return
    offset = positions - _expected_positions(seq, ctx, positions.device)  # [b or 1, seq]
    if ctx is None and not (offset == offset[..., :1]).all():
        raise ValueError(
            "position_ids restart or jump inside a row (packed documents): ring_ext attention would attend "
            f"across documents; pass one sequence per row or {_OTHER_IMPLEMENTATION}"
        )
    if ctx is not None and (offset != 0).any():
        raise ValueError(
            "with cp_context, position_ids must be ring_ext.shard(torch.arange(S)[None], ctx, seq_dim=1) for the "
            "whole sequence length S (packed documents and other positions are not supported)"
        )


class _MaskCheck:
    """A mask transformers built that may not be plain causal/full: judged by the attention function,
    which knows the CP context (Note [Nothing silently wrong])."""

    def __init__(self, mask_function, local_size, setting, batch_size, q_offset, kv_offset):
        self.mask_function, self.local_size, self.setting = mask_function, local_size, setting
        self.batch_size, self.q_offset, self.kv_offset = batch_size, q_offset, kv_offset
        self.passed = set()  # causal flags already checked: once per forward, not once per layer

    def check(self, causal: bool, positions: torch.Tensor | None, seq: int, ctx, device) -> None:
        if causal in self.passed:
            return
        if self.local_size is not None:
            _check_window(
                f"{self.setting}={self.local_size}", self.local_size, seq * (ctx.cp_size if ctx else 1)
            )
        if not torch.compiler.is_compiling():
            _check_positions(positions, seq, ctx)
            if positions is None:
                positions = _expected_positions(seq, ctx, device)
            self._check_mask(causal, positions.expand(self.batch_size, seq))
        self.passed.add(causal)

    def _check_mask(self, causal: bool, pos: torch.Tensor) -> None:
        """Evaluates the mask in query blocks; compares it with causal/full attention on the positions `pos`
        [b, s], on pairs inside one contiguous run of positions (a CP shard holds several runs)."""
        from transformers.masking_utils import sdpa_mask

        batch, seq = pos.shape
        run = (torch.diff(pos, dim=-1, prepend=pos[:, :1] - 1) != 1).cumsum(-1)  # [b, s] run index
        step = max(1, 2**24 // (batch * seq))
        for q0 in range(0, seq, step):
            q1 = min(q0 + step, seq)
            mask = sdpa_mask(
                batch_size=batch,
                q_length=q1 - q0,
                kv_length=seq,
                q_offset=self.q_offset + q0,
                kv_offset=self.kv_offset,
                mask_function=self.mask_function,
                allow_is_causal_skip=False,
                device=pos.device,
            )[:, 0]  # [b, q1 - q0, s]
            want = pos[:, q0:q1, None] >= pos[:, None, :] if causal else torch.ones_like(mask)
            same_run = run[:, q0:q1, None] == run[:, None, :]
            if ((mask != want) & same_run).any():
                raise ValueError(
                    "the model asks for an attention mask that is not plain "
                    f"{'causal' if causal else 'full'} attention (e.g. token-type or image blocks, or a "
                    f"custom mask function); ring_ext attention computes only that: {_OTHER_IMPLEMENTATION}"
                )


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
    a _MaskCheck for anything else, ValueError for padding and custom mask overlays."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "ring_ext attention does not support padding: the 2-D attention_mask has zeros; pack or "
            f"trim the batch to equal lengths, or {_OTHER_IMPLEMENTATION}"
        )
    if use_vmap:  # transformers sets it exactly when the model adds or_mask/and_mask functions
        raise ValueError(
            "the model adds a custom mask overlay (or_mask_function/and_mask_function, e.g. token-type or "
            f"image-token masks); ring_ext attention computes only plain causal/full attention: {_OTHER_IMPLEMENTATION}"
        )
    if local_size is None and (allow_is_causal_skip or allow_is_bidirectional_skip):
        return None
    window = getattr(config, "sliding_window", None)
    setting = "config.sliding_window" if window == local_size else "config.attention_chunk_size"
    return _MaskCheck(mask_function, local_size, setting, batch_size, q_offset, kv_offset)


def register(name: str = NAME) -> str:
    """Registers the attention function and its mask builder under `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, ring_ext_attention_forward)
    AttentionMaskInterface.register(name, _mask)
    return name
