"""Registers a weak-label method whose work is done in a helper module of the package."""

from w2sg.extensions import register_method
from w2sg_test_pkg.helpers import confident_rows


@register_method("ext_pkg_keep_confident")
def keep_confident(probs, features, threshold: float = 0.6):
    """Keep the rows whose top class probability is at least ``threshold``."""
    keep = confident_rows(probs, threshold)
    return probs[keep], keep
