"""FSDP2 over data parallelism and ring_ext over context parallelism on one 2-D DeviceMesh: the tiny
Llama of llama_cp.py trained on ("dp", "cp") Gloo ranks equals the same model trained in one process
on the same global batches (losses and parameters), dense or packed documents, every algorithm.

    python examples/llama_fsdp_cp.py --dp 2 --cp 2 --steps 5        # every algorithm, dense and packed
    python examples/llama_fsdp_cp.py --dp 1 --cp 4 --algos ring --packed-only

The training step uses the library's helpers only:

    mesh = init_device_mesh("cpu", (dp, cp), mesh_dim_names=("dp", "cp"))
    ctx = ring_ext.initialize(cfg, group=mesh["cp"])
    fully_shard(block, mesh=mesh["dp"]) for every block, then fully_shard(model, mesh=mesh["dp"])
    parts = ring_ext.training.shard_packed_batch(row, ctx)   # labels shifted in documents, then sharded
    loss = ring_ext.training.packed_loss(logits, parts["labels"], ctx, data_parallel=mesh["dp"])
    loss.backward()                                          # FSDP2: gradients averaged over dp
    ring_ext.reduce_gradients(model.parameters(), ctx)       # summed over cp (the DTensor shards)
    opt.step()

Each dp replica trains on its own row of the global batch. packed_loss divides by the token count of the
whole global batch and multiplies by the dp size, which undoes FSDP's mean over dp; with the sum over
cp the step is exactly the single-process step on the mean over every token of the global batch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llama_cp import ALGOS, TinyLlama, synthetic_batch  # noqa: E402

import ring_ext  # noqa: E402
import ring_ext.training  # noqa: E402
from ring_ext.testing.spawn import run_distributed  # noqa: E402

# Plain SGD, not Adam: Adam's step hardly changes when every gradient is scaled alike, so a wrong loss
# scaling (the dp mean not undone, or undone twice) would train the same; SGD's step shows it.
LR = 0.5


def optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=LR)


def replica_row(step: int, replica: int, seq: int, packed: bool, vocab: int) -> tuple[dict, tuple]:
    """One row of the global batch: input_ids and position_ids [1, seq] (labels: the ids, shifted by
    shard_packed_batch), and its packing. Packed rows hold documents of uneven lengths (1 and 2 among
    them, and an empty one); positions restart at 0 in every document."""
    tokens = synthetic_batch(100 * step + replica, 1, seq - 1, vocab)  # [1, seq]
    if not packed:
        return {"input_ids": tokens, "position_ids": torch.arange(seq)[None]}, (0, seq)
    g = torch.Generator().manual_seed(7919 * step + replica)
    cuts = sorted(set(torch.randint(3, seq - 1, (4,), generator=g).tolist()))
    cu = (0, 1, 3, *cuts, cuts[-1], seq)  # documents of 1 and 2 tokens, an empty one before the last
    positions = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])
    return {"input_ids": tokens, "position_ids": positions[None]}, cu


def reference(steps: int, dp: int, seq: int, packed: bool, seed: int = 0) -> tuple[list[float], dict]:
    """One process, no FSDP, no CP: every step on the dp rows of the global batch, the loss the mean over
    all their tokens. Returns the losses and the final parameters."""
    torch.manual_seed(seed)
    model = TinyLlama()
    opt = optimizer(model)
    losses = []
    for step in range(steps):
        summed, count = 0.0, 0
        for replica in range(dp):
            row, cu = replica_row(step, replica, seq, packed, model.embed.num_embeddings)
            parts = ring_ext.training.shard_packed_batch(row, None, cu_seqlens=cu)  # labels shifted
            logits = model(parts["input_ids"], parts["position_ids"], None, cu if packed else None)
            summed = summed + F.cross_entropy(logits[0], parts["labels"][0], reduction="sum")
            count += int((parts["labels"] != -100).sum())
        loss = summed / count
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def train_fsdp_cp(
    mesh, algo: str, steps: int, seq: int, packed: bool, seed: int = 0
) -> tuple[list[float], dict]:
    """This rank's run on mesh ("dp", "cp"): the global losses (the same on every rank) and the final
    parameters, gathered whole (every rank takes part)."""
    cp = mesh["cp"].size()
    cfg = ring_ext.CPConfig(context_parallel_size=cp, **ALGOS[algo])
    ctx = ring_ext.initialize(cfg, group=mesh["cp"])
    torch.manual_seed(seed)
    model = TinyLlama()
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = optimizer(model)
    replica = mesh["dp"].get_local_rank()
    losses = []
    for step in range(steps):
        row, cu = replica_row(step, replica, seq, packed, model.embed.num_embeddings)
        if packed:
            parts = ring_ext.training.shard_packed_batch(row, ctx, cu_seqlens=cu)
        else:  # one dense sequence: labels shifted on the whole row, then the usual zigzag shards
            whole = ring_ext.training.shard_packed_batch(row, None, cu_seqlens=cu)
            parts = {name: ring_ext.shard(t, ctx, seq_dim=1) for name, t in whole.items() if t.dim() == 2}
        logits = model(parts["input_ids"], parts["position_ids"], ctx, cu if packed else None)
        loss = ring_ext.training.packed_loss(logits, parts["labels"], ctx, data_parallel=mesh["dp"])
        opt.zero_grad()
        loss.backward()
        ring_ext.reduce_gradients(model.parameters(), ctx)
        opt.step()
        losses.append(ring_ext.training.reported_loss(loss, ctx, data_parallel=mesh["dp"]))
    return losses, {name: p.full_tensor().detach() for name, p in model.named_parameters()}


def _train_rank(rank: int, world: int, job: tuple) -> list[tuple]:
    """This rank's runs on mesh ("dp", "cp"): (algo, packed, losses, parameters) for each."""
    dp, runs, steps, seq = job
    mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "cp"))
    return [(algo, packed, *train_fsdp_cp(mesh, algo, steps, seq, packed)) for algo, packed in runs]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default; the description keeps its line breaks."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dp", type=int, default=2, help="data-parallel size (FSDP2 replicas)")
    parser.add_argument("--cp", type=int, default=2, help="context-parallel size (ranks: dp x cp)")
    parser.add_argument("--algos", default=",".join(ALGOS), help=f"comma list of {', '.join(ALGOS)}")
    parser.add_argument("--steps", type=int, default=5, help="training steps per run")
    parser.add_argument("--seq", type=int, default=64, help="tokens per row (dense: a multiple of 2 cp)")
    parser.add_argument("--packed-only", action="store_true", help="only the packed-documents runs")
    args = parser.parse_args()
    runs = [(a, p) for p in ([True] if args.packed_only else [False, True]) for a in args.algos.split(",")]
    job = (args.dp, runs, args.steps, args.seq)
    (results,) = run_distributed(_train_rank, args.dp * args.cp, [job], collect=True, timeout_s=None)
    refs = {p: reference(args.steps, args.dp, args.seq, p) for p in {p for _, p in runs}}
    print(f"dp={args.dp} x cp={args.cp}, {args.steps} SGD steps, {args.seq} tokens per row")
    print("| run | loss step 0 | loss last | max |loss - one process| | max |param - one process| |")
    print("|---|---|---|---|---|")
    for algo, packed, losses, params in results:
        ref_losses, ref_params = refs[packed]
        loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
        param_diff = max((params[n] - ref_params[n]).abs().max().item() for n in ref_params)
        name = f"{algo} {'packed' if packed else 'dense'}"
        print(f"| {name} | {losses[0]:.5f} | {losses[-1]:.5f} | {loss_diff:.1e} | {param_diff:.1e} |")


if __name__ == "__main__":
    main()
