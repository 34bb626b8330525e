"""ring_ext.hf.generate: a Hugging Face causal LM generating under context parallelism, over a sharded
KV cache (ring_ext/inference.py; docs/design.md, Inference).

    tokens = ring_ext.hf.generate(model, input_ids, ctx, max_new_tokens=64)                  # greedy
    tokens = ring_ext.hf.generate(model, input_ids, ctx, max_new_tokens=64, do_sample=True, top_p=0.9)

Every rank calls it with the whole prompt (input_ids [batch, S], any S, no padding) and gets what
model.generate returns: the prompt followed by the new tokens, the same tensor on every rank. The batch's
rows become the documents of one packed row; each rank runs the model on its shard of that row (the
context's packed placement: no rank holds or computes the whole prompt), keeps its K/V rows as the cache,
and every decode step runs the model on the batch's new tokens on every rank, appending their K/V to one
rank each and merging the ranks' partial attention by LSE (one all-gather per layer).

Note [Why not model.generate]
transformers' generate would take a Cache subclass (Cache.update receives the attention layer's kwargs,
so a ring_ext cache could route K/V to their owner), but it cannot be made to run a sharded prompt:
generate feeds each rank's input_ids as one sequence, derives positions (cache_position) from the local
length, reads the next token from the local shard's last logits (the prompt's last token lives on one
rank) and samples on each rank alone. Reusing it would mean every rank running the whole prompt through
every layer (the memory and time context parallelism exists to split) or patching its private steps.
So this loop is our own and short: it replaces generate's prefill and decode calls and keeps its
sampling: the logits processors are transformers' own public classes, built from the model's
generation_config updated with the keyword arguments, in generate's order, and EOS/padding follow
generate's rules. Greedy output equals model.generate without CP token for token
(tests/test_inference.py, tests/test_inference_dist.py).
"""

from __future__ import annotations

import copy
import inspect
import time

import torch

from .. import collectives
from ..inference import ShardedKVCache
from ..sharding import shard
from .hf import _check_arguments, _mask, ring_ext_attention_forward

NAME = "ring_ext_generate"

# generation_config settings this loop honours; every other one must keep its neutral value.
_NEUTRAL = {
    "num_beams": (1, None),
    "num_return_sequences": (1, None),
    "min_length": (0, None),
    "min_new_tokens": (0, None),
    "no_repeat_ngram_size": (0, None),
    "encoder_no_repeat_ngram_size": (0, None),
    "encoder_repetition_penalty": (1.0, None),
    "bad_words_ids": (None,),
    "force_words_ids": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "typical_p": (1.0, None),
    "epsilon_cutoff": (0.0, None),
    "eta_cutoff": (0.0, None),
    "top_h": (None,),
    "guidance_scale": (None, 1.0),
    "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (False, None),
    "remove_invalid_values": (False, None),
    "penalty_alpha": (None,),
    "watermarking_config": (None,),
    "constraints": (None,),
    "prompt_lookup_num_tokens": (None,),
    "assistant_model": (None,),
}


def cached_attention_forward(
    module, query, key, value, attention_mask, cp_cache=None, cp_step=None, **kwargs
):
    """The attention function of NAME: ring_ext's (ring_ext/integrations/hf.py) while the prompt runs,
    which also leaves each rank's K/V rows in cp_cache; the sharded-cache decode (ring_ext/inference.py)
    in a step (cp_step), with the layer's softcap and sinks (s_aux) as in the prompt. query [b, h, n, d],
    key [b, h_kv, n, d], value [b, h_kv, n, d_v] (MLA: d_v != d); returns ([b, n, h, d_v], None)."""
    if cp_cache is None:
        return ring_ext_attention_forward(module, query, key, value, attention_mask, **kwargs)
    window = kwargs.get("sliding_window")
    if cp_step is None:  # the prompt
        cp_cache.store(module.layer_idx, key.transpose(1, 2), value.transpose(1, 2), window)
        packing = torch.tensor(cp_cache.cu)
        return ring_ext_attention_forward(
            module, query, key, value, attention_mask, cp_context=cp_cache.ctx, cu_seqlens=packing, **kwargs
        )
    rest = dict(kwargs)
    scaling = rest.pop("scaling", None)
    for name, neutral in (("sliding_window", None), ("is_causal", True), ("dropout", 0.0)):
        value_ = rest.pop(name, neutral)
        if name != "sliding_window" and value_ not in (neutral, None):
            raise ValueError(f"decoding over a sharded cache needs {name}={neutral}, got {value_!r}")
    softcap, sinks = rest.pop("softcap", None), rest.pop("s_aux", None)
    _check_arguments(rest)
    out = cp_cache.attend(
        module.layer_idx,
        query.transpose(1, 2),  # [b, n, h, d] views
        key.transpose(1, 2),
        value.transpose(1, 2),
        cp_step,
        softmax_scale=scaling,
        sliding_window=window,
        softcap=softcap,
        sinks=sinks,
    )
    return out, None


def register(name: str = NAME) -> str:
    """Registers cached_attention_forward (and ring_ext's mask builder) under `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, cached_attention_forward)
    AttentionMaskInterface.register(name, _mask)
    return name


def _generation_config(model, prompt_len: int, max_new_tokens, sampling: dict):
    """The model's generation_config updated with `sampling`, checked: what this loop cannot honour
    raises ValueError naming the setting."""
    config = copy.deepcopy(model.generation_config)
    unused = config.update(**sampling)
    if unused:
        raise ValueError(f"ring_ext.hf.generate does not know the arguments {sorted(unused)}")
    for name, neutral in _NEUTRAL.items():
        if getattr(config, name, None) not in neutral:
            raise ValueError(
                f"ring_ext.hf.generate samples one token per step with temperature, top_k, top_p, min_p and "
                f"repetition_penalty only; got {name}={getattr(config, name)!r}: use the model's own generate"
            )
    if max_new_tokens is None:
        max_new_tokens = config.max_new_tokens or config.max_length - prompt_len
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    return config, max_new_tokens


def _processors(config):
    """transformers' own logits processors for `config`, in generate's order."""
    from transformers.generation import logits_process as lp

    out = lp.LogitsProcessorList()
    if config.repetition_penalty not in (None, 1.0):
        out.append(lp.RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.do_sample:
        if config.temperature not in (None, 1.0):
            out.append(lp.TemperatureLogitsWarper(config.temperature))
        if config.top_k not in (None, 0):
            out.append(lp.TopKLogitsWarper(top_k=config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            out.append(lp.TopPLogitsWarper(top_p=config.top_p))
        if config.min_p is not None:
            out.append(lp.MinPLogitsWarper(min_p=config.min_p))
    return out


def _check_inputs(model, input_ids, ctx, attention_mask) -> None:
    if not hasattr(ctx, "group"):
        raise ValueError(f"ctx must be a ring_ext.CPContext (ring_ext.initialize), got {type(ctx).__name__}")
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.dtype.is_floating_point
        or input_ids.numel() == 0
    ):
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty integer tensor [batch, seq], got {got}")
    if attention_mask is not None and (
        attention_mask.shape != input_ids.shape or not bool(attention_mask.all())
    ):
        raise ValueError(
            "ring_ext.hf.generate takes prompts of equal length without padding: attention_mask must be "
            "None or all ones of input_ids' shape"
        )
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("ring_ext.hf.generate runs decoder-only causal LMs, got an encoder-decoder model")


def generate(
    model,
    input_ids: torch.Tensor,
    ctx,
    *,
    max_new_tokens: int | None = None,
    attention_mask=None,
    stats: dict | None = None,
    **sampling,
):
    """What model.generate(input_ids, max_new_tokens=..., **sampling) returns ([batch, S + new], the
    prompt then the new tokens), computed with context parallelism over ctx; call it on every rank with
    the same arguments; every rank returns the same tensor. Sampling draws from the global RNG as
    generate does: seed every rank alike (rank 0's draw is taken). Note [Why not model.generate].
    stats (a dict, optional) receives this rank's prefill_s, decode_s, steps (decode forwards),
    cache_bytes and cache_live_bytes (ShardedKVCache.nbytes right after the prefill)."""
    _check_inputs(model, input_ids, ctx, attention_mask)
    batch, prompt_len = input_ids.shape
    config, max_new_tokens = _generation_config(model, prompt_len, max_new_tokens, sampling)
    processors = _processors(config)
    eos = config.eos_token_id
    eos = (
        None
        if eos is None
        else torch.tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
    )
    pad = config.pad_token_id if config.pad_token_id is not None else (None if eos is None else int(eos[0]))

    cu = [prompt_len * i for i in range(batch + 1)]  # the batch's rows: documents of one packed row
    layers = model.config.get_text_config().num_hidden_layers
    cache = ShardedKVCache(ctx, layers, cu_seqlens=cu, reserve=max_new_tokens // ctx.cp_size + 2)
    previous = model.config._attn_implementation
    model.set_attn_implementation(register())
    try:
        with torch.no_grad():
            start = time.perf_counter()
            logits = _prefill(model, input_ids, ctx, cache, cu)
            prefilled = time.perf_counter()
            if stats is not None:
                stats.update(prefill_s=prefilled - start, cache_bytes=cache.nbytes(), steps=0)
                stats.update(cache_live_bytes=cache.nbytes(live_only=True))
            sequences, unfinished = input_ids, torch.ones(batch, dtype=torch.bool, device=input_ids.device)
            for i in range(max_new_tokens):
                scores = processors(sequences, logits)
                if config.do_sample:
                    chosen = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
                else:
                    chosen = scores.argmax(-1)
                chosen = collectives.all_gather(chosen, ctx)[0]  # rank 0's choice, on every rank
                if eos is not None:
                    chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad))
                    unfinished = unfinished & ~torch.isin(chosen, eos)
                sequences = torch.cat([sequences, chosen[:, None]], 1)
                if i == max_new_tokens - 1 or not bool(unfinished.any()):
                    break
                step = cache.step(1)  # one token per row (document)
                out = model(chosen[None], position_ids=step.positions[None].to(chosen.device), use_cache=False,
                            cp_cache=cache, cp_step=step)  # fmt: skip
                logits = out.logits[0].float()  # [batch, vocab]
                if stats is not None:
                    stats["steps"] += 1
            if stats is not None:
                stats["decode_s"] = time.perf_counter() - prefilled
    finally:
        model.set_attn_implementation(previous)
    return sequences


def _prefill(model, input_ids, ctx, cache, cu) -> torch.Tensor:
    """Runs every rank's shard of the packed prompt row, filling the cache; float32 logits [batch,
    vocab] of every row's last token, on every rank."""
    batch, prompt_len = input_ids.shape
    row = input_ids.reshape(1, -1)
    positions = torch.arange(prompt_len, device=input_ids.device).repeat(batch)[None]
    ids_l, pos_l = (shard(t, ctx, 1, cu_seqlens=cu) for t in (row, positions))
    docs, local_pos = cache.prompt_tokens()
    last = (local_pos == prompt_len - 1).nonzero().flatten()  # local rows holding a row's last token
    kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = (last if len(last) else torch.zeros(1, dtype=torch.long)).to(row.device)
        picked = torch.arange(len(last))
    else:
        picked = last
    logits = model(ids_l, position_ids=pos_l, use_cache=False, cp_cache=cache, **kwargs).logits[0]
    full = torch.zeros(batch, logits.shape[-1], dtype=torch.float32, device=logits.device)
    full[docs[last].to(full.device)] = logits[picked.to(logits.device)].float()
    return collectives.all_reduce(full, ctx)  # one rank holds each row's last token: the sum is exact
