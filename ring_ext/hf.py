"""ring_ext.hf: what a Hugging Face training script uses, under one name.

    ring_ext.hf.register()                               the attention implementation "ring_ext"
    ring_ext.hf.shard_packed_batch, packed_loss, reported_loss    packed rows under CP
    ring_ext.hf.generate(model, input_ids, ctx, max_new_tokens=N)  generation over a sharded KV cache

The transformers adapter lives in ring_ext/integrations/hf.py (Note [Nothing silently wrong]), the
training-loop helpers, which need no transformers, in ring_ext/training.py. This module only re-exports
them: users and the README know these names as ring_ext.hf.*, and one import keeps serving a
transformers script while each implementation has its own home.
"""

from __future__ import annotations

from .integrations.hf import NAME, register, ring_ext_attention_forward
from .integrations.hf_generate import generate
from .training import packed_loss, reported_loss, shard_packed_batch

__all__ = [
    "NAME",
    "generate",
    "packed_loss",
    "register",
    "reported_loss",
    "ring_ext_attention_forward",
    "shard_packed_batch",
]
