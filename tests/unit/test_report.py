"""retrain's report (issue 19), its figures: precision, recall and F1 per class, Wilson intervals."""
import os

import pytest

from retrain import report


def test_wilson_interval():
    """The 95% interval of a proportion: Wilson's, as statistics texts give it (e.g. 8 of 10: 0.490 to 0.943)."""
    low, high = report.wilson_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    assert report.wilson_interval(0, 20)[0] == 0.0 and report.wilson_interval(20, 20)[1] == pytest.approx(1.0)
    assert report.wilson_interval(0, 0) == (0.0, 0.0)


def test_per_class_precision_recall_f1():
    import numpy as np
    matrix = np.array([[8, 2], [1, 9]])  # rows: true
    (p0, r0, f0, s0), (p1, r1, f1, s1) = report.per_class(matrix)
    assert (p0, r0, s0) == (8 / 9, 0.8, 10) and (p1, r1, s1) == (9 / 11, 0.9, 10)
    assert f0 == pytest.approx(2 * p0 * r0 / (p0 + r0))
    assert os.path.basename(report.HTML) == "report.html"
