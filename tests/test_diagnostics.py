"""Student-vs-teacher diagnostics (misfit, weak-label fit, agreement) and the per-run PGR CI in metrics.json."""

import math
import re

import numpy as np
import pandas as pd
import pytest
from helpers import TINY, compose

from w2sg.core.errors import W2SGError
from w2sg.core.store import Store
from w2sg.results import diagnostics, plots
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


def test_misfit_is_measured_against_the_targets_the_student_trained_on():
    """A transform (labels= / budget=) trained the student on other labels, here of rows 0 and 2 only."""
    targets = [[0.0, 1.0], [0.1, 0.9]]  # row 0 relabelled (e.g. ground truth), row 2 kept as a soft label
    d = diagnostics.compute(PW, PS, QW, QS, Y, T, targets=targets, target_rows=[0, 2])
    # student on rows 0 and 2: [0.7, 0.3], [0.1, 0.9]
    assert d["misfit_sq"] == pytest.approx((2 * 0.7 ** 2 + 0.0) / 2)
    assert d["misfit_kl"] == pytest.approx((math.log(1 / 0.3) + 0.0) / 2), "row 2 fits its soft label exactly"
    assert d["misfit_disagreement"] == pytest.approx(0.5) and d["weak_label_fit"] == pytest.approx(0.5)
    assert d["weak_label_xent"] == pytest.approx((-math.log(0.3) - 0.1 * math.log(0.1) - 0.9 * math.log(0.9)) / 2)
    # the raw weak labels of the whole transfer set, under their own names: as without a transform
    plain = diagnostics.compute(PW, PS, QW, QS, Y, T)
    for k in ("sq", "kl", "disagreement"):
        assert d[f"misfit_{k}_raw_weak"] == pytest.approx(plain[f"misfit_{k}"]) == plain[f"misfit_{k}_raw_weak"]
    assert d["misfit_sq"] != pytest.approx(plain["misfit_sq"])
    assert (d["n_transfer"], d["n_targets"], plain["n_targets"]) == (3, 2, 3)
    assert d["weak_label_acc"] == plain["weak_label_acc"] and d["student_transfer_acc"] == plain["student_transfer_acc"]
    with pytest.raises(W2SGError, match="must be rows of the transfer set"):
        diagnostics.compute(PW, PS, QW, QS, Y, targets=targets, target_rows=[0, 3])
    with pytest.raises(W2SGError, match="2 soft labels for 1 rows"):
        diagnostics.compute(PW, PS, QW, QS, Y, targets=targets, target_rows=[0])


def test_misfit_on_the_test_set_is_the_student_against_the_weak_model():
    d = diagnostics.compute(PW, PS, QW, QS, Y, T)
    # test: weak [0.8, 0.2], [0.3, 0.7]; student [0.6, 0.4], [0.9, 0.1]
    assert d["misfit_sq_test"] == pytest.approx((2 * 0.2 ** 2 + 2 * 0.6 ** 2) / 2)
    assert d["misfit_kl_test"] == pytest.approx((0.8 * math.log(0.8 / 0.6) + 0.2 * math.log(0.2 / 0.4)
                                                 + 0.3 * math.log(0.3 / 0.9) + 0.7 * math.log(0.7 / 0.1)) / 2)
    copy = diagnostics.compute(PW, None, QW, QW, Y)
    assert copy["misfit_sq_test"] == 0 and copy["misfit_kl_test"] == pytest.approx(0), "no transfer predictions needed"


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


def test_misfit_plot(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    drawn = {}
    save = Figure.savefig

    def savefig(fig, *args, **kwargs):
        drawn["title"] = fig._suptitle.get_text()
        drawn["x"] = [ax.get_xlabel() for ax in fig.axes]
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    rows = [dict(diagnostics.compute(PW, PS, QW, QS, Y, T), pgr=0.3, loss="xent"),
            dict(diagnostics.compute(PW, PW, QW, QW, Y), pgr=0.0, loss="aux")]
    path = plots.misfit_vs_gain(pd.DataFrame(rows), tmp_path / "misfit.png")
    assert path.exists() and path.stat().st_size > 5000
    assert "gain ~ misfit holds under Charikar et al.'s realisability assumption" in drawn["title"]
    assert any("test set" in x for x in drawn["x"]), "the test-set misfit has a panel"
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
    assert d["targets"] == "weak_labels" and d["misfit_sq_raw_weak"] == d["misfit_sq"]
    weak_test = runner.store.get(m["stages"]["weak"]["key"]).read_array("test_probs")
    assert d["misfit_sq_test"] == pytest.approx(float(((w2s.read_array("test_probs") - weak_test) ** 2).sum(-1).mean()))
    text = experiment.table(m)
    assert "PGR 95% CI" in text and "too small" in text and "misfit (transfer)" in text
    assert "misfit (test)" in text and diagnostics.REALISABILITY in text and "misfit (raw weak)" not in text

    # a w2s stage stored before transfer predictions were kept: test-set numbers, and how to get the rest
    (w2s.path / "transfer_probs.npy").unlink()
    runner.store._update_sizes(m["stages"]["w2s"]["key"])  # its record without the file, as such a stage's is
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


def test_with_labels_methods_misfit_is_against_the_transformed_labels_and_pgr_also_against_the_ensemble(tmp_path):
    m, runner = run_experiment(["labels=ensemble", "labels.seeds=[0,1]", "budget=mixed", "budget.n_gt=8",
                                "budget.n_weak=16"], tmp_path / "s")
    d, get = m["diagnostics"], lambda name, array: runner.store.get(m["stages"][name]["key"]).read_array(array)
    student, raw = get("w2s", "transfer_probs"), get("weak_labels", "probs")
    targets, rows = get("train_labels", "probs"), get("train_labels", "rows")
    assert len(rows) == 24 and d["n_targets"] == 24 and d["n_transfer"] == len(raw) == 32
    assert d["targets"] == "train_labels"
    assert d["misfit_sq"] == pytest.approx(float(((student[rows] - targets) ** 2).sum(-1).mean()))
    assert d["weak_label_fit"] == pytest.approx(float((student[rows].argmax(-1) == targets.argmax(-1)).mean()))
    assert d["misfit_sq_raw_weak"] == pytest.approx(float(((student - raw) ** 2).sum(-1).mean()))
    assert d["misfit_sq"] != pytest.approx(d["misfit_sq_raw_weak"])
    # the ensemble: its members' test probabilities averaged, and PGR against its accuracy beside pgr's
    test_y = np.array([y for _, y in runner.data.test])
    members = [get("weak", "test_probs"), get("member1", "test_probs")]
    ens = float((((members[0] + members[1]) / 2).argmax(-1) == test_y).mean())
    e, acc = m["ensemble"], m["acc"]
    assert e["members"] == 2 and e["acc"] == pytest.approx(ens)
    if acc["ceiling"] > ens:
        assert e["pgr"] == pytest.approx((acc["w2s"] - ens) / (acc["ceiling"] - ens))
    else:
        assert e["pgr"] is None and "no gap" in e["pgr_reason"]
    if acc["ceiling"] > acc["weak"]:
        assert m["pgr"] == pytest.approx((acc["w2s"] - acc["weak"]) / (acc["ceiling"] - acc["weak"]))
    text = experiment.table(m)
    assert "acc ensemble (2)" in text and "PGR vs ensemble" in text and "misfit (raw weak)" in text
    from w2sg.results.collect import rows_of

    (row,) = rows_of([("run", m)], "test")
    assert row["acc_ensemble"] == e["acc"] and row["pgr_vs_ensemble"] == e["pgr"]
    assert row["misfit_sq"] == d["misfit_sq"] and row["misfit_sq_raw_weak"] == d["misfit_sq_raw_weak"]
