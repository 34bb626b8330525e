"""CPConfig, the flags and their defaults."""

from __future__ import annotations

import argparse

import pytest

import ring_ext


def parse(*argv):
    return ring_ext.add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_flag_defaults_match_mindspeed():
    cfg = ring_ext.CPConfig.from_args(parse())
    assert cfg == ring_ext.CPConfig()
    assert (cfg.context_parallel_size, cfg.context_parallel_algo, cfg.use_cp_send_recv_overlap) == (
        1,
        "ulysses_cp_algo",
        False,
    )
    assert (
        cfg.attention_mask_type,
        cfg.megatron_cp_in_bnsd,
        cfg.cp_window_size,
        cfg.ulysses_degree_in_cp,
    ) == ("causal", False, 1, None)


def test_flags_round_trip():
    cfg = ring_ext.CPConfig.from_args(
        parse(
            "--context-parallel-size",
            "8",
            "--context-parallel-algo",
            "hybrid_cp_algo",
            "--use-cp-send-recv-overlap",
            "--attention-mask-type",
            "general",
            "--megatron-cp-in-bnsd",
            "--cp-window-size",
            "2",
            "--ulysses-degree-in-cp",
            "2",
            "--cp-sliding-window",
            "4096",
        )
    )
    assert cfg == ring_ext.CPConfig(8, "hybrid_cp_algo", True, "general", True, 2, 2, 4096)
    assert not cfg.causal and cfg.megatron_cp_in_bnsd


def test_bad_flag_choices_exit():
    with pytest.raises(SystemExit):
        parse("--context-parallel-algo", "ring")
    with pytest.raises(SystemExit):
        parse("--attention-mask-type", "sliding")


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(context_parallel_size=0), "context_parallel_size"),
        (dict(context_parallel_size=2.0), "context_parallel_size"),
        (dict(context_parallel_algo="ring"), "context_parallel_algo"),
        (dict(attention_mask_type="sliding"), "attention_mask_type"),
        (dict(use_cp_send_recv_overlap=1), "use_cp_send_recv_overlap"),
        (
            dict(context_parallel_size=4, context_parallel_algo="megatron_cp_algo", cp_window_size=3),
            "cp_window_size",
        ),
        (dict(cp_window_size=0), "cp_window_size"),
        (dict(cp_sliding_window=0), "cp_sliding_window"),
        (dict(context_parallel_size=4, context_parallel_algo="hybrid_cp_algo"), "ulysses_degree_in_cp"),
        (
            dict(context_parallel_size=4, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=3),
            "ulysses_degree_in_cp",
        ),
        (
            dict(
                context_parallel_size=8,
                context_parallel_algo="hybrid_cp_algo",
                ulysses_degree_in_cp=2,
                cp_window_size=8,
            ),
            "cp_window_size",
        ),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ring_ext.CPConfig(**kwargs)
