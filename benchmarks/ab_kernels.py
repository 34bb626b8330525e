"""Two revisions of the CPU kernels timed against each other in one process, on the same inputs.

On a shared machine, timing two builds in separate processes gives ratios that move by 10-20% between
runs. This compiles both revisions' kernels into one C++ binary (benchmarks/ab_kernels_main.cpp, Note
[Two revisions in one binary]) that calls flash_fwd and flash_bwd directly (no torch), one warm-up
each, then base, new, base, new, ... on the same inputs, so load that comes and goes hits both alike.
Each row gives each revision's median and min ms, new/base as the median over repetitions of the two
times of the same repetition (and the range of those ratios), and % of the FMA-loop peak
(benchmarks/peak.py, measured before and after the table, the larger). The binary also checks that
the revisions agree: out and lse forward, dq, dk and dv backward, as max |base - new| over max |base|;
above 1e-4 (fp32) or 1e-2 (bf16) the row says MISMATCH and the script exits 1.

REV is any git revision; --new defaults to the working tree. Both run the --isa level, unless
--base-isa names another for base: a level new has and base lacks is then paired against the level base
ran on that CPU (issue 27's before and after on an AVX-512 CPU without BF16: --isa avx512f --base-isa
avx2 --base e133338^). Each revision's csrc/ is extracted to a temp dir (git archive) and its
kernels_<isa>.cpp copied with RING_EXT_CPU_ISA renamed, and the binary is cached by a hash of both
trees, the levels, the C++ main, the flags and the compiler (compiled.py). The params structs cross from one
revision's code to the other's, so two revisions whose csrc/common/params.h differ are refused.

Inputs: N(0, 1) q, k, v, dout in [1, s, h, d] (bf16: rounded to nearest even), scale 1/sqrt(d); the
backward gets base's lse and delta = rowsum(dout * out) and adds into zeroed float32 dq, dk, dv; all
heads go in one call. Masks: full, causal, or packed lognormal documents (--docs of them, causal
within each, passed as kRows intervals; ring_ext.testing.documents.lognormal_docs, seed 0, the
lengths benchmarks/bench_varlen.py uses). FLOPs: forward 4 * b * h * d per visible (query, key) pair,
backward 2.5x that; causal and packed count half of each square, as benchmarks/bench_kernels.py does.

Mask `loop` (e.g. fp32:64:16384:loop) measures issue 27's packed target instead of two revisions:
the same documents as `packed`, with the new kernels run as a per-document loop (one causal call per
document, in base's columns) and as the packed call (new's columns), so new/base is packed over the
loop. --base is still compiled but not run for such a row.

    python benchmarks/ab_kernels.py --base HEAD              # HEAD against the working tree
    python benchmarks/ab_kernels.py --base main --new perf3 --repeats 9
    python benchmarks/ab_kernels.py --base HEAD~1 --shapes fp32:128:4096:full bf16:64:16384:packed
    python benchmarks/ab_kernels.py --base HEAD --shapes fp32:64:16384:loop bf16:64:16384:loop
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from compiled import cached_binary, compiler, read, tree_digest
from peak import cpu_model, fma_peak

import ring_ext
from ring_ext.testing.documents import lognormal_docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "benchmarks", "ab_kernels_main.cpp")
CXXFLAGS = ["-O3", "-std=c++20", "-fopenmp"]  # setup.py's for the kernel files; targets by pragma
ISAS = ("avx512", "avx512f", "avx2", "baseline")  # best first, as csrc/cpu/dispatch.cpp
MASKS = ("full", "causal", "packed", "loop")
DOCUMENTS = ("packed", "loop")  # the masks of lognormal documents
DEFAULT_SHAPES = ["fp32:64:4096:causal", "fp32:128:4096:full", "bf16:64:4096:causal", "fp32:64:16384:packed"]
BATCH = 1  # the binary's inputs are [1, s, h, d]


def parse_shape(text: str) -> tuple[str, int, int, str]:
    """'bf16:64:16384:packed' -> ('bf16', 64, 16384, 'packed')."""
    try:
        dtype, d, s, mask = text.split(":")
        assert dtype in ("fp32", "bf16") and mask in MASKS and int(d) > 0 and int(s) > 0
        return dtype, int(d), int(s), mask
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(
            f"shape must be dtype:d:s:mask (dtype fp32|bf16, mask {'|'.join(MASKS)}), got {text!r}"
        ) from None


def cpu_isas() -> list[str]:
    """The kernel builds this CPU runs, best first: the extension's level (csrc/cpu/dispatch.cpp) and
    those below it."""
    info = ring_ext.build_info()
    if info["emulated_avx512"]:
        sys.exit("ab_kernels: the installed ring_ext is an emulated AVX-512 test build (setup.py)")
    return list(ISAS[ISAS.index(info["cpu_isa"]) :])


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", ROOT, *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def extract(rev: str | None, dest: str) -> str:
    """csrc/ of revision rev (None: the working tree) into dest; returns how to name it in the header."""
    if rev is None:
        shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(dest, "csrc"))
        changed = " with uncommitted csrc changes" if git("status", "--porcelain", "--", "csrc") else ""
        return f"working tree (HEAD {git('rev-parse', '--short', 'HEAD')}{changed})"
    try:
        commit = git("rev-parse", "--verify", "--short", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        sys.exit(f"ab_kernels: {rev!r} is not a git revision of {ROOT}")
    os.makedirs(dest)
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit, "csrc"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    return commit if rev.startswith(commit) else f"{rev} ({commit})"


def check_same_params(base: str, new: str) -> None:
    """Refuse two trees whose csrc/common/params.h differ: the structs pass from this binary's main
    (compiled with new's) to base's kernels, which would read them with another layout."""
    base_params, new_params = (read(os.path.join(tree, "csrc", "common", "params.h")) for tree in (base, new))
    if base_params != new_params:
        sys.exit(
            "ab_kernels: csrc/common/params.h differs between base and new; the params structs cross "
            "the two revisions' code, so they must be the same (compare revisions that share it)"
        )


def write_kernels(tree: str, isa: str, name: str) -> str:
    """tree's kernels_<isa>.cpp copied as kernels_<name>.cpp next to it, compiling its kernels into
    namespace ring_ext::cpu::<name>; returns its path."""
    source = os.path.join(tree, "csrc", "cpu", f"kernels_{isa}.cpp")
    if not os.path.exists(source):
        sys.exit(f"ab_kernels: {source} is missing from one of the revisions")
    line = f"#define RING_EXT_CPU_ISA {isa}"
    lines = read(source).decode().split("\n")
    if lines.count(line) != 1:
        sys.exit(f"ab_kernels: expected one line {line!r} in kernels_{isa}.cpp of one of the revisions")
    lines[lines.index(line)] = f"#define RING_EXT_CPU_ISA {name}"
    path = os.path.join(tree, "csrc", "cpu", f"kernels_{name}.cpp")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def build(trees: dict[str, str], isas: dict[str, str]) -> str:
    """The binary of base's and new's kernels (each revision's at its level in isas) and
    ab_kernels_main.cpp, compiled unless cached."""

    def compile_into(binary: str) -> None:
        objects, jobs = [], []
        for name, tree in trees.items():  # the two revisions' kernels, two jobs at once
            objects.append(os.path.join(os.path.dirname(tree), f"{name}.o"))
            source = write_kernels(tree, isas[name], name)
            jobs.append(
                subprocess.Popen(
                    [compiler(), *CXXFLAGS, f"-Dring_ext=ring_ext_{name}", "-c", source, "-o", objects[-1]]
                )
            )
        if any(job.wait() != 0 for job in jobs):
            sys.exit("ab_kernels: compiling the kernels failed (the compiler's messages are above)")
        include = os.path.join(trees["ab_new"], "csrc")
        subprocess.run([compiler(), *CXXFLAGS, "-I", include, MAIN, *objects, "-o", binary], check=True)

    key = "\0".join([" ".join(CXXFLAGS), *isas.values(), *(tree_digest(t) for t in trees.values())])
    return cached_binary("ab_kernels", key.encode() + read(MAIN), compile_into)


def flops(dtype: str, d: int, s: int, mask: str, docs: list[int], heads: int, backward: bool) -> float:
    pairs = s * s if mask == "full" else s * s / 2 if mask == "causal" else sum(n * n / 2 for n in docs)
    return 4 * BATCH * heads * d * pairs * (2.5 if backward else 1.0)


def table_row(shape, docs: list[int], heads: int, result: list[str], peak: dict[str, float]) -> str:
    """One markdown row from one result line of the binary (ab_kernels_main.cpp)."""
    dtype, d, s, mask = shape
    _, pass_name, base_ms, new_ms, diffs, status = result
    base, new = ([float(x) for x in times.split(",")] for times in (base_ms, new_ms))
    ratios = [n / b for b, n in zip(base, new)]
    work = flops(dtype, d, s, mask, docs, heads, pass_name == "bwd")

    def percent(ms: float) -> str:
        return f"{100 * work / (ms / 1e3) / 1e9 / peak[dtype]:.0f}%"

    check = diffs.replace(",", ", ") if status == "ok" else f"**MISMATCH** {diffs.replace(',', ', ')}"
    return (
        f"| {dtype} | {d} | {s} | {mask} | {pass_name} | {statistics.median(base):.1f} | "
        f"{statistics.median(new):.1f} | {min(base):.1f} | {min(new):.1f} | {statistics.median(ratios):.3f} | "
        f"{min(ratios):.2f}-{max(ratios):.2f} | {percent(statistics.median(base))} | "
        f"{percent(statistics.median(new))} | {check} |"
    )


def run_binary(binary: str, args, shapes, docs: dict) -> tuple[list[list[str]], int]:
    """The binary's result lines, split on tabs, and its exit status; progress goes to stderr."""
    binary_mask = {"packed": "docs", "loop": "loop"}  # the binary's names, followed by the lengths
    cases = [
        f"{dtype}:{d}:{s}:"
        + (f"{binary_mask[mask]}:{','.join(map(str, docs[s]))}" if mask in DOCUMENTS else mask)
        for dtype, d, s, mask in shapes
    ]
    command = [binary, str(args.threads), str(args.repeats), str(args.heads), *cases]
    results = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            results.append(line.rstrip("\n").split("\t"))
            name = ":".join(results[-1][0].split(":")[:4])
            print(f"{name} {results[-1][1]}: {results[-1][5]}", file=sys.stderr)
    if proc.returncode not in (0, 1):
        sys.exit(f"ab_kernels: the binary failed with status {proc.returncode}")
    return results, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="git revision of the baseline kernels")
    parser.add_argument("--new", help="git revision of the kernels to compare (default: the working tree)")
    parser.add_argument(
        "--isa", choices=ISAS, help="kernel build to compare (default: the best this CPU runs)"
    )
    parser.add_argument(
        "--base-isa",
        choices=ISAS,
        help="base's kernel build, when it is not --isa's: a level new has and base lacks, against the "
        "level base ran on that CPU (e.g. --isa avx512f --base-isa avx2)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of base, new after the warm-up")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument(
        "--docs", type=int, default=10, help="documents of a packed shape (lognormal, seed 0)"
    )
    parser.add_argument(
        "--shapes", nargs="+", type=parse_shape, help="dtype:d:s:full|causal|packed|loop entries"
    )
    args = parser.parse_args()
    shapes = args.shapes or [parse_shape(text) for text in DEFAULT_SHAPES]
    runnable = cpu_isas()
    isa = args.isa or runnable[0]
    isas = {"ab_base": args.base_isa or isa, "ab_new": isa}
    for level in isas.values():
        if level not in runnable:
            sys.exit(f"ab_kernels: this CPU cannot run the {level} kernels (it runs {', '.join(runnable)})")
    docs = {s: list(lognormal_docs(s, args.docs, seed=0)) for _, _, s, mask in shapes if mask in DOCUMENTS}

    with tempfile.TemporaryDirectory(prefix="ring_ext_ab_") as tmp:
        trees = {"ab_base": os.path.join(tmp, "base"), "ab_new": os.path.join(tmp, "new")}
        base_name, new_name = extract(args.base, trees["ab_base"]), extract(args.new, trees["ab_new"])
        check_same_params(*trees.values())
        binary = build(trees, isas)

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    peak_before = fma_peak(args.threads)
    results, status = run_binary(binary, args, shapes, docs)
    peak_after = fma_peak(args.threads)
    peak = {k: max(peak_before[k], peak_after[k]) for k in peak_before}
    lines = [
        f"CPU kernels A/B (benchmarks/ab_kernels.py): base {base_name}, new {new_name}; cpu: {cpu_model()}, "
        + (f"isa {isa}, " if isas["ab_base"] == isa else f"isa base {isas['ab_base']}, new {isa}, ")
        + f"{args.threads} threads, b={BATCH} h={args.heads}, {args.repeats} rounds of base, new "
        f"after a warm-up; load average (1, 5, 15 min) at start: {load}.",
        "",
        "| dtype | d | s | mask | pass | base ms | new ms | base min | new min | new/base | range "
        "| base % peak | new % peak | diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    passes = [shape for shape in shapes for _ in ("fwd", "bwd")]  # the binary's lines, in order
    lines += [
        table_row(shape, docs.get(shape[2], []), args.heads, res, peak) for shape, res in zip(passes, results)
    ]
    lines.append(
        "\nms: median and min; new/base: median of the per-round ratios, range their min-max; diff: "
        "max |base - new| / max |base| of each result. A loop row times the new kernels twice: base is "
        "a causal call per document, one after the other, and new is the packed call over the same "
        "documents, so new/base is packed over the per-document loop. "
        "FMA-loop peak, GFLOP/s (before / after): "
        + ", ".join(f"{k} {peak_before[k]:.0f} / {peak_after[k]:.0f}" for k in peak)
        + f". Load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}."
    )
    lines += [f"Packed s={s}: {len(lengths)} documents of {lengths}." for s, lengths in docs.items()]
    print("\n".join(lines), flush=True)
    if status != 0:
        sys.exit("ab_kernels: MISMATCH: base and new disagree beyond the tolerance (rows marked above)")


if __name__ == "__main__":
    main()
