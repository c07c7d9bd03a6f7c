"""JSON from the network, read one way by every route that takes it (TF Serving REST, V2 REST) and by the
stream's remote mode: nesting deeper than MAX_DEPTH is refused before Python's json, which recurses once
per level, ever sees it (100,000 '[' would be a RecursionError, a 500 and a worker's stack spent)."""
from __future__ import annotations

import json
import re

import numpy as np

from classify_server.core.inference import INVALID_INPUT, InferenceError

MAX_DEPTH = 32  # the deepest request of any protocol here is 5 levels; room for clients' extra fields

# A whole string (escapes included, so that brackets inside it do not count), or a quote that starts no
# complete string, with everything after it (not JSON: json.loads says so). Linear: every character of a string
# matches one way only, and a string that never ends is given up on once.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|"[\s\S]*', re.DOTALL)
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_CHUNK = 1 << 20  # brackets counted a chunk at a time: bounded memory for a body of brackets only


def nests_deeper(data: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the arrays and objects of `data` nest deeper than `limit`, counted in C and numpy (a body
    of 10 MiB of brackets takes tenths of a second), without recursion."""
    if data.count(b"[") + data.count(b"{") <= limit:  # most bodies: too few brackets to need a look
        return False
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    level = 0
    for at in range(0, len(brackets), _CHUNK):
        chunk = np.frombuffer(brackets, np.uint8, min(_CHUNK, len(brackets) - at), at)
        steps = np.where((chunk == ord("[")) | (chunk == ord("{")), 1, -1).astype(np.int32)
        levels = np.cumsum(steps, dtype=np.int64) + level
        if levels.max() > limit:
            return True
        level = int(levels[-1])
    return False


def loads(data: bytes, what: str = "the request") -> object:
    """`data` parsed, or InferenceError(INVALID_INPUT) for what is not JSON or nests past MAX_DEPTH."""
    if nests_deeper(data):
        raise InferenceError(INVALID_INPUT, f"{what} nests JSON arrays and objects deeper than {MAX_DEPTH} levels")
    try:
        # UTF-8 only (RFC 8259, and TF Serving's parser): json.loads would also guess UTF-16 or 32, where a
        # quote or bracket byte can be half of another character and mislead the count above.
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # RecursionError: never past the check above; kept as a guard
        raise InferenceError(INVALID_INPUT, f"{what} is not valid JSON: {exc}"[:300]) from None
