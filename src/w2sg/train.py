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
    on_epoch: Optional[Callable[[int, Dict[str, float]], None]] = None,
) -> TrainResult:
    """Fit ``model`` to soft ``labels`` [N, C]. Raises W2SGError on a non-finite loss."""
    from transformers import get_scheduler

    if schedule not in SCHEDULES:
        raise W2SGError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    n = len(data.ids)
    steps_per_epoch = math.ceil(n / batch_size)
    total = steps_per_epoch * epochs
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = get_scheduler(SCHEDULES[schedule], opt, num_warmup_steps=int(warmup_frac * total), num_training_steps=total)
    y = torch.as_tensor(labels, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    result = TrainResult()
    model.train()
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen).tolist()
        loss_sum, correct = 0.0, 0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
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
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(-1) == y[idx].argmax(-1)).sum())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        entry = {"epoch": epoch + 1, "loss": loss_sum / n, "train_acc": correct / n, "lr": sched.get_last_lr()[0]}
        result.history.append(entry)
        if on_epoch is not None:
            on_epoch(epoch, entry)
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
