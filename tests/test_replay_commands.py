"""``disagg replay`` / ``disagg experiment`` flags and deployments, without serving anything."""

from __future__ import annotations

import argparse

import pytest

from disagg.cli import build_parser
from disagg.cpus import parse_cpus, pin_to_cpus, usable_cpus
from disagg.replay.commands import offered_rate, parse_rates, shape_runs, slo_bounds
from disagg.replay.commands import DEFAULT_TRACE
from disagg.replay.experiment import mode_config, split_cpus
from disagg.replay.shaping import ShapedRequest


def test_parse_rates():
    assert parse_rates("1,0.25, 0.5") == [0.25, 0.5, 1.0]
    assert parse_rates(None) is None
    for bad in ("", "a", "0,1", "1,1", "-2"):
        with pytest.raises(ValueError, match="--rates"):
            parse_rates(bad)


def test_parse_cpus_and_bad_pins():
    assert parse_cpus("0-3,8") == {0, 1, 2, 3, 8}
    assert parse_cpus("1") == {1}
    for bad in ("", "a", "3-1", "-1", "0-"):
        with pytest.raises(ValueError):
            parse_cpus(bad)
    with pytest.raises(ValueError, match="cannot pin"):
        pin_to_cpus("100000")
    assert usable_cpus() and usable_cpus() == sorted(usable_cpus())


def test_split_cpus():
    assert split_cpus([0, 1]) == ([0], [1])
    assert split_cpus([0, 1, 2, 3, 4]) == ([0, 1], [2, 3, 4])
    with pytest.raises(ValueError, match="at least 2 cores"):
        split_cpus([0])


def _experiment(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["experiment", *argv])


def test_experiment_defaults_fit_this_machine():
    a = _experiment()
    assert a.trace == str(DEFAULT_TRACE) and DEFAULT_TRACE.is_file()
    assert parse_rates(a.rates) == [0.2, 0.4, 0.6, 0.8]
    assert slo_bounds(a) == (2.0, 0.2)
    runs = shape_runs(a)
    assert [rate for rate, _ in runs] == [0.2, 0.4, 0.6, 0.8]
    for i, (rate, reqs) in enumerate(runs):
        assert len(reqs) == 40
        assert max(len(r.prompt_token_ids) for r in reqs) <= 512
        assert max(r.max_tokens for r in reqs) <= 64
        assert offered_rate(reqs, None) == pytest.approx(rate)
    # Same lengths at every rate; different tokens (seed + i) so no run hits another's cache.
    assert [len(r.prompt_token_ids) for r in runs[0][1]] == \
        [len(r.prompt_token_ids) for r in runs[1][1]]
    assert runs[0][1][0].prompt_token_ids != runs[1][1][0].prompt_token_ids


def test_mode_deployments_use_the_same_cores(tmp_path):
    a = _experiment("--policy-option", "interference_weight=2", "--node-arg=--max-num-seqs=8")
    colo = mode_config("colocated", a, [0, 1], tmp_path)
    assert (colo.num_prefill, colo.policy, colo.decode_args) == (0, "local", ("--cpus", "0,1"))
    assert colo.node_args == ("--max-num-seqs", "8")
    dis = mode_config("disaggregated", a, [0, 1], tmp_path)
    assert (dis.num_prefill, dis.policy, dis.policy_options) == (1, "remote", ())
    assert (dis.prefill_args, dis.decode_args) == (("--cpus", "0"), ("--cpus", "1"))
    cond = mode_config("conditional", a, [0, 1], tmp_path)
    assert (cond.policy, cond.policy_options) == ("cost", ("interference_weight=2",))
    assert cond.log_dir == str(tmp_path / "conditional")
    # laid out as disagg serve does: 2 cores are too few to split, so both nodes share them
    assert (cond.prefill_args, cond.decode_args) == (("--cpus", "0,1"), ("--cpus", "0,1"))
    assert cond.compute_turns and not dis.compute_turns and not colo.compute_turns
    cond = mode_config("conditional", a, list(range(8)), tmp_path)
    assert (cond.prefill_args, cond.decode_args) == (("--cpus", "0,1,2,3"), ("--cpus", "4,5,6,7"))
    assert not cond.compute_turns


def test_bad_flags_are_refused_before_anything_starts():
    from disagg.replay.experiment import run_experiment
    with pytest.raises(ValueError, match="--modes"):
        run_experiment(_experiment("--modes", "colocated,fast"))
    with pytest.raises(ValueError, match="--ttft-slo-ms"):
        slo_bounds(_experiment("--ttft-slo-ms", "0"))
    with pytest.raises(ValueError, match="--attainment-target"):
        slo_bounds(_experiment("--attainment-target", "1.5"))


def test_offered_rate_from_the_schedule():
    reqs = [ShapedRequest(t, [5], 1, 0) for t in (0.0, 1.0, 2.0, 4.0)]
    assert offered_rate(reqs, None) == pytest.approx(0.75)
    assert offered_rate(reqs, 3.0) == 3.0
    assert offered_rate(reqs[:1], None) == 0.0
