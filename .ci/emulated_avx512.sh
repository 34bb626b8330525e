#!/usr/bin/env bash
# The AVX-512 kernels on a CPU without AVX-512 (Note [Emulated AVX-512] in csrc/cpu/emulated_avx512.h):
# builds a copy of the tree as a fresh clone has it with RING_EXT_EMULATE_AVX512 (SIMDe's headers from
# Debian's libsimde-dev, fetched with `apt-get download`, no root needed) and runs the kernel and
# variant suites there: the avx512 level in process, avx512f, avx2 and baseline in the suites'
# lower-level subprocesses. On a machine whose CPU has AVX-512 the regular suite runs them natively too.
# Uses the venv `make test` made ($VENV, default .venv). About 5.5 minutes on 2 cores (the full CPU build
# about 2.5 of them, 2026-12-06). If SIMDe cannot be fetched, it says so loudly and the check is not run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
export MAX_JOBS=${MAX_JOBS:-2}
start=$SECONDS
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

mkdir "$SCRATCH/simde" "$SCRATCH/src"
if ! (cd "$SCRATCH/simde" && apt-get download libsimde-dev >"$SCRATCH/apt.log" 2>&1); then
  tail -5 "$SCRATCH/apt.log"
  echo "emulated_avx512: NOT RUN: libsimde-dev (SIMDe's headers) could not be downloaded" >&2
  exit 0
fi
dpkg-deb -x "$SCRATCH"/simde/libsimde-dev_*.deb "$SCRATCH/simde/root"
SIMDE=$SCRATCH/simde/root/usr/include

git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SCRATCH/src"
cd "$SCRATCH/src"
RING_EXT_EMULATE_AVX512=$SIMDE "$VENV/bin/python" setup.py build_ext --inplace >"$SCRATCH/build.log" 2>&1 \
  || { tail -30 "$SCRATCH/build.log"; echo "emulated_avx512: build FAILED" >&2; exit 1; }
export PYTHONPATH=$SCRATCH/src  # this build, not the venv's editable install
echo "emulated_avx512: built in $((SECONDS - start)) s"
"$VENV/bin/python" -c 'import ring_ext; i = ring_ext.build_info(); print("emulated_avx512:", i)
assert i["cpu_isa"] == "avx512" and i["emulated_avx512"], "not the emulated build"'
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_variants.py
echo "emulated_avx512: $((SECONDS - start)) s"
