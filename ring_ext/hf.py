"""Hugging Face transformers integration: ring_ext as an attention implementation.

    import ring_ext.hf
    ring_ext.hf.register()                               # once per process
    model.set_attn_implementation("ring_ext")            # or config._attn_implementation = "ring_ext"
    logits = model(ids_local, position_ids=pos_local, cp_context=ctx).logits

With `cp_context` (a ring_ext.CPContext) each rank feeds its shard of the sequence — input ids,
position ids (so RoPE sees global positions) and labels, all cut by ring_ext.shard along the sequence
dim — and attention runs context-parallel with the context's algorithm. Without it this is plain
single-process attention. The causal/full choice comes from the model (module.is_causal). Padding
masks and attention dropout are not supported: a padded batch raises instead of being silently wrong.
"""

from __future__ import annotations

import torch

from .attention import attention

NAME = "ring_ext"


def ring_ext_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    cp_context=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [b, h, s, d], key/value [b, h_kv, s, d];
    returns ([b, s, h, d], None)."""
    if attention_mask is not None:
        raise ValueError(
            "ring_ext attention supports causal or full masks only, not an attention_mask tensor"
        )
    if dropout:
        raise ValueError(f"ring_ext attention has no attention dropout, got dropout={dropout}")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = attention(query, key, value, cp_context, layout="bnsd", causal=causal, softmax_scale=scaling)
    return out.transpose(1, 2), None  # [b, h, s, d] -> [b, s, h, d]


def _no_mask(*args, **kwargs):
    # The kernels apply the causal mask themselves; any padding mask would be rejected above.
    return None


def register(name: str = NAME) -> str:
    """Registers the attention function (and a mask builder that makes no mask) under `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, ring_ext_attention_forward)
    AttentionMaskInterface.register(name, _no_mask)
    return name
