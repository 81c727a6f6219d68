"""The valid values of every option with a fixed set of choices, and the checks that name them (no torch).

The training loop (w2sg.ml.train), the device policy (w2sg.run.device) and generative finetuning map these names to
their implementations; the config is checked against them once, at the entry (w2sg.app.config.validate).
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
STRATEGIES = ("auto", "single", "ddp", "fsdp")  # train.strategy (w2sg.ml.distributed)
# train.truncation: how a text longer than train.max_length is cut (w2sg.core.options.truncation_side)
TRUNCATIONS = ("auto", "left", "right", "drop")
HEAD_INITS = ("default", "zero")  # train.head_init: torch's nn.Linear initialisation, or zeros (openai/weak-to-strong)
DEFAULT_LORA_LR = 5e-4  # train=lora for a model without its own lora_lr
# LoRA target modules per model family (transformers' config.model_type): every linear projection of attention and
# MLP, as openai/weak-to-strong and EleutherAI/w2s adapt them. A model's lora_targets or train.lora.target_modules
# override them. LORA_TARGETS_VERSION enters the key of a LoRA stage whose targets come from this table by family
# at run time (a model with neither lora_targets nor arch), so a change of the table cannot reuse its results.
LORA_TARGETS = {
    "bert": ["query", "key", "value", "dense"], "roberta": ["query", "key", "value", "dense"],
    "electra": ["query", "key", "value", "dense"], "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
}
LORA_TARGETS_VERSION = 2  # 1: the attention's query and value only
GENERATIVE_OBJECTIVES = ("auto", "mlm", "clm")  # generative.objective
GENERATIVE_SIDES = ("weak", "strong")  # generative.sides


def one_of(key: str, value: object, valid: Sequence[object]) -> None:
    if value not in valid:
        raise W2SGError(f"unknown {key} {value!r}; valid: {', '.join(map(str, valid))}")


def truncation_side(truncation: str, pooling: str) -> str:
    """Which end of a single text survives a cut: ``left`` keeps the end (cut on the left), ``right`` the start.

    auto: the end for last-token pooling (a decoder reads the last token, where boolq's question, a multiple-choice
    answer or a dialogue's last turn sit), the start otherwise (mean or [CLS] pooling, as before this option);
    drop: over-long training examples are left out, and the texts that are still read (labels, tests) keep their
    end. Pairs (reward modeling) are always cut on the left: their texts differ at the end."""
    one_of("train.truncation", truncation, TRUNCATIONS)
    if truncation in ("left", "right"):
        return truncation
    return "left" if truncation == "drop" or pooling == "last" else "right"


def check_train_settings(mode: str, optimizer: str, schedule: str, keep_best: Optional[str], val_frac: float,
                         val_labels: str, batch_size: int, minibatch_size: Optional[int],
                         batch_order: str = "grouped", truncation: str = "auto", head_init: str = "default") -> None:
    """Errors naming the bad value and the valid ones, before anything is loaded."""
    for key, value, valid in (("train.mode", mode, MODES), ("train.optimizer", optimizer, OPTIMIZERS),
                              ("train.schedule", schedule, SCHEDULES), ("train.val_labels", val_labels, VAL_LABELS),
                              ("train.batch_order", batch_order, BATCH_ORDERS),
                              ("train.truncation", truncation, TRUNCATIONS), ("train.head_init", head_init, HEAD_INITS)):
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


def check_parallel_settings(strategy: str, processes: Optional[int], mode: str = "full",
                            device_map: Optional[str] = None) -> None:
    """train.strategy / processes: errors naming the bad value and the valid ones."""
    one_of("train.strategy", strategy, STRATEGIES)
    if processes is not None and (isinstance(processes, bool) or not isinstance(processes, int) or processes < 1):
        raise W2SGError(f"train.processes must be a whole number >= 1 or null (the job's GPUs), got {processes!r}")
    if strategy == "single" and processes is not None and processes > 1:
        raise W2SGError(f"train.strategy=single trains in one process, but train.processes={processes}; use "
                        "train.strategy=auto, ddp or fsdp, or train.processes=1")
    if strategy in ("ddp", "fsdp") and mode != "full":
        raise W2SGError(f"train.strategy={strategy} trains every weight over several processes (train=full); "
                        f"train.mode={mode} trains in one process: use train.strategy=auto or single")
    if strategy in ("ddp", "fsdp") and device_map is not None:
        raise W2SGError(f"train.strategy={strategy} and train.device_map={device_map} both spread a model over GPUs; "
                        "choose one (train.device_map=null)")
