"""Progress bars for long work: tqdm on a terminal; elsewhere (a log file, a pipe, CI) one plain line
every few seconds, instead of one line full of carriage returns."""
import sys

from tqdm import tqdm

LOG_INTERVAL = 5  # seconds between two lines when the output is not a terminal


class _Lines:
    """A file for tqdm that turns each redraw of the bar into one line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        for line in text.replace("\r", "\n").split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self):
        self.stream.flush()


def bar(*args, **kwargs):
    """tqdm(*args, **kwargs), in lines every LOG_INTERVAL seconds when stderr is not a terminal."""
    if not sys.stderr.isatty():
        kwargs.setdefault("file", _Lines(sys.stderr))
        kwargs.setdefault("mininterval", LOG_INTERVAL)
    return tqdm(*args, **kwargs)


write = tqdm.write  # a message that does not break the bar
