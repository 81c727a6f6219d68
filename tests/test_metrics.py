import numpy as np
import pytest

from w2sg.ml.metrics import accuracy, auroc, pgr


def test_pgr_arithmetic():
    assert pgr(0.6, 0.7, 0.8) == (pytest.approx(0.5), None)
    assert pgr(0.6, 0.8, 0.8)[0] == pytest.approx(1.0)
    assert pgr(0.6, 0.5, 0.8)[0] == pytest.approx(-0.5)
    assert pgr(0.6, 0.9, 0.8)[0] == pytest.approx(1.5)


@pytest.mark.parametrize("ceiling", [0.6, 0.55])
def test_pgr_is_null_with_a_reason_without_a_gap(ceiling):
    value, reason = pgr(0.6, 0.7, ceiling)
    assert value is None and "does not exceed weak" in reason


def test_accuracy_and_auroc():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = [0, 1, 1, 0]
    assert accuracy(probs, labels) == 0.5
    # positives' scores 0.8, 0.4; negatives' 0.1, 0.7: 3 of 4 pairs ordered right
    assert auroc(probs, labels) == pytest.approx(0.75)
    assert auroc(probs, [1, 1, 1, 1]) is None
