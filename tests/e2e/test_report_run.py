"""retrain's report.html (issue 19): what a person sees agrees with what retrain printed and wrote."""
import json
from html.parser import HTMLParser

import pytest
from support.images import CLASSES
from support.models import read_labels


class Page(HTMLParser):
    """The report's tables (by id, rows of cell texts), headings, picture sources and misclassified paths."""

    def __init__(self, text):
        super().__init__()
        self.tables, self.headings, self.pictures, self.paths = {}, [], [], []
        self._table = self._row = self._cell = self._heading = self._path = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag in ("h1", "h2", "h3"):
            self._heading = ""
        elif tag == "img":
            self.pictures.append(attrs["src"])
        elif tag == "span" and attrs.get("class") == "path":
            self._path = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append(self._heading)
            self._heading = None
        elif tag == "span" and self._path is not None:
            self.paths.append(self._path)
            self._path = None

    def handle_data(self, data):
        for name in ("_cell", "_heading", "_path"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name) + data)


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
