#!/usr/bin/env python3
"""atheris harness: a spool directory entry, name and content both hostile.

The input is split into a name (after "smtpd" or "draft.") and a content.
What smtpfwdd does with one entry -- list it, sweep drafts, open it for
delivery, parse it and date it -- may only answer "not eligible", Odd or
Malformed: never another exception, never a hang (no FIFO, no link is
opened), and a parsed message has a sender, recipients and a body inside
the file."""
import os
import shutil
import sys
import tempfile
import time

import atheris

with atheris.instrument_imports():
    import common  # noqa: F401
    from smtpgate import spool, spooldir

KINDS = ("file", "draft", "link", "fifo", "dir")


def make(d, fdp):
    kind = KINDS[fdp.ConsumeIntInRange(0, len(KINDS) - 1)]
    raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)).replace(b"/", b"_").replace(b"\0", b"_")
    name = (b"draft." if kind == "draft" else b"smtpd") + raw
    path = os.path.join(os.fsencode(d), name)
    mode = fdp.PickValueInList([0o600, 0o750, 0o755, 0o000, 0o644])
    content = fdp.ConsumeBytes(fdp.remaining_bytes())
    if kind in ("file", "draft"):
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, mode)
        os.utime(path, (time.time() - 7200,) * 2)
    elif kind == "link":
        os.symlink(os.path.join(d, "target"), path)
        with open(os.path.join(d, "target"), "wb") as f:
            f.write(content)
        os.chmod(os.path.join(d, "target"), 0o750)
    elif kind == "fifo":
        os.mkfifo(path)
        os.chmod(path, mode)
    else:
        os.mkdir(path)
    return path, content


def TestOneInput(data):
    fdp = atheris.FuzzedDataProvider(data)
    d = tempfile.mkdtemp(prefix="fuzz-spool-")
    try:
        path, content = make(d, fdp)
        spooldir.remove_stale_drafts(d, 3600, time.time())
        for e in spooldir.entries(d):
            e.stat(follow_symlinks=False)
            try:
                f = spool.open_for_delivery(e.path, time.time(), 0)
            except spool.Odd:
                continue
            if f is None:
                continue
            with f:
                try:
                    msg = spool.parse(f)
                except spool.Malformed:
                    continue
                if not msg.recipients and not msg.sent:
                    raise RuntimeError("parsed without recipients")
                if not 0 < msg.body_offset <= len(content):
                    raise RuntimeError("body outside the file")
                if msg.arrival is not None and not isinstance(msg.arrival, (int, float)):
                    raise RuntimeError("arrival %r" % (msg.arrival,))
    finally:
        shutil.rmtree(d, ignore_errors=True)


atheris.Setup(sys.argv, TestOneInput)
atheris.Fuzz()
