"""report.html read back as a person sees it: retrain's report (retrain/report.py)."""
from html.parser import HTMLParser


class Page(HTMLParser):
    """The report's tables (by id, rows of cell texts), headings, picture sources, and the photos' paths of each
    list (`lists`, by the id of its div: misclassified, label-issues); `paths` are the misclassified ones."""

    def __init__(self, text):
        super().__init__()
        self.tables, self.headings, self.pictures, self.lists = {}, [], [], {}
        self._table = self._row = self._cell = self._heading = self._path = self._list = None
        self.feed(text)

    @property
    def paths(self):
        return self.lists.get("misclassified", [])

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
        elif tag == "div" and attrs.get("id"):
            self._list = self.lists.setdefault(attrs["id"], [])

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
            self._list.append(self._path)
            self._path = None
        elif tag == "div":
            self._list = None

    def handle_data(self, data):
        for name in ("_cell", "_heading", "_path"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name) + data)
