"""Executes stages against the store: loads the task once, keeps fresh models in memory, and runs each
stage kind's body (train, labels, features, lm, transform)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional

from w2sg.core.errors import W2SGError
from w2sg.core.config import Config
from w2sg.core.graph import Kind, Role, Stage
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

    def __init__(self, cfg: Config, store: Store, tracker: Optional[Tracker] = None):
        from w2sg.core.config import check_ranges

        check_ranges(cfg)  # before anything is loaded or trained
        store.check_writable()
        self.cfg = cfg
        self.store = store
        self.tracker = tracker or Tracker(None, None)
        self._data = None
        self._tokenizers: Dict[str, Any] = {}
        self._encoded: Dict[tuple, Any] = {}  # (tokenizer path, task part) -> token ids
        self._models: Dict[str, Any] = {}  # stage key -> trained Classifier computed in this process
        self._features: Dict[str, Dict[str, Any]] = {}  # features stage key -> part -> (x, x_b) arrays
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
        cap = model.eval_batch_size
        return min(self.cfg.train.eval_batch_size, int(cap)) if cap else self.cfg.train.eval_batch_size

    def check_memory(self, stage: "Stage", mode: str, batch: int, shards: int = 1) -> None:
        """Before loading onto a GPU: the memory estimate against what the device has (w2sg.run.device).
        ``shards``: FSDP's ranks, over which weights, gradients and optimizer state are divided."""
        if self.policy.device == "cpu":
            return
        from w2sg.run.device import check_memory

        length = int(stage.spec.get("max_length") or self.cfg.train.max_length)
        parts = self.memory_parts(stage, mode, batch)
        hint = ""
        if shards > 1:
            from w2sg.ml.device import HEADROOM, STATE

            parts = {k: (v // shards if k in STATE else v) for k, v in parts.items() if k != "headroom"}
            parts["headroom"] = int(HEADROOM * sum(parts.values()))
            hint = f", sharded over {shards} ranks"
        check_memory(f"{stage.label} ({mode}, batch {batch} x length {length})", parts, self.policy, hint=hint,
                     mode=mode)

    def fits_one_device(self, stage: "Stage", mode: str, batch: int) -> bool:
        """Whether the stage fits this process's GPU by the memory estimate (the CPU: always)."""
        if self.policy.device == "cpu":
            return True
        from w2sg.run.device import available_memory

        have = available_memory(self.policy)
        return have is None or sum(self.memory_parts(stage, mode, batch).values()) <= have[0]

    def memory_parts(self, stage: "Stage", mode: str, batch: int) -> Dict[str, int]:
        """The stage's memory estimate on the GPU, by part (w2sg.run.device.stage_estimate)."""
        from w2sg.run.device import hf_config_of, stage_estimate

        length = int(stage.spec.get("max_length") or self.cfg.train.max_length)
        lm = stage.kind is Kind.LM  # generative finetuning: AdamW (w2sg.ml.generative) and the LM head's logits
        vocab = int(getattr(hf_config_of(stage.model), "vocab_size", 0)) if lm else 0
        rank = int(stage.spec.get("train", {}).get("lora", {}).get("rank", 8)) if mode == "lora" else 8
        return stage_estimate(stage.model, mode, batch, length, self.policy.precision,
                              gradient_checkpointing=self.policy.gradient_checkpointing,
                              optimizer="adamw" if lm else self.cfg.train.optimizer, vocab=vocab, lora_rank=rank)

    @property
    def data(self):
        if self._data is None:
            from w2sg.data.tasks import load_task

            self._data = load_task(self.cfg.task, self.cfg.seed)
        return self._data

    def task_sizes(self) -> Dict[str, int]:
        """Examples per part of the task actually used (fewer than asked when the data is short), and the rows left
        out as copies of a text already in the pool (task.dedupe)."""
        d = self.data
        sizes = {"n_train": len(d.gt) + len(d.weak), "n_test": len(d.test), "gt": len(d.gt), "weak": len(d.weak)}
        if d.duplicates_removed is not None:
            sizes["duplicates_removed"] = d.duplicates_removed
        return sizes

    def tokenizer(self, model: Any):
        from w2sg.ml.models import load_tokenizer, resolve_path

        path = resolve_path(model.path)
        if path not in self._tokenizers:
            self._tokenizers[path] = load_tokenizer(model)
        return self._tokenizers[path]

    def cut_side(self, model: Any) -> str:
        """Which end of a text over train.max_length survives for this model (w2sg.core.options.truncation_side);
        pairs are cut on the left whatever it says."""
        from w2sg.core.options import truncation_side

        return "left" if self.pairwise else truncation_side(self.cfg.train.truncation, model.pooling)

    def encode(self, model: Any, part: str):
        """Token ids of one part of the task (gt, weak or test), computed once per tokenizer, side and part; a
        warning names the share of texts longer than train.max_length."""
        from w2sg.ml.models import resolve_path
        from w2sg.ml.train import Encoded

        side = self.cut_side(model)
        key = (resolve_path(model.path), part, side)
        if key not in self._encoded:
            texts = [t for t, _ in getattr(self.data, part)]
            self._encoded[key] = Encoded.of(self.tokenizer(model), texts, self.cfg.train.max_length, side=side)
            self._warn_cut(model, part, self._encoded[key].cut, side)
        return self._encoded[key]

    def _warn_cut(self, model: Any, part: str, cut: Optional[List[bool]], side: str) -> None:
        n = sum(cut or [])
        if not n:
            return
        kept = "end" if side == "left" else "start"
        how = ("over-long training examples are left out; the others keep their end"
               if self.cfg.train.truncation == "drop" else f"each keeps its {kept}")
        log.warning("%s: %d of %d %s texts (%.1f%%) are longer than train.max_length=%d tokens (%s; "
                    "train.truncation=%s): a larger train.max_length keeps them whole", model.name, n, len(cut),
                    PART_NAMES.get(part, part), 100 * n / len(cut), self.cfg.train.max_length, how,
                    self.cfg.train.truncation)

    def runtime(self, model: Any = None) -> Dict[str, Any]:
        """Where a stage computed: device (and GPU name), compute dtype, attention kernel, peak GPU memory."""
        from w2sg.run.device import describe_runtime

        return describe_runtime(self.policy, model)

    def run(self, stage: Stage, force: bool = False) -> Outcome:
        """Run a stage (its inputs first) through the store; ``force`` recomputes it even if it is stored."""
        if stage.key in self.outcomes:
            return self.outcomes[stage.key]
        for dep in stage.inputs.values():
            self.run(dep)
        start = time.time()
        from w2sg.run.bodies import BODIES

        body = BODIES[stage.kind]
        meta = {**stage.describe(), "task_name": self.cfg.task.name}
        sd, reused = self.store.compute(
            stage.key, meta, lambda out: self._run_body(body, stage, out), force=force,
            on_invalid=lambda why: log.warning("stage %s (%s) in the store is %s; recomputing", stage.key, stage.label, why),
        )
        outcome = Outcome(stage.key, reused, time.time() - start, sd.read_json("metrics.json"))
        where = "" if reused or stage.kind is Kind.TRANSFORM else \
            f" on {_runtime_line(outcome.metrics.get('runtime') or self.runtime())}"
        log.info("%-28s %s  %s", stage.label, stage.key[:12],
                 "reused" if reused else f"done in {outcome.seconds:.1f}s{where}")
        self.outcomes[stage.key] = outcome
        return outcome

    def _run_body(self, body: Any, stage: Stage, out: StageDir) -> None:
        """A stage's body, with the GPU's peak memory counted from its start."""
        if stage.kind is not Kind.TRANSFORM and self.policy.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        body(self, stage, out)

    def tracker_config(self, stage: Stage) -> Dict[str, Any]:
        """What dashboards group and plot by: models and sizes, task, loss, seed, and the stage's full spec."""
        cfg, m = self.cfg, stage.model
        conf: Dict[str, Any] = {"stage": stage.role.value, "key": stage.key, "model": m.name, "params": m.params,
                                "size": m.size, "task": cfg.task.name, "seed": cfg.seed, "spec": stage.spec}
        if stage.kind is Kind.TRAIN:
            conf["loss"] = stage.spec["loss"]["name"]
        if stage.role in (Role.WEAK, Role.LABELS):
            conf.update(weak_model=m.name, weak_params=m.params)
        if stage.role in (Role.CEILING, Role.W2S, Role.LINK, Role.S2S):
            conf.update(strong_model=m.name, strong_params=m.params)
        if stage.role in (Role.W2S, Role.LINK, Role.S2S):  # the teacher: whose labels (s2s: the previous student)
            teacher = stage.inputs["labels"].model
            conf.update(weak_model=teacher.name, weak_params=teacher.params)
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
            x, x_b = self.features(stage.inputs["features"])[part]
            return Features(_tensor(x), _tensor(x_b) if x_b is not None else None)
        return self.encode(stage.model, part)

    def features(self, stage: Stage) -> Dict[str, Any]:
        """part (gt, weak, test) -> (features [N, H], the pair's second text's or None) of a features stage's
        encoder for this run's texts, read from the store's feature bank; texts it does not hold yet (another
        seed's, size's or task's run encoded the rest) are encoded first, once, under the bank's lock."""
        if stage.key in self._features:
            return self._features[stage.key]
        from w2sg.core.store import text_hash

        bank = self.store.feature_bank(stage.key)
        parts = {part: [t for t, _ in getattr(self.data, part)] for part in ("gt", "weak", "test")}
        side = self.cut_side(stage.model)  # pairs are cut on the left, single texts by train.truncation
        columns = {(part, c): [t[c] if self.pairwise else t for t in texts]
                   for part, texts in parts.items() for c in ((0, 1) if self.pairwise else (0,))}
        digests = {k: [text_hash(t, side) for t in col] for k, col in columns.items()}
        texts = {d: t for k, col in columns.items() for d, t in zip(digests[k], col)}
        if bank.missing(texts):
            with self.store.lock(f"features-{stage.key}"):
                missing = bank.missing(texts)  # another process may have encoded some meanwhile
                if missing:
                    start = time.time()
                    bank.add(missing, self._encode_texts(stage, [texts[d] for d in missing], side))
                    log.info("%-28s %s  %d texts encoded in %.1fs (%d from the store)", stage.label, stage.key[:12],
                             len(missing), time.time() - start, len(texts) - len(missing))
        rows = {k: bank.rows(d) for k, d in digests.items()}
        self._features[stage.key] = {part: (rows[(part, 0)], rows.get((part, 1))) for part in parts}
        return self._features[stage.key]

    def _encode_texts(self, stage: Stage, texts: List[str], side: str):
        """Pooled features [N, H] of ``texts`` from the frozen model of a features stage, truncated on ``side``."""
        from w2sg.ml.models import build_model
        from w2sg.ml.train import Encoded, extract_features

        self.check_memory(stage, "inference", self.eval_batch_size(stage.model))
        model = build_model(stage.model, self.cfg.task.num_classes, self.cfg.seed, policy=self.policy,
                            trainable=False)
        self.load_init(stage, model)
        tokenizer = self.tokenizer(stage.model)
        encoded = Encoded.of(tokenizer, list(texts), stage.spec["max_length"], side=side)
        self._warn_cut(stage.model, "features", encoded.cut, side)
        log.info("%s on %s", stage.label, _runtime_line(self.runtime(model)))
        x, _ = extract_features(model, encoded, batch_size=self.eval_batch_size(stage.model),
                                pad_id=tokenizer.pad_token_id, progress=self.cfg.progress, desc=stage.label,
                                policy=self.policy)
        return x

    def model_seed(self, stage: Stage) -> int:
        """The seed of a model's initialisation and data order: the run's, or an ensemble member's own."""
        return int(stage.spec.get("model_seed", self.cfg.seed))

    def load_init(self, stage: Stage, model: Any) -> None:
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

    def load_trained(self, stage: Stage):
        """A trained model from the store (or this process); weights freed by store.keep_weights are recomputed."""
        from w2sg.core.store import WEIGHT_FILES

        if stage.key not in self._models and not any(
                self.store.get(stage.key).file(n).exists() for n in WEIGHT_FILES):
            self.restore_weights(stage)
        if stage.key in self._models:
            return self._models[stage.key]
        from safetensors.torch import load_file

        from w2sg.ml.models import add_lora, build_head, build_model, merge_lora

        num_classes, seed = self.cfg.task.num_classes, self.model_seed(stage)  # as built for training
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
        self.load_init(stage, model)  # the base the adapters were trained on
        lora = tspec["lora"]
        add_lora(model, lora["rank"], lora["alpha"], lora["dropout"], lora["target_modules"])
        adapter = load_file(str(sd.file("adapter.safetensors")), device=device)
        unexpected = model.load_state_dict(adapter, strict=False).unexpected_keys
        if unexpected:
            raise W2SGError(f"{stage.label}: its stored adapters do not fit the model (unexpected "
                            f"{sorted(unexpected)[:5]}); recompute it (recompute=[...] naming that stage)")
        merge_lora(model)
        return model

    def restore_weights(self, stage: Stage) -> None:
        """Train a stage whose weights were freed (store.keep_weights, w2sg gc) again, into a scratch directory;
        its weights go back into the store only if its test predictions equal the stored ones, so that labels
        computed from them belong to the model whose results are stored. Training that is not reproducible here
        (e.g. nondeterministic GPU kernels) is an error naming the way out, never a silent mix of two models."""
        import shutil

        import numpy as np

        from w2sg.core.store import WEIGHT_FILES

        note = self.store.weights_freed(stage.key) or {}
        log.warning("%s: its weights were freed (%s); training it again to recover them", stage.label,
                    note.get("why", "store.keep_weights"))
        with self.store.lock(stage.key):
            sd = self.store.get(stage.key)
            if any(sd.file(n).exists() for n in WEIGHT_FILES):
                return  # another process recovered them meanwhile
            tmp = self.store.scratch_dir(stage.key, "restore")
            try:
                from w2sg.run import bodies

                bodies.train(self, stage, StageDir(tmp))
                stored, again = sd.read_array("test_probs"), StageDir(tmp).read_array("test_probs")
                same, diff = same_predictions(stored, again, self.policy.device)
                if not same:
                    self._models.pop(stage.key, None)
                    tol = RESTORE_TOLERANCE[self.policy.device if self.policy.device in RESTORE_TOLERANCE else "cuda"]
                    raise W2SGError(
                        f"{stage.label}: its weights were freed, and training it again predicts differently from the "
                        f"stored model (max probability difference {diff:.2g}, tolerance {tol['atol']:g} on "
                        f"{self.policy.device}): training is not reproducible here, so labels from the new weights "
                        "would not belong to the stored results. "
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

        policy = self.cfg.store.keep_weights
        if policy == "all":
            return 0
        stages = list(stages)
        readers: Dict[str, list] = {}
        for s in stages:
            if s.kind is Kind.LABELS:
                readers.setdefault(s.inputs["model"].key, []).append(s)
        freed = 0
        for s in stages:
            if s.kind is not Kind.TRAIN or (policy == "needed" and s.key not in readers):
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


# How closely a model trained again (restore_weights) must predict what the stored one did: on the CPU training is
# deterministic (equal to float noise); GPU kernels (atomics in reductions, cuBLAS/cuDNN algorithm choice, bf16) do
# not promise bitwise-equal results, so there a small probability difference is accepted while nearly every hard
# label (at least min_agree of them) stays the same.
RESTORE_TOLERANCE = {"cpu": {"atol": 1e-6, "min_agree": 1.0}, "cuda": {"atol": 0.02, "min_agree": 0.99}}


def same_predictions(stored: Any, again: Any, device: str) -> tuple:
    """(whether ``again`` predicts what ``stored`` did within the device's RESTORE_TOLERANCE, max difference)."""
    import numpy as np

    if stored.shape != again.shape:
        return False, float("nan")
    tol = RESTORE_TOLERANCE.get(device, RESTORE_TOLERANCE["cuda"])
    diff = float(np.abs(stored - again).max()) if stored.size else 0.0
    agree = float((stored.argmax(-1) == again.argmax(-1)).mean()) if len(stored) else 1.0
    return diff <= tol["atol"] and agree >= tol["min_agree"], diff


PART_NAMES = {"gt": "ground-truth half", "weak": "weak-label half", "test": "test", "features": "newly encoded"}


def _runtime_line(rt: Dict[str, Any]) -> str:
    peak = f", peak {rt['peak_gib']:.1f} GiB" if rt.get("peak_gib") is not None else ""
    return f"{rt['device']} ({rt['dtype']}, attention {rt['attention']}{peak})"


def _tensor(arr: Any):
    import torch

    return torch.as_tensor(arr, dtype=torch.float32)


def task_sizes(cfg: Config, outcomes: Dict[str, Outcome]) -> Optional[Dict[str, Any]]:
    """The task sizes used (from any train stage's metrics), next to those asked for; a warning when smaller."""
    used = next((o.metrics["task_sizes"] for o in outcomes.values() if "task_sizes" in o.metrics), None)
    if used is None:
        return None
    asked = {"n_train": cfg.task.n_train, "n_test": cfg.task.n_test}
    all_reused = all(o.reused for o in outcomes.values())  # else load_task has warned already, with details
    if all_reused and (used["n_train"] < asked["n_train"] or used["n_test"] < asked["n_test"]):
        log.warning("task %r: used %d train and %d test examples, fewer than task.n_train=%d / task.n_test=%d "
                    "asked for: the data has no more usable rows", cfg.task.name, used["n_train"], used["n_test"],
                    asked["n_train"], asked["n_test"])
    return {**used, "requested": asked}
