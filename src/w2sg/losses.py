"""Losses for training on (soft) labels: a registry of plain functions.

Every loss is ``fn(logits [B, C], labels [B, C] soft targets, step_frac in [0, 1], **params) -> scalar``.
``step_frac`` is the fraction of training done, for warm-ups. A new loss is one function decorated with
``@register_loss("name")`` plus one YAML file under conf/loss/ holding ``name`` and the keyword arguments.

Auxiliary terms (the student's own predictions) make sense only when the labels come from another model,
so stages that train on ground truth always use ``xent`` (see w2sg.stages).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Mapping

import torch
import torch.nn.functional as F

from w2sg.errors import W2SGError

LossFn = Callable[..., torch.Tensor]
LOSSES: Dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn

    return deco


def loss_params(fn: LossFn) -> Dict[str, Any]:
    """The tunable keyword arguments of a loss and their defaults."""
    sig = inspect.signature(fn)
    return {n: p.default for n, p in list(sig.parameters.items())[3:]}


def validate_loss(cfg: Mapping[str, Any]) -> None:
    """Check a loss config (name + keyword arguments) against the registry, naming what is valid."""
    name = cfg.get("name")
    if name not in LOSSES:
        raise W2SGError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}")
    valid = loss_params(LOSSES[name])
    unknown = sorted(set(cfg) - {"name"} - set(valid))
    if unknown:
        raise W2SGError(
            f"loss {name!r} has no parameter {', '.join(map(repr, unknown))}; valid: {', '.join(valid) or '(none)'}"
        )


def make_loss(cfg: Mapping[str, Any]) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    validate_loss(cfg)
    fn = LOSSES[cfg["name"]]
    params = {k: v for k, v in cfg.items() if k != "name"}

    def loss(logits: torch.Tensor, labels: torch.Tensor, step_frac: float) -> torch.Tensor:
        return fn(logits, labels, step_frac, **params)

    return loss


def _soft_xent(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


@register_loss("xent")
def xent(logits: torch.Tensor, labels: torch.Tensor, step_frac: float) -> torch.Tensor:
    """Cross-entropy against soft labels: mean over the batch of -sum_c y_c log p_c."""
    return _soft_xent(logits, labels.float())


@register_loss("kl")
def kl(logits: torch.Tensor, labels: torch.Tensor, step_frac: float) -> torch.Tensor:
    """KL(labels || student), batch mean. Same gradient as xent; zero when the student matches the labels."""
    y = labels.float()
    return F.kl_div(F.log_softmax(logits.float(), dim=-1), y, reduction="batchmean")


def harden_balanced(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One-hot student predictions whose class balance matches the (weak) labels' mean.

    Binary: class 1 goes to the share ``mean(labels[:, 1])`` of the batch with the lowest p(class 0),
    exactly as the paper's code picks its threshold. More classes: plain argmax.
    """
    if probs.shape[1] != 2:
        return F.one_hot(probs.argmax(-1), probs.shape[1]).to(probs.dtype)
    share_1 = labels.float().mean(0)[1]
    threshold = torch.quantile(probs[:, 0], share_1)
    is_1 = probs[:, 0] < threshold
    return torch.stack([~is_1, is_1], dim=1).to(probs.dtype)


@register_loss("logconf")
def logconf(
    logits: torch.Tensor,
    labels: torch.Tensor,
    step_frac: float,
    aux_coef: float = 0.5,
    warmup_frac: float = 0.1,
) -> torch.Tensor:
    """Auxiliary-confidence loss (Burns et al. 2023): xent against (1-a)·labels + a·hardened student.

    a rises linearly from 0 to ``aux_coef`` over the first ``warmup_frac`` of training, then stays there.
    (The paper's code multiplies by step_frac itself during warm-up, so its a jumps from
    0.1·aux_coef to aux_coef at warmup_frac = 10% of training; this follows the intended linear ramp.)
    """
    ramp = 1.0 if warmup_frac <= 0 else min(1.0, step_frac / warmup_frac)
    coef = aux_coef * ramp
    probs = torch.softmax(logits.float(), dim=-1)
    hard = harden_balanced(probs.detach(), labels)
    target = labels.float() * (1 - coef) + hard * coef
    return _soft_xent(logits, target)


@register_loss("product")
def product(
    logits: torch.Tensor,
    labels: torch.Tensor,
    step_frac: float,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> torch.Tensor:
    """xent against target ∝ labels^alpha · student^beta (normalised, no gradient through the target)."""
    probs = torch.softmax(logits.float(), dim=-1).detach()
    target = labels.float().clamp(min=0).pow(alpha) * probs.pow(beta)
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-12)
    return _soft_xent(logits, target)
