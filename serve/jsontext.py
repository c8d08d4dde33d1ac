"""Bounded JSON: parse in linear time under a value count, a nesting depth and a time budget; encode big arrays.

Why not plain ``json.loads``: it is linear in the text, but a JSON text's memory is not (a 3-byte ``[],`` becomes a
64-byte list), and it holds the GIL from start to end, so one large parse on a worker thread freezes the event loop
(health probes included). Here:

* the values a text can hold are bounded from above by counting separators first (``bytes.count``, C speed, before
  any object is built): a text that could hold more than ``max_values`` values, or more than
  :data:`MAX_JSON_OBJECTS` containers and strings, or more than :data:`MAX_JSON_STRUCTURE_BYTES` of anything
  but numbers (all of which the parser builds without a hook), is refused unparsed;
* every number goes through a Python hook that counts it, checks the deadline every 4096 numbers, and whose
  bytecode lets the interpreter hand the GIL to other threads (the event loop) every switch interval;
* nesting is bounded by the parser's own recursion guard, then checked against :data:`MAX_JSON_DEPTH` (exactly, from
  the parsed value, only when the bracket count says it could be exceeded).

Anything refused raises :class:`~blindnet.serve.errors.HTTPError`: 400 for malformed or too deeply nested JSON,
413 for too many values or a parse past its deadline.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from blindnet.serve.errors import HTTPError

#: A valid v2 request nests at most 7 deep ({"inputs": [{"data": [[[[...]]]]}]}); deeper JSON is refused.
MAX_JSON_DEPTH = 32
#: Most containers and strings one JSON text may hold (counted before parsing). The parser builds them without
#: calling back into Python, so without this cap a text of millions of ``[]`` would hold the GIL for seconds; a v2
#: request needs a handful (flat ``data`` is one list; nested ``data`` needs one list per pixel: send it flat).
MAX_JSON_OBJECTS = 65536
#: Most bytes of a JSON text that are not part of a list of numbers (anything but digits, ``-+.``, commas and
#: whitespace: strings, names, brackets, escapes). The parser handles those without calling back into Python, so
#: this bounds how long it holds the GIL in one go (a v2 request's own fields are a few hundred bytes).
MAX_JSON_STRUCTURE_BYTES = 1024 * 1024
_NUMBER_BYTES = b"0123456789-+.,\t\n\r "
#: Numbers parsed between two deadline checks.
_CHECK_EVERY = 4096
#: Values converted or encoded per step of the chunked loops (each step holds the GIL for about a millisecond).
CHUNK = 65536
_BRACKETS_ONLY = bytes(sorted(set(range(256)) - set(b"[]{}")))
_BINARY_HINT = "send tensors as binary data (Inference-Header-Content-Length) instead"


class ParseDeadline:
    """A monotonic deadline shared by the steps of one request's parse."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.at = None if seconds is None else time.monotonic() + seconds

    def check(self, what: str) -> None:
        """Raise 413 once the deadline has passed."""
        if self.at is not None and time.monotonic() > self.at:
            raise HTTPError(413, f"{what} took longer than {self.seconds:g} s to parse; {_BINARY_HINT}")


def value_bound(text: bytes) -> int:
    """An upper bound of the JSON values in ``text``, without parsing it (C-speed counts, linear time).

    Every value but the first follows a ``,``, a ``:`` or an opening bracket, so the count of those plus one bounds
    them (separators inside strings only make it larger).
    """
    return 1 + text.count(b",") + text.count(b":") + text.count(b"[") + text.count(b"{")


def bracket_depth_bound(text: bytes) -> int:
    """An upper bound of the nesting depth (brackets inside strings count too)."""
    brackets = np.frombuffer(text.translate(None, _BRACKETS_ONLY), np.uint8)
    if brackets.size == 0:
        return 0
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max())


class _NumberHook:
    """``parse_int``/``parse_float`` hooks: count numbers, stop at the limit and at the deadline."""

    def __init__(self, what: str, max_values: int, deadline: ParseDeadline) -> None:
        self.what, self.max_values, self.deadline = what, max_values, deadline
        self.count = 0

    def _tick(self) -> None:
        self.count += 1
        if self.count > self.max_values:
            raise HTTPError(413, f"{self.what} holds more than {self.max_values} JSON numbers; {_BINARY_HINT}")
        if self.count % _CHECK_EVERY == 0:
            self.deadline.check(self.what)

    def int(self, text: str) -> int:
        self._tick()
        return int(text)

    def float(self, text: str) -> float:
        self._tick()
        return float(text)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(
    text: bytes,
    what: str,
    *,
    max_bytes: int | None = None,
    max_values: int | None = None,
    deadline: ParseDeadline | None = None,
) -> Any:
    """Parse JSON ``text`` under the limits (see the module docstring); 400 / 413 on anything wrong."""
    deadline = deadline or ParseDeadline(None)
    if max_bytes is not None and len(text) > max_bytes:
        raise HTTPError(413, f"{what} is {len(text)} bytes of JSON; at most {max_bytes} are accepted; {_BINARY_HINT}")
    bound = value_bound(text)
    if max_values is not None and bound > max_values:
        raise HTTPError(413, f"{what} may hold up to {bound} JSON values; at most {max_values}; {_BINARY_HINT}")
    structure = len(text.translate(None, _NUMBER_BYTES))
    if structure > MAX_JSON_STRUCTURE_BYTES:
        raise HTTPError(
            413,
            f"{what} holds {structure} bytes of JSON other than numbers; at most {MAX_JSON_STRUCTURE_BYTES} "
            "(strings, names and brackets of a request are a few hundred bytes)",
        )
    objects = text.count(b"[") + text.count(b"{") + text.count(b'"') // 2
    if objects > MAX_JSON_OBJECTS:
        raise HTTPError(
            413,
            f"{what} may hold up to {objects} JSON arrays, objects and strings; at most {MAX_JSON_OBJECTS} "
            f"(send tensor data as one flat list); {_BINARY_HINT}",
        )
    hook = _NumberHook(what, max_values if max_values is not None else bound, deadline)
    try:
        value = json.loads(text, parse_int=hook.int, parse_float=hook.float, parse_constant=_no_constants)
    except RecursionError:
        raise HTTPError(400, f"{what} is JSON nested too deep; at most {MAX_JSON_DEPTH} levels are accepted") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, bad constants, oversized integers
        raise HTTPError(400, f"{what} is not valid JSON ({exc})") from None
    deadline.check(what)
    if bracket_depth_bound(text) > MAX_JSON_DEPTH:  # cheap bound first; the exact walk only when it could be deep
        depth = value_depth(value)
        if depth > MAX_JSON_DEPTH:
            raise HTTPError(400, f"{what} is JSON nested {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted")
    return value


def value_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion limit)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (list, dict)))
        elif isinstance(node, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in node if isinstance(v, (list, dict)))
    return deepest


# ----------------------------------------------------------------------------------------------------------------------
# JSON tensor data <-> arrays, in chunks
# ----------------------------------------------------------------------------------------------------------------------


def int_list_to_array(data: list, what: str, deadline: ParseDeadline) -> np.ndarray:
    """A JSON list of integers (flat, or nested lists of equal length) as one flat int64 array; 400 otherwise.

    Booleans are not integers here (JSON has a type of its own for them). Converted ``CHUNK`` values at a time, so
    the GIL is released between chunks and the deadline checked.
    """
    if data and isinstance(data[0], list):
        parts = [int_list_to_array(x, what, deadline) if isinstance(x, list) else None for x in data]
        if any(p is None for p in parts) or len({p.size for p in parts}) != 1:  # type: ignore[union-attr]
            raise HTTPError(400, f"{what} data is ragged or mixes lists and numbers")
        return np.concatenate(parts)  # type: ignore[arg-type]
    out = np.empty(len(data), np.int64)
    for start in range(0, len(data), CHUNK):
        chunk = data[start : start + CHUNK]
        if not set(map(type, chunk)) <= {int}:
            raise HTTPError(400, f"{what} UINT8 data must be integers in 0..255 (no booleans, strings or lists)")
        try:
            out[start : start + len(chunk)] = chunk
        except OverflowError:
            raise HTTPError(400, f"{what} UINT8 data must be integers in 0..255") from None
        deadline.check(what)
    return out


def json_array_text(arr: np.ndarray) -> bytes:
    """The JSON text of a flat list of ``arr``'s values (what ``json.dumps(arr.ravel().tolist())`` gives), built
    ``CHUNK`` values at a time so that a large answer never holds the GIL for long."""
    flat = arr.reshape(-1)
    pieces = []
    fmt = repr if flat.dtype.kind == "f" else str  # json.dumps writes floats with repr
    for start in range(0, flat.size, CHUNK):
        pieces.append(",".join(map(fmt, flat[start : start + CHUNK].tolist())))
    return ("[" + ",".join(pieces) + "]").encode()
