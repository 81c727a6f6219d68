"""Diagnostics of one weak-to-strong result: how the student relates to its teacher and to the labels it trained on.

Notation: on the transfer set (the weak-label half of the training data, which the weak model labels and the
w2s student trains on), p_w(x) is the weak label (the weak model's class probabilities), t(x) the student's
training target and p_s(x) the student's prediction; on the test set, q_w(x) and q_s(x) are the weak model's and
the student's predictions, y the truth. The training targets are the weak labels themselves, unless ``labels=``
or ``budget=`` made the w2s stage's training set a ``train_labels`` transform stage (filtered or relabelled weak
labels, an ensemble's average, ground-truth rows): then t(x) is that stage's soft labels (``probs.npy``) on its
rows (``rows.npy``), and the transfer-set numbers below cover those rows only.

Misfit (Charikar, Pabbaraju and Shiragur 2024, "Quantifying the gain in weak-to-strong generalization"):
for a student fitted to the weak model's outputs under the squared loss, d(f_s, f*) <= d(f_w, f*) -
d(f_s, f_w) with d(f, g) = E_x ||f(x) - g(x)||^2 (realizable, convex strong class): the student's gain in
squared error over its teacher is at least its misfit to the teacher, and in their experiments about equal.
That "gain ~ misfit" rests on their realisability assumption (the strong class contains the truth, f*), which
a finetuned student need not meet. Here every function outputs class probabilities, so against one-hot truth
d(f, f*) is the Brier score, and

* ``misfit_sq``   = mean over the training rows of sum_c (p_s(x)_c - t(x)_c)^2   (the paper's misfit, against
  the targets the student trained on)
* ``gain_sq``     = Brier(q_w, y) - Brier(q_s, y) on test                        (the gain it predicts)
* ``misfit_kl``   = mean over the training rows of KL(t(x) || p_s(x)): the cross-entropy the student was
  trained on (loss=xent) less the targets' entropy, i.e. the KL analogue of the squared misfit. Mulgund and
  Pabbaraju 2025 and Yao et al. 2025 extend misfit ~ gain to cross-entropy / KL (Bregman divergences), under
  conditions that include which argument of the KL the student fills; this number is the training objective's
  direction, beside
* ``gain_xent``   = cross-entropy(q_w, y) - cross-entropy(q_s, y) on test.
* ``misfit_disagreement`` = share of training rows where argmax p_s != argmax t (hard misfit), beside
* ``gain_acc``    = acc(q_s) - acc(q_w) on test.
* ``misfit_sq_raw_weak``, ``misfit_kl_raw_weak``, ``misfit_disagreement_raw_weak``: the same against the weak
  model's raw labels p_w on the whole transfer set (equal to the three above when no transform ran).
* ``misfit_sq_test``, ``misfit_kl_test``: the student against the weak model on the test set, mean
  ||q_s - q_w||^2 and KL(q_w || q_s) (the hard one is 1 - ``teacher_agreement_test``): the misfit on data
  neither model trained on, measured where the gains are.

Also: ``teacher_agreement_test`` (share of test examples where the student predicts the weak model's class),
``weak_label_fit`` (1 - misfit_disagreement: how well the student fits the hard labels it was trained on, the
transform's when one ran), ``weak_label_xent`` (its cross-entropy against those soft targets: the xent training
loss), and, with the transfer set's ground truth, ``weak_label_acc`` (the weak model's raw labels' own accuracy
on the whole transfer set) and ``student_transfer_acc`` (the student's accuracy on the whole transfer set: above
weak_label_acc, it corrected some of its teacher's errors). ``n_transfer`` counts the transfer set's rows,
``n_targets`` the training rows.

With ``train.val_frac`` > 0 the student trained on all but the held-out share of its training rows, and with
``train.truncation=drop`` without the over-long ones; the transfer-set numbers cover every training row (held-out
and dropped ones included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple

import numpy as np

from w2sg.core.errors import W2SGError

if TYPE_CHECKING:
    from w2sg.core.store import Store

EPS = 1e-12  # floor for probabilities inside logarithms
KEYS = ("misfit_sq", "misfit_kl", "misfit_disagreement", "misfit_sq_raw_weak", "misfit_kl_raw_weak",
        "misfit_disagreement_raw_weak", "misfit_sq_test", "misfit_kl_test", "gain_sq", "gain_xent", "gain_acc",
        "teacher_agreement_test", "weak_label_fit", "weak_label_xent", "weak_label_acc", "student_transfer_acc")
# one sentence for wherever misfit is shown beside gain
REALISABILITY = "gain ~ misfit holds under Charikar et al.'s realisability assumption (the truth in the strong class)"


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


def compute(weak_labels: Any, student_transfer: Optional[Any], weak_test: Any, student_test: Any,
            test_labels: Sequence[int], transfer_labels: Optional[Sequence[int]] = None,
            targets: Optional[Any] = None, target_rows: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Diagnostics of one w2s result (see the module docstring for each number's definition).

    weak_labels, student_transfer: (n_transfer, classes) probabilities of the weak model (its raw labels) and of
    the student, on the whole transfer set. weak_test, student_test: (n_test, classes) on the test set, with
    test_labels. transfer_labels: the transfer set's ground truth, if known. targets, target_rows: what the
    student trained on, (n_targets, classes) soft labels of those rows of the transfer set (a transform stage's
    ``probs`` and ``rows``); None: the weak labels of every row. student_transfer None: the transfer-set numbers
    of the student are None, and ``note`` says why."""
    pw = _probs("weak labels", weak_labels)
    qw, qs = _probs("weak model on test", weak_test), _probs("student on test", student_test)
    _same("test set", qw, qs)
    y = np.asarray(test_labels, dtype=int)
    if len(y) != len(qw):
        raise W2SGError(f"test set: {len(qw)} predictions but {len(y)} labels")
    rows = np.arange(len(pw)) if target_rows is None else np.asarray(target_rows, dtype=int)
    tgt = pw if targets is None else _probs("training targets", targets)
    if targets is not None and target_rows is None and len(tgt) != len(pw):
        raise W2SGError(f"training targets: {len(tgt)} rows for a transfer set of {len(pw)}, and no rows say which")
    if len(rows) != len(tgt) or (len(rows) and (rows.min() < 0 or rows.max() >= len(pw))):
        raise W2SGError(f"training targets: {len(tgt)} soft labels for {len(rows)} rows, which must be rows of the "
                        f"transfer set (0..{len(pw) - 1})")
    if tgt.shape[1] != pw.shape[1]:
        raise W2SGError(f"training targets have {tgt.shape[1]} classes, the weak labels {pw.shape[1]}")
    out: Dict[str, Any] = {k: None for k in KEYS}
    out.update({
        "gain_sq": float(brier(qw, y).mean() - brier(qs, y).mean()),
        "gain_xent": float(xent(qw, y).mean() - xent(qs, y).mean()),
        "gain_acc": float((qs.argmax(-1) == y).mean() - (qw.argmax(-1) == y).mean()),
        "teacher_agreement_test": float((qs.argmax(-1) == qw.argmax(-1)).mean()),
        "misfit_sq_test": float(((qs - qw) ** 2).sum(-1).mean()),
        "misfit_kl_test": float(kl(qw, qs).mean()),
        "n_transfer": len(pw),
        "n_targets": len(rows),
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
    fit = ps[rows]
    hard_t, hard_s = tgt.argmax(-1), fit.argmax(-1)
    out.update({
        "misfit_sq": float(((fit - tgt) ** 2).sum(-1).mean()),
        "misfit_kl": float(kl(tgt, fit).mean()),
        "misfit_disagreement": float((hard_t != hard_s).mean()),
        "misfit_sq_raw_weak": float(((ps - pw) ** 2).sum(-1).mean()),
        "misfit_kl_raw_weak": float(kl(pw, ps).mean()),
        "misfit_disagreement_raw_weak": float((pw.argmax(-1) != ps.argmax(-1)).mean()),
        "weak_label_fit": float((hard_t == hard_s).mean()),
        "weak_label_xent": float(-(tgt * np.log(np.clip(fit, EPS, 1.0))).sum(-1).mean()),
    })
    if t is not None:
        out["student_transfer_acc"] = float((ps.argmax(-1) == t).mean())
    return out


def for_run(store: "Store", keys: Dict[str, str], test_labels: Sequence[int], transfer_labels: Sequence[int],
            n_boot: int = 2000, seed: int = 0) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(diagnostics, pgr_ci) of a finished experiment, from its stages' predictions in ``store`` and
    the task's labels of the test set and of the transfer set (the weak-label half).

    keys: store keys of its ``weak``, ``weak_labels``, ``ceiling`` and ``w2s`` stages, and optionally
    ``targets``: the stage whose labels the w2s stage trained on (its ``labels`` input: a ``train_labels``
    transform under labels= / budget=, whose ``probs`` and ``rows`` are then the training targets). A w2s stage
    stored before students' transfer-set predictions were kept gives the test-set numbers only (with a note)."""
    from w2sg.results import stats

    sd = {name: store.get(key) for name, key in keys.items()}
    test_y, transfer_y = list(test_labels), list(transfer_labels)
    student_transfer = sd["w2s"].read_array("transfer_probs") if sd["w2s"].file("transfer_probs.npy").exists() else None
    test = {k: sd[k].read_array("test_probs") for k in ("weak", "ceiling", "w2s")}
    targets = rows = None
    if keys.get("targets", keys["weak_labels"]) != keys["weak_labels"]:  # as w2sg.run.bodies.training_labels reads
        targets = sd["targets"].read_array("probs")
        rows = sd["targets"].read_array("rows") if sd["targets"].file("rows.npy").exists() else None
    diag = compute(sd["weak_labels"].read_array("probs"), student_transfer, test["weak"], test["w2s"], test_y,
                   transfer_y, targets, rows)
    diag["targets"] = "weak_labels" if targets is None else "train_labels"  # what misfit_* are measured against
    if student_transfer is None:
        diag["note"] += f" (the w2s stage {keys['w2s'][:12]} was stored without them; recompute=[w2s] adds them)"
    boot = stats.bootstrap_over_test(*(stats.correct(test[k], test_y) for k in ("weak", "ceiling", "w2s")),
                                     n_boot=n_boot, seed=seed)
    return diag, stats.pgr_ci_entry(boot)


def row(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """The diagnostics of a run's metrics.json as flat columns for a results row (None where not recorded)."""
    d = metrics.get("diagnostics") or {}
    return {k: d.get(k) for k in KEYS}
