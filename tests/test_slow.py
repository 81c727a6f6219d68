"""Slow: the default experiment on the real pretrained MiniLM (minutes on 2 cores). Run with -m slow."""

import functools

import helpers
import pytest
from helpers import check_results, metrics_files, run_config, task_test_labels

# as a user runs them (python -m w2sg): the minutes-long runs on the real MiniLM
run_w2sg = functools.partial(helpers.run_w2sg, subprocess=True)

pytestmark = pytest.mark.slow


@pytest.mark.slow(seconds=100)
def test_default_experiment_shows_a_real_gap(tmp_path, store):
    proc = run_w2sg(["progress=false"], tmp_path)
    [m] = metrics_files(tmp_path)
    assert (m["weak"]["model"], m["strong"]["model"]) == ("minilm_l1", "minilm_l6")
    cfg = run_config(m)
    assert (cfg.train.mode, cfg.task.n_train, cfg.task.n_test) == ("probe", 4000, 3000), "the default experiment"
    # real pretrained features: both models learn the task, and the 6-layer model beats the 1-layer one
    assert m["acc"]["weak"] > 0.65 and m["acc"]["ceiling"] > m["acc"]["weak"] + 0.02
    check_results(m, store, task_test_labels(run_config(m)))  # PGR a number: the ceiling beats weak
    assert "PGR" in proc.stdout


@pytest.mark.slow(seconds=70)
def test_another_pair_with_logconf(tmp_path, store):
    # full finetuning of the real models (the default is linear probes)
    run_w2sg(["pair=minilm_l2_l6", "train=full", "loss=logconf", "train.epochs=1", "progress=false"], tmp_path)
    [m] = metrics_files(tmp_path)
    assert (m["weak"]["model"], m["loss"], run_config(m).train.mode) == ("minilm_l2", "logconf", "full")
    check_results(m, store, task_test_labels(run_config(m)))
