import math

import pytest
import torch

from w2sg.errors import W2SGError
from w2sg.losses import LOSSES, harden_balanced, make_loss, validate_loss


def test_registry_holds_the_documented_losses():
    assert {"xent", "kl", "logconf", "product"} <= set(LOSSES)


def test_xent_on_soft_labels_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p = [.5,.5] and [.75,.25]
    labels = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    expected = (-(0.2 * math.log(0.5) + 0.8 * math.log(0.5)) - math.log(0.75)) / 2
    assert make_loss({"name": "xent"})(logits, labels, 0.0).item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_xent_minus_label_entropy():
    logits = torch.tensor([[0.3, -0.2], [1.0, 2.0]])
    labels = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    xent = make_loss({"name": "xent"})(logits, labels, 0.0).item()
    ent = -(labels * labels.log()).sum(-1).mean().item()
    assert make_loss({"name": "kl"})(logits, labels, 0.0).item() == pytest.approx(xent - ent, rel=1e-5)
    assert make_loss({"name": "kl"})(labels.log(), labels, 0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_hardening_keeps_the_weak_label_class_balance():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.45, 0.55], [0.2, 0.8]])
    weak = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.1, 0.9]])  # mean p(1) = 0.375
    hard = harden_balanced(probs, weak)
    # threshold = quantile(p0, 0.375) = 0.5625 -> the rows with p0 < 0.5625 become class 1
    assert hard.tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]


def test_logconf_by_hand_after_warmup():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([[0.6, 0.4], [0.3, 0.7]])  # mean p(1) = 0.55
    p = torch.softmax(logits, -1)
    # p0 = [0.881, 0.269]; threshold = quantile(p0, 0.55) = 0.269 + 0.55*(0.881-0.269); row 2 is below -> class 1
    hard = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a = 0.5
    target = labels * (1 - a) + hard * a
    expected = -(target * p.log()).sum(-1).mean().item()
    got = make_loss({"name": "logconf", "aux_coef": 0.5, "warmup_frac": 0.1})(logits, labels, 0.5).item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_logconf_warms_up_linearly_not_in_a_jump():
    """a = aux_coef * step_frac / warmup_frac during warm-up: at half the warm-up it is half of aux_coef."""
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([[0.6, 0.4], [0.3, 0.7]])
    fn = make_loss({"name": "logconf", "aux_coef": 0.5, "warmup_frac": 0.2})
    xent = make_loss({"name": "xent"})(logits, labels, 0.0).item()
    full = fn(logits, labels, 0.2).item()
    half = fn(logits, labels, 0.1).item()
    assert fn(logits, labels, 0.0).item() == pytest.approx(xent)
    # the loss is linear in a, so half the warm-up gives the midpoint
    assert half == pytest.approx((xent + full) / 2, rel=1e-6)
    assert fn(logits, labels, 0.9).item() == pytest.approx(full)


def test_product_by_hand():
    logits = torch.tensor([[math.log(3.0), 0.0]])  # p = [.75, .25]
    labels = torch.tensor([[0.4, 0.6]])
    t = torch.tensor([0.75 * 0.4, 0.25 * 0.6])
    t = t / t.sum()
    expected = -(t[0] * math.log(0.75) + t[1] * math.log(0.25)).item()
    assert make_loss({"name": "product", "alpha": 1.0, "beta": 1.0})(logits, labels, 0.3).item() == pytest.approx(expected)
    # beta = 0 ignores the student: plain xent
    assert make_loss({"name": "product", "alpha": 1.0, "beta": 0.0})(logits, labels, 0.3).item() == pytest.approx(
        make_loss({"name": "xent"})(logits, labels, 0.3).item())


def test_unknown_loss_and_parameter_name_the_valid_ones():
    with pytest.raises(W2SGError, match="unknown loss 'nope'; valid: .*logconf.*xent"):
        validate_loss({"name": "nope"})
    with pytest.raises(W2SGError, match="no parameter 'aux_coeff'; valid: aux_coef, warmup_frac"):
        validate_loss({"name": "logconf", "aux_coeff": 1.0})
