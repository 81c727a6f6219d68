"""How a model and its batches meet the accelerator: a resolved device/precision ``Policy`` (placement, autocast,
the fp16 gradient scaler), the attention kernel, and the memory estimate checked before a model is loaded.

Which policy a process uses is decided from the config by w2sg.run.device.runtime_policy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Optional

from w2sg.core.errors import W2SGError

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GIB = 1024**3


@dataclass(frozen=True)
class Policy:
    """A resolved device and precision; every stage moves models and batches and casts through one of these."""

    device: str = "cpu"  # cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    device_map: Optional[str] = None  # auto: the model is sharded over the node's GPUs (accelerate)

    @property
    def dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    @property
    def input_device(self) -> str:
        """Where batches go: the device (a sharded model takes its inputs on the first GPU)."""
        return "cuda:0" if self.device_map else self.device

    def load_dtype(self, trainable: bool):
        """Trainable weights stay fp32 (master weights under autocast); frozen ones load in the compute dtype."""
        import torch

        return torch.float32 if trainable else self.dtype

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=self.device, dtype=self.dtype)

    def grad_scaler(self):
        """fp16 needs loss scaling (its range is narrow); bf16 and fp32 do not."""
        if self.precision != "fp16":
            return None
        import torch

        if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3 (also on the CPU)
            return torch.amp.GradScaler(self.device)
        return torch.cuda.amp.GradScaler()

    def to(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        if self.input_device == "cpu":
            return batch
        return {k: v.to(self.input_device, non_blocking=True) for k, v in batch.items()}

    def place(self, model: Any) -> Any:
        """Move a model that is not sharded onto the device."""
        if self.device_map or self.device == "cpu":
            return model
        return model.to(self.device)


CPU = Policy()


def attn_implementation(setting: Optional[str], policy: Policy) -> Optional[str]:
    """The model's attention kernel: auto -> flash-attention 2 when installed (GPU, half precision), else
    transformers' default (SDPA where the architecture has it); any other value is passed on as is."""
    if setting not in (None, "auto"):
        return setting
    import importlib.util

    if policy.device == "cuda" and policy.precision != "fp32" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


# --- memory estimate ------------------------------------------------------------------------------------------

def estimate_memory(params: int, precision: str, mode: str, batch: int, length: int, hidden: int, layers: int,
                    gradient_checkpointing: bool = False, vocab: int = 0) -> Dict[str, int]:
    """Bytes a stage needs on the accelerator, by part: weights, gradients, optimizer state, activations.

    ``mode``: full (fp32 master weights, gradients and two AdamW moments: 16 bytes a parameter), lora (frozen
    weights in the compute dtype; adapters are small), inference (weights in the compute dtype). Activations of
    training: about 34 x hidden bytes per token and layer in half precision (Korthikanti et al. 2022), 2 x hidden
    with gradient checkpointing; ``vocab``: the LM head's fp32 logits (generative finetuning). An estimate, meant
    to fail early and clearly rather than to be exact."""
    if mode not in ("full", "lora", "inference"):
        raise W2SGError(f"memory estimate: unknown mode {mode!r}; valid: full, lora, inference")
    b = BYTES[precision]
    tokens = batch * length
    if mode == "full":
        parts = {"weights": 4 * params, "gradients": 4 * params, "optimizer": 8 * params}
    elif mode == "lora":
        parts = {"weights": b * params, "gradients": params // 100 * 4, "optimizer": params // 100 * 8}
    else:
        parts = {"weights": b * params, "gradients": 0, "optimizer": 0}
    if mode == "inference":
        per_token = 4 * hidden * b  # one layer's activations at a time
    else:
        per_token = layers * hidden * (2 * b if gradient_checkpointing else 17 * b)
    parts["activations"] = tokens * per_token + tokens * vocab * 4
    return parts


def describe(parts: Dict[str, int]) -> str:
    return ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items() if v)


def available_memory(policy: Policy) -> Optional[tuple]:
    """(free bytes, total bytes, what) of the GPU, or of all GPUs when sharded; None on CPU."""
    if policy.device != "cuda":
        return None
    import torch

    gpus = range(torch.cuda.device_count()) if policy.device_map else [torch.cuda.current_device()]
    free = total = 0
    for i in gpus:
        f, t = torch.cuda.mem_get_info(i)
        free, total = free + f, total + t
    name = torch.cuda.get_device_name()
    return free, total, f"{len(gpus)} x {name}" if policy.device_map else name


def check_memory(what: str, parts: Dict[str, int], policy: Policy, hint: str = "") -> None:
    """Before loading: a clear error naming what is needed and what the device has, instead of an OOM later."""
    have = available_memory(policy)
    if have is None:
        return
    need = sum(parts.values())
    free, total, name = have
    if need <= free:
        return
    ways = ["train.mode=lora or train=probe", "train.gradient_checkpointing=true", "a smaller train.minibatch_size",
            "a shorter train.max_length"]
    if not policy.device_map:
        ways.append("train.device_map=auto (shard over every GPU of the node; LoRA and inference)")
    raise W2SGError(f"{what} needs about {need / GIB:.1f} GiB of GPU memory ({describe(parts)} GiB; "
                    f"{policy.precision}{hint}) but {name} has {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB; "
                    f"ways out: {'; '.join(ways)}")
