"""The package's helper: the extension's results depend on this file, which registers nothing."""

import numpy as np


def confident_rows(probs, threshold):
    return np.flatnonzero(np.asarray(probs).max(axis=1) >= threshold)
