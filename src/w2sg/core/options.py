"""The valid values of every option with a fixed set of choices, and the checks that name them (no torch).

The training loop (w2sg.ml.train), the device policy (w2sg.run.device) and generative finetuning map these names to
their implementations; the config is checked against them once, at the entry (w2sg.app.cli.validate).
"""

from __future__ import annotations

from typing import Optional, Sequence

from w2sg.core.errors import W2SGError

MODES = ("full", "probe", "lora")  # train.mode
OPTIMIZERS = ("adamw", "adam", "adafactor")  # train.optimizer
SCHEDULES = ("cosine", "constant", "linear")  # train.schedule (with train.warmup_frac of linear warm-up)
VAL_LABELS = ("weak", "ground_truth")  # train.val_labels
BEST_METRICS = ("acc", "auroc", "loss")  # train.keep_best
BATCH_ORDERS = ("grouped", "random")  # train.batch_order: batches of similar lengths, or a plain random order
DEVICES = ("auto", "cpu", "cuda")  # train.device
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # train.precision
DEVICE_MAPS = (None, "auto")  # train.device_map
GENERATIVE_OBJECTIVES = ("auto", "mlm", "clm")  # generative.objective
GENERATIVE_SIDES = ("weak", "strong")  # generative.sides


def one_of(key: str, value: object, valid: Sequence[object]) -> None:
    if value not in valid:
        raise W2SGError(f"unknown {key} {value!r}; valid: {', '.join(map(str, valid))}")


def check_train_settings(mode: str, optimizer: str, schedule: str, keep_best: Optional[str], val_frac: float,
                         val_labels: str, batch_size: int, minibatch_size: Optional[int],
                         batch_order: str = "grouped") -> None:
    """Errors naming the bad value and the valid ones, before anything is loaded."""
    for key, value, valid in (("train.mode", mode, MODES), ("train.optimizer", optimizer, OPTIMIZERS),
                              ("train.schedule", schedule, SCHEDULES), ("train.val_labels", val_labels, VAL_LABELS),
                              ("train.batch_order", batch_order, BATCH_ORDERS)):
        one_of(key, value, valid)
    if keep_best is not None and keep_best not in BEST_METRICS:
        raise W2SGError(f"unknown train.keep_best {keep_best!r}; valid: {', '.join(BEST_METRICS)} (or null)")
    if keep_best is not None and not 0 < val_frac < 1:
        raise W2SGError(f"train.keep_best={keep_best} needs a validation set: set 0 < train.val_frac < 1 "
                        f"(now {val_frac})")
    if not 0 <= val_frac < 1:
        raise W2SGError(f"train.val_frac must be in [0, 1), got {val_frac}")
    if minibatch_size is not None and (minibatch_size < 1 or batch_size % minibatch_size):
        raise W2SGError(f"train.minibatch_size={minibatch_size} must divide train.batch_size={batch_size}")


def check_device_settings(device: str, precision: str, device_map: Optional[str] = None, mode: str = "full") -> None:
    """train.device / precision / device_map: errors naming the bad value and the valid ones."""
    one_of("train.device", device, DEVICES)
    one_of("train.precision", precision, PRECISIONS)
    if device_map not in DEVICE_MAPS:
        raise W2SGError(f"unknown train.device_map {device_map!r}; valid: null (one device), auto (all GPUs)")
    if device_map is not None and device == "cpu":
        raise W2SGError("train.device_map=auto shards a model over GPUs; it needs train.device=auto or cuda")
    if device_map is not None and mode == "full":
        raise W2SGError("train.device_map=auto (a model sharded over GPUs) trains LoRA adapters or probes, not "
                        "every weight: use train=lora or train=probe, or train.device_map=null")
