"""A small Llama-style decoder trained with context parallelism on CPU (Gloo), next to the same model
without it: the loss curves agree.

    python examples/llama_cp.py --cp 4 --steps 30        # every algorithm at cp=4 against cp=1

Every rank holds the whole model and its shard of each sequence (ring_ext.shard: zigzag for the
causal ring), positions included, so RoPE sees global positions. Each rank's loss is its share of the
mean over all tokens; the gradients are summed over the CP ranks, which makes the step identical to
the step on the full sequence. Attention: ring_ext.attention; feed-forward: ring_ext.blockwise_ffn.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import ring_ext
from ring_ext.testing.spawn import run_distributed


class Rope:
    """Rotary embedding at explicit (global) positions."""

    def __init__(self, head_dim: int, positions: torch.Tensor, base: float = 10000.0):
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = positions.float()[:, None] * inv[None, :]  # [s, d/2]
        self.cos, self.sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [b, s, h, d]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack((x1 * self.cos - x2 * self.sin, x1 * self.sin + x2 * self.cos), dim=-1)
        return rotated.flatten(-2)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int, ffn_chunk: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.ffn_chunk = heads, kv_heads, dim // heads, ffn_chunk
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, rope: Rope, ctx, cu_seqlens=None) -> torch.Tensor:  # x [b, s, dim]
        b, s, _ = x.shape
        h = self.norm1(x)
        q = rope(self.wq(h).view(b, s, self.heads, self.head_dim))
        k, v = self.wkv(h).view(b, s, 2, self.kv_heads, self.head_dim).unbind(2)
        attn = ring_ext.attention(q, rope(k), v, ctx, layout="bshd", causal=True, cu_seqlens=cu_seqlens)
        x = x + self.wo(attn.flatten(-2))
        return x + ring_ext.blockwise_ffn(self.norm2(x), self.ffn, self.ffn_chunk, dim=1)


class TinyLlama(nn.Module):
    def __init__(self, vocab=256, dim=64, layers=2, heads=4, kv_heads=2, hidden=256, ffn_chunk=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, hidden, ffn_chunk) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, ctx=None, cu_seqlens=None) -> torch.Tensor:
        """ids [b, s] and positions [s] (or [1, s]) of this rank's tokens; cu_seqlens: packed documents
        (batch 1), positions restarting per document."""
        rope = Rope(self.blocks[0].head_dim, positions.flatten())
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, rope, ctx, cu_seqlens)
        return self.head(self.norm(x))


def synthetic_batch(step: int, batch: int, seq: int, vocab: int) -> torch.Tensor:
    """Sequences with learnable structure: a random walk over the vocabulary with small steps."""
    g = torch.Generator().manual_seed(1000 + step)
    steps = torch.randint(-3, 4, (batch, seq + 1), generator=g)
    return (steps.cumsum(1) + torch.randint(0, vocab, (batch, 1), generator=g)) % vocab


def train(steps: int, seq: int, ctx=None, batch: int = 2, lr: float = 1e-2, seed: int = 0) -> list[float]:
    """Losses of `steps` Adam steps; with ctx, on this rank's shard, gradients summed over the CP group."""
    torch.manual_seed(seed)
    model = TinyLlama()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    vocab = model.embed.num_embeddings
    losses = []
    for step in range(steps):
        tokens = synthetic_batch(step, batch, seq, vocab)
        ids, labels, positions = tokens[:, :-1], tokens[:, 1:], torch.arange(seq)
        if ctx is not None:
            ids, labels, positions = (
                ring_ext.shard(t, ctx, seq_dim=t.dim() - 1) for t in (ids, labels, positions)
            )
        logits = model(ids, positions, ctx)
        # This rank's share of the mean over all batch * seq tokens.
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / (batch * seq)
        opt.zero_grad()
        loss.backward()
        if ctx is not None:
            ring_ext.reduce_gradients(model.parameters(), ctx)
            loss = ring_ext.all_reduce(loss.detach(), ctx)
        opt.step()
        losses.append(loss.item())
    return losses


# name -> CPConfig fields besides the size: the four algorithms of ring_ext.
ALGOS = {
    "ulysses": dict(context_parallel_algo="ulysses_cp_algo"),
    "ring": dict(context_parallel_algo="megatron_cp_algo"),
    "double_ring": dict(context_parallel_algo="megatron_cp_algo", cp_window_size=2),
    "hybrid": dict(context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2),
}


def _train_rank(rank: int, world: int, run: tuple[str, int, int]) -> list[float]:
    algo, steps, seq = run
    cfg = ring_ext.CPConfig(context_parallel_size=world, **ALGOS[algo])
    return train(steps, seq, ring_ext.initialize(cfg))


def train_cp(cp: int, algo: str, steps: int, seq: int) -> list[float]:
    """Runs train() on cp local Gloo processes (ring_ext.testing.spawn); returns the (all-reduced)
    losses."""
    return run_distributed(_train_rank, cp, [(algo, steps, seq)], collect=True, timeout_s=None)[0]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default; the description keeps its line breaks."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--cp", type=int, default=4, help="context-parallel size: spawned Gloo ranks")
    parser.add_argument("--algos", default=",".join(ALGOS), help=f"comma list of {', '.join(ALGOS)}")
    parser.add_argument("--steps", type=int, default=30, help="training steps (one loss per step)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (a multiple of 2 cp)")
    args = parser.parse_args()
    algos = args.algos.split(",")
    curves = {"cp=1": train(args.steps, args.seq)}
    for algo in algos:
        curves[f"{algo} cp={args.cp}"] = train_cp(args.cp, algo, args.steps, args.seq)
    print("| step | " + " | ".join(curves) + " | max diff |")
    print("|---" * (len(curves) + 2) + "|")
    for i in range(args.steps):
        losses = [c[i] for c in curves.values()]
        diff = max(abs(x - losses[0]) for x in losses)
        print(f"| {i} | " + " | ".join(f"{x:.5f}" for x in losses) + f" | {diff:.1e} |")


if __name__ == "__main__":
    main()
