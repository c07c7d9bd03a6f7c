"""retrain.label_issues in this process (issue 29): out-of-fold probabilities from retrain's own new layer,
cleanlab's ranking, and report.html's list. A whole run on real photos with planted errors is
e2e/test_label_issues_run.py's."""
import argparse
import os

import numpy as np
from PIL import Image

from retrain import label_issues, report, train

FLAGS = argparse.Namespace(l2_regularization=0.01, learning_rate=0.01, how_many_training_steps=400,
                           train_batch_size=100, eval_step_interval=400, summaries_dir="")
LABELS = ["a", "b", "c"]


def head(x, y):
    return train.train_head(x, y, None, len(LABELS), FLAGS, quiet=True)


def clusters(per_class=40, seed=0):
    """Three well-separated Gaussian clusters of 16-dimensional 'bottlenecks' and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (len(LABELS), 16))
    y = np.repeat(np.arange(len(LABELS)), per_class)
    return (centres[y] + rng.normal(0, 1, (len(y), 16))).astype(np.float32), y


def test_flipped_labels_come_first_with_the_right_suggestion():
    x, truth = clusters()
    y = truth.copy()
    flipped = [3, 50, 97, 110]
    for i in flipped:
        y[i] = (truth[i] + 1) % len(LABELS)
    paths = [f"photo{i}.jpg" for i in range(len(y))]
    folds = []
    issues = label_issues.find(paths, x, y, LABELS, head, on_fold=lambda: folds.append(1))
    assert len(folds) == label_issues.FOLDS  # every class has 10 photos or more: 10 folds
    assert {issue.path for issue in issues[:len(flipped)]} == {paths[i] for i in flipped}
    for issue in issues[:len(flipped)]:
        i = paths.index(issue.path)
        assert (issue.given, issue.suggested) == (LABELS[y[i]], LABELS[truth[i]]) and issue.score < 0.2
    scores = [issue.score for issue in issues]
    assert scores == sorted(scores)  # likeliest first: the lowest probability of the given label


def test_clean_labels_give_none_and_too_few_photos_give_nothing():
    x, y = clusters()
    assert label_issues.find([str(i) for i in range(len(y))], x, y, LABELS, head) == []
    few = np.array([0, 0, 1, 1, 2])  # class c has one photo: nothing can be held out for it
    assert label_issues.folds_for(few, 3) == 1
    assert label_issues.find(list("abcde"), x[:5], few, LABELS, head) == []
    assert label_issues.folds_for(np.array([0, 0, 0, 1, 1, 2, 2]), 3) == 2  # as many folds as the rarest class


def test_the_report_shows_them_with_thumbnails(tmp_path):
    photo = tmp_path / "roses" / "bedroom.jpg"
    photo.parent.mkdir()
    Image.new("RGB", (300, 200), (90, 60, 30)).save(photo)
    run = report.Run(["roses", "tulips"], "mobilenet_v2", "imagenet", counts={"training": {}, "validation": {},
                     "testing": {}}, skipped={}, settings={})
    run.label_issues = [label_issues.LabelIssue(str(photo), "roses", "tulips", 0.0123),
                        label_issues.LabelIssue(str(tmp_path / "gone.jpg"), "tulips", "roses", 0.2)]
    page = open(report.write(str(tmp_path / "model"), run)).read()
    section = page.split('<div id="label-issues">', 1)[1]
    assert "Likely label errors (2)" in page
    assert section.index(str(photo)) < section.index("gone.jpg")  # in the order given: likeliest first
    assert "given <b>roses</b>, suggested <b>tulips</b>" in section and "0.012" in section
    assert 'src="report/label-issues/0.jpg"' in section and 'src="report/label-issues/1.jpg"' not in section
    with Image.open(tmp_path / "model" / "report" / "label-issues" / "0.jpg") as thumbnail:
        assert max(thumbnail.size) == report.THUMBNAIL
    assert not os.path.exists(tmp_path / "model" / "report" / "label-issues" / "1.jpg")  # unreadable: listed only
