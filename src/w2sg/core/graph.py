"""The stage graph: a Stage (kind, role, side, spec, inputs) and the specs that make its key.

A stage's key is a hash of the fully resolved values it uses plus its inputs' keys. Values that cannot change
a result (names and size labels, progress bars, launcher, tracker, paths) stay out of the key, so the weak
model of a pair is the same stage as the weak model of every other pair with the same task, seed and training
settings, and a grid trains each weak and ceiling model once. No torch here.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

from omegaconf import OmegaConf

GT_LOSS = {"name": "xent"}  # stages that train on ground truth never use auxiliary terms


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def fingerprint_cache(cfg: Any) -> Optional[str]:
    """Where content fingerprints are cached: <store>/fingerprints, when the store exists (see w2sg.core.fingerprint)."""
    store_dir = cfg.get("store_dir") if OmegaConf.is_config(cfg) else None
    if store_dir and Path(str(store_dir)).expanduser().is_dir():
        return str(Path(str(store_dir)).expanduser() / "fingerprints")
    return None


_SPECS: Optional[Dict[tuple, Any]] = None  # model and task specs by config, while planning many jobs


@contextmanager
def memoized_specs() -> Iterator[None]:
    """Within it, model and task specs (content fingerprints of model and data files) are computed once per
    distinct config: a launcher planning a thousand jobs reads each file's fingerprint once, not per job. Files
    are taken as unchanged while it lasts."""
    global _SPECS
    outer = _SPECS
    _SPECS = {} if outer is None else outer
    try:
        yield
    finally:
        _SPECS = outer


def _memoized(fn: Callable[[Any, Optional[str]], Dict[str, Any]]) -> Callable[..., Dict[str, Any]]:
    @functools.wraps(fn)
    def spec(node: Any, cache_dir: Optional[str] = None) -> Dict[str, Any]:
        if _SPECS is None:
            return fn(node, cache_dir)
        key = (fn.__name__, json.dumps(_plain(node), sort_keys=True, default=str), cache_dir)
        if key not in _SPECS:
            _SPECS[key] = fn(node, cache_dir)
        return copy.deepcopy(_SPECS[key])

    return spec


@_memoized
def model_spec(model: Any, cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """What of a model config changes results (not its name, size label or parameter count).

    ``path`` becomes the content hash of a local model directory (w2sg.core.fingerprint.model_source), so new weights at
    the same path get new keys and the same weights elsewhere reuse stages."""
    from w2sg.core.fingerprint import model_source

    m = _plain(model)
    spec = {k: m.get(k) for k in ("path", "num_layers", "pooling", "random_init")}
    spec["path"] = model_source(model, cache_dir)
    # newer fields enter only when set, so that the keys of models without them stay as they were
    spec.update({k: m[k] for k in ("revision", "tokenizer") if m.get(k) is not None})
    if m.get("random_init") is not None and m.get("arch") is not None:  # a random model built from arch alone
        spec["arch"] = m["arch"]
    return spec


@_memoized
def task_spec(task: Any, cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """The task's values, with local data files (and pkg:// files) replaced by the hash of their bytes.

    Edited data under the same path gets new keys; the same data at another path reuses stages. A hub data set
    is keyed by its name, subset and ``load_kwargs`` (which hold its ``revision`` when one is pinned)."""
    from w2sg.data.tasks import data_fingerprints

    t = dict(_plain(task))
    t.pop("name", None)
    t["data_files"] = data_fingerprints(task, cache_dir)
    return t


def train_spec(train: Any, model: Any) -> Dict[str, Any]:
    from w2sg.run.device import key_precision

    t = dict(_plain(train))
    # evaluation batching, checkpoints, the device and memory savers do not change results; the precision does
    for k in ("eval_batch_size", "checkpoint_every", "device", "precision", "gradient_checkpointing", "device_map"):
        t.pop(k, None)
    t.update(key_precision(train))
    t["lr"] = float(t["lr"] if t.get("lr") is not None else model.lr)
    if t.get("mode") != "lora":
        t.pop("lora", None)  # adapter settings matter only when adapters are trained
    elif t["lora"].get("target_modules") is None and model.get("lora_targets") is not None:
        t["lora"] = {**t["lora"], "target_modules": list(model.lora_targets)}  # the model's own default
    if not t.get("val_frac"):
        for k in ("val_labels", "eval_every", "keep_best"):  # no validation set: nothing to validate
            t.pop(k, None)
    return t


@dataclass
class Stage:
    kind: str  # "train" or "labels"
    spec: Dict[str, Any]  # resolved values the stage uses
    inputs: Dict[str, "Stage"] = field(default_factory=dict)
    model: Any = None  # the model config (for building; its result-relevant part is in spec)
    label: str = ""  # human-readable name, e.g. "weak:minilm_l1"

    def __post_init__(self) -> None:
        from w2sg.core.registry import versions_used

        used = versions_used(self.spec)  # the version of users' code (extensions:) that this stage runs
        if used:
            self.spec["extensions"] = used

    @property
    def role(self) -> str:
        """weak, ceiling, w2s, link or labels: the W&B job type and the kind shown to users."""
        prefix = self.label.split(":")[0]
        if self.kind in ("features", "lm"):
            return self.kind
        return "labels" if prefix.endswith("labels") else prefix.rstrip("0123456789")

    @cached_property
    def key(self) -> str:
        payload = {"kind": self.kind, "spec": self.spec, "inputs": {k: v.key for k, v in sorted(self.inputs.items())}}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _precision(cfg: Any) -> Dict[str, str]:
    from w2sg.run.device import key_precision

    return key_precision(cfg.train)


def lm_stage(cfg: Any, model: Any) -> Stage:
    """Generative finetuning of a model on the task's unlabelled training text (w2sg.ml.generative)."""
    g = _plain(cfg.generative)
    cache = fingerprint_cache(cfg)
    spec = {"model": model_spec(model, cache), "task": task_spec(cfg.task, cache), "seed": int(cfg.seed),
            "max_length": int(cfg.train.max_length),
            "generative": {k: g[k] for k in ("objective", "epochs", "batch_size", "lr", "mlm_probability")},
            **_precision(cfg)}
    return Stage("lm", spec, {}, model, f"lm:{model.name}")


def init_inputs(cfg: Any, model: Any, side: str) -> Dict[str, Stage]:
    """The generatively finetuned weights a model starts from, when generative finetuning applies to its side."""
    if cfg.generative.enabled and side in cfg.generative.sides:
        return {"init": lm_stage(cfg, model)}
    return {}


def features_stage(cfg: Any, model: Any, side: str) -> Stage:
    """Probe mode: the frozen model's pooled features of every part of the task, computed once and reused."""
    cache = fingerprint_cache(cfg)
    spec = {"model": model_spec(model, cache), "task": task_spec(cfg.task, cache), "seed": int(cfg.seed),
            "max_length": int(cfg.train.max_length), **_precision(cfg)}
    return Stage("features", spec, init_inputs(cfg, model, side), model, f"features:{model.name}")


def train_stage(cfg: Any, model: Any, labels: Optional[Stage], loss: Any, label: str) -> Stage:
    inputs: Dict[str, Stage] = {"labels": labels} if labels is not None else {}
    side = "weak" if label.startswith("weak:") else "strong"  # ceiling, w2s and chain links train strong-side models
    if cfg.train.mode == "probe":
        inputs["features"] = features_stage(cfg, model, side)
    else:
        inputs.update(init_inputs(cfg, model, side))
    tspec = train_spec(cfg.train, model)
    if labels is None:
        tspec.pop("val_labels", None)  # ground-truth stages validate against ground truth whatever it says
    cache = fingerprint_cache(cfg)
    spec = {
        "model": model_spec(model, cache),
        "task": task_spec(cfg.task, cache),
        "train": tspec,
        "seed": int(cfg.seed),
        "loss": _plain(loss) if labels is not None else GT_LOSS,
        "labels": "weak" if labels is not None else "ground_truth",
    }
    return Stage("train", spec, inputs, model, label)


def labels_stage(cfg: Any, trained: Stage, label: str) -> Stage:
    spec = {"task": task_spec(cfg.task, fingerprint_cache(cfg)), "seed": int(cfg.seed),
            "max_length": int(cfg.train.max_length), **_precision(cfg)}
    return Stage("labels", spec, {"model": trained}, trained.model, label)


def member_stage(cfg: Any, model: Any, seed: int) -> Stage:
    """An ensemble member (w2sg.ml.methods): a weak model trained on ground truth with its own model seed (weights
    initialisation and data order; the data split stays the run's). The run's own weak model and seed is the
    run's weak stage itself, so it is shared."""
    if seed == int(cfg.seed):
        return train_stage(cfg, model, None, None, f"weak:{model.name}")
    stage = train_stage(cfg, model, None, None, f"weak:{model.name}@seed{seed}")
    return Stage(stage.kind, {**stage.spec, "model_seed": int(seed)}, stage.inputs, stage.model, stage.label)


def transform_stage(cfg: Any, labels: Dict[str, Stage], features: Optional[Stage], label: str) -> Stage:
    """The training set of the w2s stage (w2sg.ml.methods): the weak labels after ``labels=`` and ``budget=``.
    Inputs: ``labels`` (or ``member<i>`` for an ensemble's members) and the strong model's ``features`` for probes."""
    from w2sg.ml.methods import budget_spec, method_spec

    spec = {"method": method_spec(_plain(cfg.labels)), "budget": budget_spec(cfg.budget), "seed": int(cfg.seed),
            "task": task_spec(cfg.task)}
    inputs = dict(labels, **({"features": features} if features is not None else {}))
    return Stage("transform", spec, inputs, cfg.weak, label)
