"""How a model and its batches meet the accelerator: a resolved device/precision ``Policy`` (placement, autocast,
the fp16 gradient scaler), the attention kernel, and the memory estimate checked before a model is loaded.

Which policy a process uses is decided from the config by w2sg.run.device.runtime_policy.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

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

# Bytes one transformer layer saves for the backward pass per token, under bf16/fp16 autocast over fp32 master
# weights (the Policy above), in training mode: a x hidden + b x intermediate, by family (transformers'
# model_type). Measured by benchmarks/activation_memory.py (SDPA attention; flash-attention 2 saves a bit less),
# which fails when they drift; families not measured take the largest a and the largest b.
ACTIVATION_FACTORS: Dict[str, Tuple[float, float]] = {
    "bert": (28.2, 4.0), "gpt2": (24.1, 10.0), "gpt_neox": (22.1, 4.0), "llama": (31.4, 8.0), "qwen2": (30.6, 8.0),
    # qwen3: fitted at Qwen3-0.6B, whose attention is 2 x hidden wide (16 heads x head_dim 128) and RMS-norms queries
    # and keys; at 1.7B-8B (attention 1-1.6 x hidden) it over-estimates by 13-28%, the safe side (a x hidden +
    # b x intermediate cannot fit both 0.6B and 1.7B within 10%: 1.7B doubles both widths, its bytes grow 1.6x)
    "qwen3": (56.2, 8.0),
}
# families whose attention is wider than hidden (heads x head_dim > hidden): their constants over-estimate the larger
# sizes (the form has no attention-width term), so they neither set the default nor count as drift when above
WIDE_ATTENTION = ("qwen3",)
DEFAULT_ACTIVATION = tuple(max(f[i] for k, f in ACTIVATION_FACTORS.items() if k not in WIDE_ATTENTION)
                           for i in range(2))
FP32_ACTIVATION_SCALE = 2  # no autocast: the same tensors, the bf16 ones in fp32 (measured 1.6-1.9x the bf16 bytes)
CHECKPOINTED_BYTES = 4  # x hidden, per token and layer, with gradient checkpointing: each layer's fp32 input
# per token and vocabulary entry of an LM head: the loss saves fp32 log-probabilities (4, measured like the
# activations); the fp32 copy of the logits beside them in the forward, their fp32 gradient in the backward (8)
LOGIT_BYTES = 12
AUTOCAST_COPY_BYTES = 2  # per trainable parameter: autocast's cached bf16/fp16 copy, saved for the backward pass
ADAPTER_SHARE = 0.01  # LoRA's trainable parameters when not counted from the target modules (rank 8: 0.3-1%)
HEADROOM = 0.10  # allocator fragmentation, the CUDA context, transient buffers of the backward pass
OPTIMIZERS = ("adamw", "adam", "adafactor")


def intermediate_size(hf_config: Any) -> int:
    """The MLP's inner width of a transformers config (GPT-2's n_inner, 4 x hidden when unset)."""
    hidden = getattr(hf_config, "hidden_size", None) or hf_config.n_embd
    return int(getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None) or 4 * hidden)


def activation_bytes(family: str, hidden: int, intermediate: int = 0, precision: str = "bf16") -> float:
    """Bytes one layer saves for backward per token (``intermediate`` 0: 4 x hidden)."""
    a, b = ACTIVATION_FACTORS.get(family, DEFAULT_ACTIVATION)
    per_token = a * hidden + b * (intermediate or 4 * hidden)
    return per_token * (FP32_ACTIVATION_SCALE if precision == "fp32" else 1)


def optimizer_bytes(optimizer: str, trainable: int, hidden: int) -> int:
    """State of the optimizer over ``trainable`` fp32 parameters: adamw/adam keep two fp32 moments (8 bytes a
    parameter); adafactor (no first moment) factors the second into a row and a column vector per matrix: at most
    8 / hidden bytes a parameter for matrices whose sides are hidden or larger."""
    if optimizer not in OPTIMIZERS:
        raise W2SGError(f"memory estimate: unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    return 8 * trainable if optimizer != "adafactor" else 8 * trainable // max(hidden, 1)


def _state(params: int, precision: str, mode: str, trainable: Optional[int], optimizer: str,
           hidden: int) -> Dict[str, int]:
    """Weights, gradients, optimizer state and autocast's weight copies."""
    b = BYTES[precision]
    copy = AUTOCAST_COPY_BYTES if precision != "fp32" else 0
    if mode == "inference":
        return {"weights": b * params}
    if mode == "full":
        trainable, frozen = params, 0
    else:
        trainable = int(params * ADAPTER_SHARE) if trainable is None else trainable
        frozen = params
    return {"weights": b * frozen + 4 * trainable, "gradients": 4 * trainable,
            "optimizer": optimizer_bytes(optimizer, trainable, hidden), "autocast copies": copy * trainable}


def estimate_memory(params: int, precision: str, mode: str, batch: int, length: int, hidden: int, layers: int,
                    gradient_checkpointing: bool = False, vocab: int = 0, *, family: str = "",
                    intermediate: int = 0, optimizer: str = "adamw",
                    trainable: Optional[int] = None) -> Dict[str, int]:
    """Bytes a stage needs on the accelerator, by part; the last part, headroom, is 10% of the others.

    ``mode``: full (fp32 master weights, their gradients, the optimizer's state and, under autocast, a bf16/fp16
    copy of every weight), lora (the frozen base in the compute dtype; ``trainable`` fp32 adapter parameters with
    gradients, state and copies: ADAPTER_SHARE of ``params`` when not given), inference (weights in the compute
    dtype, one layer's activations at a time). Activations of training: ``layers`` x activation_bytes per token
    (``family`` and ``intermediate`` pick the calibrated constants; LoRA on every linear projection saves 92-95%
    of that, measured, and is given the same); with gradient checkpointing each layer keeps only its input and one
    layer is recomputed at a time. ``vocab``: the LM head's logits (generative finetuning).
    An estimate, meant to fail early and clearly rather than to be exact."""
    if mode not in ("full", "lora", "inference"):
        raise W2SGError(f"memory estimate: unknown mode {mode!r}; valid: full, lora, inference")
    tokens = batch * length
    parts = _state(params, precision, mode, trainable, optimizer, hidden)
    layer = activation_bytes(family, hidden, intermediate, precision)
    if mode == "inference":
        stored = layer
    elif gradient_checkpointing:
        stored = layers * CHECKPOINTED_BYTES * hidden + layer
    else:
        stored = layers * layer
    parts["activations"] = int(tokens * stored)
    parts["logits"] = tokens * vocab * LOGIT_BYTES
    parts["headroom"] = int(HEADROOM * sum(parts.values()))
    return parts


STATE = ("weights", "gradients", "optimizer", "autocast copies")


def describe(parts: Dict[str, int]) -> str:
    return ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items() if v)


def available_memory(policy: Policy) -> Optional[tuple]:
    """(free bytes, total bytes, what) of the GPU, or of all GPUs when sharded; None on CPU. PyTorch's cached
    blocks (a model of an earlier stage of this process) are released first, so they count as free."""
    if policy.device != "cuda":
        return None
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    gpus = range(torch.cuda.device_count()) if policy.device_map else [torch.cuda.current_device()]
    free = total = 0
    for i in gpus:
        f, t = torch.cuda.mem_get_info(i)
        free, total = free + f, total + t
    name = torch.cuda.get_device_name()
    return free, total, f"{len(gpus)} x {name}" if policy.device_map else name


def _remedies(policy: Policy, mode: str) -> Dict[str, list]:
    """The settings that shrink each kind of part."""
    state = ["train.mode=lora or train=probe (no gradients or optimizer state for the base)"] if mode == "full" else []
    if not policy.device_map:
        state.append("train.device_map=auto (shard over every GPU of the node; LoRA and inference)")
    if mode == "inference":
        acts = ["a smaller train.eval_batch_size", "a shorter train.max_length"]
    else:
        acts = ([] if policy.gradient_checkpointing else ["train.gradient_checkpointing=true"]) + \
            ["a smaller train.minibatch_size", "a shorter train.max_length"]
    return {"weights and optimizer state": state, "activations": acts}


def ways_out(parts: Dict[str, int], free: int, policy: Policy, mode: str = "full") -> str:
    """The ways out that can help, those of the dominant part first: a kind of remedy is left out when the other
    part alone (with its headroom) exceeds the free memory, as then it cannot be enough."""
    sizes = {"weights and optimizer state": sum(v for k, v in parts.items() if k in STATE),
             "activations": parts.get("activations", 0) + parts.get("logits", 0)}
    order = sorted(sizes, key=lambda k: -sizes[k])
    other = {order[0]: sizes[order[1]], order[1]: sizes[order[0]]}
    helps = [k for k in order if other[k] * (1 + HEADROOM) <= free] or order
    ways = [w for k in helps for w in _remedies(policy, mode)[k]] + ["a GPU with more memory"]
    return f"{order[0]} dominate; ways out: {'; '.join(ways)}"


def check_memory(what: str, parts: Dict[str, int], policy: Policy, hint: str = "", mode: str = "full") -> None:
    """Before loading: a clear error naming what is needed, what the device has free (cached blocks released)
    and the ways out that fit the dominant part, instead of an out-of-memory error later."""
    have = available_memory(policy)
    if have is None:
        return
    need = sum(parts.values())
    free, total, name = have
    if need <= free:
        return
    raise W2SGError(f"{what} needs about {need / GIB:.1f} GiB of GPU memory ({describe(parts)} GiB; "
                    f"{policy.precision}{hint}) but {name} has {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB; "
                    f"{ways_out(parts, free, policy, mode)}")
