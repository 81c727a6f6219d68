"""Models: any encoder or decoder that transformers.AutoModel loads, pooled features, a linear class head."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from w2sg.errors import W2SGError
from w2sg.extensions import record
from w2sg.paths import PKG_SCHEME, resolve_path  # noqa: F401  (resolve_path: part of this module's API)


def check_model_path(cfg: Any) -> None:
    """Fail early, with the path, when a model is neither a local directory nor (offline) a cached hub id."""
    if cfg.random_init is not None:
        return
    path = resolve_path(cfg.path)
    if Path(path).is_dir():
        return
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local:
        raise W2SGError(f"model {cfg.name!r}: path {path!r} does not exist")
    # A hub id: transformers raises its own error when it is neither cached nor reachable.


class Classifier(nn.Module):
    """Backbone + pooling + linear head. ``forward`` returns class logits.

    Pairwise (reward modeling): the head gives one scalar reward per text; for a pair (a, b) the logits are
    [r(b), r(a)], so softmax gives P(a preferred) = sigmoid(r(a) - r(b)) as class 1, and every loss and metric
    for two classes applies unchanged.
    """

    def __init__(self, backbone: nn.Module, hidden: int, num_classes: int, pooling: str, pairwise: bool = False):
        super().__init__()
        if pooling not in POOLINGS:
            raise W2SGError(f"unknown pooling {pooling!r}; valid: {', '.join(sorted(POOLINGS))}")
        self.backbone = backbone
        self.pooling = pooling
        self.head = Head(hidden, num_classes, pairwise)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return POOLINGS[self.pooling](out.last_hidden_state, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                input_ids_b: Optional[torch.Tensor] = None, attention_mask_b: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        f_b = self.features(input_ids_b, attention_mask_b) if input_ids_b is not None else None
        return self.head(self.features(input_ids, attention_mask), f_b)


class Head(nn.Module):
    """The linear head: class logits from features, or for pairs [r(b), r(a)] from one scalar reward each.

    Used on its own in probe mode, on features stored by the features stage."""

    def __init__(self, hidden: int, num_classes: int, pairwise: bool = False):
        super().__init__()
        if pairwise and num_classes != 2:
            raise W2SGError(f"pairwise tasks have 2 classes (first or second preferred), got num_classes={num_classes}")
        self.pairwise = pairwise
        self.linear = nn.Linear(hidden, 1 if pairwise else num_classes)

    def forward(self, features: torch.Tensor, features_b: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.pairwise:
            return self.linear(features)
        if features_b is None:
            raise W2SGError("a pairwise head needs both texts of each pair")
        return torch.cat([self.linear(features_b), self.linear(features)], dim=-1)


def _mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def _cls(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return h[:, 0]


def _last(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # last non-padding token (right padding)
    idx = mask.sum(1).long().clamp(min=1) - 1
    return h[torch.arange(h.shape[0]), idx]


Pooling = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
POOLINGS: Dict[str, Pooling] = {"mean": _mean, "cls": _cls, "last": _last}


def register_pooling(name: str) -> Callable[[Pooling], Pooling]:
    """Decorator: ``model.pooling=<name>`` (``weak.pooling=``, ``strong.pooling=``) pools with ``fn``.

    ``fn(last_hidden_state [B, T, H], attention_mask [B, T]) -> features [B, H]`` (the head is H wide).
    """
    def deco(fn: Pooling) -> Pooling:
        record(POOLINGS, "pooling", name, fn)
        return fn

    return deco


def _layer_key(config: Any) -> str:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, key):
            return key
    raise W2SGError(f"cannot truncate layers of a {type(config).__name__}: no layer-count attribute")


def load_tokenizer(cfg: Any):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_path(cfg.path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_config(cfg: Any):
    """(resolved path, transformers config) of a model config: random-init overrides and layer truncation applied.

    The one place the backbone's shape is decided, for the classifier, a probe's head and the LM of generative
    finetuning alike."""
    from transformers import AutoConfig

    path = resolve_path(cfg.path)
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise W2SGError(f"model {cfg.name!r}: cannot load {path!r}: {str(e).splitlines()[0]}") from None
    for key, value in (cfg.random_init or {}).items():
        setattr(hf_config, key, value)
    if cfg.num_layers is not None:
        setattr(hf_config, _layer_key(hf_config), int(cfg.num_layers))
    return path, hf_config


def build_model(cfg: Any, num_classes: int, seed: int, pairwise: bool = False) -> Classifier:
    """Load (or, for tests, randomly build) the backbone and add a freshly initialised head."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # truncation leaves unused layer weights: expected, not worth a warning
    torch.manual_seed(seed)
    path, hf_config = model_config(cfg)
    try:
        if cfg.random_init is not None:
            backbone = AutoModel.from_config(hf_config)
        else:
            backbone = AutoModel.from_pretrained(path, config=hf_config)
    except OSError as e:
        raise W2SGError(f"model {cfg.name!r}: cannot load {path!r}: {str(e).splitlines()[0]}") from None
    return Classifier(backbone, hidden_size(hf_config), num_classes, cfg.pooling, pairwise)


def hidden_size(hf_config: Any) -> int:
    return getattr(hf_config, "hidden_size", None) or getattr(hf_config, "n_embd")


def build_head(cfg: Any, num_classes: int, seed: int, pairwise: bool = False) -> Head:
    """Probe mode: the head alone (the backbone runs once, in the features stage)."""
    torch.manual_seed(seed)
    return Head(hidden_size(model_config(cfg)[1]), num_classes, pairwise)


# LoRA target modules per model family (transformers' config.model_type); train.lora.target_modules overrides
LORA_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"], "electra": ["query", "value"], "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"], "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "pythia": ["query_key_value"], "phi": ["q_proj", "v_proj"],
}
CONV1D_FAMILIES = {"gpt2"}  # weights stored transposed (transformers Conv1D): peft needs fan_in_fan_out


def add_lora(model: Classifier, rank: int, alpha: float, dropout: float, target_modules: Optional[List[str]]) -> None:
    """Freeze the backbone and wrap it with peft LoRA adapters; the head stays fully trainable."""
    from peft import LoraConfig, get_peft_model

    model_type = getattr(model.backbone.config, "model_type", "?")
    targets = list(target_modules) if target_modules else LORA_TARGETS.get(model_type)
    if not targets:
        raise W2SGError(f"no default LoRA target modules for model type {model_type!r} (known: "
                        f"{', '.join(sorted(LORA_TARGETS))}); set train.lora.target_modules=[...]")
    try:
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                            fan_in_fan_out=model_type in CONV1D_FAMILIES)
        model.backbone = get_peft_model(model.backbone, config)
    except ValueError as e:
        raise W2SGError(f"LoRA on model type {model_type!r}: {str(e).splitlines()[0]}") from None


def merge_lora(model: Classifier) -> None:
    """Fold trained adapters into the backbone's weights, leaving a plain model to store and reload."""
    if hasattr(getattr(model, "backbone", None), "merge_and_unload"):
        model.backbone = model.backbone.merge_and_unload()
        for p in model.parameters():
            p.requires_grad_(True)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
