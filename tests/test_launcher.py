"""The Slurm launcher's options and the stage-subset runs it builds on, without Slurm."""

import json
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, compose
from hydra_plugins.w2sg_launcher.w2sg_launcher import (W2sgSlurmConf, W2sgSlurmLauncher, _error_line,
                                                     shared_stage_groups)
from w2sg import cli, experiment, report
from w2sg.errors import W2SGError

GRID = ["sweep=tiny_grid", "logger=none"]
PAIRS = [(w, s) for w in ("tiny_random", "tiny_random_l2") for s in ("tiny_random_l3", "tiny_random_l4")]


def grid_configs(pairs=PAIRS, extra=()):
    return [compose([*GRID, f"weak={w}", f"strong={s}", *extra]) for w, s in pairs]


def test_unknown_shared_stages_value_names_the_valid_ones():
    with pytest.raises(W2SGError, match=r"shared_stages: unknown value 'fifo'; valid: lock, dependency"):
        W2sgSlurmLauncher(shared_stages="fifo")
    assert W2sgSlurmLauncher(shared_stages="dependency").shared_stages == "dependency"


def test_a_failed_job_is_summed_up_by_its_exception_line():
    trace = ("Job (task=0) failed during processing with trace:\n----------------------\n"
             "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
             "w2sg.errors.W2SGError: need n_train >= 2\n\n----------------------\n"
             "You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n  - a.err\n  - a.out")
    assert _error_line(trace) == "w2sg.errors.W2SGError: need n_train >= 2"  # submitit's FailedJobError
    assert _error_line("task 'x': need n_train >= 2\nmore") == "task 'x': need n_train >= 2"  # Hydra's JobReturn


def test_every_slurm_profile_uses_the_default_shared_stages():
    for name in ("slurm_local", "slurm_gpu", "slurm_cpu"):
        launcher = yaml.safe_load((ROOT / "launchers" / f"{name}.yaml").read_text())["hydra"]["launcher"]
        assert launcher["shared_stages"] == W2sgSlurmConf.shared_stages, name


def test_stage_names_are_checked_naming_the_valid_ones(store):
    [cfg] = grid_configs(PAIRS[:1], ["stages=[weak,wieght]"])
    with pytest.raises(W2SGError, match=r"stages: no stage named 'wieght'.*valid: weak, weak_labels, ceiling, w2s"):
        experiment.select(cfg, experiment.plan(cfg))
    [cfg] = grid_configs(PAIRS[:1], ["stages=[]"])
    with pytest.raises(W2SGError, match="stages: empty list"):
        experiment.select(cfg, experiment.plan(cfg))
    [cfg] = grid_configs(PAIRS[:1], ["stages=[w2s]"])  # w2s needs the weak labels, which need the weak model
    assert list(experiment.select(cfg, experiment.plan(cfg))) == ["weak", "weak_labels", "w2s"]
    [cfg] = grid_configs(PAIRS[:1])
    assert list(experiment.select(cfg, experiment.plan(cfg))) == ["weak", "weak_labels", "ceiling", "w2s"]


def test_shared_stage_groups_dedupe_by_key(store):
    groups = shared_stage_groups(grid_configs())
    assert [(g.labels, g.names, g.jobs) for g in groups] == [
        (["weak:tiny_random", "weak_labels:tiny_random"], ["weak", "weak_labels"], [0, 1]),
        (["ceiling:tiny_random_l3"], ["ceiling"], [0, 2]),
        (["ceiling:tiny_random_l4"], ["ceiling"], [1, 3]),
        (["weak:tiny_random_l2", "weak_labels:tiny_random_l2"], ["weak", "weak_labels"], [2, 3]),
    ]
    # tiny_random_l2 is the strong model of pair 0 and the weak model of pair 1: one group, run by pair 1
    cfgs = grid_configs([("tiny_random", "tiny_random_l2"), ("tiny_random_l2", "tiny_random_l3")])
    groups = {g.labels[0]: g for g in shared_stage_groups(cfgs)}
    assert len(groups) == 3
    g = groups["ceiling:tiny_random_l2"]
    assert (g.labels, g.source, g.names, g.jobs) == (
        ["ceiling:tiny_random_l2", "weak_labels:tiny_random_l2"], 1, ["weak", "weak_labels"], [0, 1])


def test_a_subset_run_writes_metrics_without_pgr_that_reports_skip(tmp_path, store, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    [cfg] = grid_configs(PAIRS[:1], ["stages=[weak_labels]"])
    metrics = cli.run(cfg)  # writes ./metrics.json and prints the table
    assert "acc w2s" in capsys.readouterr().out
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert written["subset"] == ["weak", "weak_labels"] and list(written["stages"]) == ["weak", "weak_labels"]
    assert written["pgr"] is None and "only stages weak, weak_labels ran" in written["pgr_reason"]
    assert written["acc"]["weak"] is not None and written["acc"]["ceiling"] is None and written["acc"]["w2s"] is None
    assert report.rows_from_runs(Path(tmp_path)) == []
    # what the subset stored is not planned again; the rest of the grid still is
    groups = shared_stage_groups(grid_configs())
    assert [g.labels[0] for g in groups] == ["ceiling:tiny_random_l3", "ceiling:tiny_random_l4", "weak:tiny_random_l2"]
