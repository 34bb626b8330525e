#!/usr/bin/env bash
# Issue 27's tables for every CPU level this machine runs, in one command: for each level (best
# first, as csrc/cpu/dispatch.cpp picks), the kernels before the issue (e133338^) against HEAD,
# paired, with % of the widest-vector FMA peak; the kernels against PyTorch's SDPA at that level
# (bench_kernels.py, a lower level forced by RING_EXT_CPU_ISA); and the matrix products alone
# (bench_tiles.py). Written for a session on an AVX-512 CPU (the levels avx512f and avx512 have
# no tables yet: every session so far ran on an AVX2-only AMD EPYC).
#
#   tools/cpu_level_tables.sh [OUTDIR]        (OUTDIR default: out/cpu_levels; about 25 minutes
#                                              on 2 cores with every level, half of it bench_kernels)
#
# The before of the avx512f level is avx2: e133338^ had no avx512f level, so on a CPU with AVX-512F
# but no BF16 it ran its AVX2 kernels, and the pair is --base-isa avx2 --isa avx512f. Run it with
# nothing else on the machine (`uptime` is in every file). Needs the extension built in place
# (make build) and git history back to e133338. QUICK=1 runs every step at a tiny size (a check
# of the script itself, a few minutes: the kernels of both revisions are compiled per level).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/cpu_levels}
PY=${PYTHON:-python}
mkdir -p "$OUT"
BASE=e133338^
if [ "${QUICK:-0}" = 1 ]; then
  PAIRS=(--shapes fp32:64:256:causal --repeats 1) SDPA=(--quick --repeats 1)
  TILES=(--dims 16 --rounds 1 --seconds 0.001)
else
  PAIRS=(--repeats 5) SDPA=() TILES=()
fi

{ uptime; lscpu | grep -E "Model name|Flags"; } > "$OUT/machine.txt"
LEVELS=$(PYTHONPATH=benchmarks $PY -c "from ab_kernels import cpu_isas; print(' '.join(cpu_isas()))")
echo "levels: $LEVELS" | tee -a "$OUT/machine.txt"

for level in $LEVELS; do
  base_isa=$level
  [ "$level" = avx512f ] && base_isa=avx2
  echo "== $level: $BASE ($base_isa) against HEAD"
  { uptime; $PY benchmarks/ab_kernels.py --base "$BASE" --new HEAD --isa "$level" \
      --base-isa "$base_isa" --threads 2 "${PAIRS[@]}"; } > "$OUT/pairs_$level.md"
  echo "== $level: against SDPA"
  { uptime; RING_EXT_CPU_ISA=$level $PY benchmarks/bench_kernels.py "${SDPA[@]}"; } > "$OUT/sdpa_$level.md"
done
echo "== products alone"
{ uptime; $PY benchmarks/bench_tiles.py "${TILES[@]}"; } > "$OUT/tiles.md"
echo "tables in $OUT"
