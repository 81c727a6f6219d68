import math

import pytest
import torch

from w2sg.core.errors import W2SGError
from w2sg.ml.losses import LOSSES, harden_balanced, make_loss, validate_loss


def test_registry_holds_the_documented_losses():
    assert {"xent", "kl", "logconf", "product", "entropy", "window"} <= set(LOSSES)


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


def _entropy_loss(aux_coef=0.5, warmup_frac=0.1):
    return make_loss({"name": "entropy", "aux_coef": aux_coef, "warmup_frac": warmup_frac})


def test_entropy_by_hand_after_warmup():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # p = [.75,.25] and [.5,.5]
    labels = torch.tensor([[0.4, 0.6], [0.9, 0.1]])
    xent = (-(0.4 * math.log(0.75) + 0.6 * math.log(0.25)) - math.log(0.5)) / 2
    ent = (-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) + math.log(2.0)) / 2
    expected = 0.7 * xent + 0.3 * ent
    assert _entropy_loss(0.3, 0.1)(logits, labels, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_entropy_value_matches_eleuther_soft_target_form():
    """EleutherAI/w2s computes it as xent against (1-a)·labels + a·softmax(logits).detach(): same value."""
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.4, 0.1]])
    labels = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.55, 0.45]])
    a = 0.5
    p = torch.softmax(logits, -1)
    target = (1 - a) * labels + a * p
    expected = -(target * p.log()).sum(-1).mean().item()
    assert _entropy_loss(a, 0.1)(logits, labels, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_entropy_warms_up_linearly_from_xent():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([[0.6, 0.4], [0.3, 0.7]])
    fn = _entropy_loss(0.5, 0.2)
    xent = make_loss({"name": "xent"})(logits, labels, 0.0).item()
    full = fn(logits, labels, 0.2).item()
    assert full != pytest.approx(xent)  # the entropy term is on after warm-up
    assert fn(logits, labels, 0.0).item() == pytest.approx(xent)  # a = 0 at the start: plain xent
    assert fn(logits, labels, 0.1).item() == pytest.approx((xent + full) / 2, rel=1e-6)  # linear in a
    assert fn(logits, labels, 0.9).item() == pytest.approx(full)  # constant after warm-up
    # no warm-up: the full coefficient from the first step
    assert _entropy_loss(0.5, 0.0)(logits, labels, 0.0).item() == pytest.approx(full)


def test_entropy_gradient_flows_through_the_entropy_term():
    """Labels equal to the student's prediction: the xent part has zero gradient, the entropy part pushes
    towards the class the student already prefers (dH/dz_k = -p_k (log p_k + H)).
    EleutherAI/w2s detaches the student's prediction, which would make this gradient exactly zero."""
    logits = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)  # p = [.75, .25]
    labels = torch.tensor([[0.75, 0.25]])
    a = 0.4
    _entropy_loss(a, 0.1)(logits, labels, 1.0).backward()
    p = torch.tensor([0.75, 0.25])
    h = -(p * p.log()).sum()
    expected = a * (-p * (p.log() + h))  # = [-0.0824, +0.0824]
    assert torch.allclose(logits.grad[0], expected, atol=1e-6)
    assert logits.grad[0, 0] < 0  # gradient descent raises the preferred class's logit


def test_entropy_gradient_by_hand_with_xent_part():
    logits = torch.tensor([[0.5, -0.5], [0.0, 2.0]], requires_grad=True)
    labels = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    a = 0.5
    _entropy_loss(a, 0.1)(logits, labels, 1.0).backward()
    p = torch.softmax(logits.detach(), -1)
    h = -(p * p.log()).sum(-1, keepdim=True)
    expected = ((1 - a) * (p - labels) + a * (-p * (p.log() + h))) / 2
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def _window_loss(radius):
    return make_loss({"name": "window", "radius": radius})


def test_window_keeps_only_examples_where_the_student_is_unsure():
    # student top-class probabilities: .75, .5, .9; weak labels do not decide what is kept
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, math.log(9.0)]])
    labels = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.99, 0.01]])
    ce = [-(0.5 * math.log(0.75) + 0.5 * math.log(0.25)), -math.log(0.5), -(0.99 * math.log(0.1) + 0.01 * math.log(0.9))]
    # radius .3: threshold .8 keeps rows 1 and 2; divided by the whole batch (3), not by the 2 kept
    assert _window_loss(0.3)(logits, labels, 0.5).item() == pytest.approx((ce[0] + ce[1]) / 3, rel=1e-6)
    # radius .15 (the default): threshold .65 keeps row 2 only
    assert make_loss({"name": "window"})(logits, labels, 0.5).item() == pytest.approx(ce[1] / 3, rel=1e-6)
    # radius >= .5 keeps everything: plain xent
    assert _window_loss(0.51)(logits, labels, 0.5).item() == pytest.approx(
        make_loss({"name": "xent"})(logits, labels, 0.5).item(), rel=1e-6)


def test_window_threshold_is_strict():
    logits = torch.tensor([[0.0, 0.0]])  # p = [.5, .5] exactly
    labels = torch.tensor([[1.0, 0.0]])
    assert _window_loss(0.0)(logits, labels, 0.0).item() == 0.0  # .5 < .5 is false: dropped
    assert _window_loss(0.01)(logits, labels, 0.0).item() == pytest.approx(math.log(2.0))


def test_window_that_drops_everything_gives_zero_not_nan():
    logits = torch.tensor([[3.0, 0.0], [0.0, 4.0]], requires_grad=True)
    labels = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    loss = _window_loss(0.0)(logits, labels, 0.3)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_window_gradient_flows_through_kept_examples_only():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(9.0)]], requires_grad=True)  # max p .75, .9
    labels = torch.tensor([[0.2, 0.8], [0.7, 0.3]])
    _window_loss(0.3)(logits, labels, 0.0).backward()  # keeps row 1 only
    p0 = torch.tensor([0.75, 0.25])
    assert torch.allclose(logits.grad[0], (p0 - labels[0]) / 2, atol=1e-6)
    assert torch.equal(logits.grad[1], torch.zeros(2))


def test_new_losses_name_their_parameters():
    with pytest.raises(W2SGError, match="no parameter 'raduis'; valid: radius"):
        validate_loss({"name": "window", "raduis": 0.2})
    with pytest.raises(W2SGError, match="valid: aux_coef, warmup_frac"):
        validate_loss({"name": "entropy", "logconf_weight": 0.5})
