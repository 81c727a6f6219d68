"""The stage graph: a Stage (kind, role, side, spec, inputs) and the specs that make its key.

A stage's key is a hash of its kind, the fully resolved values it uses (its spec) and its inputs' keys. Values
that cannot change a result (names and size labels, progress bars, launcher, tracker, paths, the device) stay
out of the key, so the weak model of a pair is the same stage as the weak model of every other pair with the
same task, seed and training settings, and a grid trains each weak and ceiling model once. A stage's ``role``
(its part in an experiment) and ``side`` (the weak or the strong model's) are fields, never in its key: the same
training serves as the weak model of one pair and the ceiling of another.

Builders take the typed config (w2sg.core.config.Config). No torch here.

Adding a stage kind: a member of ``Kind``, a builder here (its spec), and its body in w2sg.run.bodies.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, TypedDict

from w2sg.core import options
from w2sg.core.config import Config, ModelConfig, TrainConfig, plain

GT_LOSS = {"name": "xent"}  # stages that train on ground truth never use auxiliary terms


class Kind(str, Enum):
    """What a stage computes (its bodies: w2sg.run.bodies). A str, so it is written and hashed as its value."""

    TRAIN = "train"  # a model trained on labels -> weights, test predictions, metrics
    LABELS = "labels"  # a trained model's soft labels of the weak-label half
    FEATURES = "features"  # a frozen model's pooled features of every part of the task (probe mode)
    LM = "lm"  # generative finetuning on the task's unlabelled text
    TRANSFORM = "transform"  # the w2s stage's training set: weak labels after labels= / budget= (w2sg.ml.methods)

    def __str__(self) -> str:
        return self.value


class Role(str, Enum):
    """A stage's part in an experiment: the W&B job type, ``w2sg status --role``, and how reports read it."""

    WEAK = "weak"  # the weak model, trained on ground truth (also an ensemble's members)
    CEILING = "ceiling"  # a strong model trained on ground truth
    W2S = "w2s"  # the strong model trained on weak labels
    LINK = "link"  # a bootstrap chain's link: a student trained on its teacher's labels
    S2S = "s2s"  # a strong-to-strong iteration
    LABELS = "labels"  # soft labels of a trained model (and the transformed training set of w2s)
    FEATURES = "features"
    LM = "lm"

    def __str__(self) -> str:
        return self.value


class Side(str, Enum):
    """Whose model a stage belongs to: generative finetuning applies per side (generative.sides)."""

    WEAK = "weak"
    STRONG = "strong"

    def __str__(self) -> str:
        return self.value


class TrainSpec(TypedDict, total=False):
    """The spec of a ``train`` stage: what other modules (reports, launchers) may read of it."""

    model: Dict[str, Any]  # model_spec
    task: Dict[str, Any]  # task_spec
    train: Dict[str, Any]  # train_spec
    seed: int
    loss: Dict[str, Any]  # {name, parameters}; xent for ground truth
    labels: str  # "ground_truth" | "weak" (any teacher's labels)
    model_seed: int  # an ensemble member's own initialisation seed
    extensions: Dict[str, str]  # versions of users' code the stage runs


def fingerprint_cache(cfg: Config) -> Optional[str]:
    """Where content fingerprints are cached: <store>/fingerprints, when the store exists (w2sg.core.fingerprint)."""
    store_dir = cfg.store_dir
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
        key = (fn.__name__, json.dumps(plain(node), sort_keys=True, default=str), cache_dir)
        if key not in _SPECS:
            _SPECS[key] = fn(node, cache_dir)
        return copy.deepcopy(_SPECS[key])

    return spec


@_memoized
def model_spec(model: ModelConfig, cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """What of a model config changes results (not its name, size label or parameter count).

    ``path`` becomes the content hash of a local model directory (w2sg.core.fingerprint.model_source), so new
    weights at the same path get new keys and the same weights elsewhere reuse stages."""
    from w2sg.core.fingerprint import model_source

    spec: Dict[str, Any] = {"path": model_source(model, cache_dir), "num_layers": model.num_layers,
                            "pooling": model.pooling, "random_init": plain(model.random_init)}
    # newer fields enter only when set, so that the keys of models without them stay as they were
    spec.update({k: getattr(model, k) for k in ("revision", "tokenizer", "feature_layer")
                 if getattr(model, k) is not None})
    if model.random_init is not None and model.arch is not None:  # a random model built from arch alone
        spec["arch"] = plain(model.arch)
    return spec


@_memoized
def task_spec(task: Any, cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """The task's values, with local data files (and pkg:// files) replaced by the hash of their bytes.

    Edited data under the same path gets new keys; the same data at another path reuses stages. A hub data set
    is keyed by its name, subset and ``load_kwargs`` (which hold its ``revision`` when one is pinned). Removing
    duplicate texts (task.dedupe) enters as the number of its rule."""
    from w2sg.core.fingerprint import data_fingerprints

    t = plain(task)
    t.pop("name", None)
    if t.get("pool_seed") is None:
        t.pop("pool_seed", None)  # the pool follows the run's seed: keys as before pool_seed existed
    if t.pop("dedupe", True):  # false: the data and keys as before deduplication existed
        t["dedupe"] = 1  # the rule's number (w2sg.data.tasks.DEDUPE_RULE): a new rule, new keys
    t["data_files"] = data_fingerprints(task, cache_dir)
    return t


def key_precision(train: TrainConfig) -> Dict[str, str]:
    """What of the precision enters a stage key: {} for fp32 (keys as before mixed precision), else its name.
    ``train.precision`` is resolved at the entry (w2sg.app.config.resolve: auto -> this node's precision)."""
    if train.precision == "auto":
        from w2sg.core.errors import W2SGError

        raise W2SGError("train.precision is still 'auto': plan from a resolved config (w2sg.app.config.resolve)")
    return {} if train.precision == "fp32" else {"precision": train.precision}


def train_lr(train: TrainConfig, model: ModelConfig) -> float:
    """train.lr when set, else the model's own: its lora_lr under train=lora (5e-4 without one), else its lr."""
    if train.lr is not None:
        return train.lr
    if train.mode == "lora":
        return model.lora_lr if model.lora_lr is not None else options.DEFAULT_LORA_LR
    return model.lr


def lora_targets(train: TrainConfig, model: ModelConfig) -> Optional[List[str]]:
    """The LoRA target modules: train.lora.target_modules, the model's lora_targets, or its family's
    (options.LORA_TARGETS by arch.model_type); None when only the loaded model's family can tell."""
    if train.lora.target_modules is not None:
        return list(train.lora.target_modules)
    if model.lora_targets is not None:
        return list(model.lora_targets)
    family = (model.arch or {}).get("model_type")
    return list(options.LORA_TARGETS[family]) if family in options.LORA_TARGETS else None


def truncation_spec(train: TrainConfig, model: ModelConfig) -> Dict[str, str]:
    """What of train.truncation enters a key: nothing for a cut on the right (every key before the option),
    else the side, or drop."""
    side = options.truncation_side(train.truncation, model.pooling)
    if train.truncation == "drop":
        return {"truncation": "drop"}
    return {} if side == "right" else {"truncation": side}


def train_spec(train: TrainConfig, model: ModelConfig) -> Dict[str, Any]:
    t = plain(train)
    # evaluation batching, checkpoints, the device and memory savers do not change results; the precision does;
    # data-parallel ranks train slices of the same global batches: equal to one process's to float rounding
    # (tests/test_distributed.py), so strategy and processes stay out of the key
    for k in ("eval_batch_size", "checkpoint_every", "checkpoint_minutes", "device", "precision",
              "gradient_checkpointing", "device_map", "strategy", "processes"):
        t.pop(k, None)
    t.update(key_precision(train))
    t["lr"] = float(train_lr(train, model))
    t.pop("truncation")
    # newer settings enter only when they differ from what stages computed before they existed, so those keys stay
    t.update(truncation_spec(train, model))
    if t.get("head_init") == "default":
        t.pop("head_init")
    if train.mode == "probe" or not t.get("max_grad_norm"):
        t.pop("max_grad_norm", None)  # a probe head's full-batch fit is not clipped; null/0: no clipping
    if train.mode != "lora":
        t.pop("lora", None)  # adapter settings matter only when adapters are trained
    else:
        t["lora"]["target_modules"] = lora_targets(train, model)
        if t["lora"]["target_modules"] is None:  # chosen by family at run time: the table's version decides
            t["lora"]["family_targets"] = options.LORA_TARGETS_VERSION
    if train.mode == "probe":  # a probe head fits full-batch (w2sg.ml.train.fit_probe): every epoch is one step
        for k in ("batch_size", "minibatch_size", "batch_order"):
            t.pop(k, None)
        t["fit"] = "full_batch"
    elif train.batch_order == "random":
        t.pop("batch_order", None)  # the order before grouped batches existed: the keys of those stages
    if not train.val_frac:
        for k in ("val_labels", "eval_every", "keep_best"):  # no validation set: nothing to validate
            t.pop(k, None)
    return t


@dataclass
class Stage:
    kind: Kind
    spec: Dict[str, Any]  # resolved values the stage uses (a train stage's: TrainSpec)
    inputs: Dict[str, "Stage"] = field(default_factory=dict)
    model: Any = None  # the model config (for building; its result-relevant part is in spec)
    label: str = ""  # human-readable name, e.g. "weak:minilm_l1" (display only: never parsed)
    role: Role = Role.WEAK  # its part in the experiment (not in the key)
    side: Side = Side.WEAK  # whose model (not in the key)

    def __post_init__(self) -> None:
        from w2sg.core.registry import versions_used

        self.kind, self.role, self.side = Kind(self.kind), Role(self.role), Side(self.side)
        used = versions_used(self.spec)  # the version of users' code (extensions:) that this stage runs
        if used:
            self.spec["extensions"] = used

    @cached_property
    def key(self) -> str:
        payload = {"kind": self.kind.value, "spec": self.spec,
                   "inputs": {k: v.key for k, v in sorted(self.inputs.items())}}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    @property
    def on_ground_truth(self) -> bool:
        """A training on ground truth (a weak model or a ceiling): the stages pairs of a grid share."""
        return self.kind is Kind.TRAIN and self.spec["labels"] == "ground_truth"

    def shared(self) -> bool:
        """A ground-truth training or the labels of one: stages other experiments of a sweep need too."""
        if self.kind is Kind.TRAIN:
            return self.on_ground_truth
        model = self.inputs.get("model")
        return self.kind is Kind.LABELS and model is not None and model.shared()

    def describe(self) -> Dict[str, Any]:
        """What the store records of a stage besides its spec (meta.json, the DONE summary)."""
        return {"kind": self.kind.value, "role": self.role.value, "side": self.side.value, "label": self.label,
                "spec": self.spec, "inputs": {k: v.key for k, v in self.inputs.items()},
                "model_name": self.model.name}


def lm_stage(cfg: Config, model: ModelConfig, side: Side) -> Stage:
    """Generative finetuning of a model on the task's unlabelled training text (w2sg.ml.generative)."""
    g = cfg.generative
    cache = fingerprint_cache(cfg)
    spec = {"model": model_spec(model, cache), "task": task_spec(cfg.task, cache), "seed": cfg.seed,
            "max_length": cfg.train.max_length,
            "generative": {k: getattr(g, k) for k in ("objective", "epochs", "batch_size", "lr", "mlm_probability")},
            **key_precision(cfg.train)}
    return Stage(Kind.LM, spec, {}, model, f"lm:{model.name}", Role.LM, side)


def init_inputs(cfg: Config, model: ModelConfig, side: Side) -> Dict[str, Stage]:
    """The generatively finetuned weights a model starts from, when generative finetuning applies to its side."""
    if cfg.generative.enabled and side.value in cfg.generative.sides:
        return {"init": lm_stage(cfg, model, side)}
    return {}


def features_stage(cfg: Config, model: ModelConfig, side: Side) -> Stage:
    """Probe mode: the frozen model as an encoder of texts. Its key holds what changes an encoding (the model and
    its pooling, ``max_length``, the precision, and generatively finetuned weights it starts from) and nothing of
    the task, its sizes or the seed: a split chooses rows, it never changes a text's features. The features
    themselves live by text content in the store's feature bank of this key (w2sg.core.store.FeatureBank), so
    every seed, size and task encodes only the texts no earlier run encoded."""
    spec = {"model": model_spec(model, fingerprint_cache(cfg)), "max_length": cfg.train.max_length,
            "features": "by_text", **key_precision(cfg.train)}
    cut = options.truncation_side(cfg.train.truncation, model.pooling)
    if cut != "right":  # the end of each text kept (texts are found in the bank by side and content)
        spec["truncation"] = cut
    return Stage(Kind.FEATURES, spec, init_inputs(cfg, model, side), model, f"features:{model.name}", Role.FEATURES,
                 side)


def student_train(cfg: Config) -> TrainConfig:
    """The training settings of a model trained on labels: ``train`` with ``student``'s set values."""
    changes = {k: v for k, v in plain(cfg.student).items() if v is not None}
    return dataclasses.replace(cfg.train, **changes) if changes else cfg.train


def train_stage(cfg: Config, model: ModelConfig, labels: Optional[Stage], loss: Any, label: str, role: Role,
                side: Side) -> Stage:
    """A model trained on ground truth (``labels`` None) or on a teacher's labels with ``loss``."""
    inputs: Dict[str, Stage] = {"labels": labels} if labels is not None else {}
    if cfg.train.mode == "probe":
        inputs["features"] = features_stage(cfg, model, side)
    else:
        inputs.update(init_inputs(cfg, model, side))
    tspec = train_spec(cfg.train if labels is None else student_train(cfg), model)
    if labels is None:
        tspec.pop("val_labels", None)  # ground-truth stages validate against ground truth whatever it says
    cache = fingerprint_cache(cfg)
    spec: TrainSpec = {
        "model": model_spec(model, cache),
        "task": task_spec(cfg.task, cache),
        "train": tspec,
        "seed": cfg.seed,
        "loss": plain(loss) if labels is not None else GT_LOSS,
        "labels": "weak" if labels is not None else "ground_truth",
    }
    return Stage(Kind.TRAIN, dict(spec), inputs, model, label, role, side)


def labels_stage(cfg: Config, trained: Stage, label: str) -> Stage:
    """A trained model's soft labels of the weak-label half."""
    spec = {"task": task_spec(cfg.task, fingerprint_cache(cfg)), "seed": cfg.seed,
            "max_length": cfg.train.max_length, **key_precision(cfg.train)}
    return Stage(Kind.LABELS, spec, {"model": trained}, trained.model, label, Role.LABELS, trained.side)


def member_stage(cfg: Config, model: ModelConfig, seed: int) -> Stage:
    """An ensemble member (w2sg.ml.methods): a weak model trained on ground truth with its own model seed (weights
    initialisation and data order; the data split stays the run's). The run's own weak model and seed is the
    run's weak stage itself, so it is shared."""
    if seed == cfg.seed:
        return train_stage(cfg, model, None, None, f"weak:{model.name}", Role.WEAK, Side.WEAK)
    stage = train_stage(cfg, model, None, None, f"weak:{model.name}@seed{seed}", Role.WEAK, Side.WEAK)
    return Stage(stage.kind, {**stage.spec, "model_seed": int(seed)}, stage.inputs, stage.model, stage.label,
                 stage.role, stage.side)


def transform_stage(cfg: Config, labels: Dict[str, Stage], features: Optional[Stage], label: str,
                    method: Dict[str, Any], budget: Optional[Dict[str, Any]]) -> Stage:
    """The training set of the w2s stage (w2sg.ml.methods): the weak labels after ``labels=`` and ``budget=``
    (``method``, ``budget``: their specs, w2sg.core.methods). Inputs: ``labels`` (or ``member<i>`` for an
    ensemble's members) and the strong model's ``features`` for probes."""
    spec = {"method": method, "budget": budget, "seed": cfg.seed, "task": task_spec(cfg.task)}
    inputs = dict(labels, **({"features": features} if features is not None else {}))
    return Stage(Kind.TRANSFORM, spec, inputs, cfg.weak, label, Role.LABELS, Side.WEAK)
