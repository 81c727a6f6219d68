"""Student-vs-teacher diagnostics (misfit, weak-label fit, agreement) and the per-run PGR CI in metrics.json."""

import math
import re

import numpy as np
import pandas as pd
import pytest
from helpers import TINY, compose

from w2sg.core.errors import W2SGError
from w2sg.core.store import Store
from w2sg.results import diagnostics, plots, plots
from w2sg.run import experiment
from w2sg.run.runner import Runner

# transfer set: weak labels and the student's predictions; test set: weak model, student, truth
PW = [[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]]
PS = [[0.7, 0.3], [0.6, 0.4], [0.1, 0.9]]
QW = [[0.8, 0.2], [0.3, 0.7]]
QS = [[0.6, 0.4], [0.9, 0.1]]
Y = [0, 0]
T = [0, 0, 1]


def test_misfit_and_gains_on_a_hand_made_example():
    d = diagnostics.compute(PW, PS, QW, QS, Y, T)
    # squared distances per transfer example: 2 * 0.2^2, 2 * 0.2^2, 2 * 0.1^2
    assert d["misfit_sq"] == pytest.approx((0.08 + 0.08 + 0.02) / 3)
    kl = [0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3),
          0.4 * math.log(0.4 / 0.6) + 0.6 * math.log(0.6 / 0.4),
          0.2 * math.log(0.2 / 0.1) + 0.8 * math.log(0.8 / 0.9)]
    assert d["misfit_kl"] == pytest.approx(sum(kl) / 3)
    # hard labels: weak 0, 1, 1; student 0, 0, 1
    assert d["misfit_disagreement"] == pytest.approx(1 / 3) and d["weak_label_fit"] == pytest.approx(2 / 3)
    xent = [-(0.9 * math.log(0.7) + 0.1 * math.log(0.3)), -(0.4 * math.log(0.6) + 0.6 * math.log(0.4)),
            -(0.2 * math.log(0.1) + 0.8 * math.log(0.9))]
    assert d["weak_label_xent"] == pytest.approx(sum(xent) / 3)
    # Brier on test (truth 0, 0): weak 0.08 and 0.98, student 0.32 and 0.02
    assert d["gain_sq"] == pytest.approx((0.08 + 0.98) / 2 - (0.32 + 0.02) / 2)
    assert d["gain_xent"] == pytest.approx((-math.log(0.8) - math.log(0.3) + math.log(0.6) + math.log(0.9)) / 2)
    assert d["gain_acc"] == pytest.approx(0.5) and d["teacher_agreement_test"] == pytest.approx(0.5)
    assert d["weak_label_acc"] == pytest.approx(2 / 3) and d["student_transfer_acc"] == pytest.approx(1.0)
    assert (d["n_transfer"], d["n_test"]) == (3, 2)


def test_a_student_that_copies_its_teacher_has_no_misfit_and_no_gain():
    d = diagnostics.compute(PW, PW, QW, QW, Y)
    assert d["misfit_sq"] == 0 and d["misfit_kl"] == pytest.approx(0) and d["misfit_disagreement"] == 0
    assert d["gain_sq"] == 0 and d["gain_acc"] == 0 and d["teacher_agreement_test"] == 1
    assert d["weak_label_acc"] is None, "no transfer-set truth given"


def test_without_the_students_transfer_predictions_only_test_numbers():
    d = diagnostics.compute(PW, None, QW, QS, Y, T)
    assert d["misfit_sq"] is None and d["weak_label_fit"] is None and "not computed" in d["note"]
    assert d["gain_acc"] == pytest.approx(0.5) and d["weak_label_acc"] == pytest.approx(2 / 3)


def test_bad_predictions_are_named():
    with pytest.raises(W2SGError, match="transfer set: shapes differ"):
        diagnostics.compute(PW, PS[:2], QW, QS, Y)
    with pytest.raises(W2SGError, match="not probability distributions"):
        diagnostics.compute(PW, [[2.0, -1.0]] * 3, QW, QS, Y)
    with pytest.raises(W2SGError, match="2 predictions but 3 labels"):
        diagnostics.compute(PW, PS, QW, QS, [0, 1, 1])


def test_misfit_plot(tmp_path):
    rows = [dict(diagnostics.compute(PW, PS, QW, QS, Y, T), pgr=0.3, loss="xent"),
            dict(diagnostics.compute(PW, PW, QW, QW, Y), pgr=0.0, loss="aux")]
    path = plots.misfit_vs_gain(pd.DataFrame(rows), tmp_path / "misfit.png")
    assert path.exists() and path.stat().st_size > 5000
    with pytest.raises(W2SGError, match="no column"):
        plots.misfit_vs_gain([{"pgr": 1}], tmp_path / "x.png")


def run_experiment(overrides, store_dir):
    cfg = compose(TINY + ["logger=none", f"store_dir={store_dir}"] + list(overrides))
    runner = Runner(cfg, Store(cfg.store_dir))
    return experiment.run(cfg, runner), runner


def test_every_w2s_result_records_diagnostics_and_a_pgr_ci(tmp_path):
    m, runner = run_experiment([], tmp_path / "s")
    d = m["diagnostics"]
    w2s = runner.store.get(m["stages"]["w2s"]["key"])
    student = w2s.read_array("transfer_probs")
    labels = runner.store.get(m["stages"]["weak_labels"]["key"]).read_array("probs")
    assert student.shape == labels.shape == (d["n_transfer"], 2)
    assert d["misfit_sq"] == pytest.approx(float(((student - labels) ** 2).sum(-1).mean()))
    assert d["weak_label_acc"] == pytest.approx(m["weak_label_acc"])
    assert d["gain_acc"] == pytest.approx(m["acc"]["w2s"] - m["acc"]["weak"])
    assert 0 <= d["teacher_agreement_test"] <= 1 and d["n_test"] == 32
    assert not runner.store.get(m["stages"]["ceiling"]["key"]).file("transfer_probs.npy").exists()
    ci = m["pgr_ci"]
    assert ci["n_test"] == 32 and ci["level"] == 0.95
    if ci["low"] is not None:
        assert ci["low"] <= ci["high"]
    assert ci["warning"] and "n_test=32" in ci["warning"], "32 test examples cannot tell a PGR from noise"
    text = experiment.table(m)
    assert "PGR 95% CI" in text and "too small" in text and "misfit (transfer)" in text

    # a w2s stage stored before transfer predictions were kept: test-set numbers, and how to get the rest
    (w2s.path / "transfer_probs.npy").unlink()
    again, _ = run_experiment([], tmp_path / "s")
    assert all(s["reused"] for s in again["stages"].values())
    assert again["diagnostics"]["misfit_sq"] is None and "recompute=[w2s]" in again["diagnostics"]["note"]
    assert again["diagnostics"]["gain_acc"] == d["gain_acc"] and again["pgr_ci"] == ci
    assert re.search(r"misfit \(transfer\) +sq n/a", experiment.table(again))


def test_row_flattens_a_runs_diagnostics():
    d = diagnostics.compute(PW, PS, QW, QS, Y, T)
    row = diagnostics.row({"diagnostics": d})
    assert set(row) == set(diagnostics.KEYS) and row["misfit_sq"] == d["misfit_sq"]
    assert diagnostics.row({}) == {k: None for k in diagnostics.KEYS}
    assert np.isfinite([v for v in row.values()]).all()
