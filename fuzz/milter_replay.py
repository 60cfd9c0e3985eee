"""A mail filter's side of a milter session, replayed from bytes: what the
atheris harness (fuzz_milter.py) and the Hypothesis test (t/gate/test_milter_fuzz.py)
feed the client.  exercise(data) runs a whole session -- negotiation, every
event, the end of a message with its changes applied, written both ways
(a second draft, and over the first) -- against a filter
that answers with data; only milter.Broken and rewrite.Invalid may come out,
and whatever the filter says, a reply it makes us give is an SMTP reply."""

import os
import re
import tempfile

from smtpgate import net, spool
from smtpgate.gate import milter, rewrite

REPLY = re.compile(r"^[45][0-9][0-9][ -][\x20-\x7e]*$")
MESSAGE = b"Subject: x\nX-Fold: a\n\tb\n\nbody\n.line\n"


class Replay(milter.Filter):
    """A Filter whose socket is data: what it sends goes nowhere."""

    def __init__(self, data):
        super().__init__(net.Endpoint("replay", None, "", 0), "tempfail", None)
        self.data = data
        self.sent = 0

    def write(self, data, kind):
        self.sent += len(data)

    def recv(self, kind):
        if not self.data:
            raise milter.Broken("timed out")
        chunk, self.data = self.data[:4096], self.data[4096:]
        self.rbuf += chunk
        return chunk


def admit(sender, rcpt):
    return not rcpt.endswith("refused.example>")


def check(answer):
    if answer.kind not in ("continue", "refuse", "discard", "shutdown"):
        raise RuntimeError("answer %r" % (answer,))
    for line in answer.reply.lines() if answer.reply else ():
        if not REPLY.match(line) or len(line) > milter.REPLY_LINE:
            raise RuntimeError("reply line %r" % line)


def contents(fd):
    return os.pread(fd, os.fstat(fd).st_size, 0)


def same_either_way(msg, draft):
    """The changed message written as a second draft (write) and over the
    first (rewrite) must be the same file."""
    new = msg.write("smtpdX", b"Received: x\n")
    try:
        copied = contents(new.fd)
    finally:
        new.abort()
    if not msg.rewrite(draft, b"Received: x\n"):
        raise RuntimeError("not rewritten in place")
    if contents(draft.fd) != copied:
        raise RuntimeError("in place %r, copied %r" % (contents(draft.fd), copied))


def exercise(data):
    """Run the session; True if the filter's changes were applied."""
    spooldir = tempfile.mkdtemp(prefix="fuzz-milter-")
    d = spool.Draft(spooldir, b"<a@b.example>", [b"<c@d.example>"])
    try:
        d.write(MESSAGE)
        d.flush()
        f = Replay(data)
        msg = rewrite.Message(d.fd, d.body_offset, d.body_offset + len(MESSAGE),
                              ("<a@b.example>", ["<c@d.example>"]), admit, spooldir, 100000)
        try:
            f.negotiate()
            for cmd, payload in ((milter.CONNECT, b"h\x004\x00\x19127.0.0.1\0"),
                                 (milter.HELO, b"x\0"), (milter.MAIL, b"<a@b.example>\0"),
                                 (milter.RCPT, b"<c@d.example>\0"), (milter.DATA, b"")):
                check(f.event(cmd, payload, {"i": "smtpdX"}, "command"))
            for name, value in msg.fields(False):
                check(f.event(milter.HEADER, milter.cstrings(name, value), {}, "content"))
            check(f.event(milter.EOH, b"", {"i": "smtpdX"}, "content"))
            for chunk in msg.chunks(milter.CHUNK):
                check(f.event(milter.BODY, chunk, {}, "content"))
            edits = msg.changes()
            try:
                check(f.event(milter.BODYEOB, b"", {"i": "smtpdX"}, "content", edits))
                msg.apply(edits, False)
            finally:
                edits.close()
            if msg.changed:
                same_either_way(msg, d)
            return msg.changed
        except (milter.Broken, rewrite.Invalid):
            return False
        finally:
            msg.close()
    finally:
        d.abort()
        for n in os.listdir(spooldir):
            os.unlink(os.path.join(spooldir, n))
        os.rmdir(spooldir)
