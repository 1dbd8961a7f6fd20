"""Plain values across the sandbox boundary: length-prefixed frames and a strict, typed value codec.

Stdlib only: the same source runs inside the sandbox (sent there by the launcher) and in the trusted checker.
Frames from the program are JSON, parsed by the checker with `json` (safe on any input); frames to the program
are `marshal` (fast, and the program's side can trust them). The program's side writes its JSON with the C
string escaper alone, so the sandboxed interpreter never imports `json` (and `re`): a third of its start-up.
`decode` builds nothing but exact builtin values (and a few stdlib value types) from a tree of JSON lists, so
whatever the program sends, the checker compares real ints, strs, lists... and never runs the program's code:
an object whose `__eq__` always answers True cannot cross. Objects that are not plain values stay inside the
sandbox and cross as opaque handles (`["H", ref, type name]`), which the caller turns into proxies.
"""

import marshal
import os

MAX_DEPTH = 200  # nesting of a value; deeper is refused rather than risking the checker's stack
HEADER = 4  # bytes of big-endian frame length


class ProtocolError(Exception):
    """A frame or value that does not follow the protocol (malformed, too deep, wrong types)."""


class FrameTooLarge(ProtocolError):
    """A frame longer than the receiver's limit."""


def write_frame(fd: int, data: bytes) -> None:
    view = memoryview(len(data).to_bytes(HEADER, "big") + data)
    while view:
        view = view[os.write(fd, view):]


def send(fd: int, message: dict) -> None:
    """A JSON frame (the program's side to the checker)."""
    write_frame(fd, dumps(message).encode("ascii"))


def send_trusted(fd: int, message: dict) -> None:
    """A marshal frame (the checker to the program's side, which may trust it)."""
    write_frame(fd, marshal.dumps(message))


def recv_trusted(fd: int) -> dict:
    return marshal.loads(_read_exactly(fd, int.from_bytes(_read_exactly(fd, HEADER), "big")))


def dumps(x: object) -> str:
    """JSON text of a message (dicts with str keys, lists, str, int, float, bool, None), ASCII only."""
    from _json import encode_basestring_ascii as quote

    t = type(x)
    if t is str:
        return quote(x)
    if t is list:
        return "[" + ",".join([dumps(v) for v in x]) + "]"
    if t is dict:
        return "{" + ",".join([quote(k) + ":" + dumps(v) for k, v in x.items()]) + "}"
    if x is None or t is bool:
        return "null" if x is None else "true" if x else "false"
    if t is int:
        return int.__repr__(x)
    if t is float:
        if x != x:
            return "NaN"
        return float.__repr__(x) if x not in (float("inf"), float("-inf")) else ("Infinity" if x > 0 else "-Infinity")
    raise TypeError(f"cannot send a {t.__name__}")


def _read_exactly(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the channel")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv(fd: int, limit: int) -> dict:
    """One JSON message; EOFError when the sender is gone, FrameTooLarge beyond `limit` bytes."""
    import json

    size = int.from_bytes(_read_exactly(fd, HEADER), "big")
    if size > limit:
        raise FrameTooLarge(f"a message of {size} bytes (limit {limit})")
    try:
        message = json.loads(_read_exactly(fd, size))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"malformed message: {exc}") from None
    if type(message) is not dict:
        raise ProtocolError("a message must be a JSON object")
    return message


def _type_name(obj: object) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


# Stdlib value types crossing by value, recognised by exact type name (no import needed to encode them).
_VALUE_TYPES = {"decimal.Decimal": "N", "fractions.Fraction": "Q", "collections.OrderedDict": "O",
                "collections.Counter": "K", "collections.deque": "E"}
_PLAIN_BASES = (int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset)


def encode(value: object, handle=None, depth: int = 0) -> object:
    """A JSON-able tree for `value`. `handle(obj)` gives the tree of an object that is not a plain value
    (a handle); without it such objects raise TypeError. Subclasses of builtins cross as their base value."""
    t = type(value)
    if value is None or t is bool or t is str or t is float:
        return value
    if t is int:
        return value if value.bit_length() <= 12000 else ["I", hex(value)]  # JSON ints stay parseable
    if depth >= MAX_DEPTH:
        raise ValueError(f"a value nested deeper than {MAX_DEPTH} levels")
    d = depth + 1
    if t is list or t is tuple or t is set or t is frozenset:
        return ["LTSF"[(list, tuple, set, frozenset).index(t)], *(encode(x, handle, d) for x in value)]
    if t is dict:
        return ["D", *(encode(x, handle, d) for kv in value.items() for x in kv)]
    if t is bytes or t is bytearray:
        return ["B" if t is bytes else "A", value.hex()]
    if t is complex:
        return ["C", value.real, value.imag]
    if t is range:
        return ["R", value.start, value.stop, value.step]
    tag = _VALUE_TYPES.get(_type_name(value))
    if tag is not None:
        return _encode_value_type(tag, value, handle, d)
    base = next((b for b in _PLAIN_BASES if isinstance(value, b)), None)
    if base is not None and handle is not None:  # namedtuple, IntEnum, defaultdict...: their plain content
        return encode(base(value), handle, depth)
    if handle is None:
        raise TypeError(f"a {_type_name(value)} is not a plain value")
    return handle(value)


def _encode_value_type(tag: str, value, handle, depth: int) -> list:
    if tag == "N":
        return ["N", str(value)]
    if tag == "Q":
        return ["Q", value.numerator, value.denominator]
    if tag == "E":
        return ["E", value.maxlen, *(encode(x, handle, depth) for x in value)]
    return [tag, *(encode(x, handle, depth) for kv in value.items() for x in kv)]  # OrderedDict, Counter


def decode(tree: object, remote=None, depth: int = 0) -> object:
    """The value of an encoded tree: only builtin and stdlib value types, or `remote(ref, type name)` for a
    handle. Raises ProtocolError on anything else."""
    t = type(tree)
    if tree is None or t is bool or t is str or t is int or t is float:
        return tree
    if t is not list or not tree or type(tree[0]) is not str:
        raise ProtocolError(f"not an encoded value: {str(tree)[:80]}")
    if depth >= MAX_DEPTH:
        raise ProtocolError(f"a value nested deeper than {MAX_DEPTH} levels")
    try:
        return _decode_tagged(tree[0], tree[1:], remote, depth + 1)
    except ProtocolError:
        raise
    except (TypeError, ValueError, ArithmeticError, KeyError, IndexError) as exc:
        raise ProtocolError(f"bad {tree[0]!r} value: {exc}") from None


def _decode_tagged(tag: str, items: list, remote, depth: int) -> object:
    if tag in "LTSFDOKE" and len(tag) == 1:
        values = [decode(x, remote, depth) for x in (items[1:] if tag == "E" else items)]
        if tag in "DOK":
            if len(values) % 2:
                raise ProtocolError("a mapping with an odd number of items")
            mapping = dict(zip(values[::2], values[1::2]))
            return mapping if tag == "D" else _mapping(tag)(mapping)
        if tag == "E":
            import collections

            return collections.deque(values, _exact(items[0], int, type(None)))
        return {"L": list, "T": tuple, "S": set, "F": frozenset}[tag](values)
    if tag in ("B", "A"):
        data = bytes.fromhex(_exact(items[0], str))
        return data if tag == "B" else bytearray(data)
    if tag == "I":
        return int(_exact(items[0], str), 16)
    if tag == "C":
        return complex(_exact(items[0], float, int), _exact(items[1], float, int))
    if tag == "R":
        return range(*(_exact(x, int) for x in items))
    if tag == "N":
        import decimal

        return decimal.Decimal(_exact(items[0], str))
    if tag == "Q":
        import fractions

        return fractions.Fraction(_exact(items[0], int), _exact(items[1], int))
    if tag == "H" and remote is not None:
        return remote(_exact(items[0], int), _exact(items[1], str))
    raise ProtocolError(f"unknown value tag {tag!r}")


def _mapping(tag: str):
    import collections

    return collections.OrderedDict if tag == "O" else collections.Counter


def _exact(x: object, *types: type) -> object:
    if type(x) not in types:
        raise ProtocolError(f"expected {'/'.join(t.__name__ for t in types)}, got {type(x).__name__}")
    return x
