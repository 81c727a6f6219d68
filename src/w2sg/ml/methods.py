"""Weak-label methods: what the w2s stage trains on, beyond the plain weak labels.

``labels=<method>`` transforms the weak labels of the weak-label half before the w2s stage (a registry of plain
functions, like the losses): ``confidence_filter``, ``probe_relabel`` / ``probe_filter`` (probes on the strong
model's frozen features, as EleutherAI/w2s's w2s/probe.py and w2s/topo.py compute them) and ``ensemble`` (the
average soft labels of several weak supervisors). ``budget=`` mixes n weak and m ground-truth labels (Mallen &
Belrose 2024). Both make one stored stage (kind ``transform``, plan name ``train_labels``) whose output is a
training set: soft labels plus the rows of the weak-label half they belong to, so two w2s runs (e.g. two losses)
share it. ``s2s=N`` (strong-to-strong iterations) chains ordinary train and labels stages (w2sg.core.plan.plan);
a probe method with ``reapply_s2s`` (the default, as EleutherAI/w2s) transforms each iteration's labels too.

Order inside the stage: average the ensemble's labels, draw the budget's rows (ground truth first, then weak),
apply the method to the weak-labelled rows, add the ground-truth rows with one-hot labels.

Every method is ``fn(probs [N, C], features [N, H] or None, **params) -> (probs [M, C], kept positions [M])``;
its keyword arguments (with defaults) are its parameters, checked before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from w2sg.core.errors import W2SGError
from w2sg.core.methods import KNN_METRICS, LOGREG_FITS, PROBE_PARAMS, method_kwargs
from w2sg.core.registry import METHODS, NEEDS_FEATURES

Result = Tuple[np.ndarray, np.ndarray]
BUDGET_STREAM = 16  # the budget's random stream: numpy default_rng([seed, BUDGET_STREAM])


def register_method(name: str, needs_features: bool = False) -> Callable[[Callable[..., Result]], Callable[..., Result]]:
    """Decorator: ``labels.name=<name>`` selects ``fn`` (also from a module listed in ``extensions:``).
    ``needs_features``: the method reads the strong model's frozen features (its second argument). The registry,
    METHODS, lives in w2sg.core.registry (the plan reads a method's parameters); pyproject.toml's ``w2sg.methods``
    entry point names this module, so the plan finds the built-in methods without core naming ml."""
    register = METHODS.register(name, needs_features=needs_features)

    def deco(fn: Callable[..., Result]) -> Callable[..., Result]:
        register(fn)
        if needs_features:
            NEEDS_FEATURES.add(name)
        return fn

    return deco


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

def knn_probe(x: np.ndarray, probs: np.ndarray, k: int = 50, metric: str = "euclidean", chunk: int = 1024
              ) -> np.ndarray:
    """Each row's prediction: the mean soft label of its k nearest rows, itself included. ``euclidean``: as
    EleutherAI/w2s's KnnProbe (torch.cdist, fitted on and predicting the same rows); ``cosine``: the k most
    cosine-similar rows (the earlier w2sg probe). k above the row count: all rows."""
    if metric == "euclidean":
        return np.asarray(probs, dtype=np.float32)[_neighbours(x, k, within=np.arange(len(x)), chunk=chunk)].mean(1)
    if metric != "cosine":
        raise W2SGError(f"knn metric {metric!r}: unknown; valid: {', '.join(KNN_METRICS)}")
    x = np.asarray(x, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = min(int(k), len(x))
    out = np.empty_like(np.asarray(probs, dtype=np.float32))
    for start in range(0, len(x), chunk):
        sim = x[start:start + chunk] @ x.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        out[start:start + chunk] = probs[top].mean(axis=1)
    return out


BCE_MAX_ITER = 10_000  # EleutherAI/w2s Classifier.fit's L-BFGS iterations (one optimizer step)


def bce_logreg_probe(x: np.ndarray, probs: np.ndarray, l2p: float = 1e-3, max_iter: int = BCE_MAX_ITER
                     ) -> np.ndarray:
    """EleutherAI/w2s's LogisticProbe (w2s/logistic.py Classifier.fit): a linear model from zero weights, fit by
    L-BFGS (strong Wolfe line search, ``max_iter`` iterations at most) to the binary cross-entropy with the soft
    labels plus ``l2p`` * |w|^2 (the bias unpenalised), in float32; its predicted probabilities of the same rows.
    Two classes: one logit, sigmoid (as theirs); more: softmax and the soft labels' cross-entropy, same penalty."""
    import torch

    p = np.asarray(probs, dtype=np.float32)
    n_classes = p.shape[1]
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(p[:, 1] if n_classes == 2 else p))
    linear = torch.nn.Linear(xt.shape[1], 1 if n_classes == 2 else n_classes)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
    optimizer = torch.optim.LBFGS(linear.parameters(), line_search_fn="strong_wolfe", max_iter=int(max_iter))

    def data_loss(logits: "torch.Tensor") -> "torch.Tensor":
        if n_classes == 2:
            return torch.nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1), yt)
        return -(yt * torch.log_softmax(logits, -1)).sum(-1).mean()

    def closure() -> float:
        optimizer.zero_grad()
        loss = data_loss(linear(xt))
        if l2p:
            loss = loss + float(l2p) * linear.weight.square().sum()
        loss.backward()
        return float(loss.detach())

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        logits = linear(xt)
        if n_classes == 2:
            p1 = torch.sigmoid(logits.squeeze(-1)).numpy()
            return np.stack([1 - p1, p1], axis=1).astype(np.float32)
        return torch.softmax(logits, -1).numpy().astype(np.float32)


def logreg_probe(x: np.ndarray, probs: np.ndarray, C: float = 1.0) -> np.ndarray:
    """The earlier w2sg probe (logreg_fit=sklearn_hard): scikit-learn's LogisticRegression (C) fit on the hard weak
    labels; its predicted probabilities of the same rows. Labels of one class only: that class, with probability 1
    (the only fit there is)."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(probs).argmax(axis=1)
    out = np.zeros(np.shape(probs), dtype=np.float32)
    if len(np.unique(y)) == 1:
        out[:, y[0]] = 1.0
        return out
    clf = LogisticRegression(C=float(C), max_iter=1000).fit(np.asarray(x, dtype=np.float64), y)
    out[:, clf.classes_] = clf.predict_proba(np.asarray(x, dtype=np.float64))
    return out


def _neighbours(x: np.ndarray, k: int, within: Optional[np.ndarray] = None, chunk: int = 1024) -> np.ndarray:
    """[N, k] indices of each row's k nearest rows by Euclidean distance: among all rows but itself, or (``within``,
    an index array) among those rows, itself included when it is one of them (as EleutherAI/w2s's topolabel)."""
    x = np.asarray(x, dtype=np.float32)
    pool = np.arange(len(x)) if within is None else np.asarray(within)
    y = x[pool]
    k = max(1, min(int(k), len(pool) - (1 if within is None else 0)))
    sq_pool = (y * y).sum(1)
    out = np.empty((len(x), k), dtype=np.int64)
    for start in range(0, len(x), chunk):
        block = x[start:start + chunk]
        d = (block * block).sum(1)[:, None] - 2.0 * block @ y.T + sq_pool[None, :]
        if within is None:
            d[np.arange(len(block)), np.arange(start, start + len(block))] = np.inf
        out[start:start + chunk] = np.argpartition(d, k - 1, axis=1)[:, :k]
    return pool[out]


def topo_cc(x: np.ndarray, classes: np.ndarray, k: int = 50) -> np.ndarray:
    """TopoCC (EleutherAI/w2s ``topo_cc``): a mask of the rows in the largest strongly connected component of each
    class's kNN graph (edges from each row of the class to its k nearest rows)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(x)
    nbr = _neighbours(x, k)
    rows, cols = np.repeat(np.arange(n), nbr.shape[1]), nbr.ravel()
    keep = np.zeros(n, dtype=bool)
    for c in np.unique(classes):
        edge = classes[rows] == c
        adj = csr_matrix((np.ones(int(edge.sum()), dtype=bool), (rows[edge], cols[edge])), shape=(n, n))
        count, component = connected_components(adj, directed=True, connection="strong")
        keep |= component == np.bincount(component, minlength=count).argmax()
    return keep


def topo_filter(x: np.ndarray, probs: np.ndarray, contamination: float, k_cc: int = 50, k_zeta: int = 50) -> np.ndarray:
    """TopoFilter (EleutherAI/w2s ``topofilter``): keep the rows of TopoCC, then drop those whose label is furthest
    (total variation) from the mean label of their k_zeta nearest rows within it, until ``contamination`` of all
    rows are gone (TopoCC may already have removed more). Returns the kept rows, ascending."""
    probs = np.asarray(probs, dtype=np.float32)
    inside = np.flatnonzero(topo_cc(x, probs.argmax(1), k_cc))
    nbr = _neighbours(np.asarray(x)[inside], k_zeta)  # positions within ``inside``
    distance = disagreement(probs[inside], probs[inside][nbr].mean(axis=1))
    n_drop = max(int(round(len(x) * contamination)) - (len(x) - len(inside)), 0)
    drop = np.argsort(-distance, kind="stable")[:n_drop]
    return np.sort(np.delete(inside, drop))


def topo_label(x: np.ndarray, probs: np.ndarray, k_cc: int = 50, k_zeta: int = 50) -> np.ndarray:
    """TopoLabel (EleutherAI/w2s ``topolabel``): each row's new label is the mean label of its k_zeta nearest rows
    among the rows of TopoCC."""
    probs = np.asarray(probs, dtype=np.float32)
    inside = np.flatnonzero(topo_cc(x, probs.argmax(1), k_cc))
    return probs[_neighbours(x, k_zeta, within=inside)].mean(axis=1)


def _logreg(x: np.ndarray, p: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    if params["logreg_fit"] == "sklearn_hard":
        return logreg_probe(x, p, C=params["C"])
    if params["logreg_fit"] != "soft_bce":
        raise W2SGError(f"labels.logreg_fit={params['logreg_fit']!r}: unknown; valid: {', '.join(LOGREG_FITS)}")
    return bce_logreg_probe(x, p, l2p=params["l2p"])


PROBES: Dict[str, Callable[..., np.ndarray]] = {  # x, probs, params -> predictions; w2sg.core.methods.PROBE_PARAMS
    "knn": lambda x, p, params: knn_probe(x, p, k=params["k"], metric=params["knn_metric"]),
    "logreg": _logreg,
    "topo": lambda x, p, params: topo_label(x, p, k_cc=params["k_cc"], k_zeta=params["k_zeta"]),
}
assert set(PROBES) == set(PROBE_PARAMS)


def _probe(features: Optional[np.ndarray], probs: np.ndarray, probe: str, **params: Any) -> np.ndarray:
    if features is None:
        raise W2SGError("probe methods need the strong model's features")
    return PROBES[probe](features, probs, params)


def _earlier(probe: str, knn_metric: str, logreg_fit: str) -> bool:
    """Whether the probe is one of the earlier w2sg probes (knn cosine, logreg sklearn_hard), whose filter drops a
    rounded share; EleutherAI/w2s's Probe.filter drops int(contamination * n) rows."""
    return (probe == "knn" and knn_metric == "cosine") or (probe == "logreg" and logreg_fit == "sklearn_hard")


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


@register_method("probe_relabel", needs_features=True)
def probe_relabel(probs: np.ndarray, features: Optional[np.ndarray], probe: str = "knn", k: int = 50,
                  knn_metric: str = "euclidean", logreg_fit: str = "soft_bce", l2p: float = 1e-3, C: float = 1.0,
                  k_cc: int = 50, k_zeta: int = 50, feature_layer: Any = "middle", reapply_s2s: bool = True) -> Result:
    """Replace every weak label by the probe's prediction (knn: k, knn_metric; logreg: logreg_fit, l2p or C; topo:
    k_cc, k_zeta), as EleutherAI/w2s's probe_relabel. ``feature_layer`` and ``reapply_s2s`` are read by the plan
    (w2sg.core.methods.PLAN_PARAMS): which features arrive, and which labels."""
    return _probe(features, probs, probe, k=k, knn_metric=knn_metric, logreg_fit=logreg_fit, l2p=l2p, C=C,
                  k_cc=k_cc, k_zeta=k_zeta), _all(probs)


@register_method("probe_filter", needs_features=True)
def probe_filter(probs: np.ndarray, features: Optional[np.ndarray], probe: str = "knn", k: int = 50,
                 knn_metric: str = "euclidean", logreg_fit: str = "soft_bce", l2p: float = 1e-3, C: float = 1.0,
                 contamination: float = 0.1, k_cc: int = 50, k_zeta: int = 50, feature_layer: Any = "middle",
                 reapply_s2s: bool = True) -> Result:
    """Drop the ``contamination`` share of rows where the probe disagrees most with the weak label (total
    variation: |p - q| of class 1 for two classes), int(contamination * n) rows as EleutherAI/w2s's Probe.filter
    (the earlier knn cosine and logreg sklearn_hard probes: the rounded share); the topo probe filters as TopoFilter
    does (topo_filter). ``feature_layer`` and ``reapply_s2s``: as probe_relabel's."""
    if probe == "topo":
        if features is None:
            raise W2SGError("probe methods need the strong model's features")
        keep = topo_filter(features, probs, contamination, k_cc=k_cc, k_zeta=k_zeta)
        return probs[keep], keep
    score = disagreement(_probe(features, probs, probe, k=k, knn_metric=knn_metric, logreg_fit=logreg_fit, l2p=l2p,
                                C=C, k_cc=k_cc, k_zeta=k_zeta), probs)
    if _earlier(probe, knn_metric, logreg_fit):
        keep = _drop(score, contamination)
    else:
        keep = np.sort(np.argsort(-score, kind="stable")[int(contamination * len(score)):])
    return probs[keep], keep


@register_method("ensemble")
def ensemble(probs: np.ndarray, features: Optional[np.ndarray], models: Optional[List[str]] = None,
             seeds: Optional[List[int]] = None) -> Result:
    """The members' labels arrive averaged (see ``average``); nothing else to do."""
    return probs, _all(probs)


def average(members: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble's soft labels: the mean of its members'."""
    return np.mean(np.stack([np.asarray(m, dtype=np.float32) for m in members]), axis=0)


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
    name = spec["method"]["name"]
    new, kept = METHODS[name](probs[weak_rows], features[weak_rows] if features is not None else None,
                              **method_kwargs(spec["method"]))
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
