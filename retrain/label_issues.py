"""Likely label errors: the photos a run trains on whose given label the rest of the data contradicts.

Users' photos are noisy (a bedroom filed under roses, a fountain under tulips), and a wrong label teaches
the model the wrong thing. Each photo's class probabilities come from the same new layer trained on the
other folds (out of fold, FOLDS-fold, on the cached bottlenecks: seconds, no backbone run), so no photo
vouches for its own label. The list is the photos whose held-out layer likes another class better than the
given one (cleanlab's `find_label_issues`, filter "predicted_neq_given"), ranked likeliest first by
cleanlab's self-confidence: the lowest probability of the given label. Confident learning's own filter
(pruning by estimated noise rates) flagged fewer: with 20 photos planted among 500 shared flowers it
listed 22 to 27 on EfficientNet-Lite0's confident features and left 4 to 7 planted ones out of the first
40; the ranked disagreements put 18 of 20 there for Lite0 and MobileNetV2 alike, over 3 fold shuffles.
The suggested label is the one the held-out layer gives the highest probability.
"""
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

FOLDS = 10  # 10 rather than 5: each held-out layer sees 90 % of the photos, so ranks as the real one would


@dataclass
class LabelIssue:
    path: str
    given: str  # the label its folder gives it
    suggested: str  # the label the layer trained without it likes best
    score: float  # that layer's probability of the given label: the lower, the likelier it is wrong


def out_of_fold_probabilities(x: np.ndarray, y: np.ndarray, class_count: int,
                              train_head: Callable, folds: int, on_fold: Callable = lambda: None) -> np.ndarray:
    """[photos, classes]: each photo's probabilities from a layer `train_head(x, y)` fitted on the other folds
    (stratified, seeded: the same photos give the same ranking)."""
    from sklearn.model_selection import StratifiedKFold
    probabilities = np.zeros((len(y), class_count), np.float32)
    # Each fold's layer is a new tf.function: TensorFlow's "retracing" warning would read like a fault.
    tf_logger, level = logging.getLogger("tensorflow"), logging.getLogger("tensorflow").level
    tf_logger.setLevel(logging.ERROR)
    try:
        for train, held_out in StratifiedKFold(folds, shuffle=True, random_state=0).split(x, y):
            probabilities[held_out] = train_head(x[train], y[train]).predict_on_batch(x[held_out])
            on_fold()
    finally:
        tf_logger.setLevel(level)
    return probabilities


def folds_for(y: np.ndarray, class_count: int) -> int:
    """FOLDS, or fewer when a class has fewer photos than that (each fold holds one of each out); 0 or 1:
    too few photos to find anything."""
    return min(FOLDS, int(np.bincount(y, minlength=class_count).min()))


def find(paths: list, x: np.ndarray, y: np.ndarray, labels: list, train_head: Callable,
         on_fold: Callable = lambda: None) -> list:
    """[LabelIssue] of the photos (paths, bottlenecks [N, features], label indices), likeliest first."""
    from cleanlab.filter import find_label_issues
    folds = folds_for(y, len(labels))
    if folds < 2:
        return []
    probabilities = out_of_fold_probabilities(x, y, len(labels), train_head, folds, on_fold)
    ranked = find_label_issues(y, probabilities, filter_by="predicted_neq_given",
                               return_indices_ranked_by="self_confidence",
                               n_jobs=1)  # no worker processes forked from a process running TensorFlow
    return [LabelIssue(paths[i], labels[y[i]], labels[int(np.argmax(probabilities[i]))],
                       float(probabilities[i, y[i]])) for i in ranked]
