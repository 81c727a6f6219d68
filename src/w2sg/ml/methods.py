"""Weak-label methods: what the w2s stage trains on, beyond the plain weak labels.

``labels=<method>`` transforms the weak labels of the weak-label half before the w2s stage (a registry of plain
functions, like the losses): ``confidence_filter``, ``probe_relabel`` / ``probe_filter`` (probes on the strong
model's frozen features, after EleutherAI/w2s) and ``ensemble`` (the average soft labels of several weak
supervisors). ``budget=`` mixes n weak and m ground-truth labels (Mallen & Belrose 2024). Both make one stored
stage (kind ``transform``, plan name ``train_labels``) whose output is a training set: soft labels plus the rows of
the weak-label half they belong to, so two w2s runs (e.g. two losses) share it. ``s2s=N`` (strong-to-strong
iterations) needs no method of its own: it chains ordinary train and labels stages (w2sg.core.plan.plan).

Order inside the stage: average the ensemble's labels, draw the budget's rows (ground truth first, then weak),
apply the method to the weak-labelled rows, add the ground-truth rows with one-hot labels.

Every method is ``fn(probs [N, C], features [N, H] or None, **params) -> (probs [M, C], kept positions [M])``;
its keyword arguments (with defaults) are its parameters, checked before anything runs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from w2sg.core.errors import W2SGError
from w2sg.core.registry import check_choice

Result = Tuple[np.ndarray, np.ndarray]
METHODS: Dict[str, Callable[..., Result]] = {}
NEEDS_FEATURES = {"probe_relabel", "probe_filter"}  # methods that read the strong model's frozen features
BUDGET_STREAM = 16  # the budget's random stream: numpy default_rng([seed, BUDGET_STREAM])


def register_method(name: str) -> Callable[[Callable[..., Result]], Callable[..., Result]]:
    def deco(fn: Callable[..., Result]) -> Callable[..., Result]:
        METHODS[name] = fn
        return fn

    return deco


def method_params(fn: Callable[..., Result]) -> Dict[str, Any]:
    """The keyword arguments of a method and their defaults."""
    return {n: p.default for n, p in list(inspect.signature(fn).parameters.items())[2:]}


def _all(probs: np.ndarray) -> np.ndarray:
    return np.arange(len(probs))


def _drop(score: np.ndarray, frac: float) -> np.ndarray:
    """Positions kept after dropping the ``frac`` share with the highest score (ties: the later row goes first)."""
    n_drop = int(round(frac * len(score)))
    order = np.argsort(-score, kind="stable")
    return np.sort(order[n_drop:])


def confidence(probs: np.ndarray) -> np.ndarray:
    """The top class probability: 0.5 + |p - 0.5| for two classes."""
    return np.asarray(probs).max(axis=1)


def disagreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Total variation distance between two soft labels per row: |p_a - p_b| for two classes."""
    return 0.5 * np.abs(np.asarray(a) - np.asarray(b)).sum(axis=1)


# --- probes on frozen features -------------------------------------------------------------------------------

def knn_probe(x: np.ndarray, probs: np.ndarray, k: int = 50, chunk: int = 1024) -> np.ndarray:
    """Each row's prediction: the mean soft label of its k most cosine-similar rows, itself included (as
    EleutherAI/w2s's ``knn_average``, which ranks every row against all rows of the same set)."""
    x = np.asarray(x, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = min(int(k), len(x))
    out = np.empty_like(np.asarray(probs, dtype=np.float32))
    for start in range(0, len(x), chunk):
        sim = x[start:start + chunk] @ x.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        out[start:start + chunk] = probs[top].mean(axis=1)
    return out


def logreg_probe(x: np.ndarray, probs: np.ndarray, C: float = 1.0) -> np.ndarray:
    """scikit-learn's LogisticRegression (C) fit on the hard weak labels; its predicted probabilities of the same
    rows. Labels of one class only: that class, with probability 1 (the only fit there is)."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(probs).argmax(axis=1)
    out = np.zeros(np.shape(probs), dtype=np.float32)
    if len(np.unique(y)) == 1:
        out[:, y[0]] = 1.0
        return out
    clf = LogisticRegression(C=float(C), max_iter=1000).fit(np.asarray(x, dtype=np.float64), y)
    out[:, clf.classes_] = clf.predict_proba(np.asarray(x, dtype=np.float64))
    return out


PROBES: Dict[str, Tuple[Callable[..., np.ndarray], Tuple[str, ...]]] = {
    "knn": (lambda x, p, k, C: knn_probe(x, p, k=k), ("k",)),
    "logreg": (lambda x, p, k, C: logreg_probe(x, p, C=C), ("C",)),
}


def _probe(features: Optional[np.ndarray], probs: np.ndarray, probe: str, k: int, C: float) -> np.ndarray:
    if features is None:
        raise W2SGError("probe methods need the strong model's features")
    return PROBES[probe][0](features, probs, k, C)


# --- the methods ---------------------------------------------------------------------------------------------

@register_method("none")
def none(probs: np.ndarray, features: Optional[np.ndarray]) -> Result:
    """The weak labels as they are."""
    return probs, _all(probs)


@register_method("confidence_filter")
def confidence_filter(probs: np.ndarray, features: Optional[np.ndarray], drop_frac: float = 0.1) -> Result:
    """Drop the ``drop_frac`` share of rows whose weak label is least confident."""
    keep = _drop(-confidence(probs), drop_frac)
    return probs[keep], keep


@register_method("probe_relabel")
def probe_relabel(probs: np.ndarray, features: Optional[np.ndarray], probe: str = "knn", k: int = 50,
                  C: float = 1.0) -> Result:
    """Replace every weak label by the probe's prediction."""
    return _probe(features, probs, probe, k, C), _all(probs)


@register_method("probe_filter")
def probe_filter(probs: np.ndarray, features: Optional[np.ndarray], probe: str = "knn", k: int = 50,
                 C: float = 1.0, contamination: float = 0.1) -> Result:
    """Drop the ``contamination`` share of rows where the probe disagrees most with the weak label."""
    keep = _drop(disagreement(_probe(features, probs, probe, k, C), probs), contamination)
    return probs[keep], keep


@register_method("ensemble")
def ensemble(probs: np.ndarray, features: Optional[np.ndarray], models: Optional[List[str]] = None,
             seeds: Optional[List[int]] = None) -> Result:
    """The members' labels arrive averaged (see ``average``); nothing else to do."""
    return probs, _all(probs)


def average(members: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble's soft labels: the mean of its members'."""
    return np.mean(np.stack([np.asarray(m, dtype=np.float32) for m in members]), axis=0)


# --- config -> spec ----------------------------------------------------------------------------------------

def validate_labels(cfg: Mapping[str, Any]) -> None:
    """Check ``labels=`` (name + parameters) against the registry, naming what is valid."""
    valid = check_choice("labels method", METHODS, cfg, method_params)
    p = {**valid, **{k: v for k, v in cfg.items() if k != "name"}}
    for frac in ("drop_frac", "contamination"):
        if frac in p and not 0 <= float(p[frac]) < 1:
            raise W2SGError(f"labels.{frac}={p[frac]}: must be in [0, 1)")
    if "probe" in p and p["probe"] not in PROBES:
        raise W2SGError(f"labels.probe={p['probe']!r}: unknown probe; valid: {', '.join(PROBES)}")
    if "k" in p and int(p["k"]) < 1:
        raise W2SGError(f"labels.k={p['k']}: need at least 1 neighbour")
    if "C" in p and float(p["C"]) <= 0:
        raise W2SGError(f"labels.C={p['C']}: the inverse regularisation strength must be positive")


def method_spec(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """What of ``labels=`` changes the result: the name and the parameters the method uses (a knn probe's spec has
    no C, a logreg probe's no k; an ensemble's members are the stage's inputs)."""
    validate_labels(cfg)
    name = cfg["name"]
    params = {**method_params(METHODS[name]), **{k: v for k, v in cfg.items() if k != "name"}}
    if "probe" in params:
        unused = {"k", "C"} - set(PROBES[params["probe"]][1])
        params = {k: v for k, v in params.items() if k not in unused}
    if name == "ensemble":
        params = {}
    return {"name": name, **params}


def budget_spec(budget: Any, n_train: Optional[int] = None) -> Optional[Dict[str, Optional[int]]]:
    """The budget's spec; None when it changes nothing (all weak labels, no ground truth). ``n_train``: the task's,
    to check the budget fits its weak-label half before anything runs (the stage checks the half it gets)."""
    n_weak, n_gt = budget.n_weak, budget.n_gt
    if n_train is not None and (n_weak or 0) + (n_gt or 0) > int(n_train) - int(n_train) // 2:
        half = int(n_train) - int(n_train) // 2
        raise W2SGError(f"budget: n_weak={n_weak} + n_gt={n_gt} rows, but the weak-label half has {half} "
                        f"(task.n_train={n_train}); lower the budget or raise task.n_train")
    for key, value in (("n_weak", n_weak), ("n_gt", n_gt)):
        if value is not None and int(value) < 0:
            raise W2SGError(f"budget.{key}={value}: must be >= 0 (or null)")
    if n_weak is None and not n_gt:
        return None
    if n_weak is not None and int(n_weak) == 0 and not n_gt:
        raise W2SGError("budget.n_weak=0 and no ground truth (budget.n_gt): nothing to train the w2s stage on")
    return {"n_weak": None if n_weak is None else int(n_weak), "n_gt": int(n_gt or 0)}


def ensemble_members(cfg: Any) -> List[Tuple[Any, int]]:
    """(model config, model seed) of every ensemble member: models x seeds."""
    labels = cfg.labels
    names = labels.get("models")
    models = [cfg.weak] if names is None else [model_config(n) for n in names]
    seeds = [int(cfg.seed)] if labels.get("seeds") is None else [int(s) for s in labels.seeds]
    members = [(m, s) for m in models for s in seeds]
    seen = [(m.name, s) for m, s in members]
    if len(set(seen)) < len(seen):
        raise W2SGError(f"labels=ensemble: a member appears twice in {seen}; list each model and seed once")
    if len(members) < 2:
        raise W2SGError(f"labels=ensemble needs at least 2 members (models x seeds), got {len(members)}; "
                        "set labels.seeds=[0,1,2] and/or labels.models=[<model>,<model>]")
    return members


def model_config(name: str) -> Any:
    """A model of conf/model by name, merged into its schema as Hydra would (for ``labels.models``)."""
    from omegaconf import OmegaConf

    from w2sg.app.config import ModelConfig

    folder = Path(__file__).resolve().parents[1] / "conf" / "model"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        valid = sorted(p.stem for p in folder.glob("*.yaml"))
        raise W2SGError(f"labels.models: unknown model {name!r}; valid: {', '.join(valid)}")
    values = OmegaConf.load(path)
    values.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), values)


# --- the stage's computation --------------------------------------------------------------------------------

@dataclass
class TrainingSet:
    """What a w2s stage trains on: soft labels of rows of the weak-label half; ``ground_truth`` marks the rows
    labelled with ground truth (budget)."""

    probs: np.ndarray  # [M, C]
    rows: np.ndarray  # [M] rows of the weak-label half, ascending
    ground_truth: np.ndarray  # [M] bool
    n_dropped: int  # weak-labelled rows the method dropped
    candidates: np.ndarray  # the weak-labelled rows the method was given (after the budget's draw)


def budget_rows(n: int, n_weak: Optional[int], n_gt: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(weak rows, ground-truth rows) of an n-row half: a seeded permutation's first n_gt rows get ground truth,
    the next n_weak (null: all the rest) weak labels; a larger n_gt keeps the smaller one's rows."""
    need = n_gt + (n_weak or 0)
    if need > n:
        raise W2SGError(f"budget: n_weak={n_weak} + n_gt={n_gt} = {need} rows, but the weak-label half has only {n} "
                        f"(task.n_train={2 * n} or so); lower the budget or raise task.n_train")
    perm = np.random.default_rng([int(seed), BUDGET_STREAM]).permutation(n)
    gt = perm[:n_gt]
    weak = perm[n_gt:] if n_weak is None else perm[n_gt:n_gt + n_weak]
    return np.sort(weak), np.sort(gt)


def build_training_set(spec: Mapping[str, Any], probs: np.ndarray, features: Optional[np.ndarray],
                       truth: Sequence[int]) -> TrainingSet:
    """Apply a ``transform`` stage's spec to the weak labels of the whole weak-label half."""
    probs = np.asarray(probs, dtype=np.float32)
    n, num_classes = probs.shape
    budget = spec.get("budget")
    if budget is None:
        weak_rows, gt_rows = np.arange(n), np.arange(0)
    else:
        weak_rows, gt_rows = budget_rows(n, budget["n_weak"], budget["n_gt"], int(spec["seed"]))
    method = dict(spec["method"])
    name = method.pop("name")
    new, kept = METHODS[name](probs[weak_rows], features[weak_rows] if features is not None else None, **method)
    rows = np.concatenate([weak_rows[kept], gt_rows])
    labels = np.concatenate([np.asarray(new, dtype=np.float32),
                             np.eye(num_classes, dtype=np.float32)[np.asarray(truth)[gt_rows]]])
    is_gt = np.concatenate([np.zeros(len(kept), bool), np.ones(len(gt_rows), bool)])
    if not len(rows):
        raise W2SGError(f"labels={name}: no training rows left; lower labels.drop_frac / labels.contamination")
    order = np.argsort(rows, kind="stable")
    return TrainingSet(labels[order], rows[order], is_gt[order], len(weak_rows) - len(kept), weak_rows)


def training_set_metrics(ts: TrainingSet, before: np.ndarray, truth: Sequence[int]) -> Dict[str, Any]:
    """How good the training labels are against the (hidden) ground truth: ``acc`` of every training row,
    ``acc_weak_rows`` of the weak-labelled ones, ``acc_weak_rows_before`` of the rows the method was given, with
    the labels it was given (so a filter's gain is the difference)."""
    from w2sg.ml.metrics import accuracy

    y = np.asarray(truth)
    weak = ~ts.ground_truth
    out: Dict[str, Any] = {"n": int(len(ts.rows)), "n_weak": int(weak.sum()), "n_gt": int(ts.ground_truth.sum()),
                           "n_dropped": ts.n_dropped, "acc": accuracy(ts.probs, y[ts.rows])}
    if weak.any():
        out["acc_weak_rows"] = accuracy(ts.probs[weak], y[ts.rows[weak]])
    if len(ts.candidates):
        out["acc_weak_rows_before"] = accuracy(np.asarray(before)[ts.candidates], y[ts.candidates])
    return out
