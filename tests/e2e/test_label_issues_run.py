"""Likely label errors on real photos (issue 29): photos planted under the wrong class among the shared
flowers come first in the list retrain prints (--print_label_issues) and report.html shows."""
import json
import os
import shutil

import pytest
from support.models import FLOWERS, LITE0_PRESET
from support.processes import run_retrain
from support.report_page import Page

from retrain.images import which_set

PER_CLASS = 100  # of each class's photos, linked in place: the list is judged among 500 real ones
PLANTED = 20  # 4 more photos of each class, copied under each of the 4 other classes


def printed_issues(stdout):
    """[(path, given, suggested)] of the list --print_label_issues prints, in its order."""
    lines = stdout.split("likely label errors: ", 1)[1].splitlines()[1:]
    issues = []
    for line in lines:
        if not line.startswith("  "):
            break
        path, rest = line.strip().rsplit("  (given ", 1)
        given, rest = rest.split(", suggested ", 1)
        issues.append((path, given, rest.split(", ", 1)[0]))
    return issues


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """(model folder, retrain's CompletedProcess, {planted path: (true label, given label)}); the photos, the
    copies and the model are removed afterwards."""
    if not (os.path.isdir(FLOWERS) and os.path.isdir(LITE0_PRESET)):
        pytest.skip(f"real data absent: needs {FLOWERS} and {LITE0_PRESET}")
    root = tmp_path_factory.mktemp("planted")
    try:
        images = root / "flowers"
        labels = sorted(d for d in os.listdir(FLOWERS) if os.path.isdir(os.path.join(FLOWERS, d)))
        for label in labels:
            os.makedirs(images / label)
        planted = {}
        for c, label in enumerate(labels):
            names = sorted(os.listdir(os.path.join(FLOWERS, label)))
            for name in names[:PER_CLASS]:
                os.symlink(os.path.join(FLOWERS, label, name), images / label / name)
            # Outside the subset, and not in the test split (the list ranks the photos a run trains on).
            extra = [n for n in names[PER_CLASS:] if which_set(n, 10, 10) != "testing"][:PLANTED // len(labels)]
            for j, name in enumerate(extra):
                wrong = labels[(c + 1 + j) % len(labels)]
                shutil.copy(os.path.join(FLOWERS, label, name), images / wrong / name)
                planted[str(images / wrong / name)] = (label, wrong)
        assert len(planted) == PLANTED
        out = root / "model"
        result = run_retrain("--image_dir", images, "--architecture", "efficientnet_lite0", "--weights", LITE0_PRESET,
                             "--output_dir", out, "--bottleneck_dir", root / "bottlenecks", "--summaries_dir", "",
                             "--tflite_quantization", "none", "--print_label_issues")
        yield out, result, planted
    finally:
        shutil.rmtree(root)


def test_planted_label_errors_come_first(planted_run):
    out, result, planted = planted_run
    issues = printed_issues(result.stdout)
    print("\n".join(f"{i:3d} {'PLANTED' if p in planted else '       '} {p} given {g}, suggested {s}"
                    for i, (p, g, s) in enumerate(issues[:40])))
    found = [(p, g, s) for p, g, s in issues[:40] if p in planted]
    print(f"{len(found)} of the {PLANTED} planted among the first 40 of {len(issues)}")
    assert len(found) >= 15
    for path, given, _ in found:
        assert given == planted[path][1]  # the folder's label, as given
    # The suggestion is the photo's true class for nearly all of them.
    assert sum(suggested == planted[path][0] for path, _, suggested in found) >= len(found) - 2
    assert f"likely label errors: {len(issues)} of the " in result.stdout
    assert json.loads((out / "model.json").read_text())["label_issues"] == len(issues)


def test_the_report_shows_them(planted_run):
    out, result, planted = planted_run
    issues = printed_issues(result.stdout)
    page = Page((out / "report.html").read_text())
    assert page.lists["label-issues"] == [path for path, _, _ in issues]  # the same list, in the same order
    assert f"Likely label errors ({len(issues)})" in page.headings
    for i, (path, _, _) in enumerate(issues[:40]):
        if path in planted:
            assert f"report/label-issues/{i}.jpg" in page.pictures
            assert (out / "report" / "label-issues" / f"{i}.jpg").read_bytes()[:2] == b"\xff\xd8"
    assert "label issues (s)" in dict(page.tables["run"][1:])
