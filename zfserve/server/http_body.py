"""Request bodies of the HTTP side: :class:`HttpError`, :func:`read_body`, and JSON read within limits that are
checked before and while parsing (:func:`load_json`).

Why not ``json.loads`` on the whole body: it is one call into C that holds the GIL from the first byte to the
last (a 57 MiB tensor took 2.1 s, during which the event loop that gRPC shares could not run, even from a worker
thread), it recurses once per nesting level (a body nested 100,000 deep raised RecursionError, a 500), and it
builds a Python float per number (28 bytes each) before numpy copies them again. Here, before any parse:

1. counts made at C speed refuse a body with more brackets, braces, quotes and backslashes than
   :data:`MAX_STRUCTURE`, or more values (commas + 1) than ``max_values``;
2. one pass over those structural bytes (bounded by step 1) checks the nesting depth (:data:`MAX_DEPTH`) and
   finds the arrays that hold only numbers;
3. long number arrays are cut out (:class:`NumberArray`, converted later in pieces of :data:`PIECE_BYTES`, each
   a short C call, so another thread gets the GIL between pieces); what is left, the skeleton, is at most
   :data:`MAX_SKELETON_BYTES` and is parsed by ``json.loads``.
Every refusal is an :class:`HttpError` naming the field: 413 for a body over a size limit, 400 otherwise.
"""

from __future__ import annotations

import json
import re
import secrets

import numpy as np

MAX_DEPTH = 32                  # nesting levels (an OIP infer body with nested data needs 7)
MAX_STRUCTURE = 1 << 18         # brackets, braces, quotes and backslashes in one body
MAX_SKELETON_BYTES = 1 << 20    # the body less its long number arrays (names, shapes, parameters)
DEFAULT_MAX_VALUES = 1 << 21    # numbers in one body: 2,097,152 (13 images of 3 x 224 x 224 as JSON text)
PIECE_BYTES = 1 << 16           # a number array is converted in pieces of about this many bytes
MIN_ARRAY_BYTES = 64            # shorter number arrays stay in the skeleton
CONTROL_BODY_BYTES = 1 << 16    # the bodies of control routes (repository, the page's JSON requests)

_WINDOW = 1 << 20               # bytes scanned per call into C (the GIL can pass between calls)
_STRUCTURE = re.compile(rb'[\[\]{}"\\]')
_NUMBERS_ONLY = re.compile(rb"[0-9eE+\-.,\s]*")
_OPEN, _CLOSE, _QUOTE, _BACKSLASH = b"[{", b"]}", ord('"'), ord("\\")


class HttpError(Exception):
    """An error with its HTTP status; ``field`` names the request field when known."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}


async def read_body(request, limit: int, flag: str = "--max-message-bytes") -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (the listener refuses a declared length over the
    route's limit before reading; this counts what arrives)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"body: more than {limit} bytes; at most {limit} are accepted ({flag})", "body")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)   # one chunk (the listener's): as it is


class NumberArray:
    """A JSON array of numbers, kept as its text until :meth:`to_array` converts it piece by piece."""

    __slots__ = ("data", "start", "end")

    def __init__(self, data: bytes, start: int, end: int):
        self.data, self.start, self.end = data, start, end      # data[start] == "[", data[end] == "]"

    def to_array(self, dtype, field: str) -> np.ndarray:
        """The numbers as a 1-D array of ``dtype`` (float64 or int64), parsed in pieces of about
        :data:`PIECE_BYTES`; a value that is not a JSON number, or an integer beyond ``dtype``, is a 400."""
        data, position, end, parts = self.data, self.start + 1, self.end, []
        while True:
            stop = data.find(b",", min(position + PIECE_BYTES, end), end) if position + PIECE_BYTES < end else -1
            stop = end if stop < 0 else stop
            piece = data[position:stop]
            if not piece.strip() and (stop < end or parts):   # "[1,,2]" or "[1,2,]"
                raise HttpError(400, f"{field}: not a list of numbers (an empty element)", field)
            try:
                parts.append(np.array(json.loads(b"[" + piece + b"]"), dtype=dtype))
            except (ValueError, UnicodeDecodeError):
                raise HttpError(400, f"{field}: not a list of numbers", field) from None
            except OverflowError:
                raise HttpError(400, f"{field}: a value is out of range for {np.dtype(dtype).name}", field) from None
            if stop >= end:
                return np.concatenate(parts) if len(parts) > 1 else parts[0]
            position = stop + 1


def load_json(data, field: str = "body", *, max_values: int = DEFAULT_MAX_VALUES,
              flag: str = "--http-max-json-values"):
    """``data`` (bytes, or a bytes-like body the listener received into a memory map) parsed as JSON within the
    limits above; long number arrays come back as :class:`NumberArray`. Refusals name ``field`` and the limit."""
    values = _count(data, (b",",), stop_above=max_values)[0] + 1
    if values > max_values:
        raise HttpError(413, f"{field}: more than {max_values} JSON values; at most {max_values} are accepted "
                             f"({flag}); send large tensors as binary data (Inference-Header-Content-Length)", field)
    structure = sum(_count(data, (b"[", b"]", b"{", b"}", b'"', b"\\"), stop_above=MAX_STRUCTURE))
    if structure > MAX_STRUCTURE:
        raise HttpError(413, f"{field}: more than {MAX_STRUCTURE} brackets, braces and quotes; at most "
                             f"{MAX_STRUCTURE} are accepted (send tensors as flat arrays or as binary data)", field)
    arrays = _number_arrays(data, field)
    key = "\0zfserve-array-" + secrets.token_hex(8)
    marker = json.dumps(key).encode()
    pieces, position = [], 0
    for i, array in enumerate(arrays):
        pieces += [data[position:array.start], b"{%s:%d}" % (marker, i)]
        position = array.end + 1
    skeleton = b"".join(pieces) + data[position:] if arrays else data
    if len(skeleton) > MAX_SKELETON_BYTES:
        raise HttpError(413, f"{field}: {len(skeleton)} bytes of JSON besides number arrays; at most "
                             f"{MAX_SKELETON_BYTES} are accepted", field)
    skeleton = bytes(skeleton)

    def restore(obj: dict):
        return arrays[obj[key]] if len(obj) == 1 and key in obj else obj
    try:
        return json.loads(skeleton.decode("utf-8"), object_hook=restore,
                          parse_constant=lambda name: _refuse_constant(name, field))
    except UnicodeDecodeError:
        raise HttpError(400, f"{field}: not UTF-8 text (JSON bodies are UTF-8)", field) from None
    except RecursionError:   # not reachable past the depth check; kept so a change there cannot make a 500
        raise HttpError(400, f"{field}: nested deeper than {MAX_DEPTH} levels", field) from None
    except ValueError as exc:
        raise HttpError(400, f"{field}: not JSON ({exc})", field) from None


def _refuse_constant(name: str, field: str):
    raise HttpError(400, f"{field}: {name} is not JSON (numbers must be finite)", field)


def _number_arrays(data: bytes, field: str) -> list[NumberArray]:
    """One pass over the structural bytes: refuse nesting past :data:`MAX_DEPTH`; return the arrays of at least
    :data:`MIN_ARRAY_BYTES` that hold only number characters, outermost first. Malformed text is left to
    ``json.loads`` to describe."""
    stack: list[list] = []         # per open container: [its opening byte, its offset, holds structure]
    found, in_string, escaped = [], False, -1
    for at in _structure(data):
        if at == escaped:
            continue
        byte = data[at]
        if in_string:
            if byte == _BACKSLASH:
                escaped = at + 1
            elif byte == _QUOTE:
                in_string = False
            continue
        if byte == _QUOTE:
            in_string = True
            if stack:
                stack[-1][2] = True
        elif byte in _OPEN:
            if stack:
                stack[-1][2] = True
            if len(stack) >= MAX_DEPTH:
                raise HttpError(400, f"{field}: nested deeper than {MAX_DEPTH} levels", field)
            stack.append([byte, at, False])
        elif byte in _CLOSE:
            if not stack:
                break
            opening, start, nested = stack.pop()
            if opening == ord("[") and byte == ord("]") and not nested and at - start > MIN_ARRAY_BYTES and \
                    _numbers_only(data, start + 1, at):
                found.append(NumberArray(data, start, at))
    return sorted(found, key=lambda a: a.start)


def _count(data: bytes, tokens: tuple[bytes, ...], stop_above: int) -> list[int]:
    """How often each token occurs, counted a window at a time (each count is one short call into C); the
    counting stops once the total passes ``stop_above``."""
    counts = [0] * len(tokens)
    for start in range(0, len(data), _WINDOW):
        window = data[start:start + _WINDOW]   # bytes, whatever the body's type (bytes, a memory map)
        for i, token in enumerate(tokens):
            counts[i] += window.count(token)
        if sum(counts) > stop_above:
            break
    return counts


def _structure(data: bytes):
    """The offsets of structural bytes, searched a window at a time."""
    position, size = 0, len(data)
    while position < size:
        match = _STRUCTURE.search(data, position, min(size, position + _WINDOW))
        if match is None:
            position += _WINDOW
            continue
        yield match.start()
        position = match.start() + 1


def _numbers_only(data: bytes, start: int, end: int) -> bool:
    return all(_NUMBERS_ONLY.fullmatch(data, at, min(end, at + _WINDOW)) for at in range(start, end, _WINDOW))


def numbers(value, dtype, field: str) -> np.ndarray:
    """A JSON tensor's ``data`` (a number, a :class:`NumberArray`, or lists of them, nested) as one flat
    array of ``dtype`` in row-major order; anything else is a 400 naming ``field``."""
    parts, small = [], []

    def flush():
        if small:
            try:
                parts.append(np.array(small, dtype=dtype))
            except OverflowError:
                raise HttpError(400, f"{field}: a value is out of range for {np.dtype(dtype).name}", field) from None
            small.clear()

    stack = [iter([value])]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        elif isinstance(item, NumberArray):
            flush()
            parts.append(item.to_array(dtype, field))
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            small.append(item)
        else:
            raise HttpError(400, f"{field}: not a (nested) list of numbers ({type(item).__name__} found)", field)
    flush()
    if not parts:
        return np.zeros(0, dtype)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


_END = object()

__all__ = ["CONTROL_BODY_BYTES", "DEFAULT_MAX_VALUES", "HttpError", "MAX_DEPTH", "NumberArray", "load_json",
           "numbers", "read_body"]
