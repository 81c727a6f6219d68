"""Models: any encoder or decoder that transformers.AutoModel loads, pooled features, a linear class head."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from w2sg.errors import W2SGError

PKG_SCHEME = "pkg://"


def resolve_path(spec: str) -> str:
    """Turn ``pkg://<package>[/<sub path>]`` into a directory inside that installed package.

    The package is located without importing it, so packages whose code is broken still serve their files.
    Any other value (hub id, local directory) is returned unchanged.
    """
    if not spec.startswith(PKG_SCHEME):
        return spec
    package, _, sub = spec[len(PKG_SCHEME) :].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise W2SGError(f"{spec!r}: Python package {package!r} is not installed (pip install {package.replace('_', '-')})")
    path = Path(found.origin).parent / sub
    if not path.exists():
        raise W2SGError(f"{spec!r}: {path} does not exist in the installed package {package!r}")
    return str(path)


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
    """Backbone + pooling + linear head. ``forward`` returns class logits."""

    def __init__(self, backbone: nn.Module, hidden: int, num_classes: int, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise W2SGError(f"unknown pooling {pooling!r}; valid: {', '.join(sorted(POOLINGS))}")
        self.backbone = backbone
        self.pooling = pooling
        self.head = nn.Linear(hidden, num_classes)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return POOLINGS[self.pooling](out.last_hidden_state, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask))


def _mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def _cls(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return h[:, 0]


def _last(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # last non-padding token (right padding)
    idx = mask.sum(1).long().clamp(min=1) - 1
    return h[torch.arange(h.shape[0]), idx]


POOLINGS = {"mean": _mean, "cls": _cls, "last": _last}


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


def build_model(cfg: Any, num_classes: int, seed: int) -> Classifier:
    """Load (or, for tests, randomly build) the backbone and add a freshly initialised head."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # truncation leaves unused layer weights: expected, not worth a warning
    path = resolve_path(cfg.path)
    torch.manual_seed(seed)
    try:
        hf_config = AutoConfig.from_pretrained(path)
        if cfg.random_init is not None:
            for key, value in cfg.random_init.items():
                setattr(hf_config, key, value)
        if cfg.num_layers is not None:
            setattr(hf_config, _layer_key(hf_config), int(cfg.num_layers))
        if cfg.random_init is not None:
            backbone = AutoModel.from_config(hf_config)
        else:
            backbone = AutoModel.from_pretrained(path, config=hf_config)
    except OSError as e:
        raise W2SGError(f"model {cfg.name!r}: cannot load {path!r}: {str(e).splitlines()[0]}") from None
    hidden = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "n_embd")
    return Classifier(backbone, hidden, num_classes, cfg.pooling)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
