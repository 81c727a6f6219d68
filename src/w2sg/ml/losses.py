"""Losses for training on (soft) labels: a registry of plain functions.

Every loss is ``fn(logits [B, C], labels [B, C] soft targets, step_frac in [0, 1], **params) -> scalar``.
``step_frac`` is the fraction of training done, for warm-ups. A new loss is one function decorated with
``@register_loss("name")`` plus one YAML file under conf/loss/ holding ``name`` and the keyword arguments.

Auxiliary terms (the student's own predictions) make sense only when the labels come from another model,
so stages that train on ground truth always use ``xent`` (see w2sg.run.runner).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Mapping

from w2sg.core.registry import Registry, check_choice
from w2sg.ml.lazy import F, torch  # imported at the first loss computed: the registry is checked without torch

LossFn = Callable[..., Any]  # fn(logits, labels, step_frac, **params) -> scalar tensor
LOSSES = Registry("loss")


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator: ``loss.name=<name>`` selects ``fn`` (also from a module listed in ``extensions:``)."""
    return LOSSES.register(name)


def loss_params(fn: LossFn) -> Dict[str, Any]:
    """The tunable keyword arguments of a loss and their defaults."""
    sig = inspect.signature(fn)
    return {n: p.default for n, p in list(sig.parameters.items())[3:]}


def validate_loss(cfg: Mapping[str, Any]) -> None:
    """Check a loss config (name + keyword arguments) against the registry, naming what is valid."""
    check_choice("loss", LOSSES, cfg, loss_params)


def make_loss(cfg: Mapping[str, Any]) -> Callable[..., Any]:
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


def warmed_up(coef: float, warmup_frac: float, step_frac: float) -> float:
    """``coef`` scaled by a linear ramp from 0 over the first ``warmup_frac`` of training, then constant."""
    return coef * (1.0 if warmup_frac <= 0 else min(1.0, step_frac / warmup_frac))


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
    coef = warmed_up(aux_coef, warmup_frac, step_frac)
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


@register_loss("entropy")
def entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    step_frac: float,
    aux_coef: float = 0.5,
    warmup_frac: float = 0.1,
) -> torch.Tensor:
    """Entropy loss (EleutherAI/w2s, loss name ``entropy``): xent against the labels plus the student's entropy.

        L = (1 - a) · mean_i[-sum_c y_ic log p_ic] + a · mean_i[-sum_c p_ic log p_ic],   p = softmax(logits)

    with a rising linearly from 0 to ``aux_coef`` over the first ``warmup_frac`` of training, then constant.
    Minimising the second term makes the student more confident in whatever it already predicts, like
    ``logconf`` but without hardening (and without its class-balanced threshold).

    Source: EleutherAI/w2s, w2s/loss.py ``log_confidence_loss(..., harden=False)``, called for
    ``--loss entropy`` by ``CustomLossTrainer.compute_loss`` in w2s/sft.py: xent against the target
    (1 - a)·labels + a·softmax(logits).detach(), whose value is exactly L above. Differences:

    * Gradient: because that target is detached, its a-term has zero gradient (d/dz of -sum_c q_c log p_c with
      q = p is p - p = 0), so the repository's "entropy" loss trains exactly like (1 - a)·xent. Here the
      entropy term is differentiated, so it does push towards confident predictions, as the name means.
    * Warm-up: theirs is ``min(1, step / warmup_steps)`` over optimizer steps (``logconf_warmup_steps`` = 100
      of ~940 steps with their defaults: 10k examples, batch 32, 3 epochs); here it is the same linear ramp
      over a fraction of training, default 0.1 (about the same share). ``aux_coef`` is their ``logconf_weight``
      (default 0.5).
    * Their optional ``balance_batch`` (binary log-odds centring of the labels, off by default) is left out.
    """
    coef = warmed_up(aux_coef, warmup_frac, step_frac)
    logp = F.log_softmax(logits.float(), dim=-1)
    xent_term = -(labels.float() * logp).sum(-1).mean()
    entropy_term = -(logp.exp() * logp).sum(-1).mean()
    return (1 - coef) * xent_term + coef * entropy_term


@register_loss("window")
def window(
    logits: torch.Tensor,
    labels: torch.Tensor,
    step_frac: float,
    radius: float = 0.15,
) -> torch.Tensor:
    """Confidence-window loss (EleutherAI/w2s ``confidence_window_loss``): xent only where the student is unsure.

        keep_i = max_c p_ic < 0.5 + radius          (p = softmax(logits), the student's own prediction)
        L = (1 / B) · sum_{i: keep_i} [-sum_c y_ic log p_ic]

    i.e. examples on which the student is already confident (top-class probability at least 0.5 + radius)
    are dropped, whatever the weak label says. The sum is divided by the whole batch size B, not by the
    number kept, as in the source: a batch with nothing kept gives a loss of exactly 0 (zero gradient, no
    NaN), and radius >= 0.5 keeps everything, which is plain ``xent``. ``step_frac`` is unused.

    Source: EleutherAI/w2s, w2s/loss.py ``confidence_window_loss`` (loss name ``window``, default
    radius 0.15), binary there; here the same rule on the top class for any number of classes. Their blog
    runs use ``--radius midweak``: radius = the median over the training set of the weak labels' confidence
    |p_weak(1) - 0.5| (w2s/sft.py ``train``). A loss sees one batch only, so that is not computed here: set
    ``radius`` to that number to reproduce it.
    """
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)
    keep = logp.detach().exp().max(-1).values < 0.5 + float(radius)
    per_example = -(labels.float()[keep] * logp[keep]).sum(-1)
    return per_example.sum() / logits.shape[0]
