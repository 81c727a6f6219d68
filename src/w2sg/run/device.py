"""Where and in which precision every stage computes: one policy for training, labels, features and LM stages.

``train.device``: ``auto`` (the job's GPU when torch sees one, else the CPU) | ``cpu`` | ``cuda``.
``train.precision``: ``auto`` (bf16 on GPUs that have it, fp16 with a gradient scaler on older GPUs, fp32 on
CPU) | ``fp32`` | ``bf16`` | ``fp16``. Mixed precision is torch autocast: trainable weights stay fp32 (master
weights), frozen weights (inference, features, the base of LoRA) are loaded directly in the compute dtype.
``train.device_map``: ``null`` (one device) | ``auto`` (accelerate shards the model over every GPU of the node;
inference and LoRA only). TF32 matmuls are enabled on Ampere and newer GPUs.

The device never enters a stage key (a stage computed on a GPU is reused on a CPU and vice versa); the resolved
precision does, except fp32, so every key computed before this policy existed stays valid.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Dict, Optional

from w2sg.core.errors import W2SGError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICE_MAPS = (None, "auto")
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GIB = 1024**3


def check_settings(device: str, precision: str, device_map: Optional[str] = None, mode: str = "full") -> None:
    """Errors naming the bad value and the valid ones (config validation; no torch import)."""
    if device not in DEVICES:
        raise W2SGError(f"unknown train.device {device!r}; valid: {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise W2SGError(f"unknown train.precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if device_map not in DEVICE_MAPS:
        raise W2SGError(f"unknown train.device_map {device_map!r}; valid: null (one device), auto (all GPUs)")
    if device_map is not None and device == "cpu":
        raise W2SGError("train.device_map=auto shards a model over GPUs; it needs train.device=auto or cuda")
    if device_map is not None and mode == "full":
        raise W2SGError("train.device_map=auto (a model sharded over GPUs) trains LoRA adapters or probes, not "
                        "every weight: use train=lora or train=probe, or train.device_map=null")


@functools.lru_cache(maxsize=None)  # asked per stage key (key_precision): a 1,000-job sweep plans ~5,000 stages
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _bf16_gpu() -> bool:
    """Native bf16 (Ampere, compute capability 8.0, and newer); a T4 or V100 only emulates it."""
    import torch

    return torch.cuda.get_device_capability()[0] >= 8


def _cpu_autocast(precision: str) -> bool:
    """Whether this torch autocasts to ``precision`` on the CPU (fp16 needs torch >= 2.4; older ones disable
    autocast with a warning, which would silently compute in fp32)."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.autocast("cpu", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
    return not caught


def resolve_device(device: str) -> str:
    """auto: cuda when torch sees a GPU, else cpu. Does not check that an explicit cuda is there (planning nodes)."""
    if device not in DEVICES:
        raise W2SGError(f"unknown train.device {device!r}; valid: {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    return device


def resolve_precision(precision: str, device: str) -> str:
    """The precision a stage computes in on ``device`` (resolved): auto -> fp32 on CPU, bf16 or fp16 on a GPU.

    On a node without the GPU (a login node planning Slurm jobs with train.device=cuda) auto resolves to bf16,
    the GPU default; on GPUs without bf16 set train.precision=fp16 so that such nodes agree."""
    if precision not in PRECISIONS:
        raise W2SGError(f"unknown train.precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device == "cpu":
        return "fp32"
    if not cuda_available():
        return "bf16"
    return "bf16" if _bf16_gpu() else "fp16"


def key_precision(train: Any) -> Dict[str, str]:
    """What of the precision enters a stage key: {} for fp32 (keys as before mixed precision), else the name."""
    precision = resolve_precision(str(train.get("precision", "auto")), resolve_device(str(train.get("device", "auto"))))
    return {} if precision == "fp32" else {"precision": precision}


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


def runtime_policy(train: Any) -> Policy:
    """The policy of this process, from train.device / precision / gradient_checkpointing / device_map.

    Fails with the way out when a GPU is asked for and there is none, or bf16 on a GPU without it; turns on TF32
    matmuls on Ampere and newer GPUs."""
    device_setting = str(train.get("device", "auto"))
    device = resolve_device(device_setting)
    if device == "cuda" and not cuda_available():
        import torch

        raise W2SGError(f"train.device=cuda but torch {torch.__version__} sees no GPU (a CPU build of torch, or "
                        "CUDA_VISIBLE_DEVICES empty?); use train.device=auto or train.device=cpu")
    precision = resolve_precision(str(train.get("precision", "auto")), device)
    if device == "cuda":
        import torch

        if precision == "bf16" and not _bf16_gpu():
            raise W2SGError(f"train.precision=bf16: {torch.cuda.get_device_name()} (compute capability "
                            f"{'.'.join(map(str, torch.cuda.get_device_capability()))}) has no native bf16; use "
                            "train.precision=fp16 (with a gradient scaler) or train.precision=auto")
        if _bf16_gpu():
            torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls (Ampere and newer)
            torch.backends.cudnn.allow_tf32 = True
    elif precision != "fp32" and not _cpu_autocast(precision):
        import torch

        raise W2SGError(f"train.precision={precision} on the CPU: torch {torch.__version__} has no CPU autocast for "
                        "it; use train.precision=bf16 or fp32 (or a newer torch)")
    check_settings(device_setting, precision, train.get("device_map"), str(train.get("mode", "full")))
    return Policy(device, precision, bool(train.get("gradient_checkpointing", False)), train.get("device_map"))


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
