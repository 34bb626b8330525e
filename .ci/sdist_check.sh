#!/usr/bin/env bash
# Source-distribution check: `pip install ring_ext` finds nothing, so every user builds from source, and
# the sdist must hold every file the build needs. Builds the sdist from a copy of the tree as a fresh
# clone has it (tracked and new files, nothing ignored), checks that it lists every file git has under
# csrc/ (headers included) and ring_ext/, then makes a fresh venv with the pinned torch and ninja the way
# the Makefile does (`make venv`: TORCH, TORCH_INDEX), installs the sdist into it without build
# isolation, and computes attention from outside any source tree, against PyTorch's SDPA.
#
# Needs python3, make and a C++ compiler. MAX_JOBS (default 2) bounds the parallel compile jobs; the
# compile is the full CPU build (about 4 minutes on 2 cores), the whole check about 6.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export MAX_JOBS=${MAX_JOBS:-2}
start=$SECONDS
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
VENV=$SCRATCH/venv

mkdir "$SCRATCH/src" "$SCRATCH/outside"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SCRATCH/src"
make -s VENV="$VENV" venv >"$SCRATCH/venv.log" 2>&1 || { tail -30 "$SCRATCH/venv.log"; exit 1; }
echo "sdist_check: $(tail -1 "$SCRATCH/venv.log") in $((SECONDS - start)) s"
"$VENV/bin/pip" install -q build wheel  # what `python -m build --no-isolation` needs besides torch
(cd "$SCRATCH/src" && "$VENV/bin/python" -m build --sdist --no-isolation --outdir "$SCRATCH/dist" \
  >"$SCRATCH/sdist.log" 2>&1) || { tail -30 "$SCRATCH/sdist.log"; echo "sdist_check: sdist build FAILED" >&2; exit 1; }
SDIST=$(ls "$SCRATCH"/dist/ring_ext-*.tar.gz)

# Every file the build and the package need is in the sdist (paths inside it start with ring_ext-X.Y.Z/).
tar -tzf "$SDIST" | sed 's|^[^/]*/||' | sort >"$SCRATCH/sdist.txt"
git ls-files --cached --others --exclude-standard csrc ring_ext LICENSE README.md setup.py pyproject.toml \
  | sort >"$SCRATCH/needed.txt"
missing=$(comm -23 "$SCRATCH/needed.txt" "$SCRATCH/sdist.txt")
if [[ -n $missing ]]; then
  echo "sdist_check: $(basename "$SDIST") lacks:" >&2
  echo "$missing" >&2
  exit 1
fi
headers=$(grep -cE '^csrc/.*\.(h|cuh)$' "$SCRATCH/sdist.txt" || true)
echo "sdist_check: $(basename "$SDIST"): $(wc -l <"$SCRATCH/sdist.txt") files, every one of the" \
  "$(wc -l <"$SCRATCH/needed.txt") needed ($headers csrc headers)"

install_start=$SECONDS
if ! "$VENV/bin/pip" install -v --no-build-isolation "$SDIST" >"$SCRATCH/install.log" 2>&1; then
  grep -E -B2 -A12 ': error|^ERROR' "$SCRATCH/install.log" | head -80
  echo "sdist_check: installing the sdist FAILED" >&2
  exit 1
fi
echo "sdist_check: installed the sdist (compile with MAX_JOBS=$MAX_JOBS) in $((SECONDS - install_start)) s"

# From outside any source tree: the installed package is what loads.
(cd "$SCRATCH/outside" && "$VENV/bin/python" - <<'PY'
import torch
import torch.nn.functional as F

import ring_ext

assert "site-packages" in ring_ext.__file__, ring_ext.__file__
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 256, 4, 64, generator=g).requires_grad_() for _ in range(3))  # [b, s, h, d]
out = ring_ext.attention(q, k, v, causal=True)
dq = torch.autograd.grad(out.sum(), q)[0]
q2, k2, v2 = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))  # [b, h, s, d]
ref = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True)
dq_ref = torch.autograd.grad(ref.sum(), q2)[0].transpose(1, 2)
ref = ref.detach().transpose(1, 2)
errors = [((a - e).norm() / e.norm()).item() for a, e in ((out.detach(), ref), (dq, dq_ref))]
assert max(errors) < 1e-5, errors
print(f"sdist_check: {ring_ext.__file__}: out and dq match SDPA (relative L2 {max(errors):.1e}); "
      f"{ring_ext.build_info()}")
PY
)
echo "sdist_check: OK in $((SECONDS - start)) s"
