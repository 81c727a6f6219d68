"""``objective``: the metric the ``w2sg`` task function returns, for tuning sweepers (hydra-optuna-sweeper)."""

import json
import math

import pytest
from helpers import compose, run_w2sg
from omegaconf import OmegaConf

from w2sg.app.cli import OBJECTIVES, objective_value, returned_objective, validate
from w2sg.core.errors import W2SGError

# probe mode on the tiny pair, only the weak stage: a trial takes seconds
QUICK = ["pair=tiny", "train=probe", "task.n_train=64", "task.n_test=32", "progress=false", "logger=none",
         "stages=[weak]"]


def test_a_misspelt_objective_lists_the_valid_ones():
    with pytest.raises(W2SGError, match=r"unknown objective 'acc.w2'; valid: pgr, acc.w2s, .*did you mean acc.w2s"):
        validate(compose(["pair=tiny", "objective=acc.w2"]), [])
    with pytest.raises(W2SGError, match="needs a bootstrap chain"):
        validate(compose(["pair=tiny", "objective=chain.end_to_end.pgr"]), [])
    validate(compose(["chain=tiny", "objective=chain.end_to_end.pgr"]), [])


def test_the_objective_is_read_from_the_metrics():
    metrics = {"pgr": None, "pgr_reason": "no gap", "acc": {"weak": 0.5, "w2s": 0.75, "ceiling": None},
               "chain": {"end_to_end": {"pgr": 0.25}}}
    assert objective_value(metrics, "acc.w2s") == 0.75
    assert objective_value(metrics, "chain.end_to_end.pgr") == 0.25
    assert objective_value(metrics, "pgr") is None and objective_value(metrics, "acc.ceiling") is None
    assert objective_value({"acc": {"w2s": 1}}, "acc.w2s") == 1.0 and len(OBJECTIVES) == len(set(OBJECTIVES))
    # a single run (no sweeper reads it): a null objective is NaN, as before the task function returned the PGR
    cfg = OmegaConf.create({"objective": "pgr"})
    assert math.isnan(returned_objective(cfg, metrics))
    assert returned_objective(OmegaConf.create({"objective": "acc.weak"}), metrics) == 0.5


def test_basic_sweeper_runs_jobs_whose_objective_is_null(tmp_path, store):
    """Hydra's basic sweeper ignores the return value: a null PGR (here: stages=) is no failure, as before."""
    proc = run_w2sg(["-m", "seed=0", *QUICK, "hydra.sweep.dir=basic"], tmp_path)
    assert json.loads((tmp_path / "basic" / "0" / "metrics.json").read_text())["pgr"] is None
    assert "error" not in proc.stderr.lower()


def test_optuna_sweeper_tunes_the_learning_rate(tmp_path, store):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    import yaml

    sweep = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.direction=maximize",
             "hydra.sweeper.sampler.seed=0", "train.lr=tag(log, interval(1e-4, 1e-1))", *QUICK]
    run_w2sg([*sweep, "objective=acc.weak", "hydra.sweep.dir=tuned"], tmp_path)
    result = yaml.safe_load((tmp_path / "tuned" / "optimization_results.yaml").read_text())
    trials = []
    for job in sorted((tmp_path / "tuned").glob("[0-9]*")):
        acc = json.loads((job / "metrics.json").read_text())["acc"]["weak"]
        lr = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["train"]["lr"]
        trials.append((acc, lr))
    assert len(trials) == 2 and len({lr for _, lr in trials}) == 2
    best = max(trials)
    assert result["best_value"] == pytest.approx(best[0])
    assert result["best_params"]["train.lr"] == pytest.approx(best[1])

    # a null objective under a tuning sweeper: a failed trial with our message (NaN would abort in optuna itself)
    proc = run_w2sg([*sweep, "objective=pgr", "hydra.sweep.dir=null_pgr"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "objective pgr is null for this run (only stages weak ran (stages=))" in proc.stderr
    assert "max_failure_rate" in proc.stderr
