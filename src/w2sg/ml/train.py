"""The one training loop (weak, ceiling, w2s and chain links all use it) and batched prediction.

Read top to bottom: tokenize once, then epochs of shuffled batches with dynamic padding (split into minibatches
for gradient accumulation), the chosen loss against soft labels, an optimizer (AdamW, Adam or Adafactor) with a
transformers schedule, optional validation on held-out examples keeping the best weights. The same loop trains
a full model, one with LoRA adapters (only trainable parameters are optimised) or a probe head on stored
features (``Features`` batches instead of token ids). Prediction runs under ``torch.inference_mode`` over
length-sorted batches (less padding) and returns class probabilities in the input order.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from w2sg.core import options
from w2sg.core.errors import Preempted, W2SGError  # noqa: F401  (Preempted: raised here)

LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def _pad(rows: List[List[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        input_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[j, : len(r)] = 1
    return input_ids, mask


def _token_ids(tokenizer: Any, texts: List[str], max_length: int) -> Tuple[List[List[int]], List[bool]]:
    """Token ids cut to ``max_length`` on the tokenizer's truncation side, and whether each text was longer: texts
    are read one token past the limit first, and only those that reach it are tokenized again, cut."""
    if not texts:
        return [], []
    ids = tokenizer(texts, truncation=True, max_length=max_length + 1)["input_ids"]
    cut = [len(row) > max_length for row in ids]
    long = [i for i, c in enumerate(cut) if c]
    if long:
        for i, row in zip(long, tokenizer([texts[i] for i in long], truncation=True, max_length=max_length)["input_ids"]):
            ids[i] = row
    return ids, cut


@dataclass
class Encoded:
    """Token ids of each text (unpadded); batches are padded on the fly.

    Pairwise tasks (reward modeling) give a pair of texts per example: ``ids_b`` then holds the second text's
    ids and batches carry both (``input_ids_b``, ``attention_mask_b``). Pairs are truncated on the left, so the
    end of each text (where a chosen and a rejected response differ) survives.
    """

    ids: List[List[int]]
    ids_b: Optional[List[List[int]]] = None
    cut: Optional[List[bool]] = None  # whether each example was longer than max_length (None: not known)

    @classmethod
    def of(cls, tokenizer: Any, texts: Sequence[Any], max_length: int, side: Optional[str] = None) -> "Encoded":
        """Token ids of single texts (cut on ``side``: "left" keeps the end, "right" the start; default the
        tokenizer's own) or of pairs (cut on the left), with which examples were cut."""
        pairs = bool(texts) and isinstance(texts[0], (tuple, list))
        previous = tokenizer.truncation_side
        tokenizer.truncation_side = "left" if pairs else (side or previous)
        try:
            if pairs:
                a, cut_a = _token_ids(tokenizer, [t[0] for t in texts], max_length)
                b, cut_b = _token_ids(tokenizer, [t[1] for t in texts], max_length)
                return cls(ids=a, ids_b=b, cut=[x or y for x, y in zip(cut_a, cut_b)])
            ids, cut = _token_ids(tokenizer, list(texts), max_length)
            return cls(ids=ids, cut=cut)
        finally:
            tokenizer.truncation_side = previous

    def cut_frac(self) -> float:
        """The share of examples longer than max_length (cut or, under truncation=drop, left out of training)."""
        return sum(self.cut) / len(self.cut) if self.cut else 0.0

    def __len__(self) -> int:
        return len(self.ids)

    def length(self, i: int) -> int:
        return len(self.ids[i]) + (len(self.ids_b[i]) if self.ids_b is not None else 0)

    def batch(self, idx: Sequence[int], pad_id: int) -> Dict[str, torch.Tensor]:
        input_ids, mask = _pad([self.ids[i] for i in idx], pad_id)
        out = {"input_ids": input_ids, "attention_mask": mask}
        if self.ids_b is not None:
            out["input_ids_b"], out["attention_mask_b"] = _pad([self.ids_b[i] for i in idx], pad_id)
        return out

    def subset(self, idx: Sequence[int]) -> "Encoded":
        return Encoded([self.ids[i] for i in idx], [self.ids_b[i] for i in idx] if self.ids_b is not None else None,
                       [self.cut[i] for i in idx] if self.cut is not None else None)


@dataclass
class Features:
    """Frozen feature vectors [N, H] (probe mode), and [N, H] of the second text for pairwise tasks."""

    x: torch.Tensor
    x_b: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def length(self, i: int) -> int:
        return 1

    def batch(self, idx: Sequence[int], pad_id: int = 0) -> Dict[str, torch.Tensor]:
        out = {"features": self.x[list(idx)]}
        if self.x_b is not None:
            out["features_b"] = self.x_b[list(idx)]
        return out

    def subset(self, idx: Sequence[int]) -> "Features":
        i = list(idx)
        return Features(self.x[i], self.x_b[i] if self.x_b is not None else None)


GROUP_BATCHES = 16  # batches per length group (epoch_order)


def epoch_order(data: Any, batch_size: int, seed: int, grouped: bool = True) -> List[int]:
    """One epoch's order of examples, ``batch_size`` at a time. ``grouped``: a random permutation is cut into
    groups of GROUP_BATCHES batches, each group sorted by length and cut into batches, and the full batches are
    shuffled (the short last one stays last), so a batch holds texts of similar length (little padding) while
    which examples meet, and the order of batches, stay random. Not grouped: the random permutation itself."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g).tolist()
    if not grouped or isinstance(data, Features):
        return order
    group = batch_size * GROUP_BATCHES
    ranked = [i for start in range(0, len(order), group)
              for i in sorted(order[start:start + group], key=data.length, reverse=True)]
    batches = [ranked[start:start + batch_size] for start in range(0, len(ranked), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    rest = [b for b in batches if len(b) < batch_size]
    return [i for j in torch.randperm(len(full), generator=g).tolist() for i in full[j]] + [i for b in rest for i in b]


@dataclass
class TrainResult:
    history: List[Dict[str, float]] = field(default_factory=list)  # one entry per epoch
    evals: List[Dict[str, float]] = field(default_factory=list)  # one entry per validation
    best: Optional[Dict[str, float]] = None  # the validation entry whose weights were kept (keep_best)
    steps: int = 0
    resumed_from: int = 0  # the step a checkpoint resumed from (0: a fresh start)
    state: Optional[Dict[str, Any]] = None  # several ranks: the full trained weights (rank 0; w2sg.ml.distributed)


class Checkpointer:
    """Periodic and on-signal training checkpoints in one file, written atomically.

    A checkpoint holds what training changes and nothing else: the trainable weights (LoRA: the adapters and the
    head, not the frozen base), the optimizer and schedule, the RNG and the position. It is written at most every
    ``minutes`` of training (and every ``every`` steps when set), so a large model is not saved every few steps.
    The best weights of ``keep_best`` go to a file of their own (``<path>.best``), written when they improve.

    SIGTERM, SIGUSR1 and SIGUSR2 (what Slurm and submitit send before a time limit or preemption) and SIGINT
    (Ctrl-C) only set a flag; the training loop then saves a checkpoint after the current step, hands the signal
    to the handler that was installed before (submitit's, which requeues the job and exits; not Python's own
    Ctrl-C handler), and otherwise raises Preempted. A second Ctrl-C before that stops at once
    (KeyboardInterrupt). A process killed outright (SIGKILL) resumes from its last periodic checkpoint. A
    checkpoint that cannot be read is set aside (the store's damaged/ folder) and training starts afresh.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")

    def __init__(self, path: Optional[str], every: int = 0, minutes: float = 0.0):
        import time

        self.path = path
        self.every = every
        self.minutes = minutes
        self.stop_signal: Optional[int] = None
        self._previous: Dict[int, Any] = {}
        self._last = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether a periodic checkpoint is due after ``step``: every ``every`` steps, or ``minutes`` after the last."""
        import time

        if self.path is None:
            return False
        if self.every and step % self.every == 0:
            return True
        return bool(self.minutes) and time.monotonic() - self._last >= 60 * self.minutes

    def __enter__(self) -> "Checkpointer":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    num = getattr(signal, name)
                    if num == signal.SIGINT and signal.getsignal(num) is signal.SIG_IGN:
                        continue  # started with Ctrl-C ignored (nohup, a background job): it stays ignored
                    self._previous[num] = signal.signal(num, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for num, handler in self._previous.items():
            signal.signal(num, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        import signal

        if signum == signal.SIGINT and self.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without waiting for the step and the checkpoint
        self.stop_signal = signum

    def stop(self, state: Optional[Dict[str, Any]], step: int, stage: str = "") -> None:
        """Save, let the previous handler of the signal act (e.g. requeue), then stop training."""
        import signal

        if state is not None:  # None: saved already (rank 0 of several, w2sg.ml.train.train_model)
            self.save(state)
        signum = self.stop_signal
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            self.__exit__()
            previous(signum, None)
        raise Preempted(signum, step, stage, self.path)

    def load(self, suffix: str = "") -> Optional[Dict[str, Any]]:
        """The saved state (None without one). One that cannot be read (truncated, from a full disk or a killed
        copy) is set aside into the store's damaged/ folder with a warning naming it, and None returned: the
        stage trains from its start."""
        import logging
        import os

        from w2sg.core.store import set_aside

        if self.path is None or not os.path.exists(self.path + suffix):
            return None
        try:
            return torch.load(self.path + suffix, weights_only=False, map_location="cpu")
        except Exception as e:
            moved = set_aside(self.path + suffix)
            logging.getLogger(__name__).warning(
                "checkpoint %s cannot be read (%s: %s); set aside in %s, training starts from the beginning",
                self.path + suffix, type(e).__name__, str(e)[:200], moved)
            return None

    def save(self, state: Dict[str, Any], suffix: str = "") -> None:
        """Write ``state`` atomically (a temporary file renamed into place; removed when the write fails). A write
        that runs out of disk space is an error saying so (w2sg.core.store.disk_full)."""
        import os
        import time

        from w2sg.core.store import disk_full

        if self.path is None:
            return
        target = self.path + suffix
        tmp = f"{target}.tmp{os.getpid()}"
        try:
            torch.save(state, tmp)
            os.replace(tmp, target)
        except BaseException as e:
            full = disk_full(e, os.path.dirname(target), _state_bytes(state)) if isinstance(e, Exception) else None
            if os.path.exists(tmp):
                os.remove(tmp)
            if full is not None:
                raise full from None
            raise
        if not suffix:
            self._last = time.monotonic()

    def save_best(self, step: int, weights: Dict[str, torch.Tensor]) -> None:
        self.save({"step": step, "weights": weights}, ".best")

    def load_best(self, step: int) -> Optional[Dict[str, torch.Tensor]]:
        """The best weights saved at ``step`` (the checkpoint's record of its best), else None."""
        saved = self.load(".best")
        return saved["weights"] if saved is not None and saved["step"] == step else None


def _state_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint state: about what torch.save writes."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def trainable_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict less the frozen parameters (LoRA's base): what training changes (buffers included)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def load_trainable_state(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load a :func:`trainable_state`; every trainable parameter must be in it."""
    missing = set(model.load_state_dict(state, strict=False).missing_keys)
    lacking = sorted(name for name, p in model.named_parameters() if p.requires_grad and name in missing)
    if lacking:
        raise W2SGError(f"a checkpoint lacks trainable weights of this model (e.g. {lacking[0]}): it belongs to "
                        "another setting; delete it (the stage's partial/ folder in the store) to start afresh")


SCHEDULES = {"cosine": "cosine", "constant": "constant_with_warmup", "linear": "linear"}


def _adafactor(params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False)


def _fused(params: List[torch.Tensor]) -> Dict[str, bool]:
    """torch's fused Adam kernels when every parameter is on a GPU (one kernel for the whole step); the CPU keeps
    the default implementation."""
    return {"fused": True} if params and all(p.is_cuda for p in params) else {}


OPTIMIZERS: Dict[str, Callable[[Any, float, float], torch.optim.Optimizer]] = {
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd, **_fused(params)),
    "adam": lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd, **_fused(params)),
    "adafactor": _adafactor,
}
# keep_best metric -> True when larger is better
BEST_METRICS = {"acc": True, "auroc": True, "loss": False}  # higher is better?
assert tuple(SCHEDULES) == options.SCHEDULES and tuple(OPTIMIZERS) == options.OPTIMIZERS
assert tuple(BEST_METRICS) == options.BEST_METRICS


@dataclass
class Validation:
    """Held-out examples checked during training, and whether to keep the best weights by one metric."""

    data: Any  # Encoded or Features
    labels: np.ndarray  # [N, C] soft labels they are judged against (weak labels, or ground truth)
    every: int = 0  # optimizer steps between checks (0: at the end of each epoch)
    keep_best: Optional[str] = None  # a key of BEST_METRICS

    def evaluate(self, model: torch.nn.Module, pad_id: int, batch_size: int, policy: Any = None) -> Dict[str, float]:
        from w2sg.ml.metrics import accuracy, auroc

        probs = predict(model, self.data, batch_size=batch_size, pad_id=pad_id, progress=False, policy=policy)
        hard = self.labels.argmax(-1).tolist()
        loss = float(-(self.labels * np.log(np.clip(probs, 1e-12, 1.0))).sum(-1).mean())
        au = auroc(probs, hard)
        return {"acc": accuracy(probs, hard), "auroc": au if au is not None else float("nan"), "loss": loss}




def _optimizer(model: torch.nn.Module, optimizer: str, schedule: str, lr: float, weight_decay: float,
               warmup_frac: float, total: int) -> Tuple[torch.optim.Optimizer, Any]:
    """The optimizer over the trainable parameters and its schedule over ``total`` steps (names checked)."""
    from transformers import get_scheduler

    if schedule not in SCHEDULES:
        raise W2SGError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if optimizer not in OPTIMIZERS:
        raise W2SGError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    opt = OPTIMIZERS[optimizer]([p for p in model.parameters() if p.requires_grad], lr, weight_decay)
    sched = get_scheduler(SCHEDULES[schedule], opt, num_warmup_steps=int(warmup_frac * total), num_training_steps=total)
    return opt, sched


def _validate(model: torch.nn.Module, validation: Validation, result: TrainResult, pad_id: int, batch_size: int,
              policy: Any, log: Callable[[Dict[str, float]], None],
              state_fn: Optional[Callable[[], Dict[str, torch.Tensor]]] = None) -> Optional[Dict[str, torch.Tensor]]:
    """One validation, recorded in ``result`` and logged; the weights to keep when ``keep_best`` finds it the best
    so far (``result.best`` updated), else None. ``state_fn``: how the weights are read (a sharded model's are
    gathered); default the trainable state copied to the CPU."""
    entry = {"step": result.steps, **validation.evaluate(model, pad_id, batch_size, policy)}
    model.train()
    result.evals.append(entry)
    log({f"val/{k}": v for k, v in entry.items()})
    metric = validation.keep_best
    if metric is None:
        return None
    value, sign = entry[metric], 1 if BEST_METRICS[metric] else -1
    if result.best is not None and sign * value <= sign * result.best[metric]:
        return None
    result.best = entry
    if state_fn is not None:
        return state_fn()
    return {k: v.detach().to("cpu", copy=True) for k, v in trainable_state(model).items()}


def train_model(
    model: torch.nn.Module,
    data: Any,
    labels: np.ndarray,
    loss_fn: LossFn,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    seed: int,
    minibatch_size: Optional[int] = None,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    warmup_frac: float = 0.0,
    schedule: str = "cosine",
    batch_order: str = "grouped",
    max_grad_norm: Optional[float] = None,
    validation: Optional[Validation] = None,
    eval_batch_size: int = 64,
    progress: bool = True,
    desc: str = "train",
    checkpointer: Optional[Checkpointer] = None,
    on_log: Optional[Callable[[Dict[str, float]], None]] = None,
    policy: Any = None,
    strategy: str = "single",
) -> TrainResult:
    """Fit ``model`` to soft ``labels`` [N, C]. Raises W2SGError on a non-finite loss.

    ``data`` is Encoded (token ids) or Features (probe mode); only parameters with ``requires_grad`` train.
    Each optimizer step sees ``batch_size`` examples, in forward passes of ``minibatch_size`` (gradient
    accumulation). Each epoch's order comes from (seed, epoch), so a run resumed from a checkpoint (model,
    optimiser, schedule, RNG state, position, best weights so far) continues exactly as the uninterrupted run.
    ``policy`` (w2sg.run.device): where batches go and the autocast precision, with a gradient scaler for fp16.
    ``batch_order``: "grouped" (batches of similar lengths, :func:`epoch_order`) or "random".
    ``max_grad_norm``: the gradient's norm is clipped to it before each optimizer step (None or 0: not clipped).
    ``strategy``: ddp or fsdp in an initialised process group of several ranks (w2sg.ml.distributed): each rank
    trains its slice of every global batch, the same global batches as one process; logged numbers are summed over
    ranks, rank 0 alone writes checkpoints, and ``result.state`` holds the full trained weights (on rank 0).
    """
    from w2sg.ml import distributed as dist_
    from w2sg.ml.device import CPU

    policy = policy or CPU
    scaler = policy.grad_scaler()
    ckpt = checkpointer or Checkpointer(None)
    w = dist_.world() if strategy in ("ddp", "fsdp") else dist_.World()
    if w.distributed:
        model = dist_.wrap(model, strategy, policy)
    base = dist_.inner(model)  # evaluation and states: DDP's inner module (FSDP2 shards the model in place)
    n = len(data)
    mb = minibatch_size or batch_size
    steps_per_epoch = math.ceil(n / batch_size)
    total = steps_per_epoch * epochs
    opt, sched = _optimizer(model, optimizer, schedule, lr, weight_decay, warmup_frac, total)
    y = torch.as_tensor(labels, dtype=torch.float32).to(policy.input_device)
    result = TrainResult()
    sums = {"loss": 0.0, "correct": 0}
    best_state: Optional[Dict[str, torch.Tensor]] = None
    state = ckpt.load()
    if state is not None:
        if w.distributed:
            dist_.load_state(model, state["model"], opt, state["optimizer"])
        else:
            load_trainable_state(model, state["model"])
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        result.history, result.steps, sums = state["history"], state["step"], state["sums"]
        result.evals, result.best = state.get("evals", []), state.get("best")
        if result.best is not None:
            best_state = ckpt.load_best(result.best["step"])
        result.resumed_from = result.steps

    def snapshot() -> Dict[str, Any]:  # collective in a process group (every rank calls it)
        if w.distributed:
            weights, opt_state = dist_.gather_state(model), dist_.optimizer_state(model, opt)
        else:
            weights, opt_state = trainable_state(model), opt.state_dict()
        return {"model": weights, "optimizer": opt_state, "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state(), "history": result.history, "step": result.steps, "sums": sums,
                "evals": result.evals, "best": result.best,
                "cuda_rng": torch.cuda.get_rng_state_all() if policy.device == "cuda" else None,
                "scaler": scaler.state_dict() if scaler is not None else None}

    def log(entry: Dict[str, float]) -> None:
        if on_log is not None:
            on_log(entry)

    def save(snap: Dict[str, Any], suffix: str = "") -> None:
        if w.rank == 0:
            ckpt.save(snap, suffix)
        dist_.barrier()

    def validate() -> None:  # every rank validates the same examples with the same weights: the same numbers
        nonlocal best_state
        better = _validate(model if dist_.sharded(model) else base, validation, result, pad_id, eval_batch_size,
                           policy, log, (lambda: dist_.gather_state(model)) if w.distributed else None)
        if better is not None:
            best_state = better
            save({"step": result.steps, "weights": better}, ".best")

    trainable = [p for p in model.parameters() if p.requires_grad]

    model.train()
    order: Optional[List[int]] = None
    bar = tqdm(total=total, initial=result.steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    while result.steps < total:
        epoch, pos = divmod(result.steps, steps_per_epoch)
        if pos == 0 or order is None:  # each epoch's order from (seed, epoch): a resumed run continues it exactly
            order = epoch_order(data, batch_size, seed * 100_003 + epoch, grouped=batch_order == "grouped")
        idx = order[pos * batch_size : (pos + 1) * batch_size]
        opt.zero_grad(set_to_none=True)
        step_loss, step_correct = 0.0, 0
        if w.distributed:  # this rank's slice, in as many forward passes as every other rank's
            parts = dist_.microbatches(dist_.shard(idx, w.rank, w.size), len(idx), w.size, mb)
        else:
            parts = [idx[start : start + mb] for start in range(0, len(idx), mb)]
        for k, part in enumerate(parts):
            empty = not part  # a short global batch: this rank still joins the gradient reduction, with weight 0
            rows = idx[:1] if empty else part
            last = k == len(parts) - 1
            sync = model.no_sync() if strategy == "ddp" and w.distributed and not last else nullcontext()
            if strategy == "fsdp" and w.distributed:
                model.set_requires_gradient_sync(last)
            with sync:
                with policy.autocast():
                    logits = model(**policy.to(data.batch(rows, pad_id)))
                logits = logits.float()  # the loss in fp32 whatever the compute precision
                loss = loss_fn(logits, y[rows], result.steps / total)
                if not w.distributed and not torch.isfinite(loss):
                    raise W2SGError(
                        f"{desc}: loss became {loss.item()} at step {result.steps} (epoch {epoch}); "
                        f"try a lower learning rate (now {lr:g}) or check the labels"
                    )
                if w.distributed:
                    term = loss * (0.0 if empty else dist_.loss_weight(len(part), len(idx), w.size))
                else:
                    term = loss * (len(part) / len(idx)) if len(part) < len(idx) else loss
                (scaler.scale(term) if scaler is not None else term).backward()
            if not empty:
                step_loss += loss.item() * len(part)
                step_correct += int((logits.argmax(-1) == y[part].argmax(-1)).sum())
        stop = due = False
        if w.distributed:  # the step's numbers, and whether any rank was signalled or rank 0's checkpoint is due
            due = w.rank == 0 and result.steps + 1 < total and ckpt.due(result.steps + 1)
            step_loss, step_correct, stopping, due_0 = dist_.all_sum(
                [step_loss, step_correct, float(ckpt.stop_signal is not None), float(due)], policy.device)
            step_correct, stop, due = int(round(step_correct)), stopping > 0, due_0 > 0
            if not math.isfinite(step_loss):
                raise W2SGError(f"{desc}: loss became {step_loss} at step {result.steps} (epoch {epoch}); "
                                f"try a lower learning rate (now {lr:g}) or check the labels")
        sums["correct"] += step_correct
        if max_grad_norm:
            if scaler is not None:
                scaler.unscale_(opt)  # clip the true gradient, not the scaled one
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        if scaler is not None:  # fp16: unscale, skip the step on overflow, adapt the scale
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        result.steps += 1
        sums["loss"] += step_loss
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss / len(idx):.3f}")
        epoch_end = result.steps % steps_per_epoch == 0
        if epoch_end:
            entry = {"epoch": epoch + 1, "loss": sums["loss"] / n, "train_acc": sums["correct"] / n,
                     "lr": sched.get_last_lr()[0]}
            result.history.append(entry)
            sums = {"loss": 0.0, "correct": 0}
            log({f"train/{k}": v for k, v in entry.items()})
        if validation is not None and (result.steps % validation.every == 0 if validation.every else epoch_end):
            validate()
        if not w.distributed:
            if ckpt.stop_signal is not None:
                bar.close()
                ckpt.stop(snapshot(), result.steps, desc)
            if result.steps < total and ckpt.due(result.steps):
                ckpt.save(snapshot())
        elif stop:  # some rank was signalled: rank 0 saves the gathered state, then every rank stops
            bar.close()
            save(snapshot())
            if w.rank == 0 and ckpt.stop_signal is not None:
                ckpt.stop(None, result.steps, desc)  # saved above: the previous handler (requeue), or Preempted
            raise Preempted(ckpt.stop_signal, result.steps, desc, ckpt.path)
        elif due:
            save(snapshot())
    bar.close()
    if w.distributed:  # the full weights on rank 0 (the kept best ones when keep_best found them)
        result.state = best_state if best_state is not None else dist_.gather_state(model)
        if w.rank == 0:
            bad = [k for k, v in result.state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:
                raise W2SGError(f"{desc}: weights became NaN or infinite during training ({len(bad)} tensors, e.g. "
                                f"{bad[0]}); try a lower learning rate (now {lr:g})")
        base.eval()
        return result
    if best_state is not None:
        load_trainable_state(model, best_state)
    check_finite_weights(model, desc, lr)
    model.eval()
    return result


def fit_probe(
    model: torch.nn.Module,
    data: Features,
    labels: np.ndarray,
    loss_fn: LossFn,
    *,
    epochs: int,
    lr: float,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    warmup_frac: float = 0.0,
    schedule: str = "cosine",
    validation: Optional[Validation] = None,
    eval_batch_size: int = 64,
    desc: str = "probe",
    on_log: Optional[Callable[[Dict[str, float]], None]] = None,
    policy: Any = None,
) -> TrainResult:
    """Fit a probe head on stored features as what it is: a small model on a fixed matrix, so every one of the
    ``epochs`` steps is one full-batch step (the loss over every example, then one optimizer step, on the chosen
    schedule). No minibatch order, no checkpoints and no progress bar: a head on thousands of examples fits in a
    fraction of a second. Validation (``validation.every`` steps apart, else every step) and ``keep_best`` work as
    in :func:`train_model`. Raises W2SGError on a non-finite loss."""
    from w2sg.ml.device import CPU

    policy = policy or CPU
    opt, sched = _optimizer(model, optimizer, schedule, lr, weight_decay, warmup_frac, epochs)
    batch = policy.to(data.batch(range(len(data))))
    y = torch.as_tensor(labels, dtype=torch.float32).to(policy.input_device)
    target = y.argmax(-1)
    log = on_log or (lambda entry: None)
    result = TrainResult()
    best_state: Optional[Dict[str, torch.Tensor]] = None
    model.train()
    threads = torch.get_num_threads()
    if policy.device == "cpu":  # ops this small run slower split over threads (and much slower on a busy machine)
        torch.set_num_threads(1)
    try:
        for step in range(epochs):
            opt.zero_grad(set_to_none=True)
            with policy.autocast():
                logits = model(**batch)
            logits = logits.float()
            loss = loss_fn(logits, y, step / epochs)
            if not torch.isfinite(loss):
                raise W2SGError(f"{desc}: loss became {loss.item()} at step {step}; try a lower learning rate "
                                f"(now {lr:g}) or check the labels")
            loss.backward()
            opt.step()
            sched.step()
            result.steps = step + 1
            acc = float((logits.argmax(-1) == target).float().mean())
            entry = {"epoch": step + 1, "loss": loss.item(), "train_acc": acc, "lr": sched.get_last_lr()[0]}
            result.history.append(entry)
            log({f"train/{k}": v for k, v in entry.items()})
            if validation is not None and (result.steps % validation.every == 0 if validation.every else True):
                best_state = _validate(model, validation, result, 0, eval_batch_size, policy, log) or best_state
    finally:
        torch.set_num_threads(threads)
    if best_state is not None:
        model.load_state_dict(best_state)
    check_finite_weights(model, desc, lr)
    model.eval()
    return result


def check_finite_weights(model: torch.nn.Module, desc: str, lr: float) -> None:
    """The last optimizer step can turn weights NaN after the last finite loss: catch that before predicting."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise W2SGError(f"{desc}: weights became NaN or infinite during training ({len(bad)} tensors, e.g. "
                        f"{bad[0]}); try a lower learning rate (now {lr:g})")


def _map_batches(fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor], data: Any, batch_size: int, pad_id: int,
                 progress: bool, desc: str, policy: Any = None) -> List[np.ndarray]:
    """Apply ``fn`` to length-sorted batches under inference_mode on the policy's device and precision; one
    output row (a CPU float32 array) per example, in input order."""
    from w2sg.ml.device import CPU

    policy = policy or CPU
    order = sorted(range(len(data)), key=data.length)
    out: List[Optional[np.ndarray]] = [None] * len(order)
    with torch.inference_mode(), policy.autocast():
        for start in tqdm(
            range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False, dynamic_ncols=True
        ):
            idx = order[start : start + batch_size]
            rows = fn(policy.to(data.batch(idx, pad_id))).float().cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = rows[j]
    return out


def predict(
    model: torch.nn.Module, data: Any, *, batch_size: int, pad_id: int, progress: bool = True, desc: str = "predict",
    policy: Any = None,
) -> np.ndarray:
    """Class probabilities [N, C] in input order, under inference_mode, batches sorted by length."""
    model.eval()
    out = _map_batches(lambda b: torch.softmax(model(**b).float(), dim=-1), data, batch_size, pad_id, progress, desc,
                       policy)
    probs = np.stack(out) if out else np.zeros((0, 2), dtype=np.float32)
    bad = int((~np.isfinite(probs).all(-1)).sum())
    if bad:
        raise W2SGError(f"{desc}: the model predicts NaN or infinite probabilities for {bad} of {len(probs)} "
                        "examples; its weights diverged: try a lower learning rate (train.lr)")
    return probs


def extract_features(
    model: Any, data: Encoded, *, batch_size: int, pad_id: int, progress: bool = True, desc: str = "features",
    policy: Any = None,
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Pooled features [N, H] of each text (and of each pair's second text) from a frozen Classifier."""
    model.eval()
    x = _map_batches(lambda b: model.features(b["input_ids"], b["attention_mask"]), data, batch_size, pad_id,
                     progress, desc, policy)
    x_b = None
    if data.ids_b is not None:
        x_b = np.stack(_map_batches(lambda b: model.features(b["input_ids_b"], b["attention_mask_b"]), data,
                                    batch_size, pad_id, progress, desc, policy))
    return np.stack(x), x_b
