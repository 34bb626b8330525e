"""`python -m ring_ext demo|bench` (ring_ext/tools/cli.py) end to end: a tiny run in a subprocess with a
deadline, every expected row present and PASS against the CLI's independent reference; under torchrun
(2 ranks) the CP size comes from the launched world, and a CP size the world cannot run is an error
naming both. The CLI runs every algorithm CPConfig accepts at a CP size and names the others.

The CLI checks each algorithm against PyTorch's SDPA in float64 with the suite's rule; here its reported
error is held to the suite's rule again, computed by the suite (ring_ext/testing/tolerances.py): float32
to REL_L2, bf16 to twice PyTorch's own bf16 attention's error on the same inputs (the CLI draws them from
--seed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import ring_ext.tools.cli as cli
from ring_ext.config import CPConfig
from ring_ext.testing.reference import attention_reference
from ring_ext.testing.tolerances import FACTOR, FLOOR, REL_L2, rel_l2, torch_attention
from ring_ext.tools.cli import UsageError, build_parser, cases_for, cp_sizes, full_inputs, plan

TINY = ["--seq", "64", "--heads", "4", "--head-dim", "16", "--repeats", "1", "--timeout", "60"]
TORCHRUN_2 = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ring_ext"]


def run_python(args: list[str], cwd, timeout_s: float = 240) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python args`; the whole process group (spawned or launched
    ranks too) is killed if it outlives timeout_s."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
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
        raise AssertionError(f"python {' '.join(args)} did not finish within {timeout_s}s") from None
    return proc.returncode, out, err


def run_cli(argv: list[str], cwd, timeout_s: float = 240, launcher=()) -> str:
    """stdout of `python [launcher] -m ring_ext argv`, which must exit 0."""
    args = [*launcher, *argv] if launcher else ["-m", "ring_ext", *argv]
    rc, out, err = run_python(args, cwd, timeout_s)
    assert rc == 0, f"python {' '.join(args)} exited {rc}:\n{err[-3000:]}"
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
    """cp 2 runs all four algorithms (double ring w=2 and hybrid u=2 are configurations CPConfig
    accepts), each checked against float64 SDPA with the tolerance printed."""
    argv = ["demo", "--context-parallel-size", "2", "--dtype", "fp32", *TINY]
    stdout = run_cli(argv, tmp_path)
    rows = parse_table(stdout)
    assert [(r["algo"], int(r["cp"])) for r in rows] == expected_rows(argv, [2])
    assert {r["algo"].split()[0] for r in rows} == {"ulysses", "ring", "double", "hybrid"}
    assert "against PyTorch's SDPA in float64 on the full sequence; PASS when <=" in stdout, stdout
    for r in rows:
        assert r["max_rel_err"] != "-", f"{r['algo']}: not verified"
        assert float(r["max_rel_err"]) <= REL_L2[torch.float32], r
        assert r["check"] == "PASS", r
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
        # The CLI's tolerance is the suite's rule, its float64 SDPA the suite's oracle.
        assert r["tolerance"] == pytest.approx(bound, rel=1e-6) and r["check"] == "PASS", r
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["peak_mib_per_rank"] > 0, r


def test_torchrun_demo_takes_cp_size_from_world(tmp_path):
    """`torchrun --nproc-per-node 2 -m ring_ext demo` without --context-parallel-size: cp 2, every
    algorithm that runs at 2, verified (it used to print an empty table: the default 4 was dropped;
    then it ran only Ulysses and ring, though CPConfig accepts double ring and hybrid at 2)."""
    argv = ["demo", "--dtype", "fp32", *TINY]
    rows = parse_table(run_cli(argv, tmp_path, launcher=TORCHRUN_2))
    assert [(r["algo"], int(r["cp"])) for r in rows] == expected_rows(argv, [2])
    assert {r["algo"] for r in rows} == {"ulysses", "ring", "double ring w=2", "hybrid u=2"}
    for r in rows:
        assert r["max_rel_err"] != "-", f"{r['algo']}: not verified"
        assert float(r["max_rel_err"]) <= REL_L2[torch.float32], r
        assert r["check"] == "PASS", r


def test_torchrun_cp_size_mismatch_is_an_error(tmp_path):
    rc, out, err = run_python([*TORCHRUN_2, "bench", "--cp-sizes", "4", *TINY], tmp_path)
    assert rc != 0, out
    assert "--cp-sizes 4 needs a world of 4 ranks, torchrun launched 2" in err, err[-3000:]
    assert "|" not in out and "done" not in err, out


@pytest.mark.parametrize(
    "argv, world, expected",
    [
        (["demo"], None, [4]),
        (["demo"], 2, [2]),
        (["bench"], None, [1, 2, 4]),
        (["bench"], 3, [3]),
        (["demo", "--context-parallel-size", "3"], 3, [3]),
        (["bench", "--cp-sizes", "2,4"], None, [2, 4]),
    ],
)
def test_cp_sizes_default_to_the_launched_world(argv, world, expected):
    assert cp_sizes(build_parser().parse_args(argv), world) == expected


@pytest.mark.parametrize(
    "argv, world, message",
    [
        (
            ["demo", "--context-parallel-size", "4"],
            2,
            "--context-parallel-size 4 needs a world of 4 ranks, torchrun launched 2",
        ),
        (
            ["bench", "--cp-sizes", "1,2,4"],
            2,
            "--cp-sizes 1,2,4 needs worlds of 1 and 4 ranks, torchrun launched 2",
        ),
        (["demo", "--algos", "hybrid", "--heads", "2"], 3, "hybrid cannot run at CP size 3 (--heads 2)"),
        (["demo", "--algos", "ulysses", "--heads", "3"], 4, "ulysses cannot run at CP size 4 (--heads 3)"),
        (
            ["bench", "--cp-sizes", "1,3", "--algos", "hybrid", "--heads", "2"],
            None,
            "hybrid cannot run at CP sizes 1 and 3",
        ),
        (["bench", "--cp-sizes", "1", "--algos", "double"], None, "double cannot run at CP size 1"),
        (["demo", "--algos", "rign"], 2, "unknown ['rign']"),
    ],
)
def test_what_the_world_cannot_run_is_an_error(argv, world, message):
    """Never an empty table: a size other than the world, or an algorithm no size can run, says why."""
    args = build_parser().parse_args(argv)
    with pytest.raises(UsageError) as err:
        plan(args, cp_sizes(args, world))
    assert message in str(err.value)


ALL = {"ulysses", "ring", "double", "hybrid"}


@pytest.mark.parametrize(
    "argv, cp, runs",
    [
        (["demo"], 1, {"ulysses", "ring"}),
        (["demo"], 2, ALL),
        (["demo"], 3, ALL),  # 8 heads over 3 Ulysses ranks: 3, 3 and 2 (Note [Ulysses head split])
        (["demo", "--heads", "2"], 3, {"ring", "double"}),  # fewer heads than the Ulysses degree
        (["demo"], 4, ALL),
        (["demo", "--heads", "4"], 6, {"ring", "double", "hybrid"}),
        (["demo", "--cp-window-size", "4"], 2, {"ulysses", "ring", "hybrid"}),
        (["demo", "--ulysses-degree-in-cp", "4"], 2, {"ulysses", "ring", "double"}),
    ],
)
def test_every_algorithm_cpconfig_accepts_runs(argv, cp, runs):
    """What runs at a CP size is exactly what CPConfig accepts and the heads allow; every other
    algorithm is listed as skipped with the reason."""
    args = build_parser().parse_args(argv)
    assert {c.name.split()[0] for c in cases_for(cp, args)} == runs
    for case in cases_for(cp, args):
        case.config(args)  # CPConfig accepts it
    lines = cli.skipped([cp], args)
    assert len(lines) == len(ALL - runs), lines
    for name in ALL - runs:
        assert any(line.startswith(f"skipped at cp {cp}: {name}") and "must" in line for line in lines), lines
    for case, reason in cli.candidates(cp, args):
        if reason is not None and "heads" not in reason:
            with pytest.raises(ValueError, match="must"):
                case.config(args)


def test_hybrid_at_cp_2_is_what_the_library_accepts():
    """The CLI used to refuse `--algos hybrid` at cp 2, which CPConfig (and examples/llama_cp.py) run."""
    CPConfig(context_parallel_size=2, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2)
    args = build_parser().parse_args(["demo", "--algos", "hybrid"])
    assert [c.name for c in plan(args, cp_sizes(args, 2))] == ["hybrid u=2"]


def test_the_tolerance_is_the_suites_rule():
    assert cli.FACTOR == FACTOR
    assert {name: cli.FLOOR[name] for name in cli.DTYPES} == {n: FLOOR[d] for n, d in cli.DTYPES.items()}


def test_a_failed_check_exits_nonzero(monkeypatch, capsys):
    """A row over the tolerance prints FAIL and ends the command with a non-zero exit."""
    row = dict(
        algo="ring", cp=2, seq=64, dtype="fp32", mask="causal", fwd_ms=1.0, bwd_ms=1.0, tokens_per_s=1.0,
        peak_mib_per_rank=1.0, max_rel_err=1e-3, tolerance=2.6e-6, pytorch_rel_err=3e-7, check="FAIL",
    )  # fmt: skip
    monkeypatch.setattr(cli, "run_spawned", lambda args, cp, cases: [row])
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--context-parallel-size", "2", "--algos", "ring", *TINY])
    assert exit_.value.code not in (0, None) and "verification FAILED: ring cp=2" in str(exit_.value.code)
    assert "| FAIL |" in capsys.readouterr().out


def test_plot_without_matplotlib_fails_before_any_work(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError

    def no_run(*args):
        raise AssertionError("ran the benchmark before checking --plot's dependency")

    monkeypatch.setattr(cli, "run_spawned", no_run)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--cp-sizes", "1", "--plot", "out.png", *TINY])
    assert exit_.value.code == 2
    assert "--plot needs matplotlib: pip install matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "ring_ext", "demo"],
        ["-m", "ring_ext", "bench"],
        ["-m", "ring_ext", "plan"],
        ["-m", "ring_ext", "generate"],
        ["examples/llama_cp.py"],
        ["examples/llama_fsdp_cp.py"],
    ],
)
def test_every_option_has_help_with_its_default(args):
    """argparse shows "(default: ...)" after an option's help when it has help: one per option."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rc, out, err = run_python([*args, "--help"], root, timeout_s=120)
    assert rc == 0, err[-2000:]
    options = [line.split()[0].rstrip(",") for line in out.splitlines() if line.startswith("  -")]
    options = [o for o in options if o != "-h"]
    assert options, out
    assert out.count("(default:") == len(options), out
