"""The stage graph: train(model, data, labels) -> weights + test predictions; labels(trained model) -> soft labels.

A stage's key is a hash of the fully resolved values it uses plus its inputs' keys. Values that cannot change
a result (names and size labels, progress bars, launcher, tracker, paths) stay out of the key, so the weak
model of a pair is the same stage as the weak model of every other pair with the same task, seed and training
settings, and a grid trains each weak and ceiling model once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from w2sg.store import Store, StageDir
from w2sg.tracking import Tracker

log = logging.getLogger(__name__)

GT_LOSS = {"name": "xent"}  # stages that train on ground truth never use auxiliary terms


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def model_spec(model: Any) -> Dict[str, Any]:
    """What of a model config changes results (not its name, size label or parameter count)."""
    m = _plain(model)
    return {k: m.get(k) for k in ("path", "num_layers", "pooling", "random_init")}


def task_spec(task: Any) -> Dict[str, Any]:
    t = dict(_plain(task))
    t.pop("name", None)
    return t


def train_spec(train: Any, model: Any) -> Dict[str, Any]:
    t = dict(_plain(train))
    for k in ("eval_batch_size", "checkpoint_every"):  # evaluation batching and checkpoints do not change results
        t.pop(k, None)
    t["lr"] = float(t["lr"] if t.get("lr") is not None else model.lr)
    if t.get("mode") != "lora":
        t.pop("lora", None)  # adapter settings matter only when adapters are trained
    return t


@dataclass
class Stage:
    kind: str  # "train" or "labels"
    spec: Dict[str, Any]  # resolved values the stage uses
    inputs: Dict[str, "Stage"] = field(default_factory=dict)
    model: Any = None  # the model config (for building; its result-relevant part is in spec)
    label: str = ""  # human-readable name, e.g. "weak:minilm_l1"

    @property
    def role(self) -> str:
        """weak, ceiling, w2s, link or labels: the W&B job type and the kind shown to users."""
        prefix = self.label.split(":")[0]
        return "labels" if prefix.endswith("labels") else prefix.rstrip("0123456789")

    @cached_property
    def key(self) -> str:
        payload = {"kind": self.kind, "spec": self.spec, "inputs": {k: v.key for k, v in sorted(self.inputs.items())}}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def train_stage(cfg: Any, model: Any, labels: Optional[Stage], loss: Any, label: str) -> Stage:
    spec = {
        "model": model_spec(model),
        "task": task_spec(cfg.task),
        "train": train_spec(cfg.train, model),
        "seed": int(cfg.seed),
        "loss": _plain(loss) if labels is not None else GT_LOSS,
        "labels": "weak" if labels is not None else "ground_truth",
    }
    return Stage("train", spec, {"labels": labels} if labels is not None else {}, model, label)


def labels_stage(cfg: Any, trained: Stage, label: str) -> Stage:
    spec = {"task": task_spec(cfg.task), "seed": int(cfg.seed), "max_length": int(cfg.train.max_length)}
    return Stage("labels", spec, {"model": trained}, trained.model, label)


@dataclass
class Outcome:
    key: str
    reused: bool
    seconds: float
    metrics: Dict[str, Any]


class Runner:
    """Executes stages against the store, loading the task once and keeping fresh models in memory."""

    def __init__(self, cfg: Any, store: Store, tracker: Optional[Tracker] = None):
        self.cfg = cfg
        self.store = store
        self.tracker = tracker or Tracker(None, None)
        self._data = None
        self._tokenizers: Dict[str, Any] = {}
        self._encoded: Dict[tuple, Any] = {}  # (tokenizer path, task part) -> token ids
        self._models: Dict[str, Any] = {}  # stage key -> trained Classifier computed in this process
        self.outcomes: Dict[str, Outcome] = {}  # stage key -> outcome

    @property
    def data(self):
        if self._data is None:
            from w2sg.tasks import load_task

            self._data = load_task(self.cfg.task, int(self.cfg.seed))
        return self._data

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
        compute = self._compute_train if stage.kind == "train" else self._compute_labels
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
        if stage.role in ("ceiling", "w2s", "link"):
            conf.update(strong_model=m.name, strong_params=int(m.params))
        if stage.role in ("w2s", "link"):
            teacher = stage.inputs["labels"].model
            conf.update(weak_model=teacher.name, weak_params=int(teacher.params))
        return conf

    # --- stage bodies -------------------------------------------------------------------------------------

    def _compute_train(self, stage: Stage, out: StageDir) -> None:
        import numpy as np
        from safetensors.torch import save_model

        from w2sg.losses import make_loss
        from w2sg.metrics import accuracy, auroc
        from w2sg.models import build_model, count_params
        from w2sg.train import Checkpointer, predict, train_model

        cfg, data, model_cfg = self.cfg, self.data, stage.model
        num_classes = int(cfg.task.num_classes)
        if "labels" in stage.inputs:
            part = "weak"
            soft = self.store.get(stage.inputs["labels"].key).read_array("probs")
        else:
            part = "gt"
            soft = np.eye(num_classes, dtype=np.float32)[[y for _, y in data.gt]]
        model = build_model(model_cfg, num_classes, int(cfg.seed))
        tok = self.tokenizer(model_cfg)
        pad_id = tok.pad_token_id
        tspec = stage.spec["train"]
        ckpt_path = self.store.partial_dir(stage.key) / "checkpoint.pt"
        with Checkpointer(str(ckpt_path), int(cfg.train.checkpoint_every)) as ckpt, \
                self.tracker.stage_run(stage.key, stage.label, stage.role, self.tracker_config(stage)) as wb:
            result = train_model(
                model, self.encode(model_cfg, part), soft, make_loss(stage.spec["loss"]),
                epochs=int(tspec["epochs"]), batch_size=int(tspec["batch_size"]), lr=tspec["lr"], pad_id=pad_id,
                seed=int(cfg.seed), weight_decay=float(tspec["weight_decay"]),
                warmup_frac=float(tspec["warmup_frac"]), schedule=str(tspec["schedule"]),
                progress=bool(cfg.progress), desc=stage.label, checkpointer=ckpt,
                on_epoch=lambda epoch, entry: wb.log({f"train/{k}": v for k, v in entry.items()}),
            )
            if result.resumed_from:
                log.info("%s resumed from its checkpoint at step %d", stage.label, result.resumed_from)
            test_y = [y for _, y in data.test]
            probs = predict(model, self.encode(model_cfg, "test"),
                            batch_size=int(cfg.train.eval_batch_size), pad_id=pad_id, progress=bool(cfg.progress),
                            desc=f"{stage.label} test")
            metrics = {
                "acc": accuracy(probs, test_y), "auroc": auroc(probs, test_y), "n_train": len(soft),
                "n_test": len(test_y), "params": count_params(model), "history": result.history,
                "resumed_from_step": result.resumed_from,
            }
            wb.log({"eval/acc": metrics["acc"], "eval/auroc": metrics["auroc"], "epoch": len(result.history)})
            wb.summary({k: v for k, v in metrics.items() if k != "history"})
        out.write_array("test_probs", probs)
        out.write_json("metrics.json", metrics)
        save_model(model, str(out.file("model.safetensors")))
        self._models = {stage.key: model}  # keep the latest only: the labels stage usually follows at once

    def _load_trained(self, stage: Stage):
        if stage.key in self._models:
            return self._models[stage.key]
        from safetensors.torch import load_model

        from w2sg.models import build_model

        model = build_model(stage.model, int(self.cfg.task.num_classes), int(self.cfg.seed))
        load_model(model, str(self.store.get(stage.key).file("model.safetensors")))
        return model

    def _compute_labels(self, stage: Stage, out: StageDir) -> None:
        from w2sg.metrics import accuracy, auroc
        from w2sg.train import predict

        trained = stage.inputs["model"]
        model = self._load_trained(trained)
        data = self.data
        probs = predict(model, self.encode(trained.model, "weak"),
                        batch_size=int(self.cfg.train.eval_batch_size),
                        pad_id=self.tokenizer(trained.model).pad_token_id, progress=bool(self.cfg.progress),
                        desc=stage.label)
        gt = [y for _, y in data.weak]
        # how good the labels are against the (hidden) ground truth of that half
        metrics = {"acc": accuracy(probs, gt), "auroc": auroc(probs, gt), "n": len(gt)}
        with self.tracker.stage_run(stage.key, stage.label, stage.role, self.tracker_config(stage)) as wb:
            wb.summary({f"label_{k}": v for k, v in metrics.items()})
        out.write_array("probs", probs)
        out.write_json("metrics.json", metrics)
