"""``labels=`` and ``budget=`` as specs: what of them enters the key of the w2s stage's training set (a ``transform``
stage), checked before anything runs. The methods themselves (numpy) are in w2sg.ml.methods; their registry, with
users' methods, in w2sg.core.registry. No torch here.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from w2sg.core.config import Config, ModelConfig, plain
from w2sg.core.errors import W2SGError
from w2sg.core.registry import NEEDS_FEATURES, check_choice, labels_methods

# each probe's own parameters (the others are left out of a method's spec); topo: EleutherAI/w2s's TopoFilter
PROBE_PARAMS: Dict[str, Tuple[str, ...]] = {"knn": ("k",), "logreg": ("C",), "topo": ("k_cc", "k_zeta")}


def method_params(fn: Callable[..., Any]) -> Dict[str, Any]:
    """The keyword arguments of a method and their defaults."""
    return {n: p.default for n, p in list(inspect.signature(fn).parameters.items())[2:]}


def validate_labels(cfg: Mapping[str, Any]) -> None:
    """Check ``labels=`` (name + parameters) against the registry, naming what is valid."""
    valid = check_choice("labels method", labels_methods(), cfg, method_params)
    p = {**valid, **{k: v for k, v in cfg.items() if k != "name"}}
    for frac in ("drop_frac", "contamination"):
        if frac in p and not 0 <= float(p[frac]) < 1:
            raise W2SGError(f"labels.{frac}={p[frac]}: must be in [0, 1)")
    if "probe" in p and p["probe"] not in PROBE_PARAMS:
        raise W2SGError(f"labels.probe={p['probe']!r}: unknown probe; valid: {', '.join(PROBE_PARAMS)}")
    for k in ("k", "k_cc", "k_zeta"):
        if k in p and int(p[k]) < 1:
            raise W2SGError(f"labels.{k}={p[k]}: need at least 1 neighbour")
    if "C" in p and float(p["C"]) <= 0:
        raise W2SGError(f"labels.C={p['C']}: the inverse regularisation strength must be positive")


def method_spec(labels: Mapping[str, Any]) -> Dict[str, Any]:
    """What of ``labels=`` changes the result: the name and the parameters the method uses (a knn probe's spec has
    no C, a logreg probe's no k; an ensemble's members are the stage's inputs)."""
    cfg = plain(dict(labels))
    validate_labels(cfg)
    name = cfg["name"]
    params = {**method_params(labels_methods()[name]), **{k: v for k, v in cfg.items() if k != "name"}}
    if "probe" in params:
        unused = set().union(*PROBE_PARAMS.values()) - set(PROBE_PARAMS[params["probe"]])
        params = {k: v for k, v in params.items() if k not in unused}
    if name == "ensemble":
        params = {}
    return {"name": name, **params}


def needs_features(spec: Mapping[str, Any]) -> bool:
    """Whether the method reads the strong model's frozen features."""
    labels_methods()
    return spec["name"] in NEEDS_FEATURES


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


def ensemble_members(cfg: Config) -> List[Tuple[ModelConfig, int]]:
    """(model config, model seed) of every ensemble member: models x seeds. ``labels.models`` holds model configs
    (w2sg.app.config.resolve turned their names into them); null: the run's weak model."""
    labels = cfg.labels
    models = labels.get("models")
    models = [cfg.weak] if models is None else list(models)
    if any(not isinstance(m, ModelConfig) for m in models):
        raise W2SGError("labels.models: model names are resolved at the entry (w2sg.app.config.resolve); "
                        f"got {models!r}")
    seeds = [cfg.seed] if labels.get("seeds") is None else [int(s) for s in labels["seeds"]]
    members = [(m, s) for m in models for s in seeds]
    seen = [(m.name, s) for m, s in members]
    if len(set(seen)) < len(seen):
        raise W2SGError(f"labels=ensemble: a member appears twice in {seen}; list each model and seed once")
    if len(members) < 2:
        raise W2SGError(f"labels=ensemble needs at least 2 members (models x seeds), got {len(members)}; "
                        "set labels.seeds=[0,1,2] and/or labels.models=[<model>,<model>]")
    return members
