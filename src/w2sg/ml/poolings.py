"""Poolings: how a model's token states become one feature vector per text (``<model>.pooling``), a registry.

Users' modules add theirs with w2sg.extensions.register_pooling. torch loads at the first pooling computed, so the
config is checked against this registry without it.
"""

from __future__ import annotations

from typing import Any, Callable

from w2sg.core.registry import Registry
from w2sg.ml.lazy import torch


def _mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def _cls(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return h[:, 0]


def _last(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # last non-padding token (right padding)
    idx = mask.sum(1).long().clamp(min=1) - 1
    return h[torch.arange(h.shape[0]), idx]


Pooling = Callable[[Any, Any], Any]  # (last_hidden_state [B, T, H], attention_mask [B, T]) -> [B, H]
POOLINGS = Registry("pooling")


def register_pooling(name: str) -> Callable[[Pooling], Pooling]:
    """Decorator: ``model.pooling=<name>`` (``weak.pooling=``, ``strong.pooling=``) pools with ``fn``.

    ``fn(last_hidden_state [B, T, H], attention_mask [B, T]) -> features [B, H]`` (the head is H wide).
    """
    return POOLINGS.register(name)


for _name, _fn in (("mean", _mean), ("cls", _cls), ("last", _last)):
    register_pooling(_name)(_fn)
del _name, _fn
