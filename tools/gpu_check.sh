#!/usr/bin/env bash
# GPU verification in one run, prepared for a machine we hold for minutes (an H200: under 8 minutes).
#
#   tools/gpu_check.sh [--dry-run] [OUTDIR]        (OUTDIR default: out/gpu_check)
#
# Parts, in this order, each time-boxed; a failed part does not stop the later ones (only a failed
# build or missing prerequisites do), and the whole run keeps to BUDGET_S (default 470 s):
#
#   prereqs     python + torch (CUDA build) + a GPU, nvcc, ninja, pytest, NCCL, compute-sanitizer:
#               checked first; whatever is missing is named
#   build       python setup.py build_ext --inplace for this GPU's arch (TORCH_CUDA_ARCH_LIST overrides),
#               ptxas report (registers, spills) into ptxas.txt                             <= 200 s
#   tests       pytest -m cuda tests/test_kernels.py tests/test_cuda.py (the CUDA variants of the shared
#               kernel suite and the CUDA-only tests against the float64 oracle, every path: tensor
#               cores, SIMT, merge, every candidate tiling), JUnit XML                      <= 170 s
#   cp          CP attention at cp=1 over NCCL on a side stream (test_cuda.py -k cp_attention), and
#               the sharded-KV-cache decode path over NCCL (tests/test_inference_cuda.py)   <= 40 s
#   memcheck    compute-sanitizer --tool memcheck over one forward and one backward of every
#               kernel family (tensor cores d 64/128/256/512, SIMT fp32/odd dims/misaligned/d 512,
#               softcap, sinks, a v head dim of its own, merge) and of every candidate tiling <= 50 s
#   racecheck   the same cases under --tool racecheck                                       <= 50 s
#   bench       benchmarks/bench_cuda.py: TFLOP/s of every candidate tiling against PyTorch's SDPA
#               backends, the winner per shape                                              <= 150 s
#
# Writes into OUTDIR: gpu_check.log (everything), summary.md (pass/fail per part, the GPU, the SIMT
# float32 errors, the TFLOP/s table), build.log, ptxas.txt, tests.log, tests.xml, cp.log, memcheck.log,
# racecheck.log, sanitize_cases.py, bench_cuda.md/json. Nothing is downloaded (no network needed).
#
# --dry-run (any machine, no GPU needed): prints the plan, checks every prerequisite it can, checks that
# the test files collect, that the sanitizer cases compile and that the benchmark parses its options,
# and writes summary.md with the plan; it builds and runs nothing on a GPU. Exit status: 0 when the
# run could start (dry run: when the scripts themselves are sound), 2 when prerequisites are missing,
# 1 when a part failed.
#
# Environment: PYTHON (default python3: the venv with torch), CUDA_HOME (default /usr/local/cuda),
# TORCH_CUDA_ARCH_LIST (default: the GPU's own arch, 9.0a on H100/H200), MAX_JOBS (default nproc),
# BUDGET_S (default 470).
set -uo pipefail

DRY=0
if [[ ${1:-} == --dry-run ]]; then
  DRY=1
  shift
fi
OUT=${1:-out/gpu_check}
cd "$(dirname "$0")/.."
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
: >"$OUT/gpu_check.log"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

PY=${PYTHON:-python3}
# The venv's own tools (ninja, its entry points) without activating it.
if PY_PATH=$(command -v "$PY" 2>/dev/null); then export PATH="$(dirname "$PY_PATH"):$PATH"; fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
BUDGET_S=${BUDGET_S:-470}
START=$SECONDS
PARTS=(prereqs build tests cp memcheck racecheck bench)
declare -A STATUS SECS DETAIL BOX=([build]=200 [tests]=170 [cp]=40 [memcheck]=50 [racecheck]=50 [bench]=150)
for part in "${PARTS[@]}"; do STATUS[$part]="not run" SECS[$part]=0 DETAIL[$part]=""; done

say() { echo "gpu_check: $*"; }

# Seconds a part may use: its box, cut to what the budget has left (0: no time left).
time_for() {
  local left=$((BUDGET_S - (SECONDS - START)))
  local box=${BOX[$1]}
  ((left < 20)) && { echo 0; return; }
  echo $((box < left ? box : left))
}

# run_part NAME LOGFILE CMD...: runs CMD under its time box, records status and seconds.
run_part() {
  local name=$1 log=$2 t0=$SECONDS limit rc
  shift 2
  limit=$(time_for "$name")
  if ((limit == 0)); then
    STATUS[$name]="skipped" DETAIL[$name]="no time left in the ${BUDGET_S} s budget"
    say "$name: skipped (no time left)"
    return 0
  fi
  say "$name: running (up to $limit s): $*"
  # SIGINT first: pytest then still writes its report (JUnit XML included) for the tests that ran.
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$log" 2>&1
  rc=$?
  SECS[$name]=$((SECONDS - t0))
  if ((rc == 0)); then
    STATUS[$name]=pass
  elif ((rc == 124 || rc == 130 || rc == 137)); then
    STATUS[$name]=fail DETAIL[$name]="timed out after $limit s. ${DETAIL[$name]}"
  else
    STATUS[$name]=fail DETAIL[$name]="exit $rc: $(grep -v '^\s*$' "$log" | tail -1 | cut -c1-200). ${DETAIL[$name]}"
  fi
  say "$name: ${STATUS[$name]} in ${SECS[$name]} s (log: $log)"
  tail -15 "$log"
}

# ---- prerequisites ---------------------------------------------------------------------------------
missing=() warnings=()
have_py=0 have_gpu=0
if command -v "$PY" >/dev/null; then
  if info=$("$PY" - 2>&1 <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.version.cuda is None:
    raise SystemExit("torch is a CPU build")
EOF
  ); then
    have_py=1
    say "python: $("$PY" --version 2>&1), $info"
  else
    missing+=("a CUDA build of torch in $PY (${info##*$'\n'})")
  fi
else
  missing+=("python ($PY)")
fi
if ((have_py)); then
  if gpu=$("$PY" -c 'import torch
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
      f"{p.shared_memory_per_block_optin // 1024} KiB shared memory per block (opt-in)")' 2>/dev/null); then
    have_gpu=1
    say "GPU: $gpu"
  else
    missing+=("a CUDA device visible to torch")
    gpu="none"
  fi
  "$PY" -c 'import pytest' 2>/dev/null || missing+=("pytest (pip install pytest)")
  "$PY" -c 'import torch.distributed as d; raise SystemExit(not d.is_nccl_available())' 2>/dev/null ||
    warnings+=("torch without NCCL: the cp part will fail")
  if ! command -v ninja >/dev/null && ! "$PY" -c 'import ninja' 2>/dev/null; then
    warnings+=("ninja not found: the build compiles serially and may not fit its ${BOX[build]} s")
  fi
fi
if [[ -x $CUDA_HOME/bin/nvcc ]]; then
  say "nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -1)"
else
  missing+=("nvcc under CUDA_HOME=$CUDA_HOME")
fi
SANITIZER=$(command -v "$CUDA_HOME/bin/compute-sanitizer" compute-sanitizer 2>/dev/null | head -1)
SAN_FILTER=()
if [[ -z $SANITIZER ]]; then
  warnings+=("compute-sanitizer not found (CUDA_HOME/bin, PATH): memcheck and racecheck will be skipped")
elif "$SANITIZER" --help 2>/dev/null | grep -q -- "--kernel-name"; then
  SAN_FILTER=(--kernel-name kns=ring_ext)  # instrument only our kernels: torch's own run at full speed
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
touch .gpu_check_write_test 2>/dev/null && rm -f .gpu_check_write_test || missing+=("a writable source tree ($PWD)")
for w in "${warnings[@]}"; do say "warning: $w"; done
if ((${#missing[@]})); then
  STATUS[prereqs]=fail DETAIL[prereqs]="missing: $(IFS=';'; echo "${missing[*]}")"
  say "MISSING: ${DETAIL[prereqs]#missing: }"
else
  STATUS[prereqs]=pass DETAIL[prereqs]="$(IFS=';'; echo "${warnings[*]}")"
fi

# Arch: the GPU's own (sm_90 builds 9.0a, whose cubin carries the wgmma-capable features).
if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
  if ((have_gpu)); then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}.{b}" + ("a" if (a, b) == (9, 0) else ""))')
  else
    TORCH_CUDA_ARCH_LIST=9.0a
  fi
fi
export TORCH_CUDA_ARCH_LIST RING_EXT_CUDA=1 RING_EXT_PTXAS_VERBOSE=1

# ---- the sanitizer cases: one forward and one backward per kernel family, tiny and ragged ------------
cat >"$OUT/sanitize_cases.py" <<'EOF'
"""One forward + backward of every ring_ext kernel family and candidate tiling on tiny ragged shapes (for
compute-sanitizer)."""

import torch

import ring_ext  # registers torch.ops.ring_ext
import ring_ext.cuda_tilings
import ring_ext.masks

g = torch.Generator(device="cuda").manual_seed(0)


def qkv(b, sq, sk, hq, hkv, d, dtype, misaligned=False, dv=None):
    pad, dv = (1 if misaligned else 0), dv or d
    q = torch.randn(b, sq, hq, d + pad, generator=g, device="cuda").to(dtype)[..., pad:]
    k = torch.randn(b, sk, hkv, d + pad, generator=g, device="cuda").to(dtype)[..., pad:]
    v = torch.randn(b, sk, hkv, dv + pad, generator=g, device="cuda").to(dtype)[..., pad:]
    return q, k, v


CASES = {  # name: (inputs, causal, q_offset)
    "tensor cores bf16 d64": (qkv(1, 70, 150, 2, 1, 64, torch.bfloat16), True, 80),
    "tensor cores fp16 d128": (qkv(2, 90, 140, 2, 2, 128, torch.float16), False, 0),
    "tensor cores bf16 d256": (qkv(1, 70, 75, 2, 1, 256, torch.bfloat16), True, 5),
    "simt fp32 d64": (qkv(1, 40, 70, 2, 1, 64, torch.float32), True, 30),
    "simt bf16 d33": (qkv(1, 40, 70, 2, 1, 33, torch.bfloat16), True, 30),
    "simt fp16 d100 misaligned": (qkv(1, 30, 50, 2, 2, 100, torch.float16, misaligned=True), False, 0),
    "simt fp32 d256": (qkv(1, 20, 40, 2, 1, 256, torch.float32), True, 20),
}
for name, ((q, k, v), causal, q_offset) in CASES.items():
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.2, causal, q_offset, 0)
    grads = torch.ops.ring_ext.bwd(torch.randn_like(out), q, k, v, out, lse, 0.2, causal, q_offset, 0)
    torch.cuda.synchronize()
    assert all(torch.isfinite(t).all() for t in (out, *grads)), name
    print("ok:", name, flush=True)
# Softcap, sinks, a v head dim of its own (MLA) and head dims up to 512 (Note [Softcap and sinks] in
# csrc/common/params.h; Notes [Head dim 512 in the forward] / [... backward] in csrc/cuda/flash_*.cu).
SINKS = torch.randn(4, generator=g, device="cuda")
SOFTCAP, BOTH = {"softcap": 1.5}, {"softcap": 2.0, "sinks": SINKS}
for name, (q, k, v), causal, q_offset, extra in [
    ("tensor cores bf16 d64 softcap", qkv(1, 70, 150, 4, 2, 64, torch.bfloat16), True, 80, SOFTCAP),
    ("tensor cores fp16 d128 sinks", qkv(1, 90, 140, 4, 2, 128, torch.float16), True, 0, {"sinks": SINKS, "k": 20}),
    ("tensor cores bf16 d192/v128 (MLA)", qkv(1, 70, 75, 4, 2, 192, torch.bfloat16, dv=128), True, 5, {}),
    ("tensor cores bf16 d512", qkv(1, 70, 75, 4, 2, 512, torch.bfloat16), True, 5, {}),
    ("tensor cores fp16 d96/v264 softcap sinks", qkv(1, 40, 70, 4, 1, 96, torch.float16, dv=264), False, 0, BOTH),
    ("simt fp32 d512 softcap sinks", qkv(1, 20, 40, 4, 2, 512, torch.float32), True, 20, BOTH),
    ("simt bf16 d33/v300", qkv(1, 30, 50, 4, 2, 33, torch.bfloat16, dv=300), True, 10, {}),
]:
    extra = dict(extra)
    k_offset = extra.pop("k", 0)  # keys ahead of the rows: the first rows see none (out 0, lse = sink)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.2, causal, q_offset, k_offset, **extra)
    softcap = extra.get("softcap", 0.0)
    grads = torch.ops.ring_ext.bwd(
        torch.randn_like(out), q, k, v, out, lse, 0.2, causal, q_offset, k_offset, softcap=softcap
    )
    torch.cuda.synchronize()
    assert all(torch.isfinite(t).all() for t in (out, *grads)), name
    print("ok:", name, flush=True)
# Per-row key intervals (packed documents [0, 3, 70, 71, 130] with a window of 9, rows 130.. padding).
rows = torch.arange(140)
visible = ring_ext.masks.visible_keys(rows, rows, (0, 3, 70, 71, 130), True, 9).to("cuda")
for name, dtype, d, misaligned in [
    ("tensor cores bf16 d64", torch.bfloat16, 64, False),
    ("tensor cores fp16 d256", torch.float16, 256, False),
    ("simt fp32 d64", torch.float32, 64, False),
    ("simt bf16 d40 misaligned", torch.bfloat16, 40, True),
]:
    q, k, v = qkv(1, 140, 140, 2, 1, d, dtype, misaligned)
    out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.2, False, visible=visible)
    grads = torch.ops.ring_ext.bwd(torch.randn_like(out), q, k, v, out, lse, 0.2, False, visible=visible)
    torch.cuda.synchronize()
    assert all(torch.isfinite(t).all() for t in (out, *grads)), name
    print("ok: packed window", name, flush=True)
# Every candidate tiling (Note [Candidate tilings]), chosen through ring_ext.cuda_tilings: causal at an
# offset with GQA, so that the backward walks several q blocks (its double-buffered loads included).
for entry in ring_ext.build_info()["cuda_tilings"]:
    kernel, head_dim, name = entry.split("/")
    with ring_ext.cuda_tilings.chosen(kernel, name):
        q, k, v = qkv(1, 150, 200, 4, 2, int(head_dim), torch.bfloat16)
        out, lse = torch.ops.ring_ext.fwd(q, k, v, 0.2, True, 60, 0)
        grads = torch.ops.ring_ext.bwd(torch.randn_like(out), q, k, v, out, lse, 0.2, True, 60, 0)
        torch.cuda.synchronize()
    assert all(torch.isfinite(t).all() for t in (out, *grads)), entry
    print("ok: tiling", entry, flush=True)
for dtype in (torch.float32, torch.bfloat16):
    out, lse = torch.randn(1, 37, 3, 72, device="cuda"), torch.randn(1, 3, 37, device="cuda")
    lse[:, :, :4] = -torch.inf
    block = torch.randn(1, 37, 3, 72, device="cuda").to(dtype)
    block_lse = torch.randn(1, 3, 37, device="cuda")
    torch.ops.ring_ext.merge_(out, lse, block, block_lse)
    torch.cuda.synchronize()
    print("ok: merge", dtype, flush=True)
EOF

plan() {
  cat <<EOF
== gpu_check plan (OUTDIR $OUT, budget $BUDGET_S s)
  prereqs    done above
  build      RING_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS $PY setup.py build_ext --inplace   (<= ${BOX[build]} s)
  tests      $PY -m pytest -m cuda tests/test_kernels.py tests/test_cuda.py -k 'not cp_attention' --junitxml tests.xml   (<= ${BOX[tests]} s)
  cp         $PY -m pytest tests/test_cuda.py -k cp_attention; tests/test_inference_cuda.py   (<= ${BOX[cp]} s)
  memcheck   ${SANITIZER:-compute-sanitizer (missing)} --tool memcheck ${SAN_FILTER[*]} $PY sanitize_cases.py   (<= ${BOX[memcheck]} s)
  racecheck  ${SANITIZER:-compute-sanitizer (missing)} --tool racecheck ${SAN_FILTER[*]} $PY sanitize_cases.py   (<= ${BOX[racecheck]} s)
  bench      $PY benchmarks/bench_cuda.py --out OUTDIR --budget $((BOX[bench] - 20))   (<= ${BOX[bench]} s)
EOF
}

write_summary() {
  {
    echo "# gpu_check summary"
    echo
    local commit="unknown (no git)"
    if git rev-parse --short HEAD >/dev/null 2>&1; then
      commit="$(git rev-parse --short HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' with local changes')"
    fi
    echo "$(date -u +%FT%TZ), commit $commit, GPU: ${gpu:-unknown}, archs $TORCH_CUDA_ARCH_LIST, total $((SECONDS - START)) s of $BUDGET_S s$( ((DRY)) && echo ', DRY RUN: nothing was built or run on a GPU')"
    echo
    echo "| part | result | seconds | detail |"
    echo "|---|---|---|---|"
    for part in "${PARTS[@]}"; do
      echo "| $part | ${STATUS[$part]} | ${SECS[$part]} | ${DETAIL[$part]//|/\\|} |"
    done
    if [[ -s $OUT/tests.xml ]]; then
      echo
      "$PY" - "$OUT/tests.xml" <<'PYEOF'
import sys
import xml.etree.ElementTree as ET
from collections import Counter

root = ET.parse(sys.argv[1]).getroot()
cases = list(root.iter("testcase"))
failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
skipped = [c for c in cases if c.find("skipped") is not None]
print(f"tests: {len(cases)} run, {len(failed)} failed, {len(skipped)} skipped")
for c in failed[:30]:
    node = c.find("failure") if c.find("failure") is not None else c.find("error")
    msg = (node.get("message") or "").splitlines()[0][:200] if node is not None else ""
    print(f"- FAILED {c.get('name')}: {msg}")
reasons = Counter((c.find("skipped").get("message") or "")[:200] for c in skipped)
for reason, n in reasons.most_common(10):
    print(f"- skipped x{n}: {reason}")
props = [(p.get("name"), p.get("value")) for c in cases for p in c.iter("property")]
if props:
    print("\nmeasured (test properties):\n")
    for name, value in props:
        print(f"- {name}: {value}")
PYEOF
    fi
    for tool in memcheck racecheck; do
      [[ -s $OUT/$tool.log ]] && echo && echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool.log" | tail -1)"
    done
    if [[ -s $OUT/ptxas.txt ]]; then
      echo
      echo "ptxas: $(grep -c 'Used' "$OUT/ptxas.txt") kernels, $(grep -cE '[1-9][0-9]* bytes spill' "$OUT/ptxas.txt") with spills"
    fi
    echo
    if [[ -s $OUT/bench_cuda.md ]]; then cat "$OUT/bench_cuda.md"; else echo "(no benchmark table)"; fi
  } >"$OUT/summary.md"
}

plan
if ((DRY)); then
  say "dry run: checking what can be checked without a GPU"
  ok=1
  bash -n "$0" || ok=0
  if ((have_py)) || "$PY" -c 'import torch' 2>/dev/null; then
    "$PY" -m py_compile "$OUT/sanitize_cases.py" && say "sanitize_cases.py compiles" || ok=0
    if "$PY" -m pytest -q -p no:cacheprovider --collect-only -m cuda tests/test_kernels.py tests/test_cuda.py tests/test_inference_cuda.py >"$OUT/collect.log" 2>&1; then
      say "tests collect: $(tail -1 "$OUT/collect.log")"
    else
      tail -20 "$OUT/collect.log"
      say "tests do not collect (see collect.log)"
      ok=0
    fi
    "$PY" benchmarks/bench_cuda.py --help >/dev/null 2>&1 && say "bench_cuda.py parses its options" ||
      say "bench_cuda.py --help failed here (it needs a CUDA build of torch to import)"
  else
    say "no python with torch: the test collection and script checks are skipped"
  fi
  for part in build tests cp memcheck racecheck bench; do STATUS[$part]="planned" DETAIL[$part]="dry run"; done
  [[ -z $SANITIZER ]] && STATUS[memcheck]="would skip" STATUS[racecheck]="would skip" DETAIL[memcheck]="no compute-sanitizer" DETAIL[racecheck]="no compute-sanitizer"
  write_summary
  say "dry run done; summary: $OUT/summary.md"
  ((ok)) || exit 1
  exit 0
fi
if [[ ${STATUS[prereqs]} != pass ]]; then
  write_summary
  say "prerequisites missing: nothing else runs (summary: $OUT/summary.md)"
  exit 2
fi

# ---- build -------------------------------------------------------------------------------------------
run_part build "$OUT/build.log" "$PY" setup.py build_ext --inplace
grep -E "Compiling entry function|spill|Used [0-9]+ registers" "$OUT/build.log" >"$OUT/ptxas.txt"
if [[ ${STATUS[build]} != pass ]]; then
  grep -E -B2 -A12 'error|Error' "$OUT/build.log" | head -60
  write_summary
  say "build failed: nothing else can run (see build.log)"
  exit 1
fi
DETAIL[build]="$("$PY" -c 'import ring_ext; print(ring_ext.build_info())' 2>&1 | tail -1)"

# ---- tests, CP over NCCL, sanitizers, benchmark -------------------------------------------------------
run_part tests "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider -rs -m cuda tests/test_kernels.py tests/test_cuda.py \
  -k "not cp_attention" --junitxml="$OUT/tests.xml"
DETAIL[tests]+="$(grep -E '[0-9]+ (passed|failed|skipped)' "$OUT/tests.log" | tail -1)"
# On a GPU every CUDA test must run: one that skips (no memory, no profiler data) is named in summary.md.
if [[ ${STATUS[tests]} == pass ]] && ! grep -qE '[0-9]+ passed' "$OUT/tests.log"; then
  STATUS[tests]=fail DETAIL[tests]="nothing passed (all skipped?): ${DETAIL[tests]}"
fi
run_part cp "$OUT/cp.log" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_inference_cuda.py \
  -k "cp_attention or sharded_cache"
DETAIL[cp]+="$(grep -E '[0-9]+ (passed|failed|skipped)' "$OUT/cp.log" | tail -1)"
if [[ ${STATUS[cp]} == pass ]] && ! grep -qE '[0-9]+ passed' "$OUT/cp.log"; then
  STATUS[cp]=fail DETAIL[cp]="nothing passed (all skipped?): ${DETAIL[cp]}"
fi
for tool in memcheck racecheck; do
  if [[ -z $SANITIZER ]]; then
    STATUS[$tool]="skipped" DETAIL[$tool]="compute-sanitizer not found"
    continue
  fi
  run_part "$tool" "$OUT/$tool.log" "$SANITIZER" --tool "$tool" --error-exitcode 3 "${SAN_FILTER[@]}" \
    "$PY" "$OUT/sanitize_cases.py"
  DETAIL[$tool]+="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool.log" | tail -1)"
done
run_part bench "$OUT/bench.log" "$PY" benchmarks/bench_cuda.py --out "$OUT" --budget $(($(time_for bench) - 20))

write_summary
cat "$OUT/summary.md"
for part in "${PARTS[@]}"; do
  [[ ${STATUS[$part]} == fail ]] && exit 1
done
exit 0
