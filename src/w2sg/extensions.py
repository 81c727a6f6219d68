"""The public API for your own methods (modules listed in ``extensions:``): one import for every registry.

    from w2sg.extensions import register_loss, register_method, register_pooling, register_formatter

Each decorator registers a function under a new name, which then works in the config like a built-in one
(``loss.name=``, ``labels.name=``, ``<model>.pooling=``, ``task.kind=``). Importing this module is light: the
registry behind a decorator (and torch, for losses and poolings) is imported when the decorator is first used.
How extensions are imported and versioned: w2sg.core.registry.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "register_loss": "w2sg.ml.losses",  # fn(logits [B, C], soft labels [B, C], step_frac, **params) -> scalar
    "register_method": "w2sg.ml.methods",  # fn(probs [N, C], features [N, H] | None, **params) -> (probs, kept)
    "register_pooling": "w2sg.ml.poolings",  # fn(last_hidden_state [B, T, H], attention_mask [B, T]) -> [B, H]
    "register_formatter": "w2sg.data.formats",  # fn(row, rng, task cfg) -> (text, class index) | None
}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'w2sg.extensions' has no attribute {name!r}; it provides {', '.join(_WHERE)}")
