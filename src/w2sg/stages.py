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

from w2sg.errors import W2SGError
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


def lm_stage(cfg: Any, model: Any) -> Stage:
    """Generative finetuning of a model on the task's unlabelled training text (w2sg.generative)."""
    g = _plain(cfg.generative)
    spec = {"model": model_spec(model), "task": task_spec(cfg.task), "seed": int(cfg.seed),
            "max_length": int(cfg.train.max_length),
            "generative": {k: g[k] for k in ("objective", "epochs", "batch_size", "lr", "mlm_probability")}}
    return Stage("lm", spec, {}, model, f"lm:{model.name}")


def init_inputs(cfg: Any, model: Any, side: str) -> Dict[str, Stage]:
    """The generatively finetuned weights a model starts from, when generative finetuning applies to its side."""
    if cfg.generative.enabled and side in cfg.generative.sides:
        return {"init": lm_stage(cfg, model)}
    return {}


def features_stage(cfg: Any, model: Any, side: str) -> Stage:
    """Probe mode: the frozen model's pooled features of every part of the task, computed once and reused."""
    spec = {"model": model_spec(model), "task": task_spec(cfg.task), "seed": int(cfg.seed),
            "max_length": int(cfg.train.max_length)}
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
    spec = {
        "model": model_spec(model),
        "task": task_spec(cfg.task),
        "train": tspec,
        "seed": int(cfg.seed),
        "loss": _plain(loss) if labels is not None else GT_LOSS,
        "labels": "weak" if labels is not None else "ground_truth",
    }
    return Stage("train", spec, inputs, model, label)


def labels_stage(cfg: Any, trained: Stage, label: str) -> Stage:
    spec = {"task": task_spec(cfg.task), "seed": int(cfg.seed), "max_length": int(cfg.train.max_length)}
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
        from w2sg.models import add_lora, build_head, build_model

        cfg, num_classes = self.cfg, int(self.cfg.task.num_classes)
        seed = self._model_seed(stage)
        if stage.spec["train"]["mode"] == "probe":
            return build_head(stage.model, num_classes, seed, self.pairwise)
        model = build_model(stage.model, num_classes, seed, self.pairwise)
        self._load_init(stage, model)
        if stage.spec["train"]["mode"] == "lora":
            lora = stage.spec["train"]["lora"]
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
        from safetensors.torch import save_model

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
                schedule=str(tspec["schedule"]), validation=validation, eval_batch_size=int(cfg.train.eval_batch_size),
                progress=bool(cfg.progress), desc=stage.label, checkpointer=ckpt, on_log=wb.log,
            )
            if result.resumed_from:
                log.info("%s resumed from its checkpoint at step %d", stage.label, result.resumed_from)
            trained_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            merge_lora(model)
            test_y = [y for _, y in data.test]
            probs = predict(model, self.inputs_of(stage, "test"),
                            batch_size=int(cfg.train.eval_batch_size), pad_id=pad_id, progress=bool(cfg.progress),
                            desc=f"{stage.label} test")
            metrics = {
                "acc": accuracy(probs, test_y), "auroc": auroc(probs, test_y), "n_train": len(train_y),
                "n_test": len(test_y), "history": result.history, "trained_params": trained_params,
                # the predicting model's size (a probe's backbone ran in the features stage)
                "params": int(stage.model.params) if tspec["mode"] == "probe" else count_params(model),
                "resumed_from_step": result.resumed_from,
            }
            if validation is not None:
                metrics.update(n_val=len(validation.labels), val_labels=tspec.get("val_labels", "ground_truth"),
                               evals=result.evals, best=result.best)
            wb.log({"eval/acc": metrics["acc"], "eval/auroc": metrics["auroc"], "epoch": len(result.history)})
            wb.summary({k: v for k, v in metrics.items() if k not in ("history", "evals")})
        out.write_array("test_probs", probs)
        out.write_json("metrics.json", metrics)
        save_model(model, str(out.file("model.safetensors")))
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

    def _compute_features(self, stage: Stage, out: StageDir) -> None:
        """Pooled last-layer features of the frozen model for gt, weak and test (and each pair's second text)."""
        from w2sg.models import build_model
        from w2sg.train import extract_features

        model = build_model(stage.model, int(self.cfg.task.num_classes), int(self.cfg.seed))
        self._load_init(stage, model)
        pad_id = self.tokenizer(stage.model).pad_token_id
        shapes = {}
        for part in ("gt", "weak", "test"):
            x, x_b = extract_features(model, self.encode(stage.model, part), batch_size=int(self.cfg.train.eval_batch_size),
                                      pad_id=pad_id, progress=bool(self.cfg.progress), desc=f"{stage.label} {part}")
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
        with self.tracker.stage_run(stage.key, stage.label, stage.role, self.tracker_config(stage)) as wb:
            result = finetune_lm(stage.model, self.tokenizer(stage.model), texts, objective=g["objective"],
                                 epochs=int(g["epochs"]), batch_size=int(g["batch_size"]), lr=float(g["lr"]),
                                 max_length=int(stage.spec["max_length"]), mlm_probability=float(g["mlm_probability"]),
                                 seed=int(self.cfg.seed), progress=bool(self.cfg.progress), desc=stage.label)
            for entry in result["history"]:
                wb.log({f"lm/{k}": v for k, v in entry.items()})
            metrics = {"objective": result["objective"], "n_texts": len(texts), "history": result["history"]}
            wb.summary({"objective": result["objective"], "final_loss": result["history"][-1]["loss"]})
        save_file({k: v.contiguous() for k, v in result["state"].items()}, str(out.file("backbone.safetensors")))
        out.write_json("metrics.json", metrics)

    def _load_trained(self, stage: Stage):
        if stage.key in self._models:
            return self._models[stage.key]
        from safetensors.torch import load_model

        from w2sg.models import build_head, build_model

        num_classes, seed = int(self.cfg.task.num_classes), int(self.cfg.seed)
        if stage.spec["train"]["mode"] == "probe":
            model = build_head(stage.model, num_classes, seed, self.pairwise)
        else:  # full, and lora (adapters were merged before saving)
            model = build_model(stage.model, num_classes, seed, self.pairwise)
        load_model(model, str(self.store.get(stage.key).file("model.safetensors")))
        return model

    def _compute_labels(self, stage: Stage, out: StageDir) -> None:
        from w2sg.metrics import accuracy, auroc
        from w2sg.train import predict

        trained = stage.inputs["model"]
        model = self._load_trained(trained)
        data = self.data
        probs = predict(model, self.inputs_of(trained, "weak"),
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


def _tensor(arr: Any):
    import torch

    return torch.as_tensor(arr, dtype=torch.float32)
