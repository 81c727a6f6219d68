"""Where and in which precision every stage computes: one policy for training, labels, features and LM stages.

``train.device``: ``auto`` (the job's GPU when torch sees one, else the CPU) | ``cpu`` | ``cuda``.
``train.precision``: ``auto`` (bf16 on GPUs that have it, fp16 with a gradient scaler on older GPUs, fp32 on
CPU) | ``fp32`` | ``bf16`` | ``fp16``. Mixed precision is torch autocast: trainable weights stay fp32 (master
weights), frozen weights (inference, features, the base of LoRA) are loaded directly in the compute dtype.
``train.device_map``: ``null`` (one device) | ``auto`` (accelerate shards the model over every GPU of the node;
inference and LoRA only). TF32 matmuls are enabled on Ampere and newer GPUs.

The device never enters a stage key (a stage computed on a GPU is reused on a CPU and vice versa); the resolved
precision does, except fp32, so every key computed before this policy existed stays valid. ``auto`` is resolved
once per process at the entry (w2sg.app.config.resolve -> ``resolve_precision``), so the plan sees a concrete
precision. This module decides the policy from the config; how a policy places models and batches, autocasts and
estimates memory is w2sg.ml.device.
"""

from __future__ import annotations

import functools
from typing import Any

from w2sg.core.errors import W2SGError
from w2sg.core.options import DEVICES, PRECISIONS, check_device_settings
# the mechanics of a policy and the memory estimate (w2sg.ml.device), here too for callers of the policy
from w2sg.ml.device import (BYTES, CPU, GIB, Policy, attn_implementation, available_memory,  # noqa: F401
                            check_memory, describe, estimate_memory)

check_settings = check_device_settings  # the config check (w2sg.core.options)


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


def runtime_policy(train: Any) -> Policy:
    """The policy of this process, from train.device / precision / gradient_checkpointing / device_map.

    Fails with the way out when a GPU is asked for and there is none, or bf16 on a GPU without it; turns on TF32
    matmuls on Ampere and newer GPUs."""
    device_setting = train.device
    device = resolve_device(device_setting)
    if device == "cuda" and not cuda_available():
        import torch

        raise W2SGError(f"train.device=cuda but torch {torch.__version__} sees no GPU (a CPU build of torch, or "
                        "CUDA_VISIBLE_DEVICES empty?); use train.device=auto or train.device=cpu")
    precision = resolve_precision(train.precision, device)
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
    check_device_settings(device_setting, precision, train.device_map, train.mode)
    return Policy(device, precision, train.gradient_checkpointing, train.device_map)


