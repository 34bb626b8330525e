#!/usr/bin/env bash
# CUDA build check (no GPU needed): builds ring_ext with its CUDA kernels against a CUDA build of torch
# for the default TORCH_CUDA_ARCH_LIST (8.0+PTX;9.0a), prints the ptxas resource report of the
# kernels (every candidate tiling included), fails on register spills in any kernel, fails unless the
# library embeds sm_80 and sm_90a code and sm_80 PTX (cuobjdump: newer GPUs such as sm_86/89/100/120
# JIT the PTX), then imports the package, checks the CUDA registrations and the candidate tilings, and
# that every CUDA test (-m cuda) skips with "no CUDA device".
#
# Needs python3 and nvcc (CUDA_HOME, default /usr/local/cuda); cuobjdump from CUDA_HOME, PATH or the
# copy triton ships in the venv. Makes the venv RING_EXT_CUDA_VENV (default .venv-cuda; reused when
# present) with torch==2.14.1 and builds from a scratch copy of the tree, so the CPU build in the repo
# is left alone. MAX_JOBS (default 2) bounds the parallel compile jobs. The compile should stay under
# 5 minutes on 2 free cores (the check prints wall and CPU time and warns above 300 s).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${RING_EXT_CUDA_VENV:-$ROOT/.venv-cuda}
TORCH_SPEC=torch==2.14.1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}
start=$SECONDS

if [[ ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  echo "cuda_build_check: nvcc not found under CUDA_HOME=$CUDA_HOME" >&2
  exit 1
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
  echo '*' >"$VENV/.gitignore"  # keeps the venv out of git without touching the repo's .gitignore
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1')" 2>/dev/null; then
  "$VENV/bin/pip" install -q "$TORCH_SPEC" ninja pytest numpy
fi
echo "cuda_build_check: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'), $("$CUDA_HOME/bin/nvcc" --version | tail -1)"

# Build from a scratch copy: the in-tree build/ and ring_ext/_build_info.py belong to the CPU build.
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SCRATCH"
LOG=$SCRATCH/build.log
build_start=$SECONDS
unset TORCH_CUDA_ARCH_LIST  # the check builds setup.py's default arch list
if ! (cd "$SCRATCH" && RING_EXT_CUDA=1 RING_EXT_PTXAS_VERBOSE=1 /usr/bin/time -f "%U %S" -o "$SCRATCH/cpu_time" \
  "$VENV/bin/pip" install -v --no-build-isolation . >"$LOG" 2>&1); then
  grep -E -B2 -A12 'error|Error' "$LOG" | head -150
  echo "cuda_build_check: build FAILED" >&2
  exit 1
fi
build_s=$((SECONDS - build_start))
cpu_s=$(awk '{printf "%d", $1 + $2}' "$SCRATCH/cpu_time")
echo "cuda_build_check: CUDA build (8.0+PTX;9.0a, MAX_JOBS=$MAX_JOBS) took $build_s s wall, $cpu_s s CPU"
if ((build_s > 300)); then
  echo "cuda_build_check: WARNING: compile above the 5-minute budget (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
fi

# ptxas report: one line per (kernel, arch); spills in any kernel fail the check.
"$VENV/bin/python" - "$LOG" <<'EOF'
import re
import subprocess
import sys

text = open(sys.argv[1], errors="replace").read()
entries = re.findall(
    r"Compiling entry function '(\S+)' for '(sm_\w+)'.*?"
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?"
    r"Used (\d+) registers",
    text,
    flags=re.S,
)
if not entries:
    sys.exit("cuda_build_check: no ptxas report found in the build log")
names = subprocess.run(
    ["c++filt"], input="\n".join(e[0] for e in entries), capture_output=True, text=True
).stdout.split("\n")
bad = []
print(f"{'kernel':<80} {'arch':<7} {'regs':>4} {'stack':>5} {'spill st/ld':>11}")
for (mangled, arch, stack, st, ld, regs), name in zip(entries, names, strict=False):
    name = re.sub(r"ring_ext::cuda::\(anonymous namespace\)::", "", name or mangled)
    name = re.sub(r"\(ring_ext::\w+, int\)|\(ring_ext::\w+\)", "", name)
    print(f"{name:<80} {arch:<7} {regs:>4} {stack:>5} {st + '/' + ld:>11}")
    if int(st) or int(ld):
        bad.append(f"{name} {arch}")
if bad:
    sys.exit("cuda_build_check: register spills: " + ", ".join(bad))
print(f"cuda_build_check: {len(entries)} kernel builds, no spills")
EOF

# What the library embeds: machine code for sm_80 and sm_90a, and sm_80 PTX for every newer GPU.
CUOBJDUMP=$(command -v "$CUDA_HOME/bin/cuobjdump" cuobjdump "$VENV"/lib/python*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -1 || true)
if [[ -z $CUOBJDUMP ]]; then
  echo "cuda_build_check: cuobjdump not found (CUDA_HOME/bin, PATH, triton in the venv)" >&2
  exit 1
fi
LIB=$(ls "$SCRATCH"/build/lib*/ring_ext/_C*.so)
"$CUOBJDUMP" --list-elf "$LIB" >"$SCRATCH/elf.txt" 2>&1 || true
"$CUOBJDUMP" --list-ptx "$LIB" >"$SCRATCH/ptx.txt" 2>&1 || true
count() { grep -o "sm_[0-9a-z]*\.$1" "$2" | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}'; }
echo "cuda_build_check: cuobjdump: cubins $(count cubin "$SCRATCH/elf.txt"); PTX $(count ptx "$SCRATCH/ptx.txt")"
for want in sm_80.cubin sm_90a.cubin; do
  grep -q "$want" "$SCRATCH/elf.txt" || { echo "cuda_build_check: no $want in $LIB" >&2; exit 1; }
done
if ! grep -q "sm_80.ptx" "$SCRATCH/ptx.txt"; then
  cat "$SCRATCH/ptx.txt" >&2
  echo "cuda_build_check: no sm_80 PTX in $LIB: GPUs other than sm_80/sm_90a could not run the kernels" >&2
  exit 1
fi

# Import from outside the tree so that the installed package (not the sources) is what loads.
(cd "$SCRATCH" && mkdir -p empty && cd empty && "$VENV/bin/python" - <<'EOF'
import torch

import ring_ext

info = ring_ext.build_info()
print("cuda_build_check: build_info", info)
assert info["cuda"] is True, info
assert info["cuda_archs"] == ["8.0+PTX", "9.0a"], info
# Every op with tensors has a CUDA kernel; the tensor-free ones (ring_schedule, cpu_isa) have one
# kernel for every device (CompositeImplicitAutograd).
has = torch._C._dispatch_has_kernel_for_dispatch_key
ops = sorted(
    n
    for n in torch._C._dispatch_get_all_op_names()
    if n.startswith("ring_ext::") and not has(n, "CompositeImplicitAutograd")
)
assert {"ring_ext::attention", "ring_ext::attention_bwd", "ring_ext::fwd"} <= set(ops), ops
for op in ops:
    assert has(op, "CUDA"), op
print("cuda_build_check: CUDA kernels registered for", ", ".join(o.split("::")[1] for o in ops))
# The candidate tilings (Note [Candidate tilings]): every head-dim bucket of both kernels is compiled,
# with 2-3 forward tilings each up to 256 and 3 backward tilings for the benchmarked head dims 64 and
# 128; 512 has one of each (Notes [Head dim 512 in the forward] and [... backward]).
tilings = info["cuda_tilings"]
buckets = (64, 128, 256, 512)
count = {(k, d): sum(t.startswith(f"{k}/{d}/") for t in tilings) for k in ("fwd", "bwd") for d in buckets}
assert all(count[("fwd", d)] >= 2 for d in (64, 128, 256)) and count[("fwd", 512)] >= 1, count
assert count[("bwd", 64)] >= 3 and count[("bwd", 128)] >= 3, count
assert count[("bwd", 256)] >= 1 and count[("bwd", 512)] >= 1, count
print("cuda_build_check: candidate tilings", ", ".join(tilings))
EOF
)
# The CUDA tests (the CUDA variants of the shared kernel suite, and the CUDA-only file) must be
# collected and skip cleanly here (no GPU); they run in tools/gpu_check.sh. pytest imports ring_ext
# from the scratch tree, so give that tree the library just built.
cp "$LIB" "$SCRATCH/ring_ext/"
(cd "$SCRATCH" && "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m cuda tests/test_kernels.py tests/test_cuda.py -rs >"$SCRATCH/tests.log" 2>&1) || true
tail -3 "$SCRATCH/tests.log"
# Every test must be collected and skipped for exactly this reason (no other skip, no failure).
if ! grep -qE '^[0-9]+ skipped(, [0-9]+ deselected)? in' "$SCRATCH/tests.log" || grep -E '^SKIPPED' "$SCRATCH/tests.log" | grep -vq ': no CUDA device$'; then
  echo "cuda_build_check: every CUDA test (-m cuda) must skip with the reason 'no CUDA device'" >&2
  exit 1
fi
echo "cuda_build_check: OK in $((SECONDS - start)) s"
