"""Executes stages against the store: loads the task once, keeps fresh models in memory, and runs each
stage kind's body (train, labels, features, lm, transform)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional

from omegaconf import OmegaConf

from w2sg.core.errors import W2SGError
from w2sg.core.graph import Stage
from w2sg.core.store import StageDir, Store
from w2sg.run.tracking import Tracker

log = logging.getLogger(__name__)


def _load_safetensors(model: Any, path: str, device: str) -> None:
    """safetensors' load_model, reading straight onto ``device`` where safetensors can (its ``device`` argument is
    newer than our floor, 0.4.1); without it the weights are read on the CPU and copied into the placed model."""
    import inspect

    from safetensors.torch import load_model

    if "device" in inspect.signature(load_model).parameters:
        load_model(model, path, device=device)
    else:
        load_model(model, path)


@dataclass
class Outcome:
    key: str
    reused: bool
    seconds: float
    metrics: Dict[str, Any]


class Runner:
    """Executes stages against the store, loading the task once and keeping fresh models in memory."""

    def __init__(self, cfg: Any, store: Store, tracker: Optional[Tracker] = None):
        from w2sg.app.config import check_ranges

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
        """Device and precision of every stage of this process (w2sg.run.device), resolved once."""
        if self._policy is None:
            from w2sg.run.device import runtime_policy

            self._policy = runtime_policy(self.cfg.train)
        return self._policy

    def eval_batch_size(self, model: Any) -> int:
        """train.eval_batch_size, capped by the model's own (large models)."""
        cap = model.get("eval_batch_size")
        return min(int(self.cfg.train.eval_batch_size), int(cap)) if cap else int(self.cfg.train.eval_batch_size)

    def check_memory(self, stage: "Stage", mode: str, batch: int) -> None:
        """Before loading onto a GPU: the memory estimate against what the device has (w2sg.run.device)."""
        if self.policy.device == "cpu":
            return
        from w2sg.ml.models import hidden_size, model_config
        from w2sg.run.device import check_memory, estimate_memory

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
            from w2sg.data.tasks import load_task

            self._data = load_task(self.cfg.task, int(self.cfg.seed))
        return self._data

    def task_sizes(self) -> Dict[str, int]:
        """Examples per part of the task actually used (fewer than asked when the data is short)."""
        d = self.data
        return {"n_train": len(d.gt) + len(d.weak), "n_test": len(d.test), "gt": len(d.gt), "weak": len(d.weak)}

    def tokenizer(self, model: Any):
        from w2sg.ml.models import load_tokenizer, resolve_path

        path = resolve_path(model.path)
        if path not in self._tokenizers:
            self._tokenizers[path] = load_tokenizer(model)
        return self._tokenizers[path]

    def encode(self, model: Any, part: str):
        """Token ids of one part of the task (gt, weak or test), computed once per tokenizer and part."""
        from w2sg.ml.models import resolve_path
        from w2sg.ml.train import Encoded

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
        """Reward modeling: each example is a pair of texts (see w2sg.ml.models.Classifier)."""
        return bool(self.data.gt) and isinstance(self.data.gt[0][0], tuple)

    def inputs_of(self, stage: Stage, part: str):
        """What a model of this stage reads for one part of the task: token ids, or stored features (probe)."""
        from w2sg.ml.train import Features

        if "features" in stage.inputs:
            sd = self.store.get(stage.inputs["features"].key)
            x_b = sd.read_array(f"{part}_b") if self.pairwise else None
            return Features(_tensor(sd.read_array(part)), _tensor(x_b) if x_b is not None else None)
        return self.encode(stage.model, part)

    def _build(self, stage: Stage):
        """A fresh model for a train stage: the full classifier, with LoRA adapters, or a head alone (probe)."""
        from w2sg.ml.models import (
            add_lora,
            build_head,
            build_model,
            enable_gradient_checkpointing,
        )

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

        from w2sg.ml.train import Validation

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

        from w2sg.ml.losses import make_loss
        from w2sg.ml.metrics import accuracy, auroc
        from w2sg.ml.models import count_params, merge_lora
        from w2sg.ml.train import Checkpointer, predict, train_model

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
        ckpt_path = self.store.checkpoint_path(stage.key)
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
            if part == "weak":  # the student's fit of the weak labels (misfit; w2sg.results.diagnostics)
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
        """The w2s stage's training set (w2sg.ml.methods): averaged members, budget rows, the labels= method."""
        import numpy as np

        from w2sg.ml.methods import average, build_training_set, training_set_metrics

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
        from w2sg.ml.models import build_model
        from w2sg.ml.train import extract_features

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

        from w2sg.ml.generative import finetune_lm

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
        from w2sg.core.store import WEIGHT_FILES

        if stage.key not in self._models and not any(
                self.store.get(stage.key).file(n).exists() for n in WEIGHT_FILES):
            self._restore_weights(stage)
        if stage.key in self._models:
            return self._models[stage.key]
        from safetensors.torch import load_file

        from w2sg.ml.models import add_lora, build_head, build_model, merge_lora

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

        from w2sg.core.store import WEIGHT_FILES

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
        from w2sg.core.store import human_bytes

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
        from w2sg.ml.metrics import accuracy, auroc
        from w2sg.ml.train import predict

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
