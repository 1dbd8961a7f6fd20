"""The value codec between the program and the checker: plain values round-trip exactly; nothing else crosses
as anything but a handle; malformed, too deep or too large input is refused, never built."""

from __future__ import annotations

import collections
import decimal
import fractions
import math
import os

import pytest

from diffcoder.evaluation import _wire

PLAIN = [
    None, True, False, 0, -7, 2**80, -(2**50000), 1.5, -0.0, float("inf"), "", "héllo\n\"\\", "\udc80 lone surrogate",
    b"\x00\xff", bytearray(b"ab"), 3 + 4j, [], [1, [2, [3]]], (), (1,), (1, (2, "x")), {1, 2}, frozenset({"a"}),
    {}, {1: "a", (2, 3): [4], "k": {"n": None}}, range(2, 10, 3), decimal.Decimal("1.10"), fractions.Fraction(3, 4),
    collections.OrderedDict([("b", 1), ("a", 2)]), collections.Counter("hello"), collections.deque([1, 2], maxlen=5),
]


def _roundtrip(value, handle=None, remote=None):
    """Through both frame formats, as the real channel does."""
    r, w = os.pipe()
    try:
        _wire.send(w, {"ok": _wire.encode(value, handle)})
        tree = _wire.recv(r, 1 << 26)["ok"]
        _wire.send_trusted(w, {"v": tree})
        assert repr(_wire.recv_trusted(r)["v"]) == repr(tree)
    finally:
        os.close(r)
        os.close(w)
    return _wire.decode(tree, remote)


@pytest.mark.parametrize("value", PLAIN, ids=lambda v: type(v).__name__)
def test_plain_values_round_trip_with_their_exact_types(value):
    out = _roundtrip(value)
    assert type(out) is type(value) and out == value
    if not isinstance(value, int) or abs(value) < 2**64:
        assert repr(out) == repr(value)
    if isinstance(value, (dict, collections.deque)):
        assert list(out) == list(value)  # order kept


def test_nan_crosses():
    assert math.isnan(_roundtrip(float("nan")))


def test_subclasses_cross_as_their_plain_base():
    Point = collections.namedtuple("Point", "x y")

    class Liar(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    class Everything:
        def __eq__(self, other):
            return True

    handles = []
    out = _roundtrip([Point(1, 2), Liar(3), collections.defaultdict(int, a=1), Everything()],
                     handle=lambda obj: handles.append(obj) or ["H", len(handles), type(obj).__name__],
                     remote=lambda ref, name: ("remote", ref, name))
    assert out == [(1, 2), 3, {"a": 1}, ("remote", 1, "Everything")]
    assert [type(x) for x in out[:3]] == [tuple, int, dict]
    assert out[1] != 4  # the plain 3 is compared as 3, whatever the program's class claimed
    with pytest.raises(TypeError, match="not a plain value"):
        _wire.encode(Everything())  # without a handle function nothing but plain values crosses


@pytest.mark.parametrize("tree", [
    {"a": 1},  # a JSON object is not a value
    [],  # no tag
    ["X", 1],  # unknown tag
    ["S", ["L", 1]],  # an unhashable set member
    ["D", 1],  # odd mapping
    ["B", "zz"],  # bad hex
    ["I", 12],  # big int must be hex text
    ["C", "1", 2],  # complex parts must be numbers
    ["H", 1, "f"],  # a handle where none may be
    ["E", "x", 1],  # bad deque maxlen
])
def test_malformed_trees_are_refused(tree):
    with pytest.raises(_wire.ProtocolError):
        _wire.decode(tree)


def test_depth_and_size_limits():
    deep = 1
    for _ in range(_wire.MAX_DEPTH + 5):
        deep = ["L", deep]
    with pytest.raises(_wire.ProtocolError, match="deeper"):
        _wire.decode(deep)
    nested = []
    for _ in range(_wire.MAX_DEPTH + 5):
        nested = [nested]
    with pytest.raises(ValueError, match="deeper"):
        _wire.encode(nested)
    for frame, error in ((b'{"ok": "' + b"x" * 5000 + b'"}', _wire.FrameTooLarge), (b"[1,2", _wire.ProtocolError),
                         (b"[1,2]", _wire.ProtocolError), (b"", EOFError)):
        r, w = os.pipe()
        try:
            if frame:
                os.write(w, len(frame).to_bytes(4, "big") + frame)
            os.close(w)
            with pytest.raises(error):
                _wire.recv(r, 4096)
        finally:
            os.close(r)
