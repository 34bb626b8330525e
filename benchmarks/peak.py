"""This CPU's arithmetic peak (GFLOP/s), from the FMA loop of benchmarks/fma_peak.cpp.

The ceiling the benchmarks report their kernels against (torch.mm is not one: on AMD it takes a slower
MKL path). Compiled with the host's C++ compiler ($CXX, else g++) for this CPU (-march=native on
x86-64, -mcpu=native elsewhere) into the temp directory, once per source version (compiled.py).

    python benchmarks/peak.py            # fp32 and bf16 GFLOP/s for 1 and 2 threads
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

from compiled import cached_binary, compiler, read

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fma_peak.cpp")
NATIVE = "-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native"  # this CPU


def _binary() -> str:
    flags = ["-O2", "-ffp-contract=fast", NATIVE, "-pthread"]
    return cached_binary(
        "fma_peak",
        " ".join(flags).encode() + b"\0" + read(SOURCE),
        lambda out: subprocess.run([compiler(), *flags, SOURCE, "-o", out], check=True),
    )


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or "unknown"."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def fma_vectors() -> str:
    """The vectors the FMA loop runs on: the widest the compiler targets for this CPU, by the same
    tests as fma_peak.cpp's (AVX-512, AVX2 + FMA, else 4-lane GCC vectors)."""
    macros = subprocess.run(
        [compiler(), NATIVE, "-dM", "-E", "-x", "c++", os.devnull], check=True, capture_output=True, text=True
    ).stdout.split()
    if "__AVX512F__" in macros:
        return "AVX-512, 16 fp32 lanes" + (", vdpbf16ps" if "__AVX512BF16__" in macros else "")
    if "__AVX2__" in macros and "__FMA__" in macros:
        return "AVX2, 8 fp32 lanes"
    return "4-lane vectors"


def fma_peak(threads: int) -> dict[str, float]:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s} of `threads` threads doing only fused multiply-adds."""
    out = subprocess.run([_binary(), str(threads)], check=True, capture_output=True, text=True).stdout
    return {name: float(value) for name, value in (line.split() for line in out.splitlines())}


if __name__ == "__main__":
    print(f"cpu: {cpu_model()}; FMA loop on {fma_vectors()}")
    for n in (1, 2) if len(sys.argv) < 2 else (int(sys.argv[1]),):
        print(f"{n} thread(s): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in fma_peak(n).items()))
