"""Accuracy, AUROC and performance gap recovered (PGR)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np


def accuracy(probs: np.ndarray, labels: Sequence[int]) -> float:
    return float(np.mean(np.asarray(probs).argmax(-1) == np.asarray(labels)))


def auroc(probs: np.ndarray, labels: Sequence[int]) -> Optional[float]:
    """Binary: AUROC of p(class 1); more classes: one-vs-rest macro AUROC. None if only one class occurs."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels)
    p = np.asarray(probs)
    if len(np.unique(y)) < 2:
        return None
    if p.shape[1] == 2:
        return float(roc_auc_score(y, p[:, 1]))
    present = np.unique(y)
    if len(present) < p.shape[1]:
        return None
    return float(roc_auc_score(y, p, multi_class="ovr"))


def pgr(weak: float, w2s: float, ceiling: float) -> Tuple[Optional[float], Optional[str]]:
    """(w2s - weak) / (ceiling - weak), or (None, reason) when the ceiling does not beat the weak model."""
    gap = ceiling - weak
    if gap <= 0:
        return None, f"ceiling ({ceiling:.4f}) does not exceed weak ({weak:.4f}): no gap to recover"
    return (w2s - weak) / gap, None
