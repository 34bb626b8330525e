"""The benchmark scripts still run: the kernel table on one tiny shape, and the FMA-loop peak it reports
against (timings are not checked here: targets are met in benchmarks, never in timed tests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


@pytest.fixture(scope="module")
def peak_module():
    sys.path.insert(0, BENCH)
    try:
        import peak

        yield peak
    finally:
        sys.path.remove(BENCH)


def test_fma_peak_reports_both_dtypes(peak_module):
    rates = peak_module.fma_peak(1)
    assert set(rates) == {"fp32", "bf16"}
    assert all(rate > 0.5 for rate in rates.values()), rates  # any x86-64 core does > 0.5 GFLOP/s


def test_kernel_table_reports_percent_of_peak(tmp_path):
    out = tmp_path / "t.md"
    subprocess.run(
        [
            sys.executable,
            os.path.join(BENCH, "bench_kernels.py"),
            "--shapes",
            "fp32:64:256:causal",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    rows = [line for line in out.read_text().splitlines() if line.startswith("| fp32 ")]
    assert [row.split(" | ")[4] for row in rows] == ["fwd", "fwd+bwd"]
    for row in rows:  # ours and SDPA as a % of the peak, both positive
        percents = [float(x) for x in re.findall(r"\| (\d+)% ", row)]
        assert len(percents) == 2 and all(p > 0 for p in percents), row
    assert re.search(r"FMA-loop peak, GFLOP/s \(before / after the table\): fp32 \d+ / \d+", out.read_text())
