"""``labels=`` and ``budget=`` as specs: what of them enters the key of the w2s stage's training set (a ``transform``
stage), checked before anything runs. The methods themselves (numpy) are in w2sg.ml.methods; their registry, with
users' methods, in w2sg.core.registry. No torch here.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from w2sg.core.config import Config, ModelConfig, plain
from w2sg.core.errors import W2SGError
from w2sg.core.paths import FEATURE_LAYERS, check_feature_layer
from w2sg.core.registry import NEEDS_FEATURES, check_choice, labels_methods

# each probe's own parameters (the others are left out of a method's spec); topo: EleutherAI/w2s's TopoFilter
PROBE_PARAMS: Dict[str, Tuple[str, ...]] = {"knn": ("k", "knn_metric"), "logreg": ("logreg_fit", "l2p", "C"),
                                            "topo": ("k_cc", "k_zeta")}
# knn: euclidean (EleutherAI/w2s's KnnProbe, torch.cdist) | cosine (the earlier w2sg probe, kept by that name)
KNN_METRICS = ("euclidean", "cosine")
# logreg: soft_bce (EleutherAI/w2s's LogisticProbe: BCE on the soft labels + l2p * |w|^2, L-BFGS) | sklearn_hard
# (the earlier w2sg probe: scikit-learn's LogisticRegression(C) on the hard labels, kept by that name)
LOGREG_FITS = ("soft_bce", "sklearn_hard")
# a probe parameter at this value is left out of the spec: the form the spec had before the parameter existed, so
# stage keys stored then are reached by naming it (labels.knn_metric=cosine, labels.logreg_fit=sklearn_hard)
EARLIER_FORM = {"knn_metric": "cosine", "logreg_fit": "sklearn_hard"}
# parameters the plan reads rather than the method's function: the hidden state the probe's features are
# (feature_layer; null: the strong model's own features, as before the parameter) and whether each strong-to-strong
# iteration's labels go through the method too (reapply_s2s; the s2s stages' inputs carry it, not this spec)
PLAN_PARAMS = ("feature_layer", "reapply_s2s")


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
    if "l2p" in p and float(p["l2p"]) < 0:
        raise W2SGError(f"labels.l2p={p['l2p']}: the L2 penalty must be >= 0")
    for key, valid_values in (("knn_metric", KNN_METRICS), ("logreg_fit", LOGREG_FITS)):
        if key in p and p[key] not in valid_values:
            raise W2SGError(f"labels.{key}={p[key]!r}: unknown; valid: {', '.join(valid_values)}")
    if "feature_layer" in p:
        check_probe_layer(p["feature_layer"])
    if "reapply_s2s" in p and not isinstance(p["reapply_s2s"], bool):
        raise W2SGError(f"labels.reapply_s2s={p['reapply_s2s']!r}: must be true or false")


def check_probe_layer(value: Any) -> None:
    """``labels.feature_layer``'s form (its range is checked against the strong model in ``probe_features_model``)."""
    if value is None or value in FEATURE_LAYERS or (isinstance(value, int) and not isinstance(value, bool)
                                                    and value >= 0):
        return
    raise W2SGError(f"labels.feature_layer={value!r}: unknown; valid: null (the strong model's own features), "
                    f"{', '.join(FEATURE_LAYERS)} (layer num_layers // 2, as EleutherAI/w2s probes), or a layer "
                    "number (0: the embeddings)")


def used_probe_params(params: Mapping[str, Any]) -> Tuple[str, ...]:
    """The probe parameters the chosen probe reads, in their spec's form: a knn probe's k (and knn_metric unless
    cosine), a logreg probe's C (sklearn_hard) or logreg_fit and l2p (soft_bce), a topo probe's k_cc and k_zeta."""
    probe = params["probe"]
    if probe == "logreg":
        fit = params.get("logreg_fit", EARLIER_FORM["logreg_fit"])
        return ("C",) if fit == "sklearn_hard" else ("logreg_fit", "l2p")
    return tuple(k for k in PROBE_PARAMS[probe] if k in params and params[k] != EARLIER_FORM.get(k))


def method_spec(labels: Mapping[str, Any]) -> Dict[str, Any]:
    """What of ``labels=`` changes the result: the name and the parameters the method uses (a knn probe's spec has
    no C, a logreg probe's no k; an ensemble's members are the stage's inputs). ``feature_layer`` enters when set
    (its features stage, an input, differs too); ``reapply_s2s`` never (it adds s2s stages, whose inputs carry it)."""
    cfg = plain(dict(labels))
    validate_labels(cfg)
    name = cfg["name"]
    params = {**method_params(labels_methods()[name]), **{k: v for k, v in cfg.items() if k != "name"}}
    if "probe" in params:
        unused = set().union(*PROBE_PARAMS.values()) - set(used_probe_params(params))
        params = {k: v for k, v in params.items() if k not in unused}
    params.pop("reapply_s2s", None)
    if params.get("feature_layer", 0) is None:  # the strong model's own features: the spec of before
        del params["feature_layer"]
    if name == "ensemble":
        params = {}
    return {"name": name, **params}


def method_kwargs(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """The keyword arguments a method's function gets from its spec (``method_spec``): the spec's parameters, with
    those it leaves out in their earlier form (EARLIER_FORM: knn_metric cosine, logreg_fit sklearn_hard) put back,
    so that a spec of before runs the probe it ran then, not today's default."""
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    accepted = method_params(labels_methods()[spec["name"]])
    if "probe" in kwargs:
        kwargs.update({k: v for k, v in EARLIER_FORM.items() if k in accepted and k not in kwargs})
    return kwargs


def reapplies(labels: Mapping[str, Any]) -> bool:
    """Whether each strong-to-strong iteration's labels go through the method too (``reapply_s2s``, as
    EleutherAI/w2s re-applies its probe at every transfer), not only the weak labels."""
    cfg = plain(dict(labels))
    params = {**method_params(labels_methods()[cfg["name"]]), **cfg}
    return bool(params.get("reapply_s2s", False))


def probe_features_model(strong: ModelConfig, spec: Mapping[str, Any]) -> ModelConfig:
    """The strong model whose frozen features a probe method reads: with the spec's ``feature_layer`` (middle:
    EleutherAI/w2s's layer) in place of the model's own, its pooling kept (last token for the decoders, as
    EleutherAI/w2s; the mean for the encoders); without one, the model as configured."""
    layer = spec.get("feature_layer")
    if layer is None:
        return strong
    model = dataclasses.replace(strong, feature_layer=layer)
    try:
        check_feature_layer(model)
    except W2SGError as e:
        raise W2SGError(f"labels.feature_layer={layer!r}: {e}") from None
    return model


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
