"""The benchmark scripts still run: the kernel table on one tiny shape, and the FMA-loop peak it reports
against, which must bound torch.mm from above (no speed target is checked here: targets are met in
benchmarks, never in timed tests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch

import ring_ext

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


@pytest.fixture(scope="module")
def peak_module():
    sys.path.insert(0, BENCH)
    try:
        import peak

        yield peak
    finally:
        sys.path.remove(BENCH)


def test_fma_peak_is_a_ceiling(peak_module):
    """The FMA-loop peak of one thread is a real ceiling: at least what torch.mm reaches on that thread
    (a peak below it means a miscounted or unvectorised loop; 1.2x of margin for a shared machine), and
    below what any core can do (2 FMA pipes x 16 fp32 lanes x 2 FLOPs x 6 GHz: a loop the compiler
    removed reads as far more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        torch.mm(a, b)
        mm = 0.0
        for _ in range(5):
            start = time.perf_counter()
            torch.mm(a, b)
            mm = max(mm, 2 * 1024**3 / (time.perf_counter() - start) / 1e9)
    finally:
        torch.set_num_threads(threads)
    rates = peak_module.fma_peak(1)
    assert set(rates) == {"fp32", "bf16"}
    assert 1.2 * rates["fp32"] >= mm, (rates, mm)
    assert rates["fp32"] <= 2 * 16 * 2 * 6.0, rates
    # bf16: the fp32 rate without a bf16 dot product, at most 2x it with vdpbf16ps (margin for noise)
    assert 0.8 * rates["fp32"] <= rates["bf16"] <= 2.5 * rates["fp32"], rates


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
    assert re.search(r"cpu: .+, cpu_isa=\w+, .* on the widest vectors: \w", out.read_text())  # which CPU


def test_variants_benchmark_runs(tmp_path):
    """benchmarks/bench_variants.py at a tiny size: both tables, every column a ratio."""
    out = tmp_path / "v.md"
    subprocess.run(
        [sys.executable, os.path.join(BENCH, "bench_variants.py"), "--seq", "64", "--heads", "2", "--dim", "16",
         "--dtypes", "fp32", "--repeats", "1", "--threads", "1", "--out", str(out)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    text = out.read_text()
    assert re.search(
        r"\| fp32 \| 64 \| 2 \| 16 \| fwd\+bwd \| [\d.]+ \| [\d.]+x \| [\d.]+x \| [\d.]+x \|", text
    ), text
    assert re.search(r"\| fp32 \| 64 \| 2 \| 192 / 128 \| fwd \| [\d.]+ \| [\d.]+ \| [\d.]+x \|", text), text


def test_masks_benchmark_runs():
    """benchmarks/bench_masks.py at a tiny size: the shared prompt against the prompt per answer, and
    the balance table, whose balanced placement is within 2% of even. At this size the baseline's peak
    memory can read 0 MiB: its memory ratio is then "-"."""
    done = subprocess.run(
        [sys.executable, os.path.join(BENCH, "bench_masks.py"), "--prompt", "96", "--answers", "32", "--count", "3",
         "--heads", "2", "--dim", "16", "--dtype", "fp32", "--repeats", "1", "--threads", "1", "--cps", "2", "3"],
        check=True, capture_output=True, timeout=300, text=True, cwd=BENCH,
    )  # fmt: skip
    text = done.stdout
    assert re.search(
        r"\| shared prompt \(key_bounds\) \| 192 \| [\d.]+ \| [\d.]+ \| [\d.]+x \| \d+ \| ([\d.]+x|-) \|",
        text,
    )
    for cp in (2, 3):
        row = re.search(rf"\| {cp} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", text)
        assert row and float(row.group(3)) <= 1.02, text


def test_memory_benchmark_chunk_cost_runs():
    """benchmarks/bench_memory.py --chunk-cost at a size with a short last chunk: the chunked backward
    gives the whole call's gradients (the script checks) and both are timed."""
    done = subprocess.run(
        [sys.executable, os.path.join(BENCH, "bench_memory.py"), "--chunk-cost", "--sizes", "1100", "--dim", "16"],
        check=True, capture_output=True, timeout=300, text=True, cwd=BENCH,
    )  # fmt: skip
    for dtype in ("bfloat16", "float32"):
        row = rf"\| {dtype} \| 1100 \| 16 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|"
        assert re.search(row, done.stdout), done.stdout


def test_ab_kernels_pairs_head_with_working_tree():
    """benchmarks/ab_kernels.py at a tiny size, HEAD's baseline level against the working tree's best:
    both revisions compile into one binary (cached after the first run), each at its level, agree within
    the tolerance (the script exits 1 otherwise), and each pass has a row with both times and the ratio.
    The loop row checks the packed call against a per-document loop of the same kernels the same way.
    Skipped outside a git checkout, and when the working tree's params.h differs from HEAD's (the script
    refuses such a pair)."""
    root = os.path.join(BENCH, "..")
    same = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD", "--", "csrc/common/params.h"])
    if same.returncode != 0:
        pytest.skip("not a git checkout, or csrc/common/params.h differs from HEAD's")
    done = subprocess.run(
        [sys.executable, os.path.join(BENCH, "ab_kernels.py"), "--base", "HEAD", "--base-isa", "baseline", "--shapes",
         "fp32:64:256:causal", "fp32:64:256:packed",
         "fp32:64:256:loop",
         "--repeats", "1", "--threads", "1"],
        check=True, capture_output=True, timeout=300, text=True,
    )  # fmt: skip
    assert "MISMATCH" not in done.stdout, done.stdout
    assert re.search(r"base HEAD \(\w+\), new working tree .* isa (baseline|base baseline, new \w+), 1 threads",
                     done.stdout), done.stdout  # fmt: skip
    for mask in ("causal", "packed", "loop"):
        for pass_name, diffs in (("fwd", r"out=[\d.e-]+, lse="), ("bwd", r"dq=[\d.e-]+, dk=[\d.e-]+, dv=")):
            row = rf"\| fp32 \| 64 \| 256 \| {mask} \| {pass_name} \|( [\d.]+ \|){{5}} [\d.]+-[\d.]+ \| \d+% \| \d+% \| {diffs}"
            assert re.search(row, done.stdout), done.stdout


def test_tile_products_run_and_match_a_plain_sum():
    """benchmarks/bench_tiles.py at a tiny size: every level this CPU runs compiles, each of the kernels'
    products has a row with both columns' GFLOP/s and % of the peak, and every product agrees with a
    plain sum over the same strides (the script exits 1 otherwise)."""
    if ring_ext.build_info()["emulated_avx512"]:
        pytest.skip("bench_tiles refuses an emulated AVX-512 test build, as ab_kernels does")
    done = subprocess.run(
        [sys.executable, os.path.join(BENCH, "bench_tiles.py"), "--dims", "16", "--cold-mib", "1", "--seconds", "0.001",
         "--rounds", "1"],
        check=True, capture_output=True, timeout=300, text=True,
    )  # fmt: skip
    assert "MISMATCH" not in done.stdout, done.stdout
    products = ("fwd S = Q K^T", "fwd O += P V", "bwd S = Q K^T, dP = dO V^T", "bwd dV += P^T dO, dK += dS^T Q",
                "bwd dQ += dS K")  # fmt: skip
    isa = ring_ext.build_info()["cpu_isa"]
    for product in products:
        row = rf"\| {isa} \| fp32 \| 16 \| {re.escape(product)} \|( \d+ \|){{3}} [\d.]+ \| \d+% \| [\d.]+ \| \d+% \| [\d.e-]+ \|"
        assert re.search(row, done.stdout), done.stdout


def test_perf_split_counts_leaves_under_a_caller(tmp_path):
    """tools/perf_split.py on a made-up `perf script` text: only the samples with a frame under the
    caller count, each by its leaf function, namespaces and offsets stripped."""
    sample = "ab_kernels 1 2: 1 cycles:\n\t{leaf}\n\t{caller}\n"
    frame = "    {addr} ring_ext_ab_new::cpu::ab_new::{name}+0x1f (/tmp/ab_kernels)"
    trace = tmp_path / "perf.txt"
    trace.write_text(
        "\n".join(
            sample.format(
                leaf=frame.format(addr="1a", name=leaf), caller=frame.format(addr="2b", name=caller)
            )
            for leaf, caller in [
                ("gemm_tile<6, true>", "fwd_task<float>(ring_ext_ab_new::FwdParams const&, long)"),
                ("gemm_tile<6, true>", "fwd_task<float>(ring_ext_ab_new::FwdParams const&, long)"),
                ("softmax_step<float>(ring_ext_ab_new::FwdParams const&)", "fwd_task<float>(long)"),
                ("bwd_pair<float>(long)", "bwd_task<float>(long)"),
            ]
        )
    )
    tool = os.path.join(BENCH, "..", "tools", "perf_split.py")
    done = subprocess.run(
        [sys.executable, tool, str(trace), "--under", "ab_new::fwd_task"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert done.stdout.splitlines() == [
        "3 samples under ab_new::fwd_task",
        " 66.7%  gemm_tile<6, true>",
        " 33.3%  softmax_step<float>",
    ], done.stdout
