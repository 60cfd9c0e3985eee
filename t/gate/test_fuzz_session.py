"""A Hypothesis state machine drives one SMTP session over a socketpair with
random commands, arguments and byte noise (issue 9).

Invariants: the session never crashes; every reply is a well-formed single
or multi-line SMTP reply; every 250 after DATA is exactly one more committed
spool file; refused messages leave nothing (no file, no draft)."""

import os
import re
import shutil
import socket
import tempfile
import threading

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import buildconf
from smtpgate.gate import session
from smtpgate.gate.config import GateConfig
from smtpgate.gate.connection import Connection
from smtpgate.gate.engine import in_process
from smtpgate.gate.peer import Peer
from smtpgate.rules import ruleset as engine


@pytest.fixture(autouse=True, scope="module")
def no_tarpit():
    """Random commands make many errors: no error delays in this module."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(buildconf, "SMTPD_ERROR_SLEEP", 0)
        yield

REPLY_LINE = re.compile(rb"^[2-5][0-9][0-9][ -][\x20-\x7e]*$")
VERBS = ["HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "EXPN",
         "HELP", "helo", "Mail", "FOO", "", "MAIL FROM:", "RCPT TO:", "MAIL FROM:<>"]
ARGS = st.one_of(
    st.sampled_from(["<a@b.example>", "<bob@my.domain>", "<>", "a@b", "<-x@y>",
                     "<a,b@c>", '<"q q"@x>', "x" * 600, " SIZE=10", "<x@refused.example>",
                     "<a@b.example> SIZE=99999999", "<a@b.example> BODY=8BITMIME"]),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40))
BODY_LINE = st.one_of(st.sampled_from([b".", b"..", b".x", b"", b"Subject: y",
                                       b"a\nb", b"a\rb", b"a\x00b", b"\xff\xfe"]),
                      st.binary(max_size=80).filter(lambda b: b"\r\n" not in b))


class SessionMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="fuzz-spool-")
        cfg = GateConfig(myname="fuzz.example", spooldir=self.dir, maxsize=2000)
        rules = in_process(engine.parse("noto:ALL:ALL:*@refused.example:550 no\n"
                                        "allow:ALL:ALL:ALL\n")[0])
        ours, theirs = socket.socketpair()
        self.sock = ours
        self.sock.settimeout(10)
        self.buf = b""
        self.status = None
        client = engine.Client("192.0.2.1", None)
        self.s = session.Session(cfg, rules, Peer.around(client),
                                 Connection(theirs.fileno(), theirs.fileno()))
        self.theirs = theirs

        def run():
            self.status = self.s.run()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        self.in_data = False
        self.closed = False
        self.committed = 0
        assert self.reply()[0] == 220

    def reply(self):
        """Read one whole reply, checking its form."""
        codes = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise AssertionError("connection closed in a reply: %r" % self.buf)
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            assert REPLY_LINE.match(line), line
            codes.append(line[:3])
            if line[3:4] == b" ":
                assert len(set(codes)) == 1, codes
                return int(codes[0]), line
            assert line[3:4] == b"-"

    def after(self, code):
        if code == 421:
            self.closed = True
        elif code == 354:
            self.in_data = True

    @precondition(lambda self: not self.closed and not self.in_data)
    @rule(verb=st.sampled_from(VERBS), arg=ARGS)
    def command(self, verb, arg):
        self.sock.sendall(("%s %s" % (verb, arg)).strip().encode("latin-1") + b"\r\n")
        self.after(self.reply()[0])

    @precondition(lambda self: not self.closed and not self.in_data)
    @rule(noise=st.binary(max_size=700).filter(lambda b: b"\r" not in b and b"\n" not in b))
    def noise(self, noise):
        self.sock.sendall(noise + b"\r\n")
        code, _ = self.reply()
        assert code in (500, 501, 503, 555, 250, 252, 214, 502, 421, 354, 553, 552, 221), code
        if code == 221:
            self.closed = True
        self.after(code)

    @precondition(lambda self: not self.closed and self.in_data)
    @rule(lines=st.lists(BODY_LINE, max_size=30))
    def body(self, lines):
        data = b"".join((b"." + l if l.startswith(b".") else l) + b"\r\n" for l in lines)
        self.sock.sendall(data + b".\r\n")
        code, _ = self.reply()
        self.in_data = False
        if code == 250:
            self.committed += 1
        else:
            assert code in (550, 552, 421), code
            self.after(code)

    @precondition(lambda self: self.closed)
    @rule()
    def after_close(self):
        """The server closed the session; nothing more to send."""

    @invariant()
    def spool_matches_the_250s(self):
        names = os.listdir(self.dir)
        if not self.in_data:
            assert [n for n in names if n.startswith("draft.")] == []
        assert len([n for n in names if n.startswith("smtpd")]) == self.committed

    def teardown(self):
        self.sock.close()
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert self.status in (os.EX_OK, os.EX_OSERR, os.EX_PROTOCOL), self.status
        self.theirs.close()
        names = os.listdir(self.dir)
        assert not [n for n in names if n.startswith("draft.")]
        shutil.rmtree(self.dir)


SessionMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25,
                                            deadline=None)
test_session_state_machine = SessionMachine.TestCase
