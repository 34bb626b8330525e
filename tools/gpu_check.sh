#!/usr/bin/env bash
# GPU verification in one run: build for sm_90a, the CUDA tests against the float64 oracle, then the
# kernel benchmark against PyTorch's SDPA backends. Everything is logged into OUTDIR.
#
#   tools/gpu_check.sh OUTDIR
#
# For a machine with a GPU, torch (CUDA 13.0 build, e.g. 2.11), nvcc 13.0, ninja and pytest, and no
# internet: nothing is downloaded. PYTHON picks the interpreter (default python3), CUDA_HOME the
# toolkit (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST the archs (default 9.0a). Each part is
# time-boxed (build 240 s, tests 150 s, benchmark 200 s incl. its own 150 s budget) so the whole run
# stays under 8 minutes; a failing test does not stop the benchmark. Outputs: gpu_check.log (all),
# build.log, ptxas.txt, tests.log, tests.xml, bench_cuda.md, bench_cuda.json, summary.md.
set -euo pipefail
OUT=${1:?usage: tools/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export RING_EXT_CUDA=1 RING_EXT_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
start=$SECONDS
status_build=fail status_tests=fail status_bench=fail

echo "== gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())' || true
"$CUDA_HOME/bin/nvcc" --version | tail -1 || true

echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
t=$SECONDS
if timeout 240 "$PY" -m pip install -v --no-build-isolation --no-deps --no-index . >"$OUT/build.log" 2>&1; then
  # Tests import ring_ext from this tree: give it the library just built.
  cp build/lib*/ring_ext/_C*.so ring_ext/
  status_build=ok
else
  grep -E -B2 -A12 'error|Error' "$OUT/build.log" | head -100 || true
fi
echo "build: $status_build in $((SECONDS - t)) s"
grep -E "Compiling entry function|spill|Used [0-9]+ registers" "$OUT/build.log" >"$OUT/ptxas.txt" || true
if [[ $status_build != ok ]]; then
  echo "build failed: nothing else can run (see build.log)"
  exit 1
fi

echo "== tests"
t=$SECONDS
if timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py --junitxml="$OUT/tests.xml" \
  >"$OUT/tests.log" 2>&1; then
  status_tests=ok
fi
tail -40 "$OUT/tests.log"
echo "tests: $status_tests in $((SECONDS - t)) s"

echo "== benchmark"
t=$SECONDS
if timeout 200 "$PY" benchmarks/bench_cuda.py --out "$OUT" --budget 150; then
  status_bench=ok
fi
echo "benchmark: $status_bench in $((SECONDS - t)) s"

{
  echo "# gpu_check summary"
  echo
  echo "build: $status_build, tests: $status_tests, benchmark: $status_bench, total $((SECONDS - start)) s"
  echo
  grep -E "passed|failed|error" "$OUT/tests.log" | tail -1 || true
  echo
  cat "$OUT/bench_cuda.md" 2>/dev/null || echo "(no benchmark table)"
} >"$OUT/summary.md"
cat "$OUT/summary.md"
[[ $status_tests == ok && $status_bench == ok ]]
