"""The planner (ring_ext/tools/planner, docs/planner.md): which CP schemes it enumerates, how it reads
the ring schedule, the model's limits and hand-computed cases, its rankings on a two-level cluster, the
hardware presets, and the `plan` subcommand."""

from __future__ import annotations

import dataclasses
import math

import pytest

from ring_ext.tools.cli import main
from ring_ext.tools.planner import calibrate
from ring_ext.tools.planner.model import (
    Cluster,
    Scheme,
    Shape,
    attention_flops,
    predict,
    rank_schemes,
    ring_steps,
    schemes,
)
from ring_ext.tools.planner.presets import ATTENTION_EFFICIENCY, GPUS, INTERCONNECTS

GB = 1e9


def _names(shape, cp):
    return {(p.algo, p.ulysses_degree, p.window, p.overlap) for p in schemes(shape, cp)}


def test_schemes_are_every_runnable_configuration():
    got = _names(Shape(seq=1024, heads=8, head_dim=64), 8)
    want = {("ring", 1, 1, o) for o in (True, False)}
    want |= {("double_ring", 1, w, o) for w in (2, 4) for o in (True, False)}
    want |= {("ulysses", 8, 1, True)}
    want |= {("hybrid", 2, w, o) for w in (1, 2) for o in (True, False)}  # ring of 4: window 2
    want |= {("hybrid", 4, 1, o) for o in (True, False)}  # ring of 2: no double ring
    assert got == want
    # Ulysses needs the q heads to split over the degree; hybrid only over its own degree.
    got6 = _names(Shape(seq=1024, heads=6, head_dim=64), 4)
    assert not any(a == "ulysses" for a, *_ in got6)
    assert {("hybrid", 2, 1, True), ("hybrid", 2, 1, False)} <= got6
    assert _names(Shape(seq=64, heads=4, head_dim=8), 1) == {("ring", 1, 1, True)}


@pytest.mark.parametrize("causal", [True, False])
def test_free_links_cost_nothing(causal):
    shape = Shape(seq=4096, heads=8, kv_heads=2, head_dim=64, causal=causal)
    cluster = Cluster(2, 4, math.inf, math.inf, 1e12, 0.0, 0.0)
    fwd, bwd = attention_flops(shape)
    for p in rank_schemes(shape, cluster):
        assert p.exposed_comm_s == pytest.approx(0.0, abs=1e-12), p.scheme
        assert p.seconds == pytest.approx((fwd + bwd) / 8 / 1e12), p.scheme


def test_plain_ring_by_hand():
    # 4 ranks on one node, K/V block 2 * 1 * 256 * 2 * 64 * 2 bytes; dK/dV in float32.
    shape = Shape(seq=1024, heads=4, kv_heads=2, head_dim=64, dtype="bf16")
    bw, lat, rate = 1e9, 1e-5, 1e11
    cluster = Cluster(1, 4, bw, bw, rate, lat, lat)
    fwd_flops = 4 * 4 * 1024**2 * 64 / 2
    c_f, c_b = fwd_flops / 4 / rate / 4, 2.5 * fwd_flops / 4 / rate / 4  # per step
    kv, dkv = 2 * 256 * 2 * 64 * 2, 2 * 256 * 2 * 64 * 4
    hop_f, hop_b = lat + kv / bw, lat + (kv + dkv) / bw
    for overlap in (True, False):
        p = predict(shape, cluster, Scheme("ring", 4, overlap=overlap))
        step = (lambda c, h: max(c, h)) if overlap else (lambda c, h: c + h)
        want = c_f + 3 * step(c_f, hop_f) + c_b + 3 * step(c_b, hop_b)
        assert p.seconds == pytest.approx(want)
        assert p.bytes_sent == 3 * kv + 3 * (kv + dkv) + dkv


def test_overlap_never_slower_and_more_ranks_less_memory():
    shape = Shape(seq=32768, heads=16, kv_heads=4, head_dim=128)
    cluster = Cluster(2, 8, 100 * GB, 10 * GB, 100e12)
    preds = {p.scheme: p for p in rank_schemes(shape, cluster)}
    for scheme, p in preds.items():
        if scheme.overlap and scheme.ring > 1:  # Ulysses has no ring to overlap
            off = preds[Scheme(scheme.algo, scheme.cp, scheme.ulysses_degree, scheme.window, False)]
            assert p.seconds <= off.seconds + 1e-15, scheme
    small = predict(shape, Cluster(1, 8, 100 * GB, 10 * GB, 100e12), Scheme("ring", 4))
    large = predict(shape, cluster, Scheme("ring", 16))
    assert large.peak_bytes < small.peak_bytes


def test_two_level_cluster_prefers_node_local_traffic():
    # Slow inter-node links: the double ring with node-sized windows beats the plain ring, and hybrid
    # with node-local all-to-alls beats Ulysses across both nodes.
    shape = Shape(seq=65536, heads=32, kv_heads=8, head_dim=128)
    cluster = Cluster(2, 4, 200 * GB, 2 * GB, 400e12)
    t = {p.scheme: p.seconds for p in rank_schemes(shape, cluster)}
    assert t[Scheme("double_ring", 8, window=4)] < t[Scheme("ring", 8)]
    assert t[Scheme("hybrid", 8, 4, 1)] < t[Scheme("ulysses", 8, 8)]
    assert min(t.values()) == rank_schemes(shape, cluster)[0].seconds


def test_bad_plans_are_rejected():
    shape = Shape(seq=1004, heads=8, head_dim=64)
    cluster = Cluster(1, 4, GB, GB, 1e12)
    with pytest.raises(ValueError, match="divisible by 2 \\* cp = 8"):
        rank_schemes(shape, cluster)
    with pytest.raises(ValueError, match="cluster's 4 ranks"):
        rank_schemes(Shape(seq=1024, heads=8, head_dim=64), cluster, cp=8)


PLAN = ["plan", "--seq", "8192", "--heads", "8", "--head-dim", "64", "--nodes", "2", "--gpus-per-node", "2"]
RATES = ["--intra-gbps", "100", "--inter-gbps", "10", "--tflops", "50"]


def test_plan_command(capsys):
    main(PLAN + RATES)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "ms" not in line]
    times = [float(r.split("|")[2]) for r in rows]
    assert len(rows) == len(schemes(Shape(seq=8192, heads=8, head_dim=64), 4)) and times == sorted(times)
    with pytest.raises(SystemExit):
        main(PLAN)
    assert "--tflops" in capsys.readouterr().err


def test_plan_plot(capsys, tmp_path):
    """--plot writes the picture with matplotlib installed, else says what to install (both checked)."""
    path = tmp_path / "p.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit):
            main(PLAN + RATES + ["--plot", str(path)])
        assert "--plot needs matplotlib" in capsys.readouterr().err
        return
    main(PLAN + RATES + ["--plot", str(path)])
    assert path.stat().st_size > 0 and f"plot: {path}" in capsys.readouterr().out


def test_plan_calibrate(capsys):
    main(["plan", "--calibrate", "--seq", "512", "--heads", "4", "--head-dim", "32", "--gpus-per-node", "2"])
    out = capsys.readouterr().out
    assert "calibrated here" in out and "| ring overlap |" in out


def test_calibrated_rate_is_shared_by_ranks_that_outnumber_the_cores():
    assert calibrate.shared_cores(2, 1, cores=2) == 1.0
    assert calibrate.shared_cores(4, 1, cores=2) == 0.5
    assert calibrate.shared_cores(3, 2, cores=2) == pytest.approx(1 / 3)
    assert calibrate.shared_cores(1, 1, cores=16) == 1.0


def test_merges_cost_memory_traffic_on_the_forward_ring_only():
    """Each forward step but the first merges 12 bytes per output element (plus the LSEs) at mem_bw;
    Ulysses (no ring) merges nothing."""
    shape = Shape(seq=4096, heads=8, head_dim=64)
    free = Cluster(1, 4, math.inf, math.inf, 1e12)
    slow = Cluster(1, 4, math.inf, math.inf, 1e12, mem_bw=1e9)
    ring = Scheme("ring", 4, overlap=True)
    q_elems = 4096 // 4 * 8 * 64
    merge = (12 * q_elems + 12 * q_elems // 64) / 1e9
    assert predict(shape, slow, ring).seconds == pytest.approx(predict(shape, free, ring).seconds + 3 * merge)
    uly = Scheme("ulysses", 4, ulysses_degree=4)
    assert predict(shape, slow, uly).seconds == predict(shape, free, uly).seconds


def test_windows_and_documents_count_visible_pairs():
    """A window or packed documents cut the flops to the visible pairs (counted per document, as the
    kernels skip tiles). Packed documents move every block; a window only the rows some rank sees
    (a halo on contiguous shards; tests/test_packed_dist.py checks these counts against the ring)."""
    dense = Shape(seq=4096, heads=8, head_dim=64)
    fwd, bwd = attention_flops(dense)
    assert fwd == 4 * 8 * 64 * 4096**2 / 2 and bwd == 2.5 * fwd
    windowed = Shape(seq=4096, heads=8, head_dim=64, window=256)
    pairs = 256 * 257 // 2 + (4096 - 256) * 256
    assert attention_flops(windowed)[0] == 4 * 8 * 64 * pairs
    packed = Shape(seq=4096, heads=8, head_dim=64, doc_lengths=(1000, 0, 3096))
    pairs = 1000 * 1001 // 2 + 3096 * 3097 // 2
    assert attention_flops(packed)[0] == 4 * 8 * 64 * pairs
    cluster = Cluster(1, 4, 1e9, 1e9, 1e12)
    ring = Scheme("ring", 4, overlap=False)
    assert predict(packed, cluster, ring).bytes_sent == predict(dense, cluster, ring).bytes_sent
    assert predict(windowed, cluster, ring).bytes_sent < predict(dense, cluster, ring).bytes_sent
    assert predict(windowed, cluster, ring).seconds < predict(dense, cluster, ring).seconds
    # Contiguous shards: the busiest rank sends 255 K/V rows forward, again backward, and the float32
    # gradient of the 255 rows it saw of its neighbour's block; a row is 2 * 8 heads * 64 * 2 bytes.
    halo = dataclasses.replace(ring, placement="contiguous")
    assert predict(windowed, cluster, halo).bytes_sent == 2 * 255 * 2048 + 255 * 4096
    assert "contiguous" in {p.scheme.placement for p in rank_schemes(windowed, cluster)}


def test_plan_command_with_window_and_documents(capsys):
    main(PLAN + RATES + ["--sliding-window", "512"])
    assert "| ring overlap |" in capsys.readouterr().out
    seq = int(PLAN[PLAN.index("--seq") + 1])
    main(PLAN + RATES + ["--doc-lengths", f"{seq - 7},7"])
    assert "| ring overlap |" in capsys.readouterr().out
    for bad in (["--doc-lengths", "5,6"], ["--doc-lengths", "a,b"], ["--sliding-window", "0"]):
        with pytest.raises(SystemExit):
            main(PLAN + RATES + bad)


def test_calibrated_rates_measure_once_per_concurrency(monkeypatch):
    """Ranks that fit the cores are measured that many at once; more ranks reuse the all-cores rate and
    get their share of it; each concurrency is measured once."""
    calls = []

    def together(shape, threads, processes, repeats):
        calls.append(processes)
        return 100.0 / processes  # slower each when more run at once

    monkeypatch.setattr(calibrate, "measure_flops_together", together)
    monkeypatch.setattr(calibrate, "machine_cores", lambda: 2)
    rates = calibrate.calibrated_rates(Shape(seq=64, heads=2, head_dim=8), [1, 2, 4, 8])
    assert rates == {1: 100.0, 2: 50.0, 4: 25.0, 8: 12.5}
    assert sorted(calls) == [1, 2]


def test_the_ring_is_read_from_the_schedule():
    """ring_steps reads ring_ext's schedule (torch.ops.ring_ext.ring_schedule): Note [Double ring
    schedule]'s table, the peers of the inner and outer hops as ring ranks, where rounds end, and which
    holders a hop's block reaches (the holders whose rows it carries under a window)."""
    double = ring_steps(4, 2)
    assert double.src == ((0, 1, 2, 3), (1, 0, 3, 2), (2, 3, 0, 1), (3, 2, 1, 0))
    assert double.inner_to == (1, 0, 3, 2) and double.outer_to == (2, 3, 0, 1)
    assert double.rounds == (range(0, 2), range(2, 4))
    assert double.inner_steps == {0, 2} and double.outer_steps == {0}
    assert [double.holder(0, t) for t in range(4)] == [0, 1, 2, 3]
    plain = ring_steps(4, 1)
    assert plain.inner_to == (1, 2, 3, 0) and plain.outer_steps == frozenset()
    assert plain.rounds == (range(0, 4),)
    assert ring_steps(1, 1).rounds == (range(0, 1),) and ring_steps(1, 1).inner_steps == frozenset()
    eight = ring_steps(8, 2)
    assert eight.fed(0, outer=False) == [1]  # an inner hop: the rest of its round
    assert eight.fed(0, outer=True) == list(range(2, 8))  # an outer hop: every later round
    assert eight.fed(4, outer=True) == [6, 7]


H100_2_NODES = ["plan", "--seq", "131072", "--heads", "32", "--gpu", "h100", "--nodes", "2"]


def _plan(capsys, argv) -> tuple[str, list[str]]:
    """The plan's first line (where the rates came from) and its table's header and rows."""
    main(argv)
    lines = capsys.readouterr().out.splitlines()
    return lines[0], [line for line in lines if line.startswith("| ")]


def test_presets_need_no_rates(capsys):
    """--gpu gives the kernel rate (its bf16 dense peak x ATTENTION_EFFICIENCY), the memory bandwidth and
    the GPU's usual links; the first line says which values were used; the plan equals the one with
    the same rates given explicitly. Every GPU preset runs."""
    header, rows = _plan(capsys, H100_2_NODES)
    tflops = GPUS["h100"].bf16_tflops * ATTENTION_EFFICIENCY
    for said in (
        f"kernels {tflops:g} TFLOP/s",
        "450 GB/s (nvlink4)",
        "50 GB/s (ib-ndr400)",
        "3350 GB/s (h100)",
    ):
        assert said in header, (said, header)
    assert len(rows) == 1 + len(schemes(Shape(seq=131072, heads=32, head_dim=128), 16))
    explicit = ["--intra-gbps", "450", "--inter-gbps", "50", "--tflops", f"{tflops}", "--mem-gbps", "3350"]
    _, same = _plan(capsys, H100_2_NODES[:5] + ["--nodes", "2"] + explicit)
    assert same == rows
    for gpu, spec in GPUS.items():
        assert INTERCONNECTS[spec.intra].level == "intra" and INTERCONNECTS[spec.inter].level == "inter"
        header, _ = _plan(capsys, ["plan", "--seq", "8192", "--heads", "8", "--gpu", gpu, "--top", "1"])
        assert f"({gpu}:" in header and f"({spec.intra})" in header


def test_explicit_rates_override_presets(capsys):
    """--tflops, --intra-gbps, --inter-gbps, --mem-gbps and --interconnect each replace the --gpu's
    value (and say so); the others stay the preset's."""
    header, rows = _plan(capsys, H100_2_NODES + ["--tflops", "100", "--inter-gbps", "5"])
    assert "kernels 100 TFLOP/s per rank (given)" in header and "inter-node 5 GB/s (given)" in header
    assert "intra-node 450 GB/s (nvlink4)" in header
    _, preset = _plan(capsys, H100_2_NODES)
    assert rows != preset
    header, _ = _plan(capsys, H100_2_NODES + ["--interconnect", "roce400,nvlink3", "--mem-gbps", "1000"])
    assert "(roce400)" in header and "300 GB/s (nvlink3)" in header and "memory 1000 GB/s (given)" in header
    header, _ = _plan(capsys, ["plan", "--seq", "8192", "--heads", "8", "--nodes", "2"] + RATES)
    assert "(given)" in header and "h100" not in header


@pytest.mark.parametrize(
    "bad, says",
    [
        (["--interconnect", "nvlink4,xgmi"], "two intra-node links"),
        (["--interconnect", "nvlink9"], "unknown 'nvlink9'"),
        (["--dtype", "fp32"], "give --tflops for --dtype fp32"),
        (["--calibrate"], "it takes no --gpu"),
    ],
)
def test_bad_presets_are_rejected(capsys, bad, says):
    with pytest.raises(SystemExit):
        main(H100_2_NODES + bad)
    assert says in capsys.readouterr().err
