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
import logging
from typing import Any, Dict

from w2sg.core.errors import W2SGError
from w2sg.core.options import DEVICES, PRECISIONS, check_device_settings, check_parallel_settings
# the mechanics of a policy and the memory estimate (w2sg.ml.device), here too for callers of the policy
from w2sg.ml.device import (ACTIVATION_FACTORS, AUTOCAST_COPY_BYTES, BYTES, CPU, GIB, LOGIT_BYTES,  # noqa: F401
                            Policy, activation_bytes, attn_implementation, available_memory, check_memory, describe,
                            estimate_memory, intermediate_size, ways_out)

check_settings = check_device_settings  # the config check (w2sg.core.options)
log = logging.getLogger(__name__)


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


def nvidia_gpu_present() -> bool:
    """Whether the machine has an NVIDIA GPU whatever torch sees (the driver's device files)."""
    import glob
    import os

    return os.path.exists("/proc/driver/nvidia/gpus") or bool(glob.glob("/dev/nvidia[0-9]*"))


def warn_cpu_build(device_setting: str, device: str) -> None:
    """train.device=auto resolved to the CPU on a machine with an NVIDIA GPU because torch is a CPU build: say so,
    instead of computing on the CPU without a word."""
    import torch

    if device_setting == "auto" and device == "cpu" and torch.version.cuda is None and nvidia_gpu_present():
        log.warning("train.device=auto: this machine has an NVIDIA GPU but torch %s is a CPU build, so every stage "
                    "computes on the CPU; install a CUDA build of torch (https://pytorch.org/get-started/locally/), "
                    "or set train.device=cpu to say that the CPU is meant", torch.__version__)


def attention_kernel(model: Any) -> str:
    """The attention implementation a model computes with (transformers' config), or none for a probe head."""
    if model is None:
        return "n/a"
    config = getattr(getattr(model, "backbone", model), "config", None)
    if config is None:
        return "none (probe head)"
    return str(getattr(config, "_attn_implementation", None) or "default")


def describe_runtime(policy: Policy, model: Any = None) -> Dict[str, Any]:
    """Where a stage computed: device (and the GPU's name), compute dtype, attention kernel, peak GPU memory."""
    rt: Dict[str, Any] = {"device": policy.device, "dtype": policy.precision, "attention": attention_kernel(model)}
    if policy.device == "cuda":
        import torch

        rt["gpu"] = torch.cuda.get_device_name()
        rt["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    return rt


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
    warn_cpu_build(device_setting, device)
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
    check_parallel_settings(getattr(train, "strategy", "auto"), getattr(train, "processes", None), train.mode,
                            train.device_map)
    return Policy(device, precision, train.gradient_checkpointing, train.device_map)




# --- the memory estimate of a stage ---------------------------------------------------------------------------

def hf_config_of(model_cfg: Any) -> Any:
    """The transformers config of a model (w2sg.ml.models.model_config). A model with ``arch`` is read from those
    fields, the architecture the catalogue's tests check, so that an estimate needs no download (a hub config, a
    GGUF file's conversion); others from their path."""
    import copy

    from w2sg.ml.models import model_config

    if model_cfg.arch is not None and model_cfg.random_init is None:
        model_cfg = copy.copy(model_cfg)
        model_cfg.random_init = {}  # model_config builds a config with arch and random_init from arch alone
    return model_config(model_cfg)[1]


def layer_count(hf_config: Any) -> int:
    return int(next((getattr(hf_config, k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                     if hasattr(hf_config, k)), 1))


def lora_params(hf_config: Any, targets: Any, rank: int) -> int:
    """Trainable parameters of rank-``rank`` LoRA adapters on the modules named ``targets`` (peft's matching: the
    name or its last dotted parts), counted on the backbone built on the meta device (nothing allocated)."""
    import torch
    from transformers import AutoModel
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        backbone = AutoModel.from_config(hf_config)
    total = 0
    for name, module in backbone.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, torch.nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, Conv1D):  # GPT-2's projections: weight (in, out)
            total += rank * sum(module.weight.shape)
        elif isinstance(module, torch.nn.Embedding):
            total += rank * (module.num_embeddings + module.embedding_dim)
    return total


def stage_estimate(model_cfg: Any, mode: str, batch: int, length: int, precision: str, *,
                   gradient_checkpointing: bool = False, optimizer: str = "adamw", vocab: int = 0,
                   lora_rank: int = 8) -> Dict[str, int]:
    """Bytes a stage of ``model_cfg`` (a w2sg.core.config.ModelConfig) needs on the GPU, by part, "headroom"
    included (w2sg.ml.device.estimate_memory): its parameter count, its architecture's hidden, intermediate and
    layer sizes and family; in lora mode the adapters counted on the model's lora_targets (else the family's,
    w2sg.ml.models.LORA_TARGETS) at ``lora_rank``. ``vocab``: an LM head's logits, and its weights when they are
    not tied to the embeddings (generative finetuning)."""
    from w2sg.ml.device import intermediate_size
    from w2sg.ml.models import LORA_TARGETS, hidden_size

    hf = hf_config_of(model_cfg)
    family = getattr(hf, "model_type", "")
    trainable = None  # an unknown family without targets: the estimate's share of the parameters
    targets = model_cfg.lora_targets or LORA_TARGETS.get(family)
    if mode == "lora" and targets:
        trainable = lora_params(hf, list(targets), lora_rank)
    params = model_cfg.params  # the backbone and a classifier head; an LM head of its own adds vocab x hidden
    if vocab and not getattr(hf, "tie_word_embeddings", True):
        params += vocab * hidden_size(hf)
    return estimate_memory(params, precision, mode, batch, length, hidden_size(hf), layer_count(hf),
                           gradient_checkpointing, vocab, family=family, intermediate=intermediate_size(hf),
                           optimizer=optimizer, trainable=trainable)
