"""The planner's inference model (docs/design.md, Inference): predicted prefill time and decode time per
token of a whole decoder-only model served with tensor parallelism inside a node and context parallelism
across nodes (Meta's layout in "Context Parallelism for Scalable Million-Token Inference", arXiv
2411.01783: TP 8 per host, CP over hosts), from the GPU and link presets of ring_ext/tools/planner/presets.py.

    prefill  = dense compute (2 x params x S flops, at GEMM_EFFICIENCY of the bf16 peak)
             + attention compute (2 x S^2 x h_q x d flops per layer, causal, at ATTENTION_EFFICIENCY)
             + per layer: the TP all-reduces (2, S / cp tokens x hidden, bf16, NVLink) and the pass-KV
               ring's K/V hops (cp - 1 hops of S / cp tokens x h_kv / tp heads) that the attention's
               compute does not hide
    decode   = per layer: weights (params / tp / layers) and this rank's cache (S / cp tokens) read from
               HBM, two TP all-reduces and one CP all-gather of the partials (latency bound: ring_ext's
               decode merge, Note [Merging partials across ranks] in ring_ext/inference.py)

Assumptions are the module's constants; every one is printed next to the prediction by
benchmarks/bench_inference.py.
"""

from __future__ import annotations

import dataclasses

from .presets import ATTENTION_EFFICIENCY, GPUS, INTERCONNECTS

# Share of the dense bf16 peak that large GEMMs attain at long sequences (the linear layers of prefill).
GEMM_EFFICIENCY = 0.7
# One small collective's latency: within a node (NVLink) and across nodes (NCCL over InfiniBand).
INTRA_LATENCY_S, INTER_LATENCY_S = 10e-6, 30e-6


@dataclasses.dataclass(frozen=True)
class Model:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    params: float  # parameters, embeddings included
    weight_bytes: float = 2.0  # per parameter as served (bf16: 2, fp8: 1)


# Llama 3.1 405B (config.json of meta-llama/Llama-3.1-405B): 126 layers, hidden 16384, 128 q / 8 K/V
# heads of 128; 405e9 parameters. Meta served it with row-wise FP8 weights (1 byte) on H100.
LLAMA3_405B = Model(126, 16384, 128, 8, 128, 405e9, weight_bytes=1.0)


def predict_prefill(
    model: Model, seq: int, nodes: int, gpu: str = "h100", tp: int = 8, elem: int = 2
) -> dict:
    g = GPUS[gpu]
    gpus = nodes * tp
    peak = g.bf16_tflops * 1e12
    dense_s = 2 * model.params * seq / (gpus * peak * GEMM_EFFICIENCY)
    attn_flops_layer = 2 * seq * seq * model.heads * model.head_dim  # causal: half of 4 S^2 h d
    attn_layer_s = attn_flops_layer / (gpus * peak * ATTENTION_EFFICIENCY)
    intra, inter = INTERCONNECTS[g.intra].gbps * 1e9, INTERCONNECTS[g.inter].gbps * 1e9
    tokens = seq / nodes
    allreduce_s = 2 * (2 * (tp - 1) / tp * tokens * model.hidden * elem / intra + INTRA_LATENCY_S)
    kv_heads_per_gpu = max(model.kv_heads // tp, 1)
    hop_s = 2 * tokens * kv_heads_per_gpu * model.head_dim * elem / inter + INTER_LATENCY_S
    step_compute = attn_layer_s / nodes if nodes > 1 else attn_layer_s
    exposed_kv = (nodes - 1) * max(0.0, hop_s - step_compute) + (hop_s if nodes > 1 else 0.0)
    total = dense_s + model.layers * (attn_layer_s + allreduce_s + exposed_kv)
    return {
        "seconds": total,
        "dense_s": dense_s,
        "attention_s": model.layers * attn_layer_s,
        "comm_s": model.layers * (allreduce_s + exposed_kv),
        "flops": 2 * model.params * seq + model.layers * attn_flops_layer,
        "gpus": gpus,
    }


def predict_decode(
    model: Model, context: int, nodes: int, gpu: str = "h100", tp: int = 8, elem: int = 2
) -> dict:
    """Seconds per decoded token, batch 1, after a prompt of `context` tokens."""
    g = GPUS[gpu]
    hbm = g.hbm_gbps * 1e9
    weights_s = model.params * model.weight_bytes / tp / hbm
    kv_heads_per_gpu = max(model.kv_heads // tp, 1)
    cache_bytes = 2 * (context / nodes) * kv_heads_per_gpu * model.head_dim * elem * model.layers
    cache_s = cache_bytes / hbm
    comm_s = model.layers * (2 * INTRA_LATENCY_S + (INTER_LATENCY_S if nodes > 1 else 0.0))
    return {
        "seconds": weights_s + cache_s + comm_s,
        "weights_s": weights_s,
        "cache_s": cache_s,
        "comm_s": comm_s,
        "cache_gib_per_gpu": cache_bytes / 2**30,
    }


# What Meta published (arXiv 2411.01783, abstract): Llama 3 405B prefill, CP over H100 hosts of 8 GPUs
# with TP 8 inside each, 16 hosts (128 GPUs): 1M tokens in 77 s at 93% parallel efficiency and 63% FLOPS
# utilisation; 128K tokens in 3.8 s.
META = [
    {"seq": 1 << 20, "nodes": 16, "seconds": 77.0, "efficiency": 0.93},
    {"seq": 128 * 1024, "nodes": 16, "seconds": 3.8, "efficiency": None},
]


def meta_comparison(model: Model = LLAMA3_405B, gpu: str = "h100") -> list[dict]:
    """Our prediction next to each of Meta's figures; parallel efficiency = T(1 host) / (hosts x T)."""
    rows = []
    for ref in META:
        ours = predict_prefill(model, ref["seq"], ref["nodes"], gpu)
        one = predict_prefill(model, ref["seq"], 1, gpu)
        rows.append(
            {
                "seq": ref["seq"],
                "gpus": ours["gpus"],
                "meta_s": ref["seconds"],
                "predicted_s": ours["seconds"],
                "meta_efficiency": ref["efficiency"],
                "predicted_efficiency": one["seconds"] / (ref["nodes"] * ours["seconds"]),
                "predicted_decode_ms": 1e3 * predict_decode(model, ref["seq"], ref["nodes"], gpu)["seconds"],
            }
        )
    return rows
