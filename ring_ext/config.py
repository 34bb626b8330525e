"""CPConfig: the context-parallel options, named after MindSpeed's flags, and their argparse flags.

--context-parallel-size N          default 1
--context-parallel-algo A          ulysses_cp_algo (default) | megatron_cp_algo | hybrid_cp_algo
--use-cp-send-recv-overlap         overlap the ring's next transfer with the current block
--attention-mask-type M            causal (default) | general (no mask: every key visible)
--megatron-cp-in-bnsd              BNSD layout instead of the default SBH
--cp-window-size W                 default 1; W > 1: double ring with inner rings of W ranks
--ulysses-degree-in-cp U           hybrid: Ulysses inside groups of U ranks, ring across them
--cp-sliding-window W              ring_ext's own: every attention layer has a sliding window of
                                   W tokens; shards are contiguous pieces (a windowed layer is a
                                   halo exchange) instead of zigzag ones (balanced for full causal
                                   layers). Each ring_ext.attention call still passes its own
                                   sliding_window (docs/design.md, "Token placement")
"""

from __future__ import annotations

import argparse
import dataclasses
import os

ALGOS = ("ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo")
MASK_TYPES = ("causal", "general")


@dataclasses.dataclass(frozen=True)
class CPConfig:
    context_parallel_size: int = 1
    context_parallel_algo: str = "ulysses_cp_algo"
    use_cp_send_recv_overlap: bool = False
    attention_mask_type: str = "causal"
    megatron_cp_in_bnsd: bool = False
    cp_window_size: int = 1
    ulysses_degree_in_cp: int | None = None
    cp_sliding_window: int | None = None

    def __post_init__(self):
        cp = _positive_int(self.context_parallel_size, "context_parallel_size")
        if self.context_parallel_algo not in ALGOS:
            raise ValueError(
                f"context_parallel_algo must be one of {ALGOS}, got {self.context_parallel_algo!r}"
            )
        if self.attention_mask_type not in MASK_TYPES:
            raise ValueError(
                f"attention_mask_type must be one of {MASK_TYPES}, got {self.attention_mask_type!r}"
            )
        for name in ("use_cp_send_recv_overlap", "megatron_cp_in_bnsd"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.cp_sliding_window is not None:
            _positive_int(self.cp_sliding_window, "cp_sliding_window")
        window = _positive_int(self.cp_window_size, "cp_window_size")
        ring = cp
        if self.context_parallel_algo == "hybrid_cp_algo":
            if self.ulysses_degree_in_cp is None:
                raise ValueError("ulysses_degree_in_cp must be set for hybrid_cp_algo")
            u = _positive_int(self.ulysses_degree_in_cp, "ulysses_degree_in_cp")
            if cp % u != 0:
                raise ValueError(f"ulysses_degree_in_cp ({u}) must divide context_parallel_size ({cp})")
            ring = cp // u
        elif self.ulysses_degree_in_cp is not None:
            _positive_int(self.ulysses_degree_in_cp, "ulysses_degree_in_cp")
        if ring % window != 0:
            raise ValueError(
                f"cp_window_size ({window}) must divide the ring size ({ring} = context_parallel_size"
                + (" / ulysses_degree_in_cp" if ring != cp else "")
                + ")"
            )

    @property
    def causal(self) -> bool:
        return self.attention_mask_type == "causal"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CPConfig:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the context-parallel flags (MindSpeed names and defaults) to parser; returns it."""
    g = parser.add_argument_group("context parallel (ring_ext)")
    g.add_argument("--context-parallel-size", type=int, default=1, help="ranks sharing one sequence")
    g.add_argument(
        "--context-parallel-algo",
        choices=ALGOS,
        default="ulysses_cp_algo",
        help="Ulysses (all-to-all over heads), megatron: ring (double ring with --cp-window-size > 1), "
        "hybrid: Ulysses inside groups of --ulysses-degree-in-cp ranks, ring across them",
    )
    g.add_argument(
        "--use-cp-send-recv-overlap",
        action="store_true",
        help="post the ring's next transfer before the current block's compute",
    )
    g.add_argument(
        "--attention-mask-type",
        choices=MASK_TYPES,
        default="causal",
        help="general: no mask (full attention)",
    )
    g.add_argument("--megatron-cp-in-bnsd", action="store_true", help="inputs are BNSD instead of SBH")
    g.add_argument(
        "--cp-window-size",
        type=int,
        default=1,
        help="> 1: double ring with inner rings of this many ranks (must divide the ring size)",
    )
    g.add_argument(
        "--ulysses-degree-in-cp",
        type=int,
        default=None,
        help="hybrid: the Ulysses group size (must divide the CP size; required by hybrid_cp_algo)",
    )
    g.add_argument(
        "--cp-sliding-window",
        type=int,
        default=None,
        help="every attention layer has this sliding window: shards become contiguous pieces (None: "
        "zigzag shards, balanced for full causal layers)",
    )
    return parser


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (or another launcher that sets RANK and WORLD_SIZE).
    ring_ext's one environment read besides the build and the CUDA tiling switch (cuda_tilings.chosen
    sets RING_EXT_CUDA_*_TILING, which csrc/cuda/tilings.h reads at every launch)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
