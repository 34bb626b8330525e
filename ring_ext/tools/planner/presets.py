"""Hardware presets of `plan --gpu` and `--interconnect`: public spec-sheet peaks, and the one assumption
that turns a tensor-core peak into the rate attention kernels attain (ATTENTION_EFFICIENCY)."""

from __future__ import annotations

import dataclasses

# The share of the bf16 dense tensor-core peak that attention kernels attain, forward+backward, at long
# sequences and head dim 128. FlashAttention-2 on A100: forward 50-73 % of the peak, forward+backward
# up to ~60 % (Dao 2023, "FlashAttention-2", arXiv:2307.08691, section 4.1); FlashAttention-3 on H100:
# forward up to 75 % in bf16 (740 TFLOP/s), backward lower (Shah et al. 2024, "FlashAttention-3",
# arXiv:2407.08608, section 4.1). We take the low end: ring steps run the kernels on 1/cp-sized blocks,
# and FlashAttention-2 itself reaches ~35 % on H100 (the FlashAttention-3 paper's figure). --tflops
# replaces the product.
ATTENTION_EFFICIENCY = 0.5


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One GPU's spec-sheet peaks, and the links it usually comes with (each an INTERCONNECTS name)."""

    bf16_tflops: float  # dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s
    hbm_gbps: float  # device memory bandwidth, GB/s
    intra: str  # within a node
    inter: str  # between nodes (one NIC per GPU, as in NVIDIA's DGX/HGX and AMD's OAM platforms)


GPUS = {
    # NVIDIA A100 datasheet (SXM4 80GB): bf16 312 TFLOP/s dense (624 with sparsity), HBM2e 2,039 GB/s;
    # DGX A100: one 200 Gb/s HDR InfiniBand NIC per GPU.
    "a100": Gpu(312.0, 2039.0, "nvlink3", "ib-hdr200"),
    # NVIDIA H100 datasheet (SXM5): bf16 1,979 TFLOP/s with sparsity = 989 dense, HBM3 3.35 TB/s;
    # DGX H100: one 400 Gb/s NDR InfiniBand NIC per GPU.
    "h100": Gpu(989.0, 3350.0, "nvlink4", "ib-ndr400"),
    # NVIDIA H200 datasheet (SXM): the H100's compute, HBM3e 4.8 TB/s.
    "h200": Gpu(989.0, 4800.0, "nvlink4", "ib-ndr400"),
    # NVIDIA HGX B200 (1,000 W): bf16 4.5 PFLOP/s with sparsity = 2,250 dense, HBM3e 8 TB/s;
    # DGX B200: one 400 Gb/s ConnectX-7 NIC per GPU.
    "b200": Gpu(2250.0, 8000.0, "nvlink5", "ib-ndr400"),
    # AMD Instinct MI300X datasheet: bf16 1,307.4 TFLOP/s dense (2,614.9 with sparsity), HBM3 5.3 TB/s;
    # OAM platforms pair each GPU with a 400 Gb/s Ethernet NIC.
    "mi300x": Gpu(1307.4, 5300.0, "xgmi", "roce400"),
}


@dataclasses.dataclass(frozen=True)
class Interconnect:
    """A link's rate per GPU and direction, as the planner's Cluster takes it, and its level."""

    gbps: float  # GB/s per GPU and direction, from one GPU to one peer
    level: str  # "intra" (within a node) or "inter" (between nodes)


INTERCONNECTS = {
    # NVLink through NVSwitch: any one peer gets the GPU's whole NVLink bandwidth, half of it each way.
    "nvlink3": Interconnect(300.0, "intra"),  # A100: 600 GB/s both ways
    "nvlink4": Interconnect(450.0, "intra"),  # H100/H200: 900 GB/s both ways
    "nvlink5": Interconnect(900.0, "intra"),  # B200: 1.8 TB/s both ways
    # MI300X: 7 Infinity Fabric links of 128 GB/s both ways, one to each peer (a full mesh, no switch):
    # a ring hop to one peer gets one link. The planner prices an all-to-all's chunks at this rate one
    # after another, so Ulysses on xGMI (which uses all 7 links at once) comes out pessimistic.
    "xgmi": Interconnect(64.0, "intra"),
    # Between nodes: one NIC per GPU; Gb/s on the wire / 8.
    "ib-hdr200": Interconnect(25.0, "inter"),
    "ib-ndr400": Interconnect(50.0, "inter"),
    "roce400": Interconnect(50.0, "inter"),  # 400 Gb/s Ethernet (RoCE v2)
}
