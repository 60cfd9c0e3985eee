#!/usr/bin/env python3
"""atheris harness: the DATA reader against a simple line-by-line model.

The reader must end exactly at the first CRLF.CRLF, refuse any bare CR or LF
or NUL before it, and otherwise store the dot-unstuffed lines with LF ends."""
import os
import sys

import atheris

with atheris.instrument_imports():
    import common  # noqa: F401
    from smtpgate.gate import channel


def model(data):
    """(stored bytes or None if refused, rest after the terminator)."""
    if data.startswith(b".\r\n"):
        return b"", data[3:]
    end = data.find(b"\r\n.\r\n")
    msg, rest = data[:end + 2], data[end + 5:]
    lines = msg[:-2].split(b"\r\n")
    if any(b"\r" in l or b"\n" in l or b"\0" in l for l in lines):
        return None, rest
    return b"".join((l[1:] if l.startswith(b".") else l) + b"\n" for l in lines), rest


def TestOneInput(data):
    data = data[:200000] + b"\r\n.\r\n"     # always an end, maybe not the first
    want, rest = model(data)
    r, w = os.pipe()
    os.set_blocking(w, False)
    stored = []
    ch = channel.Channel(r, w, 5, 1e18)
    ch.buf += data                      # as if it had been read already
    reader = channel.DataReader(ch, stored.append, 0)
    reader.run()
    got = None if reader.problem else b"".join(stored)
    os.close(r)
    os.close(w)
    if got != want:
        raise RuntimeError("stored %r, model %r" % (got, want))
    if bytes(ch.buf) != rest:
        raise RuntimeError("left %r, model %r" % (bytes(ch.buf), rest))


atheris.Setup(sys.argv, TestOneInput)
atheris.Fuzz()
