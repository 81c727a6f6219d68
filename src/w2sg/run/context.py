"""What a stage's body works with (w2sg.run.bodies): the ``StageContext`` of one process's run.

It holds the run's config, store and tracker, and what the stages of a run share: the task's data (loaded once),
token ids and stored features (computed once), the device policy and the memory check, and the model cache (the
latest trained model, kept for the labels stage that usually follows). It builds a train stage's model one way,
for training it and for loading it from the store. The runner (w2sg.run.runner) creates it and hands it to each
body; it keeps the stages' outcomes and the store's weights policy itself.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from typing import Any, Dict, List, Optional

from w2sg.core.config import Config
from w2sg.core.errors import W2SGError
from w2sg.core.graph import Kind, Role, Stage
from w2sg.core.store import StageDir, Store
from w2sg.run.tracking import Tracker

log = logging.getLogger(__name__)


def micro_batch(tspec: Dict[str, Any]) -> int:
    """The examples of one forward pass of a train stage (minibatch_size, else batch_size)."""
    return int(tspec.get("minibatch_size") or tspec["batch_size"])


class StageContext:
    """What the bodies of one run's stages read and share (see the module docstring).

    ``policy`` and ``data``: given (tests), or resolved and loaded on first use."""

    def __init__(self, cfg: Config, store: Store, tracker: Optional[Tracker] = None, *, policy: Any = None,
                 data: Any = None):
        self.cfg = cfg
        self.store = store
        self.tracker = tracker or Tracker(None, None)
        self._policy = policy
        self._data = data
        self._tokenizers: Dict[str, Any] = {}
        self._encoded: Dict[tuple, Any] = {}  # (tokenizer path, task part, side) -> token ids
        self._features: Dict[str, Dict[str, Any]] = {}  # features stage key -> part -> (x, x_b) arrays
        self._models: Dict[str, Any] = {}  # stage key -> trained Classifier computed in this process

    # --- the device -----------------------------------------------------------------------------------------

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

    def check_memory(self, stage: Stage, mode: str, batch: int, shards: int = 1) -> None:
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

    def fits_one_device(self, stage: Stage, mode: str, batch: int) -> bool:
        """Whether the stage fits this process's GPU by the memory estimate (the CPU: always)."""
        if self.policy.device == "cpu":
            return True
        from w2sg.run.device import available_memory

        have = available_memory(self.policy)
        return have is None or sum(self.memory_parts(stage, mode, batch).values()) <= have[0]

    def memory_parts(self, stage: Stage, mode: str, batch: int) -> Dict[str, int]:
        """The stage's memory estimate on the GPU, by part (w2sg.run.device.stage_estimate)."""
        from w2sg.run.device import hf_config_of, stage_estimate

        length = int(stage.spec.get("max_length") or self.cfg.train.max_length)
        lm = stage.kind is Kind.LM  # generative finetuning: AdamW (w2sg.ml.generative) and the LM head's logits
        vocab = int(getattr(hf_config_of(stage.model), "vocab_size", 0)) if lm else 0
        rank = int(stage.spec.get("train", {}).get("lora", {}).get("rank", 8)) if mode == "lora" else 8
        return stage_estimate(stage.model, mode, batch, length, self.policy.precision,
                              gradient_checkpointing=self.policy.gradient_checkpointing,
                              optimizer="adamw" if lm else self.cfg.train.optimizer, vocab=vocab, lora_rank=rank)

    def runtime(self, model: Any = None) -> Dict[str, Any]:
        """Where a stage computed: device (and GPU name), compute dtype, attention kernel, peak GPU memory."""
        from w2sg.run.device import describe_runtime

        return describe_runtime(self.policy, model)

    # --- the task and its inputs ----------------------------------------------------------------------------

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

    @property
    def pairwise(self) -> bool:
        """Reward modeling: each example is a pair of texts (see w2sg.ml.models.Classifier)."""
        return bool(self.data.gt) and isinstance(self.data.gt[0][0], tuple)

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
        log.info("%s on %s", stage.label, runtime_line(self.runtime(model)))
        x, _ = extract_features(model, encoded, batch_size=self.eval_batch_size(stage.model),
                                pad_id=tokenizer.pad_token_id, progress=self.cfg.progress, desc=stage.label,
                                policy=self.policy)
        return x

    # --- tracking -------------------------------------------------------------------------------------------

    def stage_run(self, stage: Stage) -> AbstractContextManager:
        """The stage's own run in the tracker (W&B), configured by ``tracker_config``."""
        return self.tracker.stage_run(stage.key, stage.label, stage.role.value, self.tracker_config(stage))

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

    # --- models ---------------------------------------------------------------------------------------------

    def keep(self, key: str, model: Any) -> None:
        """Keep ``model``, the trained model of stage ``key``, in memory in place of any other (the labels stage
        usually follows at once)."""
        self._models = {key: model}

    def kept(self, key: str) -> Optional[Any]:
        """The trained model of stage ``key`` if this process keeps it, else None."""
        return self._models.get(key)

    def forget(self, key: Optional[str] = None) -> None:
        """Drop the kept model of stage ``key`` (None: every kept model)."""
        if key is None:
            self._models.clear()
        else:
            self._models.pop(key, None)

    def model_seed(self, stage: Stage) -> int:
        """The seed of a model's initialisation and data order: the run's, or an ensemble member's own."""
        return int(stage.spec.get("model_seed", self.cfg.seed))

    def build_model(self, stage: Stage, shards: int = 1, stored: Optional[StageDir] = None):
        """A train stage's model, built the one way its training builds it (the stage's seed and head, the
        generatively finetuned backbone it starts from, its LoRA adapters): a head alone (probe), else the
        classifier.

        To train it (``stored`` None): the GPU is freed of kept models first, the memory check is its mode's at its
        micro-batch (``shards``: the ranks FSDP divides weights, gradients and optimizer state over), full
        finetuning's weights are trainable, gradient checkpointing as the policy says. To load it from ``stored``
        (its stage folder; load_trained): the memory check is inference's, the backbone frozen in the compute dtype,
        and the starting backbone and adapters are added only where it stored adapters (otherwise its
        model.safetensors holds every weight: full, probe, and LoRA stored merged)."""
        from w2sg.ml.models import (
            add_lora,
            build_head,
            build_model,
            enable_gradient_checkpointing,
        )

        num_classes, tspec = self.cfg.task.num_classes, stage.spec["train"]
        seed, head_init, mode = self.model_seed(stage), tspec.get("head_init", "default"), tspec["mode"]
        training = stored is None
        if mode == "probe":
            return self.policy.place(build_head(stage.model, num_classes, seed, self.pairwise, head_init))
        if not training:
            self.check_memory(stage, "inference", self.eval_batch_size(stage.model))
        else:
            if self.policy.device != "cpu":
                self.forget()  # free the GPU of the last trained model (the store has it)
            self.check_memory(stage, mode, micro_batch(tspec), shards=shards)
        model = build_model(stage.model, num_classes, seed, self.pairwise, self.policy,
                            trainable=training and mode == "full", head_init=head_init)
        if not training and not stored.file("adapter.safetensors").exists():
            return model
        self.load_init(stage, model)  # the base the adapters are trained on
        if training and self.policy.gradient_checkpointing:
            enable_gradient_checkpointing(model.backbone)
        if mode == "lora":
            lora = tspec["lora"]
            add_lora(model, lora["rank"], lora["alpha"], lora["dropout"], lora["target_modules"])
        return model

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
        """A train stage's trained model: the one kept in memory, else from the store (built as training built it,
        its stored weights loaded, LoRA adapters merged); weights freed by store.keep_weights are recomputed."""
        from w2sg.core.store import WEIGHT_FILES

        if self.kept(stage.key) is None and not any(
                self.store.get(stage.key).file(n).exists() for n in WEIGHT_FILES):
            self.restore_weights(stage)
        if self.kept(stage.key) is not None:
            return self.kept(stage.key)
        from safetensors.torch import load_file

        from w2sg.ml.models import merge_lora

        sd = self.store.get(stage.key)
        model = self.build_model(stage, stored=sd)
        device = "cpu" if self.policy.device_map else self.policy.device
        if not sd.file("adapter.safetensors").exists():
            _load_safetensors(model, str(sd.file("model.safetensors")), device)
            return model
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
                    self.forget(stage.key)
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


def runtime_line(rt: Dict[str, Any]) -> str:
    """A stage's runtime (StageContext.runtime) in a log line."""
    peak = f", peak {rt['peak_gib']:.1f} GiB" if rt.get("peak_gib") is not None else ""
    return f"{rt['device']} ({rt['dtype']}, attention {rt['attention']}{peak})"


def _load_safetensors(model: Any, path: str, device: str) -> None:
    """safetensors' load_model, reading straight onto ``device`` where safetensors can (its ``device`` argument is
    newer than our floor, 0.4.1); without it the weights are read on the CPU and copied into the placed model."""
    import inspect

    from safetensors.torch import load_model

    if "device" in inspect.signature(load_model).parameters:
        load_model(model, path, device=device)
    else:
        load_model(model, path)


def _tensor(arr: Any):
    import torch

    return torch.as_tensor(arr, dtype=torch.float32)
