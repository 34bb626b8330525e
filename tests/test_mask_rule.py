"""The kernels' one mask rule, csrc/common/mask.h (Note [Mask rule]), compiled on its own (it is torch-free)
in both of its instantiations, int64_t (the CPU kernels) and int (the CUDA kernels), and held pair by pair
to the mask model of csrc/common/params.h: each row's key interval, rows past seq_q, rows_seeing and
block_visibility. The int instantiation runs here on the host, so the device's arithmetic is checked
without a GPU."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ring_ext.masks import visible_keys

ROOT = Path(__file__).resolve().parents[1]
EXTRA_ROWS = 3  # rows past seq_q asked for (the padding of a tile)

# Reads cases from stdin: "kind q_offset k_offset seq_q seq_k", then for kRows a line of begins and a line
# of ends. Prints, per case and instantiation, every row's interval, rows_seeing of every key block and
# block_visibility of every (tile, key block).
DRIVER = r"""
#include <cstdio>
#include <vector>

#include "common/mask.h"

using namespace ring_ext;

template <typename I>
void dump(const char* tag, const Mask& m, const Shape& s) {
  const RowKeys<I> keys = row_keys<I>(m, s);
  for (int64_t r = 0; r < s.seq_q + EXTRA_ROWS; ++r) {
    const Interval<I> k = keys.keys(r);
    std::printf("%s keys %lld %lld %lld\n", tag, (long long)r, (long long)k.begin, (long long)k.end);
  }
  for (int64_t k0 = 0; k0 < s.seq_k; ++k0) {
    for (int64_t k1 = k0 + 1; k1 <= s.seq_k; ++k1) {
      const Interval<I> rows = keys.rows_seeing(I(k0), I(k1));
      std::printf("%s rows %lld %lld %lld %lld\n", tag, (long long)k0, (long long)k1,
                  (long long)rows.begin, (long long)rows.end);
      for (int64_t r0 = 0; r0 < s.seq_q; ++r0) {
        for (int64_t r1 = r0; r1 < s.seq_q; ++r1) {
          const BlockVisibility v = block_visibility(keys.keys(r0), keys.keys(r1), I(k0), I(k1));
          std::printf("%s block %lld %lld %lld %lld %d\n", tag, (long long)r0, (long long)r1,
                      (long long)k0, (long long)k1, int(v));
        }
      }
    }
  }
}

int main() {
  int kind;
  long long q_offset, k_offset, seq_q, seq_k;
  while (std::scanf("%d %lld %lld %lld %lld", &kind, &q_offset, &k_offset, &seq_q, &seq_k) == 5) {
    std::vector<int64_t> begin(seq_q), end(seq_q);
    if (kind == int(MaskKind::kRows)) {
      long long x;
      for (auto& b : begin) b = std::scanf("%lld", &x) == 1 ? x : 0;
      for (auto& e : end) e = std::scanf("%lld", &x) == 1 ? x : 0;
    }
    Mask m{MaskKind(kind), q_offset, k_offset, begin.data(), end.data()};
    Shape s;
    s.seq_q = seq_q;
    s.seq_k = seq_k;
    dump<int64_t>("host", m, s);
    dump<int>("device", m, s);
    std::printf("end\n");
  }
}
"""

KINDS = {"none": 0, "causal": 1, "rows": 2}


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    folder = tmp_path_factory.mktemp("mask_rule")
    source = folder / "driver.cpp"
    source.write_text(DRIVER)
    exe = folder / "driver"
    cmd = [cxx, "-std=c++17", "-Wall", "-Werror", f"-DEXTRA_ROWS={EXTRA_ROWS}", f"-I{ROOT / 'csrc'}"]
    subprocess.run([*cmd, str(source), "-o", str(exe)], check=True, capture_output=True, text=True)
    return exe


def packed_rows(seq: int) -> tuple[list[int], list[int]]:
    """Packed documents with a sliding window: the intervals of ring_ext.masks, the Python mask model."""
    index = torch.arange(seq)
    vis = visible_keys(index, index, (0, 2, 2, seq - 1, seq), True, 3)
    return vis[0].tolist(), vis[1].tolist()


def cases():
    big = 1 << 40
    out = []
    for seq_q, seq_k in ((5, 7), (7, 5), (1, 1)):
        out.append(("none", 0, 0, seq_q, seq_k, None))
        for q_offset, k_offset in ((0, 0), (3, 0), (0, 3), (-5, 7), (big, 0), (0, big)):
            out.append(("causal", q_offset, k_offset, seq_q, seq_k, None))
    out.append(("rows", 0, 0, 7, 7, packed_rows(7)))
    # Ends past seq_k and below 0 are clamped; an empty row inside (begin == end).
    out.append(("rows", 0, 0, 6, 5, ([-2, 0, 1, 3, 3, 4], [0, 2, 3, 3, 6, 9])))
    return out


def visible(case, i: int, j: int) -> bool:
    """Key j is visible to query row i (params.h, MaskKind)."""
    kind, q_offset, k_offset, seq_q, _, rows = case
    if kind == "none":
        return True
    if kind == "causal":
        return k_offset + j <= q_offset + i
    return rows[0][min(i, seq_q - 1)] <= j < rows[1][min(i, seq_q - 1)]


def run(driver: Path, case) -> dict[str, list[list[str]]]:
    kind, q_offset, k_offset, seq_q, seq_k, rows = case
    text = f"{KINDS[kind]} {q_offset} {k_offset} {seq_q} {seq_k}\n"
    if rows is not None:
        text += " ".join(map(str, rows[0])) + "\n" + " ".join(map(str, rows[1])) + "\n"
    lines = subprocess.run([str(driver)], input=text, check=True, capture_output=True, text=True).stdout
    out: dict[str, list[list[str]]] = {"host": [], "device": []}
    for line in lines.splitlines():
        if line != "end":
            tag, *rest = line.split()
            out[tag].append(rest)
    return out


@pytest.mark.parametrize("case", cases(), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}x{c[4]}")
def test_mask_rule_is_the_mask_model(driver, case):
    _, _, _, seq_q, seq_k, _ = case
    out = run(driver, case)
    assert out["host"] == out["device"], "int64_t and int instantiations disagree"
    seen, interval = {}, {}
    for fields in out["host"]:
        if fields[0] == "keys":
            row, begin, end = map(int, fields[1:])
            assert 0 <= begin <= seq_k and 0 <= end <= seq_k, (row, begin, end)
            keys = {j for j in range(seq_k) if visible(case, row, j)}
            assert keys == set(range(begin, end)), f"row {row}: [{begin}, {end}) vs {sorted(keys)}"
            seen[row], interval[row] = keys, (begin, end)
        elif fields[0] == "rows":
            k0, k1, begin, end = map(int, fields[1:])
            rows = {i for i in range(seq_q) if seen[i] & set(range(k0, k1))}
            assert rows <= set(range(begin, end)), (
                f"keys [{k0}, {k1}): rows [{begin}, {end}) vs {sorted(rows)}"
            )
            # From the first row whose interval ends past k0 to the first after it that begins at k1 or
            # later (rows between with an empty interval see none).
            assert begin == next((i for i in range(seq_q) if interval[i][1] > k0), seq_q), (k0, k1, begin)
            assert end == next((i for i in range(begin, seq_q) if interval[i][0] >= k1), seq_q), (k0, k1, end)
        else:
            r0, r1, k0, k1, vis = map(int, fields[1:])
            pairs = [j in seen[i] for i in range(r0, r1 + 1) for j in range(k0, k1)]
            assert (vis == 2) == all(pairs), (r0, r1, k0, k1, vis)  # kFull: every pair
            assert vis != 0 or not any(pairs), (r0, r1, k0, k1, vis)  # kEmpty: no pair
            if r0 == r1:  # one row: kEmpty is exact
                assert (vis == 0) == (not any(pairs)), (r0, k0, k1, vis)
    assert len(seen) == seq_q + EXTRA_ROWS
