"""Peak resident memory of a code region on Linux CPU processes (what `python -m ring_ext` and the
benchmarks report per rank).

glibc keeps freed memory for reuse, which hides later peaks; `exact_peaks()` makes large allocations
go straight to the kernel (mmap) so that every region's peak is its own. The peak counter is the
kernel's VmHWM, reset through /proc/self/clear_refs. On CUDA tensors, use torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import ctypes
import time

_M_MMAP_THRESHOLD = -3


def exact_peaks(threshold_bytes: int = 1 << 16) -> None:
    """Allocations above threshold_bytes are mmapped and returned to the kernel when freed."""
    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold_bytes)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakRSS:
    """with PeakRSS() as m: ...  then m.peak_mib is the peak resident memory above the start."""

    def __enter__(self) -> PeakRSS:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        self.start_mib = _status_mib("VmRSS")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.peak_mib = _status_mib("VmHWM") - self.start_mib
