"""Diagnostics of one weak-to-strong result: how the student relates to its teacher and to the weak labels.

Notation: on the transfer set (the weak-label half of the training data, which the weak model labels and the
w2s student trains on), p_w(x) is the weak label (the weak model's class probabilities) and p_s(x) the
student's; on the test set, q_w(x) and q_s(x) are the weak model's and the student's predictions, y the truth.

Misfit (Charikar, Pabbaraju and Shiragur 2024, "Quantifying the gain in weak-to-strong generalization"):
for a student fitted to the weak model's outputs under the squared loss, d(f_s, f*) <= d(f_w, f*) -
d(f_s, f_w) with d(f, g) = E_x ||f(x) - g(x)||^2 (realizable, convex strong class): the student's gain in
squared error over its teacher is at least its misfit to the teacher, and in their experiments about equal.
Here every function outputs class probabilities, so against one-hot truth d(f, f*) is the Brier score, and

* ``misfit_sq``   = mean over the transfer set of sum_c (p_s(x)_c - p_w(x)_c)^2   (the paper's misfit)
* ``gain_sq``     = Brier(q_w, y) - Brier(q_s, y) on test                        (the gain it predicts)
* ``misfit_kl``   = mean over the transfer set of KL(p_w(x) || p_s(x)): the cross-entropy the student was
  trained on (loss=xent) less the weak labels' entropy, i.e. the KL analogue of the squared misfit. Mulgund and
  Pabbaraju 2025 and Yao et al. 2025 extend misfit ~ gain to cross-entropy / KL (Bregman divergences), under
  conditions that include which argument of the KL the student fills; this number is the training objective's
  direction, beside
* ``gain_xent``   = cross-entropy(q_w, y) - cross-entropy(q_s, y) on test.
* ``misfit_disagreement`` = share of transfer examples where argmax p_s != argmax p_w (hard misfit), beside
* ``gain_acc``    = acc(q_s) - acc(q_w) on test.

Also: ``teacher_agreement_test`` (share of test examples where the student predicts the weak model's class),
``weak_label_fit`` (1 - misfit_disagreement: how well the student fits the hard weak labels it was trained
on), ``weak_label_xent`` (its cross-entropy against the soft weak labels: the xent training loss), and, with
the transfer set's ground truth, ``weak_label_acc`` (the weak labels' own accuracy) and ``student_transfer_acc``
(the student's accuracy on the transfer set: above weak_label_acc, it corrected some of its teacher's errors).

With ``train.val_frac`` > 0 the student trained on all but the held-out share of the transfer set; the
transfer-set numbers cover the whole set (held-out part included).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from w2sg.core.errors import W2SGError

EPS = 1e-12  # floor for probabilities inside logarithms
KEYS = ("misfit_sq", "misfit_kl", "misfit_disagreement", "gain_sq", "gain_xent", "gain_acc",
        "teacher_agreement_test", "weak_label_fit", "weak_label_xent", "weak_label_acc", "student_transfer_acc")


def _probs(name: str, p: Any) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise W2SGError(f"{name}: expected class probabilities of shape (examples, classes), got {p.shape}")
    if not np.allclose(p.sum(-1), 1.0, atol=1e-3) or (p < -1e-6).any():
        raise W2SGError(f"{name}: rows are not probability distributions (they must be >= 0 and sum to 1)")
    return p


def _same(name: str, a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise W2SGError(f"{name}: shapes differ ({a.shape} vs {b.shape}); both must cover the same examples")


def brier(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example squared distance between class probabilities and one-hot truth."""
    return ((p - np.eye(p.shape[1])[y]) ** 2).sum(-1)


def xent(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy (nats) of class probabilities against the true class."""
    return -np.log(np.clip(p[np.arange(len(y)), y], EPS, 1.0))


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-example KL(p || q) in nats."""
    p_safe, q_safe = np.clip(p, EPS, 1.0), np.clip(q, EPS, 1.0)
    return (np.where(p > 0, p * (np.log(p_safe) - np.log(q_safe)), 0.0)).sum(-1)


def compute(weak_labels: Any, student_transfer: Optional[Any], weak_test: Any, student_test: Any, test_labels: Sequence[int],
            transfer_labels: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Diagnostics of one w2s result (see the module docstring for each number's definition).

    weak_labels, student_transfer: (n_transfer, classes) probabilities of the weak model (the labels the
    student trained on) and of the student, on the transfer set. weak_test, student_test: (n_test, classes)
    on the test set, with test_labels. transfer_labels: the transfer set's ground truth, if known.
    student_transfer None: the transfer-set numbers of the student are None, and ``note`` says why."""
    pw = _probs("weak labels", weak_labels)
    qw, qs = _probs("weak model on test", weak_test), _probs("student on test", student_test)
    _same("test set", qw, qs)
    y = np.asarray(test_labels, dtype=int)
    if len(y) != len(qw):
        raise W2SGError(f"test set: {len(qw)} predictions but {len(y)} labels")
    out: Dict[str, Any] = {k: None for k in KEYS}
    out.update({
        "gain_sq": float(brier(qw, y).mean() - brier(qs, y).mean()),
        "gain_xent": float(xent(qw, y).mean() - xent(qs, y).mean()),
        "gain_acc": float((qs.argmax(-1) == y).mean() - (qw.argmax(-1) == y).mean()),
        "teacher_agreement_test": float((qs.argmax(-1) == qw.argmax(-1)).mean()),
        "n_transfer": len(pw),
        "n_test": len(y),
    })
    t = None
    if transfer_labels is not None:
        t = np.asarray(transfer_labels, dtype=int)
        if len(t) != len(pw):
            raise W2SGError(f"transfer set: {len(pw)} predictions but {len(t)} labels")
        out["weak_label_acc"] = float((pw.argmax(-1) == t).mean())
    if student_transfer is None:
        out["note"] = "no student predictions on the transfer set: misfit and weak-label fit not computed"
        return out
    ps = _probs("student on the transfer set", student_transfer)
    _same("transfer set", pw, ps)
    hard_w, hard_s = pw.argmax(-1), ps.argmax(-1)
    out.update({
        "misfit_sq": float(((ps - pw) ** 2).sum(-1).mean()),
        "misfit_kl": float(kl(pw, ps).mean()),
        "misfit_disagreement": float((hard_w != hard_s).mean()),
        "weak_label_fit": float((hard_w == hard_s).mean()),
        "weak_label_xent": float(-(pw * np.log(np.clip(ps, EPS, 1.0))).sum(-1).mean()),
    })
    if t is not None:
        out["student_transfer_acc"] = float((hard_s == t).mean())
    return out


def for_run(runner: Any, keys: Dict[str, str], n_boot: int = 2000, seed: int = 0) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(diagnostics, pgr_ci) of a finished experiment, from its stages' stored predictions.

    keys: store keys of its ``weak``, ``weak_labels``, ``ceiling`` and ``w2s`` stages. A w2s stage stored
    before students' transfer-set predictions were kept gives the test-set numbers only (with a note)."""
    from w2sg.results import stats

    sd = {name: runner.store.get(key) for name, key in keys.items()}
    test_y = [y for _, y in runner.data.test]
    transfer_y = [y for _, y in runner.data.weak]
    student_transfer = sd["w2s"].read_array("transfer_probs") if sd["w2s"].file("transfer_probs.npy").exists() else None
    test = {k: sd[k].read_array("test_probs") for k in ("weak", "ceiling", "w2s")}
    diag = compute(sd["weak_labels"].read_array("probs"), student_transfer, test["weak"], test["w2s"], test_y,
                   transfer_y)
    if student_transfer is None:
        diag["note"] += f" (the w2s stage {keys['w2s'][:12]} was stored without them; recompute=[w2s] adds them)"
    boot = stats.bootstrap_over_test(*(stats.correct(test[k], test_y) for k in ("weak", "ceiling", "w2s")),
                                     n_boot=n_boot, seed=seed)
    return diag, stats.pgr_ci_entry(boot)


def row(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """The diagnostics of a run's metrics.json as flat columns for a results row (None where not recorded)."""
    d = metrics.get("diagnostics") or {}
    return {k: d.get(k) for k in KEYS}
