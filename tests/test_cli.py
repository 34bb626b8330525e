"""`python -m ring_ext demo|bench` (ring_ext/cli.py) end to end: a tiny run in a subprocess with a
deadline, every expected row present and verified against full attention.

The CLI's own check compares each algorithm with full attention on one process in float32; here its
reported error is held to the suite's rule instead (tests/tolerances.py): float32 to REL_L2, bf16 to
twice PyTorch's own bf16 attention's error on the same inputs (the CLI draws them from its --seed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import torch

from ring_ext.cli import build_parser, cases_for, full_inputs
from ring_ext.reference import attention_reference

from tolerances import FACTOR, FLOOR, REL_L2, rel_l2, torch_attention

TINY = ["--seq", "64", "--heads", "4", "--head-dim", "16", "--repeats", "1", "--timeout", "60"]


def run_cli(argv: list[str], cwd, timeout_s: float = 240) -> str:
    """stdout of `python -m ring_ext argv`; the whole process group (the spawned ranks too) is killed
    if it outlives timeout_s."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ring_ext", *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(
            f"python -m ring_ext {' '.join(argv)} did not finish within {timeout_s}s"
        ) from None
    assert proc.returncode == 0, (
        f"python -m ring_ext {' '.join(argv)} exited {proc.returncode}:\n{err[-3000:]}"
    )
    return out


def expected_rows(argv: list[str], sizes: list[int]) -> list[tuple[str, int]]:
    args = build_parser().parse_args(argv)
    return [(c.name, cp) for cp in sizes for c in cases_for(cp, args)]


def pytorch_error(argv: list[str]) -> float:
    """max over (out, dq, dk, dv) of PyTorch's own relative L2 error, in the CLI's dtype on its inputs."""
    args = build_parser().parse_args(argv)
    q, k, v, dout = full_inputs(args, torch.device("cpu"))
    causal = args.attention_mask_type == "causal"
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out, _ = attention_reference(q64, k64, v64, causal=causal)
    expected = [out.detach(), *torch.autograd.grad(out, (q64, k64, v64), dout.double())]
    baseline = torch_attention(q, k, v, dout, causal=causal)
    return max(rel_l2(b, e) for b, e in zip(baseline, expected))


def parse_table(stdout: str) -> list[dict]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1]) <= set("|-"), lines[1]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_demo_table_every_algorithm_verified(tmp_path):
    argv = ["demo", "--context-parallel-size", "2", "--dtype", "fp32", *TINY]
    rows = parse_table(run_cli(argv, tmp_path))
    assert [(r["algo"], int(r["cp"])) for r in rows] == expected_rows(argv, [2])
    for r in rows:
        assert r["max_rel_err"] != "-", f"{r['algo']}: not verified"
        assert float(r["max_rel_err"]) <= REL_L2[torch.float32], r
        assert float(r["tokens_per_s"]) > 0 and r["seq"] == "64" and r["dtype"] == "fp32", r


def test_bench_json_every_algorithm_verified(tmp_path):
    """cp 4 is the smallest size with every algorithm: Ulysses, ring, double ring (w=2), hybrid (u=2)."""
    argv = [
        "bench",
        "--cp-sizes",
        "4",
        "--dtype",
        "bf16",
        "--attention-mask-type",
        "general",
        "--json",
        *TINY,
    ]
    rows = json.loads(run_cli(argv, tmp_path))
    assert [(r["algo"], r["cp"]) for r in rows] == expected_rows(argv, [4])
    assert {r["algo"].split()[0] for r in rows} == {"ulysses", "ring", "double", "hybrid"}
    bound = FACTOR * pytorch_error(argv) + FLOOR[torch.bfloat16]
    for r in rows:
        assert r["max_rel_err"] is not None, f"{r['algo']}: not verified"
        assert r["max_rel_err"] <= bound, f"{r['algo']}: error {r['max_rel_err']:.2e} > {bound:.2e}"
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["peak_mib_per_rank"] > 0, r
