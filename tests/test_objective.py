"""``objective``: the metric the ``w2sg`` task function returns, for tuning sweepers (hydra-optuna-sweeper)."""

import json
import logging
import math
from enum import Enum

import pytest
from helpers import compose, run_w2sg
from omegaconf import OmegaConf

from w2sg.app.cli import objective_value, returned_objective
from w2sg.app.config import (OBJECTIVES, check_direction, check_selection_split, direction_names, maximize_by_default,
                             validate)
from w2sg.core.errors import W2SGError

# probe mode on the tiny pair, only the weak stage: a trial takes seconds
QUICK = ["pair=tiny", "train=probe", "task.n_train=64", "task.n_test=32", "progress=false", "logger=none",
         "stages=[weak]"]


def test_a_misspelt_objective_lists_the_valid_ones():
    with pytest.raises(W2SGError, match=r"unknown objective 'acc.w2'; valid: val.acc.w2s, .*did you mean acc.w2s"):
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


class Direction(Enum):
    """A stand-in for hydra-optuna-sweeper's enum, which holds its default direction (``Direction.minimize``)."""

    minimize = 1
    maximize = 2


OPTUNA = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"


def hydra_node(direction, target=OPTUNA):
    return OmegaConf.create({"sweeper": {"_target_": target, "direction": direction},
                             "overrides": {"hydra": ["hydra/sweeper=optuna"]}})


def test_a_tuning_sweeper_maximises_unless_the_user_says_otherwise(caplog):
    """The direction as the plugin holds its default (an enum), as a user writes it (a string) and as a list."""
    assert direction_names(Direction.minimize) == ["minimize"] and str(Direction.minimize) != "minimize"
    assert direction_names("maximize") == ["maximize"]
    assert direction_names(OmegaConf.create({"d": ["maximize", Direction.minimize]}).d) == ["maximize", "minimize"]
    # left at the default: set to maximize before the sweeper is built, and as an override every job composes with
    hydra = hydra_node(Direction.minimize)
    assert maximize_by_default(hydra)
    assert hydra.sweeper.direction == "maximize"
    assert list(hydra.overrides.hydra) == ["hydra/sweeper=optuna", "hydra.sweeper.direction=maximize"]
    check_direction(hydra.sweeper, "pgr")
    # the default still in a job (the callback did not run): refused, naming the setting
    with pytest.raises(W2SGError, match=r"would minimise objective=pgr .*set hydra.sweeper.direction=maximize"):
        check_direction(hydra_node(Direction.minimize).sweeper, "pgr")
    # the user's own minimize: kept, with a warning
    mine = hydra_node("minimize")
    assert not maximize_by_default(mine) and mine.sweeper.direction == "minimize"
    with caplog.at_level(logging.WARNING, logger="w2sg"):
        check_direction(mine.sweeper, "acc.w2s")
    assert "the sweeper minimises acc.w2s, for which higher is better" in caplog.text
    caplog.clear()
    check_direction(hydra_node("maximize").sweeper, "pgr")
    check_direction(hydra_node(["maximize"]).sweeper, "pgr")
    assert not caplog.text
    # several objectives: w2sg returns one number
    both = hydra_node(["maximize", "minimize"])
    assert not maximize_by_default(both)
    with pytest.raises(W2SGError, match=r"asks for 2 objectives, but w2sg returns one number .*direction=maximize"):
        check_direction(both.sweeper, "pgr")
    # Hydra's basic sweeper reads no return value: left alone
    basic = OmegaConf.create({"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
                              "overrides": {"hydra": []}})
    assert not maximize_by_default(basic) and list(basic.overrides.hydra) == []


def test_optuna_without_a_direction_keeps_the_largest_value(tmp_path, store):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    import yaml

    # the grid sampler runs both learning rates; the probe learns nothing at 1e-5 and something at 1e-1
    sweep = ["-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=2",
             "train.lr=choice(1e-5, 1e-1)", "objective=acc.weak", *QUICK]
    for name, extra, pick in (("default", [], max), ("minimised", ["hydra.sweeper.direction=minimize"], min)):
        proc = run_w2sg([*sweep, *extra, f"hydra.sweep.dir={name}"], tmp_path)
        values = [json.loads((job / "metrics.json").read_text())["acc"]["weak"]
                  for job in sorted((tmp_path / name).glob("[0-9]*"))]
        assert len(values) == 2 and values[0] != values[1], "the two trials must differ for the test to tell"
        result = yaml.safe_load((tmp_path / name / "optimization_results.yaml").read_text())
        assert result["best_value"] == pytest.approx(pick(values)), name
        warned = "hydra.sweeper.direction=minimize: the sweeper minimises acc.weak" in proc.stdout + proc.stderr
        assert warned == (name == "minimised")


def test_tuning_selects_on_held_out_rows_not_on_the_test_split(caplog):
    """The default objective is read on validation rows (the student's against the weak labels); a val.* objective
    without them, or the oracle without ground truth for the student, is refused; a test-split objective warns."""
    import logging

    assert compose([]).objective == "val.acc.w2s"
    with pytest.raises(W2SGError, match="train.val_frac=0 holds none out; set train.val_frac=0.1"):
        check_selection_split(compose([]))
    check_selection_split(compose(["train.val_frac=0.1"]))
    with pytest.raises(W2SGError, match="set train.val_labels=ground_truth"):
        check_selection_split(compose(["train.val_frac=0.1", "objective=val.pgr_oracle"]))
    check_selection_split(compose(["train.val_frac=0.1", "objective=val.pgr_oracle", "train.val_labels=ground_truth"]))
    with caplog.at_level(logging.WARNING, logger="w2sg"):
        check_selection_split(compose(["objective=pgr"]))
    assert "objective=pgr is read on the test split: a result selected on it is optimistic" in caplog.text


def test_validation_accuracies_and_the_oracle_pgr_are_in_the_metrics(tmp_path):
    from helpers import TINY

    from w2sg.core.store import Store
    from w2sg.run import experiment
    from w2sg.run.runner import Runner

    cfg = compose(TINY + ["logger=none", f"store_dir={tmp_path}", "train.val_frac=0.25",
                          "train.val_labels=ground_truth"])
    m = experiment.run(cfg, Runner(cfg, Store(cfg.store_dir)))
    val = m["val"]
    assert val["labels"] == {"weak": "ground_truth", "ceiling": "ground_truth", "w2s": "ground_truth"}
    acc = val["acc"]
    gap = acc["ceiling"] - acc["weak"]
    expected = (acc["w2s"] - acc["weak"]) / gap if gap > 0 else None
    assert val.get("pgr_oracle") == (pytest.approx(expected) if expected is not None else None)
    assert objective_value(m, "val.acc.w2s") == acc["w2s"]
