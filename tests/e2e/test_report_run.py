"""retrain's report.html (issue 19): what a person sees agrees with what retrain printed and wrote."""
import json

import pytest
from support.images import CLASSES
from support.models import read_labels
from support.report_page import Page


def printed_misclassified(stdout):
    lines = stdout.split("misclassified test images:\n", 1)[1].splitlines()
    return [line.strip().rsplit("  (true ", 1)[0] for line in lines if line.startswith("  ")]


def test_the_report_shows_what_the_run_printed(report_run):
    out, result = report_run
    assert f"report: {out / 'report.html'}" in result.stdout
    page = Page((out / "report.html").read_text())
    labels = read_labels(out)
    sidecar = json.loads((out / "model.json").read_text())

    accuracy = {row[0]: row for row in page.tables["accuracy"][1:]}
    _, shown, interval, photos = accuracy["test"]
    tested = int(photos)
    assert float(shown) == pytest.approx(sidecar["accuracy"]["test"], abs=5e-5)
    low, high = (float(x) for x in interval.split(" .. "))
    assert low <= float(shown) <= high and 0 < high - low < 1
    assert f"test accuracy = {float(shown):.4f} (N={tested})" in result.stdout

    per_class = page.tables["per-class"]
    assert [row[0] for row in per_class[1:]] == labels  # every class
    assert sum(int(row[4]) for row in per_class[1:]) == tested

    confusion = page.tables["confusion"]
    assert confusion[0] == ["true \\ predicted"] + labels and [row[0] for row in confusion[1:]] == labels
    counts = [[int(c) for c in row[1:]] for row in confusion[1:]]
    assert sum(map(sum, counts)) == tested  # the confusion matrix sums to the test count
    assert sum(counts[i][i] for i in range(len(labels))) == round(float(shown) * tested)

    wrong = printed_misclassified(result.stdout)
    assert wrong, "the run was meant to get some test photos wrong"
    assert len(wrong) == tested - sum(counts[i][i] for i in range(len(labels)))  # every wrong one, once
    assert page.paths == wrong  # the misclassified list matches the printed one
    assert f"Misclassified test photos ({len(wrong)})" in page.headings
    for i in range(len(wrong)):
        assert f"report/misclassified/{i}.jpg" in page.pictures
        assert (out / "report" / "misclassified" / f"{i}.jpg").read_bytes()[:2] == b"\xff\xd8"

    data = {row[0]: [int(c) for c in row[1:]] for row in page.tables["data"][1:]}
    assert set(data) == set(labels) == set(CLASSES)
    assert all(total == 12 and train + val + test == total for train, val, test, total in data.values())
    for name in ("confusion.png", "curves.png"):
        assert f"report/{name}" in page.pictures
        assert (out / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    settings = dict(page.tables["settings"][1:])
    assert settings["--how_many_training_steps"] == "1" and settings["--testing_percentage"] == "40"
