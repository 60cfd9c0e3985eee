"""Hypothesis drives the milter client with a filter's side of a session
(fuzz/milter_replay.py, which fuzz/fuzz_milter.py shares): well-framed
packets of every reply and change, with random payloads, and raw noise.
Only milter.Broken and rewrite.Invalid come out; every reply is SMTP."""

import os
import struct
import sys

from hypothesis import given, settings, strategies as st

from harness import ROOT  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "fuzz"))
import milter_replay  # noqa: E402

OPTNEG = st.builds(lambda v, a, p, rest: struct.pack("!III", v, a, p) + rest,
                   st.sampled_from([2, 6, 6, 6, 7]), st.sampled_from([0x1FF, 0x1FF, 0x3FF, 0]),
                   st.integers(0, 1 << 21), st.binary(max_size=12))
CODES = st.sampled_from(list(b"cacaacprtdy4qhim+2-besOZ\0"))
PAYLOAD = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda n, a, b: struct.pack("!I", n) + a + b"\0" + b + b"\0",
              st.integers(0, 7), st.sampled_from([b"Subject", b"X-A", b"", b"a b", b"X:"]),
              st.sampled_from([b"v", b"", b"a\nb", b"a\n\tb", b"a\rb", b"x" * 300])),
    st.builds(lambda a, b: a + b"\0" + b, st.sampled_from([b"<n@my.domain>", b"<>", b"bad",
                                                          b"<x@refused.example>", b"<c@d.example>"]),
              st.sampled_from([b"", b"SIZE=1\0"])),
    st.sampled_from([b"550 5.7.1 no\0", b"450-4.1.1 a\r\n450 4.1.1 b\0", b"250 ok\0",
                     b"550 5.7.1 %s%%\x1b\0"]))


def packet(code, payload):
    return struct.pack("!I", len(payload) + 1) + bytes([code]) + payload


STREAM = st.builds(
    lambda neg, packets, noise, length: (
        struct.pack("!I", len(neg) + 1) + b"O" + neg
        + b"".join(packet(c, p) for c, p in packets) + noise
        + (struct.pack("!I", length) if length is not None else b"")),
    OPTNEG, st.lists(st.tuples(CODES, PAYLOAD), max_size=30), st.binary(max_size=20),
    st.one_of(st.none(), st.integers(0, 1 << 32 - 1)))


@settings(max_examples=400, deadline=None)
@given(STREAM)
def test_any_filter_stream(data):
    milter_replay.exercise(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_raw_noise(data):
    milter_replay.exercise(data)


def test_the_replay_reaches_the_changes():
    """The harness goes all the way: a well-behaved filter's changes apply."""
    stream = (packet(ord("O"), struct.pack("!III", 6, 0x1FF, 0)) + packet(ord("c"), b"") * 9
              + packet(ord("h"), b"X-A\0b\0") + packet(ord("a"), b""))
    assert milter_replay.exercise(stream)
    assert not milter_replay.exercise(stream.replace(b"X-A\0b", b"X-A\0\rb"))
    # and a change of everything at once: milter_replay writes it both ways
    # (a second draft, and over the first) and compares the two files
    stream = (packet(ord("O"), struct.pack("!III", 6, 0x1FF, 0)) + packet(ord("c"), b"") * 9
              + packet(ord("e"), b"<n@my.domain>\0") + packet(ord("+"), b"<x@y.example>\0")
              + packet(ord("i"), struct.pack("!I", 1) + b"X-B\0c\0")
              + packet(ord("b"), b"new\r\nbody\r\n") + packet(ord("a"), b""))
    assert milter_replay.exercise(stream)
