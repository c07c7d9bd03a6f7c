"""Probabilities -> the best labels: shared by the inference core and the stream's remote mode.

Kept apart from classify_server.engines.tf_session so that ranking does not import TensorFlow.
"""
from collections.abc import Sequence

import numpy as np


def top_k(labels: Sequence[str], probabilities: np.ndarray, k: int) -> list[list[str | float]]:
    """[[label, score], ...] best first, for one probability vector in label order."""
    order = np.argsort(-probabilities)[:k]
    return [[labels[i], float(probabilities[i])] for i in order]
