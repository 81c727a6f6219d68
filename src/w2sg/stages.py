"""The stage graph: train(model, data, labels) -> weights + test predictions; labels(trained model) -> soft labels.

A stage's key is a hash of the fully resolved values it uses plus its inputs' keys. Values that cannot change
a result (names and size labels, progress bars, launcher, tracker, paths) stay out of the key, so the weak
model of a pair is the same stage as the weak model of every other pair with the same task, seed and training
settings, and a grid trains each weak and ceiling model once.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

from omegaconf import OmegaConf

from w2sg.errors import W2SGError
from w2sg.store import Store, StageDir
from w2sg.tracking import Tracker

log = logging.getLogger(__name__)

GT_LOSS = {"name": "xent"}  # stages that train on ground truth never use auxiliary terms


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _load_safetensors(model: Any, path: str, device: str) -> None:
    """safetensors' load_model, reading straight onto ``device`` where safetensors can (its ``device`` argument is
    newer than our floor, 0.4.1); without it the weights are read on the CPU and copied into the placed model."""
    import inspect

    from safetensors.torch import load_model

    if "device" in inspect.signature(load_model).parameters:
        load_model(model, path, device=device)
    else:
        load_model(model, path)


def fingerprint_cache(cfg: Any) -> Optional[str]:
    """Where content fingerprints are cached: <store>/fingerprints, when the store exists (see w2sg.fingerprint)."""
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

    ``path`` becomes the content hash of a local model directory (w2sg.fingerprint.model_source), so new weights at
    the same path get new keys and the same weights elsewhere reuse stages."""
    from w2sg.fingerprint import model_source

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
    from w2sg.tasks import data_fingerprints

    t = dict(_plain(task))
    t.pop("name", None)
    t["data_files"] = data_fingerprints(task, cache_dir)
    return t


def train_spec(train: Any, model: Any) -> Dict[str, Any]:
    from w2sg.device import key_precision

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
        from w2sg.extensions import versions_used

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
    from w2sg.device import key_precision

    return key_precision(cfg.train)


def lm_stage(cfg: Any, model: Any) -> Stage:
    """Generative finetuning of a model on the task's unlabelled training text (w2sg.generative)."""
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
    """An ensemble member (w2sg.methods): a weak model trained on ground truth with its own model seed (weights
    initialisation and data order; the data split stays the run's). The run's own weak model and seed is the
    run's weak stage itself, so it is shared."""
    if seed == int(cfg.seed):
        return train_stage(cfg, model, None, None, f"weak:{model.name}")
    stage = train_stage(cfg, model, None, None, f"weak:{model.name}@seed{seed}")
    return Stage(stage.kind, {**stage.spec, "model_seed": int(seed)}, stage.inputs, stage.model, stage.label)


def transform_stage(cfg: Any, labels: Dict[str, Stage], features: Optional[Stage], label: str) -> Stage:
    """The training set of the w2s stage (w2sg.methods): the weak labels after ``labels=`` and ``budget=``.
    Inputs: ``labels`` (or ``member<i>`` for an ensemble's members) and the strong model's ``features`` for probes."""
    from w2sg.methods import budget_spec, method_spec

    spec = {"method": method_spec(_plain(cfg.labels)), "budget": budget_spec(cfg.budget), "seed": int(cfg.seed),
            "task": task_spec(cfg.task)}
    inputs = dict(labels, **({"features": features} if features is not None else {}))
    return Stage("transform", spec, inputs, cfg.weak, label)


@dataclass
class Outcome:
    key: str
    reused: bool
    seconds: float
    metrics: Dict[str, Any]


class Runner:
    """Executes stages against the store, loading the task once and keeping fresh models in memory."""

    def __init__(self, cfg: Any, store: Store, tracker: Optional[Tracker] = None):
        from w2sg.schema import check_ranges

        check_ranges(cfg)  # before anything is loaded or trained
        store.check_writable()
        self.cfg = cfg
        self.store = store
        self.tracker = tracker or Tracker(None, None)
        self._data = None
        self._tokenizers: Dict[str, Any] = {}
        self._encoded: Dict[tuple, Any] = {}  # (tokenizer path, task part) -> token ids
        self._models: Dict[str, Any] = {}  # stage key -> trained Classifier computed in this process
        self.outcomes: Dict[str, Outcome] = {}  # stage key -> outcome
        self._policy = None

    @property
    def policy(self):
        """Device and precision of every stage of this process (w2sg.device), resolved once."""
        if self._policy is None:
            from w2sg.device import runtime_policy

            self._policy = runtime_policy(self.cfg.train)
        return self._policy

    def eval_batch_size(self, model: Any) -> int:
        """train.eval_batch_size, capped by the model's own (large models)."""
        cap = model.get("eval_batch_size")
        return min(int(self.cfg.train.eval_batch_size), int(cap)) if cap else int(self.cfg.train.eval_batch_size)

    def check_memory(self, stage: "Stage", mode: str, batch: int) -> None:
        """Before loading onto a GPU: the memory estimate against what the device has (w2sg.device)."""
        if self.policy.device == "cpu":
            return
        from w2sg.device import check_memory, estimate_memory
        from w2sg.models import hidden_size, model_config

        hf = model_config(stage.model)[1]
        layers = next((getattr(hf, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(hf, k)), 1)
        length = int(stage.spec.get("max_length") or self.cfg.train.max_length)
        vocab = int(getattr(hf, "vocab_size", 0)) if stage.kind == "lm" else 0
        parts = estimate_memory(int(stage.model.params), self.policy.precision, mode, batch, length, hidden_size(hf),
                                int(layers), self.policy.gradient_checkpointing, vocab)
        check_memory(f"{stage.label} ({mode}, batch {batch} x length {length})", parts, self.policy)

    @property
    def data(self):
        if self._data is None:
            from w2sg.tasks import load_task

            self._data = load_task(self.cfg.task, int(self.cfg.seed))
        return self._data

    def task_sizes(self) -> Dict[str, int]:
        """Examples per part of the task actually used (fewer than asked when the data is short)."""
        d = self.data
        return {"n_train": len(d.gt) + len(d.weak), "n_test": len(d.test), "gt": len(d.gt), "weak": len(d.weak)}

    def tokenizer(self, model: Any):
        from w2sg.models import load_tokenizer, resolve_path

        path = resolve_path(model.path)
        if path not in self._tokenizers:
            self._tokenizers[path] = load_tokenizer(model)
        return self._tokenizers[path]

    def encode(self, model: Any, part: str):
        """Token ids of one part of the task (gt, weak or test), computed once per tokenizer and part."""
        from w2sg.models import resolve_path
        from w2sg.train import Encoded

        key = (resolve_path(model.path), part)
        if key not in self._encoded:
            texts = [t for t, _ in getattr(self.data, part)]
            self._encoded[key] = Encoded.of(self.tokenizer(model), texts, int(self.cfg.train.max_length))
        return self._encoded[key]

    def run(self, stage: Stage, force: bool = False) -> Outcome:
        """Run a stage (its inputs first) through the store; ``force`` recomputes it even if it is stored."""
        if stage.key in self.outcomes:
            return self.outcomes[stage.key]
        for dep in stage.inputs.values():
            self.run(dep)
        start = time.time()
        compute = {"train": self._compute_train, "labels": self._compute_labels,
                   "features": self._compute_features, "lm": self._compute_lm,
                   "transform": self._compute_transform}[stage.kind]
        meta = {"kind": stage.kind, "label": stage.label, "spec": stage.spec,
                "inputs": {k: v.key for k, v in stage.inputs.items()}, "model_name": stage.model.name,
                "task_name": self.cfg.task.name}
        sd, reused = self.store.compute(
            stage.key, meta, lambda out: compute(stage, out), force=force,
            on_invalid=lambda why: log.warning("stage %s (%s) in the store is %s; recomputing", stage.key, stage.label, why),
        )
        outcome = Outcome(stage.key, reused, time.time() - start, sd.read_json("metrics.json"))
        log.info("%-28s %s  %s", stage.label, stage.key[:12], "reused" if reused else f"done in {outcome.seconds:.1f}s")
        self.outcomes[stage.key] = outcome
        return outcome

    def tracker_config(self, stage: Stage) -> Dict[str, Any]:
        """What dashboards group and plot by: models and sizes, task, loss, seed, and the stage's full spec."""
        cfg, m = self.cfg, stage.model
        conf: Dict[str, Any] = {"stage": stage.role, "key": stage.key, "model": m.name, "params": int(m.params),
                                "size": m.size, "task": cfg.task.name, "seed": int(cfg.seed), "spec": stage.spec}
        if stage.kind == "train":
            conf["loss"] = stage.spec["loss"]["name"]
        if stage.role in ("weak", "labels"):
            conf.update(weak_model=m.name, weak_params=int(m.params))
        if stage.role in ("ceiling", "w2s", "link", "s2s"):
            conf.update(strong_model=m.name, strong_params=int(m.params))
        if stage.role in ("w2s", "link", "s2s"):  # the teacher: whose labels (s2s: the previous strong student)
            teacher = stage.inputs["labels"].model
            conf.update(weak_model=teacher.name, weak_params=int(teacher.params))
        return conf

    # --- stage bodies -------------------------------------------------------------------------------------

    @property
    def pairwise(self) -> bool:
        """Reward modeling: each example is a pair of texts (see w2sg.models.Classifier)."""
        return bool(self.data.gt) and isinstance(self.data.gt[0][0], tuple)

    def inputs_of(self, stage: Stage, part: str):
        """What a model of this stage reads for one part of the task: token ids, or stored features (probe)."""
        from w2sg.train import Features

        if "features" in stage.inputs:
            sd = self.store.get(stage.inputs["features"].key)
            x_b = sd.read_array(f"{part}_b") if self.pairwise else None
            return Features(_tensor(sd.read_array(part)), _tensor(x_b) if x_b is not None else None)
        return self.encode(stage.model, part)

    def _build(self, stage: Stage):
        """A fresh model for a train stage: the full classifier, with LoRA adapters, or a head alone (probe)."""
        from w2sg.models import add_lora, build_head, build_model, enable_gradient_checkpointing

        cfg, num_classes, tspec = self.cfg, int(self.cfg.task.num_classes), stage.spec["train"]
        seed = self._model_seed(stage)
        if tspec["mode"] == "probe":
            return self.policy.place(build_head(stage.model, num_classes, seed, self.pairwise))
        if self.policy.device != "cpu":
            self._models.clear()  # free the GPU of the last trained model (the store has it)
        self.check_memory(stage, tspec["mode"], int(tspec.get("minibatch_size") or tspec["batch_size"]))
        model = build_model(stage.model, num_classes, seed, self.pairwise, self.policy,
                            trainable=tspec["mode"] == "full")
        self._load_init(stage, model)
        if self.policy.gradient_checkpointing:
            enable_gradient_checkpointing(model.backbone)
        if tspec["mode"] == "lora":
            lora = tspec["lora"]
            add_lora(model, int(lora["rank"]), float(lora["alpha"]), float(lora["dropout"]), lora["target_modules"])
        return model

    def _validation(self, stage: Stage, data: Any, soft: Any, part: str, rows: Optional[Any] = None):
        """Hold out ``val_frac`` of the training part (seeded); return (train data, train labels, Validation).
        ``rows``: the rows of the part that ``data`` holds (a transformed training set), None for all."""
        import numpy as np

        from w2sg.train import Validation

        tspec = stage.spec["train"]
        n_val = int(round(float(tspec["val_frac"]) * len(soft)))
        if n_val == 0:
            return data, soft, None
        perm = np.random.RandomState(int(self.cfg.seed)).permutation(len(soft))
        val_idx, train_idx = sorted(perm[:n_val].tolist()), sorted(perm[n_val:].tolist())
        val_y = soft[val_idx]
        if part == "weak" and tspec["val_labels"] == "ground_truth":  # judge against ground truth (an oracle)
            truth = [self.data.weak[i if rows is None else int(rows[i])][1] for i in val_idx]
            val_y = np.eye(int(self.cfg.task.num_classes), dtype=np.float32)[truth]
        validation = Validation(data.subset(val_idx), val_y, int(tspec["eval_every"]), tspec["keep_best"])
        return data.subset(train_idx), soft[train_idx], validation

    def _compute_train(self, stage: Stage, out: StageDir) -> None:
        import numpy as np

        from w2sg.losses import make_loss
        from w2sg.metrics import accuracy, auroc
        from w2sg.models import count_params, merge_lora
        from w2sg.train import Checkpointer, predict, train_model

        cfg, data = self.cfg, self.data
        num_classes = int(cfg.task.num_classes)
        rows = None  # the rows of the weak-label half a transformed training set holds (None: all)
        if "labels" in stage.inputs:
            part = "weak"
            soft, rows = self._training_labels(stage.inputs["labels"])
        else:
            part = "gt"
            soft = np.eye(num_classes, dtype=np.float32)[[y for _, y in data.gt]]
        model = self._build(stage)
        pad_id = self.tokenizer(stage.model).pad_token_id
        tspec = stage.spec["train"]
        inputs = self.inputs_of(stage, part)
        inputs = inputs if rows is None else inputs.subset(rows.tolist())
        train_data, train_y, validation = self._validation(stage, inputs, soft, part, rows)
        ckpt_path = self.store.partial_dir(stage.key) / "checkpoint.pt"
        with Checkpointer(str(ckpt_path), int(cfg.train.checkpoint_every)) as ckpt, \
                self.tracker.stage_run(stage.key, stage.label, stage.role, self.tracker_config(stage)) as wb:
            result = train_model(
                model, train_data, train_y, make_loss(stage.spec["loss"]),
                epochs=int(tspec["epochs"]), batch_size=int(tspec["batch_size"]), lr=tspec["lr"], pad_id=pad_id,
                seed=self._model_seed(stage), minibatch_size=tspec.get("minibatch_size"),
                optimizer=str(tspec["optimizer"]),
                weight_decay=float(tspec["weight_decay"]), warmup_frac=float(tspec["warmup_frac"]),
                schedule=str(tspec["schedule"]), validation=validation,
                eval_batch_size=self.eval_batch_size(stage.model), progress=bool(cfg.progress), desc=stage.label,
                checkpointer=ckpt, on_log=wb.log, policy=self.policy,
            )
            if result.resumed_from:
                log.info("%s resumed from its checkpoint at step %d", stage.label, result.resumed_from)
            trained_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            adapter = self._adapter_state(model) if tspec["mode"] == "lora" else None
            merge_lora(model)
            test_y = [y for _, y in data.test]
            probs = predict(model, self.inputs_of(stage, "test"),
                            batch_size=self.eval_batch_size(stage.model), pad_id=pad_id, progress=bool(cfg.progress),
                            desc=f"{stage.label} test", policy=self.policy)
            transfer_probs = None
            if part == "weak":  # the student's fit of the weak labels (misfit; w2sg.diagnostics)
                transfer_probs = predict(model, self.inputs_of(stage, "weak"),
                                         batch_size=self.eval_batch_size(stage.model), pad_id=pad_id,
                                         progress=bool(cfg.progress), desc=f"{stage.label} transfer",
                                         policy=self.policy)
            metrics = {
                "acc": accuracy(probs, test_y), "auroc": auroc(probs, test_y), "n_train": len(train_y),
                "n_test": len(test_y), "history": result.history, "trained_params": trained_params,
                # the predicting model's size (a probe's backbone ran in the features stage)
                "params": int(stage.model.params) if tspec["mode"] == "probe" else count_params(model),
                "resumed_from_step": result.resumed_from, "task_sizes": self.task_sizes(),
            }
            if validation is not None:
                metrics.update(n_val=len(validation.labels), val_labels=tspec.get("val_labels", "ground_truth"),
                               evals=result.evals, best=result.best)
            wb.log({"eval/acc": metrics["acc"], "eval/auroc": metrics["auroc"], "epoch": len(result.history)})
            wb.summary({k: v for k, v in metrics.items() if k not in ("history", "evals")})
        out.write_array("test_probs", probs)
        if transfer_probs is not None:
            out.write_array("transfer_probs", transfer_probs)
        out.write_json("metrics.json", metrics)
        self._save_weights(stage, model, adapter, out)
        self._models = {stage.key: model}  # keep the latest only: the labels stage usually follows at once

    def _model_seed(self, stage: Stage) -> int:
        """The seed of a model's initialisation and data order: the run's, or an ensemble member's own."""
        return int(stage.spec.get("model_seed", self.cfg.seed))

    def _training_labels(self, labels: Stage):
        """(soft labels, rows of the weak-label half or None for all) of a labels or transform stage."""
        sd = self.store.get(labels.key)
        rows = sd.read_array("rows") if sd.file("rows.npy").exists() else None
        return sd.read_array("probs"), rows

    def _compute_transform(self, stage: Stage, out: StageDir) -> None:
        """The w2s stage's training set (w2sg.methods): averaged members, budget rows, the labels= method."""
        import numpy as np

        from w2sg.methods import average, build_training_set, training_set_metrics

        members = [self.store.get(dep.key).read_array("probs") for name, dep in sorted(stage.inputs.items())
                   if name == "labels" or name.startswith("member")]
        probs = members[0] if len(members) == 1 else average(members)
        features = None
        if "features" in stage.inputs:
            sd = self.store.get(stage.inputs["features"].key)
            features = sd.read_array("weak")
            if sd.file("weak_b.npy").exists():  # a pair's features: the difference of its two texts'
                features = features - sd.read_array("weak_b")
        truth = [y for _, y in self.data.weak]
        ts = build_training_set(stage.spec, probs, features, truth)
        metrics = {"method": stage.spec["method"]["name"], **training_set_metrics(ts, probs, truth)}
        with self.tracker.stage_run(stage.key, stage.label, stage.role, self.tracker_config(stage)) as wb:
            wb.summary({f"label_{k}": v for k, v in metrics.items()})
        out.write_array("probs", ts.probs)
        out.write_array("rows", ts.rows.astype(np.int64))
        out.write_array("ground_truth", ts.ground_truth)
        out.write_json("metrics.json", metrics)

    @staticmethod
    def _adapter_state(model: Any) -> Dict[str, Any]:
        """LoRA: what training changed (the adapters and the head), before the adapters are merged."""
        return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}

    def _save_weights(self, stage: Stage, model: Any, adapter: Optional[Dict[str, Any]], out: StageDir) -> None:
        """A train stage's weights: LoRA stores its adapters and head only (adapter.safetensors; _load_trained
        rebuilds the base model and merges them, as training did); a full finetune stores the model with its
        backbone in the compute dtype (fp32 on the CPU: as trained), and keeps that model for the labels stage, so
        labels are the same whether they are computed now or from the store later; a probe stores its head."""
        from safetensors.torch import save_file, save_model

        if adapter is not None:
            save_file(adapter, str(out.file("adapter.safetensors")))
            return
        if stage.spec["train"]["mode"] == "full" and self.policy.precision != "fp32":
            model.backbone.to(self.policy.dtype)  # the master weights were fp32 for training only
        save_model(model, str(out.file("model.safetensors")))

    def _compute_features(self, stage: Stage, out: StageDir) -> None:
        """Pooled last-layer features of the frozen model for gt, weak and test (and each pair's second text)."""
        from w2sg.models import build_model
        from w2sg.train import extract_features

        self.check_memory(stage, "inference", self.eval_batch_size(stage.model))
        model = build_model(stage.model, int(self.cfg.task.num_classes), int(self.cfg.seed), policy=self.policy,
                            trainable=False)
        self._load_init(stage, model)
        pad_id = self.tokenizer(stage.model).pad_token_id
        shapes = {}
        for part in ("gt", "weak", "test"):
            x, x_b = extract_features(model, self.encode(stage.model, part), batch_size=self.eval_batch_size(stage.model),
                                      pad_id=pad_id, progress=bool(self.cfg.progress), desc=f"{stage.label} {part}",
                                      policy=self.policy)
            out.write_array(part, x)
            if x_b is not None:
                out.write_array(f"{part}_b", x_b)
            shapes[part] = list(x.shape)
        out.write_json("metrics.json", {"shapes": shapes})

    def _load_init(self, stage: Stage, model: Any) -> None:
        """Start from the generatively finetuned backbone when the stage has one."""
        if "init" not in stage.inputs:
            return
        from safetensors.torch import load_model

        path = self.store.get(stage.inputs["init"].key).file("backbone.safetensors")
        missing, unexpected = load_model(model.backbone, str(path), strict=False)
        # an LM head's backbone has no pooler; the classifier pools hidden states itself and never uses one
        if unexpected or [k for k in missing if not k.startswith("pooler.")]:
            raise W2SGError(f"{stage.label}: generatively finetuned weights do not fit the model "
                            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")

    def _compute_lm(self, stage: Stage, out: StageDir) -> None:
        from safetensors.torch import save_file

        from w2sg.generative import finetune_lm

        texts = [t for part in (self.data.gt, self.data.weak) for x, _ in part
                 for t in (x if isinstance(x, tuple) else (x,))]
        g = stage.spec["generative"]
        self.check_memory(stage, "full", int(g["batch_size"]))
        with self.tracker.stage_run(stage.key, stage.label, stage.role, self.tracker_config(stage)) as wb:
            result = finetune_lm(stage.model, self.tokenizer(stage.model), texts, objective=g["objective"],
                                 epochs=int(g["epochs"]), batch_size=int(g["batch_size"]), lr=float(g["lr"]),
                                 max_length=int(stage.spec["max_length"]), mlm_probability=float(g["mlm_probability"]),
                                 seed=int(self.cfg.seed), progress=bool(self.cfg.progress), desc=stage.label,
                                 policy=self.policy)
            for entry in result["history"]:
                wb.log({f"lm/{k}": v for k, v in entry.items()})
            metrics = {"objective": result["objective"], "n_texts": len(texts), "history": result["history"]}
            wb.summary({"objective": result["objective"], "final_loss": result["history"][-1]["loss"]})
        save_file({k: v.contiguous() for k, v in result["state"].items()}, str(out.file("backbone.safetensors")))
        out.write_json("metrics.json", metrics)

    def _load_trained(self, stage: Stage):
        """A trained model from the store (or this process); weights freed by store.keep_weights are recomputed."""
        from w2sg.store import WEIGHT_FILES

        if stage.key not in self._models and not any(
                self.store.get(stage.key).file(n).exists() for n in WEIGHT_FILES):
            self._restore_weights(stage)
        if stage.key in self._models:
            return self._models[stage.key]
        from safetensors.torch import load_file, load_model

        from w2sg.models import add_lora, build_head, build_model, merge_lora

        num_classes, seed = int(self.cfg.task.num_classes), self._model_seed(stage)  # as built for training
        tspec = stage.spec["train"]
        sd = self.store.get(stage.key)
        device = "cpu" if self.policy.device_map else self.policy.device
        if tspec["mode"] == "probe":
            model = self.policy.place(build_head(stage.model, num_classes, seed, self.pairwise))
        else:  # the backbone in the compute dtype, as stored (full) or as the frozen base of the adapters (lora)
            self.check_memory(stage, "inference", self.eval_batch_size(stage.model))
            model = build_model(stage.model, num_classes, seed, self.pairwise, self.policy, trainable=False)
        if not sd.file("adapter.safetensors").exists():  # full, probe, and LoRA stored merged (before adapters)
            _load_safetensors(model, str(sd.file("model.safetensors")), device)
            return model
        self._load_init(stage, model)  # the base the adapters were trained on
        lora = tspec["lora"]
        add_lora(model, int(lora["rank"]), float(lora["alpha"]), float(lora["dropout"]), lora["target_modules"])
        adapter = load_file(str(sd.file("adapter.safetensors")), device=device)
        unexpected = model.load_state_dict(adapter, strict=False).unexpected_keys
        if unexpected:
            raise W2SGError(f"{stage.label}: its stored adapters do not fit the model (unexpected "
                            f"{sorted(unexpected)[:5]}); recompute it (recompute=[...] naming that stage)")
        merge_lora(model)
        return model

    def _restore_weights(self, stage: Stage) -> None:
        """Train a stage whose weights were freed (store.keep_weights, w2sg gc) again, into a scratch directory;
        its weights go back into the store only if its test predictions equal the stored ones, so that labels
        computed from them belong to the model whose results are stored. Training that is not reproducible here
        (e.g. nondeterministic GPU kernels) is an error naming the way out, never a silent mix of two models."""
        import os
        import shutil
        import uuid

        import numpy as np

        from w2sg.store import WEIGHT_FILES

        note = self.store.weights_freed(stage.key) or {}
        log.warning("%s: its weights were freed (%s); training it again to recover them", stage.label,
                    note.get("why", "store.keep_weights"))
        with self.store.lock(stage.key):
            sd = self.store.get(stage.key)
            if any(sd.file(n).exists() for n in WEIGHT_FILES):
                return  # another process recovered them meanwhile
            tmp = self.store.root / "tmp" / f"{stage.key}.restore.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            try:
                self._compute_train(stage, StageDir(tmp))
                stored, again = sd.read_array("test_probs"), StageDir(tmp).read_array("test_probs")
                if stored.shape != again.shape or not np.allclose(stored, again, rtol=0, atol=1e-6):
                    self._models.pop(stage.key, None)
                    diff = float(np.abs(stored - again).max()) if stored.shape == again.shape else float("nan")
                    raise W2SGError(
                        f"{stage.label}: its weights were freed, and training it again predicts differently from the "
                        f"stored model (max probability difference {diff:.2g}): training is not reproducible on "
                        "this device, so labels from the new weights would not belong to the stored results. "
                        "Recompute it and what follows from it (recompute=[<its stage name>, ...]), and keep "
                        "weights with store.keep_weights=all where training is not deterministic")
                self.store.restore_weights(stage.key, tmp)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def release_weights(self, stages: Iterable[Stage]) -> int:
        """store.keep_weights after a run: ``needed`` frees the weights of each train stage whose labels stage is
        stored (every stage of the plan that reads them has run); ``none`` frees every train stage's weights;
        ``all`` keeps them. Returns the bytes freed."""
        from w2sg.store import human_bytes

        policy = str(OmegaConf.select(self.cfg, "store.keep_weights", default="needed"))
        if policy == "all":
            return 0
        stages = list(stages)
        readers: Dict[str, list] = {}
        for s in stages:
            if s.kind == "labels":
                readers.setdefault(s.inputs["model"].key, []).append(s)
        freed = 0
        for s in stages:
            if s.kind != "train" or (policy == "needed" and s.key not in readers):
                continue
            if any(self.store.status(r.key) != "done" for r in readers.get(s.key, [])):
                continue
            size = self.store.free_weights(s.key, f"store.keep_weights={policy}")
            if size:
                log.info("%-28s %s  weights freed (%s; store.keep_weights=%s)", s.label, s.key[:12],
                         human_bytes(size), policy)
                self._models.pop(s.key, None)
            freed += size
        return freed

    def _compute_labels(self, stage: Stage, out: StageDir) -> None:
        from w2sg.metrics import accuracy, auroc
        from w2sg.train import predict

        trained = stage.inputs["model"]
        model = self._load_trained(trained)
        data = self.data
        probs = predict(model, self.inputs_of(trained, "weak"), policy=self.policy,
                        batch_size=self.eval_batch_size(trained.model),
                        pad_id=self.tokenizer(trained.model).pad_token_id, progress=bool(self.cfg.progress),
                        desc=stage.label)
        gt = [y for _, y in data.weak]
        # how good the labels are against the (hidden) ground truth of that half
        metrics = {"acc": accuracy(probs, gt), "auroc": auroc(probs, gt), "n": len(gt)}
        with self.tracker.stage_run(stage.key, stage.label, stage.role, self.tracker_config(stage)) as wb:
            wb.summary({f"label_{k}": v for k, v in metrics.items()})
        out.write_array("probs", probs)
        out.write_json("metrics.json", metrics)


def _tensor(arr: Any):
    import torch

    return torch.as_tensor(arr, dtype=torch.float32)


def task_sizes(cfg: Any, outcomes: Dict[str, Outcome]) -> Optional[Dict[str, Any]]:
    """The task sizes used (from any train stage's metrics), next to those asked for; a warning when smaller."""
    used = next((o.metrics["task_sizes"] for o in outcomes.values() if "task_sizes" in o.metrics), None)
    if used is None:
        return None
    asked = {"n_train": int(cfg.task.n_train), "n_test": int(cfg.task.n_test)}
    all_reused = all(o.reused for o in outcomes.values())  # else load_task has warned already, with details
    if all_reused and (used["n_train"] < asked["n_train"] or used["n_test"] < asked["n_test"]):
        log.warning("task %r: used %d train and %d test examples, fewer than task.n_train=%d / task.n_test=%d "
                    "asked for: the data has no more usable rows", cfg.task.name, used["n_train"], used["n_test"],
                    asked["n_train"], asked["n_test"])
    return {**used, "requested": asked}
