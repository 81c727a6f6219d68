"""The one training loop (weak, ceiling, w2s and chain links all use it) and batched prediction.

Read top to bottom: tokenize once, then epochs of shuffled minibatches with dynamic padding, the chosen
loss against soft labels, AdamW with a transformers schedule. Prediction runs under ``torch.inference_mode``
over length-sorted batches (less padding) and returns class probabilities in the input order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from w2sg.errors import W2SGError
from w2sg.models import Classifier

LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass
class Encoded:
    """Token ids of each text (unpadded); batches are padded on the fly."""

    ids: List[List[int]]

    @classmethod
    def of(cls, tokenizer: Any, texts: Sequence[str], max_length: int) -> "Encoded":
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        return cls(ids=enc["input_ids"])

    def batch(self, idx: Sequence[int], pad_id: int) -> Dict[str, torch.Tensor]:
        rows = [self.ids[i] for i in idx]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


@dataclass
class TrainResult:
    history: List[Dict[str, float]] = field(default_factory=list)  # one entry per epoch
    steps: int = 0
    resumed_from: int = 0  # the step a checkpoint resumed from (0: a fresh start)


class Preempted(Exception):
    """Raised after a checkpoint was saved because SIGTERM/SIGUSR1 asked the process to stop."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} at step {step}; checkpoint saved")
        self.signum = signum
        self.step = step


class Checkpointer:
    """Periodic and on-signal training checkpoints in one file, written atomically.

    SIGTERM, SIGUSR1 and SIGUSR2 (what Slurm and submitit send before a time limit or preemption) only set a
    flag; the training loop then saves a checkpoint after the current step, hands the signal to the handler that
    was installed before (submitit's, which requeues the job and exits), and otherwise raises Preempted. A
    process killed outright (SIGKILL) resumes from its last periodic checkpoint.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")

    def __init__(self, path: Optional[str], every: int = 0):
        self.path = path
        self.every = every
        self.stop_signal: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "Checkpointer":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    num = getattr(signal, name)
                    self._previous[num] = signal.signal(num, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for num, handler in self._previous.items():
            signal.signal(num, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_signal = signum

    def stop(self, state: Dict[str, Any], step: int) -> None:
        """Save, let the previous handler of the signal act (e.g. requeue), then stop training."""
        self.save(state)
        signum = self.stop_signal
        previous = self._previous.get(signum)
        if callable(previous):
            self.__exit__()
            previous(signum, None)
        raise Preempted(signum, step)

    def load(self) -> Optional[Dict[str, Any]]:
        import os

        if self.path is None or not os.path.exists(self.path):
            return None
        return torch.load(self.path, weights_only=False)

    def save(self, state: Dict[str, Any]) -> None:
        import os

        if self.path is None:
            return
        tmp = f"{self.path}.tmp{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, self.path)


SCHEDULES = {"cosine": "cosine", "constant": "constant_with_warmup", "linear": "linear"}


def train_model(
    model: Classifier,
    data: Encoded,
    labels: np.ndarray,
    loss_fn: LossFn,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    seed: int,
    weight_decay: float = 0.0,
    warmup_frac: float = 0.0,
    schedule: str = "cosine",
    progress: bool = True,
    desc: str = "train",
    checkpointer: Optional[Checkpointer] = None,
    on_epoch: Optional[Callable[[int, Dict[str, float]], None]] = None,
) -> TrainResult:
    """Fit ``model`` to soft ``labels`` [N, C]. Raises W2SGError on a non-finite loss.

    Each epoch's order comes from (seed, epoch), so a run resumed from a checkpoint (model, optimiser,
    schedule, RNG state, position) continues exactly as the uninterrupted run would have.
    """
    from transformers import get_scheduler

    if schedule not in SCHEDULES:
        raise W2SGError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    ckpt = checkpointer or Checkpointer(None)
    n = len(data.ids)
    steps_per_epoch = math.ceil(n / batch_size)
    total = steps_per_epoch * epochs
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = get_scheduler(SCHEDULES[schedule], opt, num_warmup_steps=int(warmup_frac * total), num_training_steps=total)
    y = torch.as_tensor(labels, dtype=torch.float32)
    result = TrainResult()
    sums = {"loss": 0.0, "correct": 0}
    state = ckpt.load()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        result.history, result.steps, sums = state["history"], state["step"], state["sums"]
        result.resumed_from = result.steps

    def snapshot() -> Dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state(), "history": result.history, "step": result.steps, "sums": sums}

    model.train()
    bar = tqdm(total=total, initial=result.steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    while result.steps < total:
        epoch, pos = divmod(result.steps, steps_per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        idx = order[pos * batch_size : (pos + 1) * batch_size]
        logits = model(**data.batch(idx, pad_id))
        loss = loss_fn(logits, y[idx], result.steps / total)
        if not torch.isfinite(loss):
            raise W2SGError(
                f"{desc}: loss became {loss.item()} at step {result.steps} (epoch {epoch}); "
                f"try a lower learning rate (now {lr:g}) or check the labels"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        result.steps += 1
        sums["loss"] += loss.item() * len(idx)
        sums["correct"] += int((logits.argmax(-1) == y[idx].argmax(-1)).sum())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if result.steps % steps_per_epoch == 0:
            entry = {"epoch": epoch + 1, "loss": sums["loss"] / n, "train_acc": sums["correct"] / n,
                     "lr": sched.get_last_lr()[0]}
            result.history.append(entry)
            sums = {"loss": 0.0, "correct": 0}
            if on_epoch is not None:
                on_epoch(epoch, entry)
        if ckpt.stop_signal is not None:
            bar.close()
            ckpt.stop(snapshot(), result.steps)
        if ckpt.every and result.steps % ckpt.every == 0 and result.steps < total:
            ckpt.save(snapshot())
    bar.close()
    model.eval()
    return result


def predict(
    model: Classifier, data: Encoded, *, batch_size: int, pad_id: int, progress: bool = True, desc: str = "predict"
) -> np.ndarray:
    """Class probabilities [N, C] in input order, under inference_mode, batches sorted by length."""
    model.eval()
    order = sorted(range(len(data.ids)), key=lambda i: len(data.ids[i]))
    out: List[Optional[np.ndarray]] = [None] * len(order)
    with torch.inference_mode():
        for start in tqdm(
            range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False, dynamic_ncols=True
        ):
            idx = order[start : start + batch_size]
            probs = torch.softmax(model(**data.batch(idx, pad_id)).float(), dim=-1).numpy()
            for j, i in enumerate(idx):
                out[i] = probs[j]
    return np.stack(out) if out else np.zeros((0, 2), dtype=np.float32)
