"""smtpfwdd's smtp: and lmtp: agents (issue 40): kept connections,
pipelining, XFORWARD, an outcome per recipient (delivered, deferred,
failed with a notification) and never a delivered recipient twice; the
MTA down, hung or hostile; a delivery process killed mid-message; DSN and
SMTPUTF8 passed or refused; STARTTLS.  A scripted server (t/lib/fakemta.py)
plays the MTA, and a private Postfix where a real one is wanted."""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

import postfix
from fakemta import CLOSE, EXTENSIONS, STALL, FakeMTA
from harness import (FWD_CONSTANTS, children, comm, free_port, give_to_nobody, now_date,
                     PYTHON, wait_for)
from smtpgate import spool

BODY = b"Subject: relayed\n\nHello.\n.leading dot\n"


def spooled(spooldir, sender=b"<alice@example.org>", rcpts=(b"<bob@my.domain>",), body=BODY,
            dsn=None, utf8=False, client=True):
    """A spool file as smtpd writes it: its own Received header first
    (naming the client and this file's id), then body."""
    with spool.Draft(spooldir, sender, list(rcpts), dsn=dsn, utf8=utf8) as d:
        if client:
            d.write(b"Received: from helo.example (mail.example.org [192.0.2.10])\n"
                    b"\tby mx.my.domain (smtpd) with ESMTP id %s;\n"
                    b"\t%s\n" % (d.name.encode(), now_date()))
        d.write(body)
        name = d.commit()
    give_to_nobody(os.path.join(spooldir, name))
    return name


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def present(spooldir, name):
    return os.path.exists(os.path.join(spooldir, name))


def rcpt_lines(path):
    return [l for l in open(path, "rb").read().split(b"\n") if l[:5] in (b"RCPT ", b"SENT ")]


@pytest.fixture
def mta():
    made = []

    def make(**kw):
        m = FakeMTA(**kw)
        made.append(m)
        return m
    yield make
    for m in made:
        m.close()


def start(fwd_env, m, *flags, **constants):
    return fwd_env.start(*flags, agent_path=m.spec if not isinstance(m, str) else m,
                         **dict(dict(SMTPFWDD_COMMAND_TIMEOUT=5, SMTPFWDD_CONNECT_TIMEOUT=5),
                                **constants))


# ------------------------------------------------------------ delivery ----

def test_one_connection_carries_many_messages_pipelined_with_xforward(fwd_env, mta):
    m = mta()
    names = [spooled(fwd_env.spool) for _ in range(5)]
    f = start(fwd_env, m, "-M", "1")
    assert m.wait(5)
    assert wait_for(lambda: not any(present(fwd_env.spool, n) for n in names))
    assert m.connections == 1                       # kept, RSET between
    assert sum(1 for _, l in m.commands if l == b"RSET") == 4
    assert all(m.pipelined)
    t = m.transactions[0]
    assert t["mail"].startswith("MAIL FROM:<alice@example.org> SIZE=")
    assert t["rcpts"] == ["RCPT TO:<bob@my.domain>"]
    # the message as stored: CRLF, dot-stuffed, our Received header first
    assert t["data"].endswith(b"Hello.\r\n..leading dot\r\n")
    assert t["data"].startswith(b"Received: from helo.example")
    xf = " ".join(t["xforward"])
    assert "NAME=mail.example.org" in xf and "ADDR=192.0.2.10" in xf
    assert "HELO=helo.example" in xf and "PROTO=ESMTP" in xf and "SOURCE=REMOTE" in xf
    assert re.search(r"IDENT=smtpd\w+", xf)
    assert {re.search(r"IDENT=(smtpd\w+)", " ".join(x["xforward"])).group(1)
            for x in m.transactions} == set(names)
    assert "said: 250 2.0.0 Ok: queued as FAKE1" in f.log()


def test_without_pipelining_one_command_at_a_time(fwd_env, mta):
    m = mta(extensions=("8BITMIME",))
    name = spooled(fwd_env.spool, rcpts=(b"<a@my.domain>", b"<b@my.domain>"))
    start(fwd_env, m)
    assert m.wait(1)
    assert wait_for(lambda: not present(fwd_env.spool, name))
    assert m.pipelined == [False]
    assert not any(l.startswith(b"XFORWARD") for _, l in m.commands)
    assert "SIZE=" not in m.transactions[0]["mail"]         # not offered: not sent


def test_a_kept_connection_the_mta_closed_is_made_anew(fwd_env, mta):
    """The MTA hangs up after each message (an idle timeout, a restart):
    the next message goes on a new connection, at once, not deferred."""
    m = mta(hangup_after=True)
    names = [spooled(fwd_env.spool) for _ in range(3)]
    f = start(fwd_env, m, "-M", "1")
    assert m.wait(3)
    assert wait_for(lambda: not any(present(fwd_env.spool, n) for n in names))
    assert m.connections == 3 and "deferred" not in f.log()


def test_an_unused_connection_is_closed_after_keep_idle(fwd_env, mta):
    m = mta()
    spooled(fwd_env.spool)
    start(fwd_env, m, SMTPFWDD_KEEP_IDLE=1)
    assert m.wait(1)
    assert wait_for(lambda: (1, b"QUIT") in m.commands, 10)
    spooled(fwd_env.spool)
    assert m.wait(2)
    assert m.connections == 2


# ------------------------------------------------ per-recipient outcomes ----

def test_4xx_defers_5xx_fails_with_a_notification_and_a_retry_repeats_nobody(fwd_env, mta):
    """bob is delivered, carol refused for good (a notification with the
    MTA's words), dave told to wait: dave alone is tried again, and once
    the MTA takes him the file is gone.  bob is never sent twice."""
    later = {"dave": True}

    def rcpt(addr):
        if "carol" in addr:
            return "550 5.1.1 <carol@my.domain>: no such user"
        if "dave" in addr and later["dave"]:
            return "452 4.2.2 mailbox full"
        return None
    m = mta(rcpt=rcpt)
    name = spooled(fwd_env.spool, rcpts=(b"<bob@my.domain>", b"<carol@my.domain>",
                                         b"<dave@my.domain>"))
    path = os.path.join(fwd_env.spool, name)
    f = start(fwd_env, m, RETRY_DELAY_TIME=2)
    assert m.wait(1)
    assert wait_for(lambda: os.path.exists(path) and os.stat(path).st_mode & 0o777 == 0o755)
    assert rcpt_lines(path) == [b"SENT <bob@my.domain>", b"SENT <carol@my.domain>",
                                b"RCPT <dave@my.domain>"]
    # the notification for carol, queued, then delivered through the same MTA
    assert wait_for(lambda: any(t["mail"].startswith("MAIL FROM:<>") for t in m.transactions))
    note = next(t["data"] for t in m.transactions if t["mail"].startswith("MAIL FROM:<>"))
    assert b"Diagnostic-Code: smtp; 550 5.1.1 <carol@my.domain>: no such user" in note
    assert b"Status: 5.1.1" in note and b"Final-Recipient: rfc822; carol@my.domain" in note
    later["dave"] = False
    assert wait_for(lambda: not present(fwd_env.spool, name), 30)
    sent_to = [r for t in m.transactions for r in t["accepted"]]
    assert sent_to.count("RCPT TO:<bob@my.domain>") == 1
    assert sent_to.count("RCPT TO:<dave@my.domain>") == 1
    log = f.log()
    assert "said to <dave@my.domain>: 452 4.2.2 mailbox full" in log
    assert "(delivered to <bob@my.domain>)" in log


def test_a_5xx_to_mail_fails_every_recipient(fwd_env, mta):
    m = mta(mail=lambda line: "552 5.3.4 message too big")
    name = spooled(fwd_env.spool, rcpts=(b"<a@my.domain>", b"<b@my.domain>"))
    start(fwd_env, m)
    assert wait_for(lambda: os.path.exists(os.path.join(fwd_env.spool, "failed", name)))
    reason = open(os.path.join(fwd_env.spool, "failed", name + ".reason"), "rb").read()
    assert b"552 5.3.4 message too big" in reason


def test_lmtp_answers_each_recipient_after_the_data(fwd_env, mta):
    def final(addr):
        return {"RCPT TO:<b@my.domain>": "452 4.2.2 over quota",
                "RCPT TO:<c@my.domain>": "550 5.1.1 gone"}.get(addr)
    m = mta(lmtp=True, final=final)
    name = spooled(fwd_env.spool, rcpts=(b"<a@my.domain>", b"<b@my.domain>",
                                         b"<c@my.domain>"))
    path = os.path.join(fwd_env.spool, name)
    start(fwd_env, m, RETRY_DELAY_TIME=600)
    assert m.wait(1)
    assert any(l.startswith(b"LHLO ") for _, l in m.commands)
    assert wait_for(lambda: os.path.exists(path) and os.stat(path).st_mode & 0o777 == 0o755)
    assert rcpt_lines(path) == [b"SENT <a@my.domain>", b"RCPT <b@my.domain>",
                                b"SENT <c@my.domain>"]


def test_lmtp_over_a_unix_socket(fwd_env, mta):
    d = tempfile.mkdtemp(prefix="lmtp-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        m = mta(lmtp=True, path=os.path.join(d, "lmtp.sock"))
        name = spooled(fwd_env.spool)
        start(fwd_env, m)
        assert m.wait(1)
        assert wait_for(lambda: not present(fwd_env.spool, name))
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------- a broken MTA ----

def test_the_mta_down_defers_and_nothing_is_lost(fwd_env):
    port = free_port()
    name = spooled(fwd_env.spool)
    path = os.path.join(fwd_env.spool, name)
    before = open(path, "rb").read()
    f = start(fwd_env, "smtp:127.0.0.1:%d" % port)
    assert wait_for(lambda: os.stat(path).st_mode & 0o777 == 0o755)
    assert open(path, "rb").read() == before
    assert re.search(r"deferred: connect to smtp:127\.0\.0\.1:%d: Connection refused" % port,
                     f.log()), f.log()


@pytest.mark.parametrize("where", ["greeting", "rcpt", "final"])
def test_a_hung_mta_defers_within_the_timeouts(fwd_env, mta, where):
    m = mta(greeting=STALL if where == "greeting" else "220 hung.example ESMTP",
            rcpt=(lambda a: STALL) if where == "rcpt" else None,
            final=(lambda a: STALL) if where == "final" else None)
    name = spooled(fwd_env.spool)
    path = os.path.join(fwd_env.spool, name)
    t0 = time.monotonic()
    f = start(fwd_env, m, SMTPFWDD_COMMAND_TIMEOUT=2, SMTPFWDD_DATA_TIMEOUT=3)
    assert wait_for(lambda: os.stat(path).st_mode & 0o777 == 0o755, 20), f.log()
    assert time.monotonic() - t0 < 15
    # (the file is deferred an instant before its line is logged)
    assert wait_for(lambda: "no reply within the time allowed" in f.log()), f.log()
    if where == "final":
        assert "it may be delivered twice" in f.log()


@pytest.mark.parametrize("greeting", [
    "220-" + "x" * 1000000,                              # a line without end
    "\r\n".join(["220-line %d" % i for i in range(500)] + ["220 done"]),
    "HTTP/1.1 400 Bad Request",
    "220 ok\x1b]0;pwned\x07",                           # controls: shown escaped
])
def test_hostile_reply_lines_are_bounded_and_escaped(fwd_env, mta, greeting):
    m = mta(greeting=greeting, rcpt=lambda a: "550 5.1.1 \x1b[2Jno\x07")
    name = spooled(fwd_env.spool)
    path = os.path.join(fwd_env.spool, name)
    f = start(fwd_env, m)
    assert wait_for(lambda: not os.path.exists(path) or os.stat(path).st_mode & 0o777 == 0o755
                    or os.path.exists(os.path.join(fwd_env.spool, "failed", name)), 20)
    time.sleep(0.5)
    log = f.log()
    assert "\x1b" not in log and "\x07" not in log
    assert len(log) < 200000


def test_a_delivery_process_killed_mid_message_loses_nothing(fwd_env, mta):
    """SIGKILL while the MTA holds the message's end unanswered: the file
    is still there, unlocked, and the next try delivers it (the MTA had not
    answered: this one delivery may be the message's second, as smtpfwdd(8)
    says)."""
    stall = {"on": True}
    m = mta(final=lambda a: STALL if stall["on"] else None)
    name = spooled(fwd_env.spool)
    f = start(fwd_env, m, SMTPFWDD_DATA_TIMEOUT=300, RETRY_DELAY_TIME=1)
    assert m.wait(1)
    senders = [p for p in descendants(f.proc.pid) if comm(p) == "smtpfwdd: send"]
    assert senders
    stall["on"] = False
    for p in senders:
        os.kill(p, signal.SIGKILL)
    assert wait_for(lambda: "died delivering" in f.log(), 15)
    assert wait_for(lambda: not present(fwd_env.spool, name), 30), f.log()
    assert len(m.transactions) == 2


# ------------------------------------------------ ESMTP parameters ----

DSN = ("RET=HDRS ENVID=abc+2Bdef", ["NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob@my.domain"])


def test_dsn_parameters_pass_when_offered(fwd_env, mta):
    m = mta()
    spooled(fwd_env.spool, dsn=DSN)
    start(fwd_env, m)
    assert m.wait(1)
    t = m.transactions[0]
    assert t["mail"].endswith(" RET=HDRS ENVID=abc+2Bdef")
    assert t["rcpts"] == ["RCPT TO:<bob@my.domain> NOTIFY=FAILURE,DELAY "
                          "ORCPT=rfc822;bob@my.domain"]


def test_dsn_parameters_are_left_out_when_not_offered(fwd_env, mta):
    m = mta(extensions=("PIPELINING",))
    spooled(fwd_env.spool, dsn=DSN)
    start(fwd_env, m)
    assert m.wait(1)
    t = m.transactions[0]
    assert "RET=" not in t["mail"] and t["rcpts"] == ["RCPT TO:<bob@my.domain>"]


def test_smtputf8_is_refused_with_a_notification_when_not_offered(fwd_env, mta):
    m = mta()                                        # no SMTPUTF8 among its extensions
    name = spooled(fwd_env.spool, rcpts=("<jösé@my.domain>".encode(),), utf8=True)
    start(fwd_env, m)
    assert wait_for(lambda: os.path.exists(os.path.join(fwd_env.spool, "failed", name)))
    assert m.transactions == []
    notes = [n for n in os.listdir(fwd_env.spool) if n.startswith("smtpd")]
    assert any(b"5.6.7" in open(os.path.join(fwd_env.spool, n), "rb").read() for n in notes)


def test_smtputf8_and_8bitmime_are_passed_when_offered(fwd_env, mta):
    m = mta(extensions=EXTENSIONS + ("SMTPUTF8",))
    spooled(fwd_env.spool, rcpts=("<jösé@my.domain>".encode(),), utf8=True,
            body="Subject: é\n\nçà\n".encode())
    start(fwd_env, m)
    assert m.wait(1)
    t = m.transactions[0]
    assert " SMTPUTF8" in t["mail"] and " BODY=8BITMIME" in t["mail"]
    assert t["rcpts"] == ["RCPT TO:<jösé@my.domain>".encode().decode("latin-1")]


# ---------------------------------------------------------- STARTTLS ----

def test_starttls_to_the_mta_is_verified(fwd_env, mta):
    import certs
    cert, key = certs.make_pair(cn="mta.inside.example", serial=4001)
    other, _ = certs.make_pair(cn="mta.inside.example", serial=4002)
    m = mta(tls=(cert, key))
    name = spooled(fwd_env.spool)
    f = start(fwd_env, m.spec + "+tls", SMTPFWDD_TLS_CA=other, RETRY_DELAY_TIME=600)
    path = os.path.join(fwd_env.spool, name)
    assert wait_for(lambda: os.stat(path).st_mode & 0o777 == 0o755)
    assert "TLS with" in f.log() and m.transactions == []
    f.stop()
    m2 = mta(tls=(cert, key))
    name2 = spooled(fwd_env.spool)
    os.unlink(path)
    f2 = start(fwd_env, m2.spec + "+tls", SMTPFWDD_TLS_CA=cert,
               SMTPFWDD_TLS_NAME="mta.inside.example")
    assert m2.wait(1), f2.log()
    assert wait_for(lambda: not present(fwd_env.spool, name2))
    assert [l for _, l in m2.commands].count(b"EHLO localhost") + \
        sum(1 for _, l in m2.commands if l.startswith(b"EHLO")) >= 2    # again after TLS


def test_a_plain_mta_is_refused_for_a_tls_agent(fwd_env, mta):
    m = mta()
    name = spooled(fwd_env.spool)
    f = start(fwd_env, m.spec + "+tls")
    path = os.path.join(fwd_env.spool, name)
    assert wait_for(lambda: os.stat(path).st_mode & 0o777 == 0o755)
    assert "does not offer STARTTLS" in f.log() and m.transactions == []


# ------------------------------------------------------- the agent spec ----

@pytest.mark.parametrize("spec", ["smtp:mx.example:25", "smtp:127.0.0.1", "lmtp:relative",
                                  "smtp:127.0.0.1:0", "smtp:[::1:25", "smtp:127.0.0.1:25x"])
def test_a_bad_agent_is_a_configuration_error(tree_factory, spec):
    tree = tree_factory(**FWD_CONSTANTS)
    p = subprocess.run([PYTHON, os.path.join(tree, "smtpfwdd.py"), "-t", "-s", spec, "-d", "/tmp"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 78 and "-s %s" % spec in p.stderr, p.stderr


# ---------------------------------------------------- a real Postfix ----

def etc_listener():
    """The service of etc/postfix-master.cf.smtpfwdd, its lines joined."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = open(os.path.join(root, "etc", "postfix-master.cf.smtpfwdd")).read()
    entry = " ".join(l.strip() for l in text.splitlines() if l and not l.startswith("#"))
    return entry.split(None, 7)[7]          # after "127.0.0.1:10025 inet n - n - -"


@pytest.mark.skipif(not postfix.available(), reason="needs root and Debian's postfix")
def test_postfix_behind_smtp_delivers_fails_and_names_the_client(fwd_env):
    """A private Postfix's second listener (127.0.0.1:PORT inet smtpd,
    XFORWARD allowed from loopback): bob's mailbox gets the message, an
    unknown recipient fails with Postfix's own reply in the notification,
    and Postfix's log names the client smtpd saw, not us."""
    port = free_port()
    with postfix.instance(users=["bob", "alice"], listen={port: etc_listener()}) as pf:
        names = [spooled(fwd_env.spool, sender=b"<alice@localhost>",
                         rcpts=(b"<bob@localhost>", b"<nosuch@localhost>"))
                 for _ in range(3)]
        f = fwd_env.start("-M", "1", agent_path="smtp:127.0.0.1:%d" % port)
        box = pf.wait_for_mail("bob", 3)
        assert box.count(b"Subject: relayed") == 3
        assert wait_for(lambda: all(os.path.exists(os.path.join(fwd_env.spool, "failed", n))
                                    for n in names), 30)
        note = pf.wait_for_mail("alice", 3)
        assert re.search(rb"Diagnostic-Code: smtp; 550 5\.1\.1 <nosuch@localhost>", note)
        log = pf.log()
        assert "client=mail.example.org[192.0.2.10]" in log, log
        assert len(re.findall(r"postfix-test/smtpd\[\d+\]: connect from", log)) == 1
        assert "said: 250 2.0.0 Ok: queued as" in f.log()
