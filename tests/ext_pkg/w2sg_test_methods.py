"""A user's own methods, outside the w2sg package (tests/test_extensions.py lists it in ``extensions:``).

Registers a loss, a model pooling, a task format and a weak-label method. The loss appends one line per call to the file named by
``W2SG_TEST_EXT_CALLS`` (when set), so a test can see which stage trained with it and with which parameter.
"""

import os

import torch
import torch.nn.functional as F

import numpy as np

from w2sg.extensions import register_formatter, register_loss, register_method, register_pooling  # the public API


@register_loss("ext_scaled_xent")
def scaled_xent(logits: torch.Tensor, labels: torch.Tensor, step_frac: float, scale: float = 1.0) -> torch.Tensor:
    """Cross-entropy against the soft labels, times ``scale``."""
    calls = os.environ.get("W2SG_TEST_EXT_CALLS")
    if calls:
        with open(calls, "a") as f:
            f.write(f"scale={scale} batch={logits.shape[0]}\n")
    return -scale * (labels.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


@register_pooling("ext_max")
def max_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over the non-padding tokens."""
    return h.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(1).values


@register_formatter("ext_upper")
def format_upper(row, rng, cfg):
    """The template formatter's text, upper-cased."""
    return cfg.template.format(**row).upper(), int(row[cfg.label_column])


@register_method("ext_keep_confident")
def keep_confident(probs: np.ndarray, features, threshold: float = 0.6):
    """Keep the rows whose weak label's top class probability is at least ``threshold``."""
    keep = np.flatnonzero(np.asarray(probs).max(axis=1) >= threshold)
    return probs[keep], keep
