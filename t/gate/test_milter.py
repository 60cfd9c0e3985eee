"""The milter client (issue 24): filters judge each message before our 250.

A fake filter of the tests' own (fakemilter.py) answers each verdict at each
stage, asks for each change, and breaks the protocol in every way it can;
the gate runs as the programs run, over loopback, in both modes."""

import json
import os
import re
import select
import signal
import smtplib
import socket
import struct
import subprocess
import threading
import time

import pytest

import certs
import rspamd
from fakemilter import CLOSE, FakeMilter, pkt, Relay, reply, STALL, strs
from harness import (Agent, free_port, Fwd, FWD_CONSTANTS, gone, PYTHON, ROOT, spool_files,
                     wait_for)
from smtpgate import net, spool
from smtpgate.gate import milter, rewrite

ALLOW = "allow:ALL:ALL:ALL\n"
MESSAGE = (b"Subject: hello\r\nFrom: Alice <alice@example.org>\r\nTo: bob@my.domain\r\n"
           b"X-Folded: one\r\n\ttwo\r\n\r\nHi Bob,\r\n.. a dot line\r\nbye\r\n")
SPOOLED = (b"Subject: hello\nFrom: Alice <alice@example.org>\nTo: bob@my.domain\n"
           b"X-Folded: one\n\ttwo\n\nHi Bob,\n. a dot line\nbye\n")
FAST = dict(SMTPD_MILTER_CONNECT_TIMEOUT=2, SMTPD_MILTER_COMMAND_TIMEOUT=2,
            SMTPD_MILTER_CONTENT_TIMEOUT=2)


@pytest.fixture
def filters():
    made = []

    def make(*args, **kw):
        f = FakeMilter(*args, **kw)
        made.append(f)
        return f
    yield make
    for f in made:
        f.close()


def gate(smtpd, *milters, rules=ALLOW, flags=(), **constants):
    specs = ",".join(m if isinstance(m, str) else m.spec for m in milters)
    return smtpd(rules, "-H", "-f", specs, *flags, **constants)


def message_of(jail, name):
    """(envelope lines, the message after smtpd's Received header)."""
    data = open(os.path.join(jail, name), "rb").read()
    envelope, _, rest = data.partition(b"BODY\n")
    m = re.match(rb"Received: .*?\n(?:\t.*\n)*", rest)
    assert m, rest[:200]
    return envelope.decode().splitlines(), rest[m.end():]


def transaction(c, rcpts=("<bob@my.domain>",), data=MESSAGE, helo="EHLO client.example"):
    """Replies to each step; stops at the first that is not a go-ahead."""
    out = {"helo": c.cmd(helo)}
    if out["helo"][0] != 250:
        return out
    out["mail"] = c.cmd("MAIL FROM:<alice@example.org>")
    if out["mail"][0] != 250:
        return out
    out["rcpt"] = [c.cmd("RCPT TO:" + r) for r in rcpts]
    out["data"] = c.cmd("DATA")
    if out["data"][0] != 354:
        return out
    c.send(data + b".\r\n")
    out["end"] = c.reply()
    return out


def session(srv, source=None, **kw):
    c = srv.connect(source) if source else srv.connect()
    assert c.code() == 220
    out = transaction(c, **kw)
    c.cmd("QUIT")
    c.close()
    return out


# ------------------------------------------------------------ the stages ----

def test_every_stage_with_postfix_macros_and_chunks(smtpd, filters):
    f = filters()
    srv = gate(smtpd, f)
    big = b"Subject: big\r\n\r\n" + b"".join(b"%06d " % i + b"x" * 90 + b"\r\n"
                                            for i in range(3000))
    out = session(srv, rcpts=("<bob@my.domain>", "<carol@my.domain>"), data=big)
    assert out["end"][0] == 250
    (name,) = spool_files(srv.jail)
    conn = next(s for s in f.sessions if b"M" in s.commands())
    assert conn.closed.wait(10)
    cmds = conn.commands()
    assert cmds[:7] == [b"O", b"C", b"H", b"M", b"R", b"R", b"T"]
    assert cmds[7] == b"L" and cmds.count(b"L") == 1 and b"N" in cmds
    assert cmds[-3:] == [b"E", b"A", b"Q"]
    assert conn.offer[0] == 6 and conn.offer[1] == 0x1FF
    events = dict(conn.events)
    hostname, family, port, addr = re.match(rb"(.*?)\0(.)(..)(.*)\0$", events[b"C"], re.S).groups()
    assert (hostname, family, addr) == (b"[127.0.0.1]", b"4", b"127.0.0.1")
    assert events[b"H"] == b"client.example\0"
    assert events[b"M"] == b"<alice@example.org>\0"
    assert [p for c, p in conn.events if c == b"R"] == [b"<bob@my.domain>\0",
                                                        b"<carol@my.domain>\0"]
    assert conn.headers() == [(b"Subject", b"big")]     # not smtpd's Received header
    chunks = [p for c, p in conn.events if c == b"B"]
    assert len(chunks) >= 5 and max(map(len, chunks)) <= 65535
    assert b"".join(chunks) == big.split(b"\r\n\r\n", 1)[1]
    m = conn.macros
    assert m[b"C"][b"j"] == m[b"C"][b"{daemon_name}"] == b"mx.my.domain"
    assert m[b"C"][b"{client_addr}"] == b"127.0.0.1"
    assert m[b"C"][b"{client_port}"] == str(struct.unpack("!H", port)[0]).encode()
    assert m[b"C"][b"_"] == b"unknown [127.0.0.1]"
    assert m[b"C"][b"{client_name}"] == m[b"C"][b"{client_ptr}"] == b"unknown"
    assert m[b"M"] == {b"i": name.encode(), b"{mail_addr}": b"alice@example.org"}
    assert m[b"R"] == {b"i": name.encode(), b"{rcpt_addr}": b"carol@my.domain"}
    assert m[b"T"][b"i"] == m[b"N"][b"i"] == m[b"E"][b"i"] == name.encode()


def test_headers_as_sendmail_sends_them_and_leading_space_on_request(smtpd, filters):
    plain, lead = filters(), filters(protocol=1 << 20)
    srv = gate(smtpd, plain, lead)
    assert session(srv)["end"][0] == 250
    get = lambda f: next(s for s in f.sessions if b"L" in s.commands()).headers()
    assert get(plain)[3] == (b"X-Folded", b"one\n\ttwo")
    assert get(lead)[3] == (b"X-Folded", b" one\n\ttwo")
    assert get(plain)[0] == (b"Subject", b"hello")


def test_tls_macros_at_helo(smtpd, filters):
    cert, key = certs.make_pair()
    f = filters()
    srv = gate(smtpd, f, flags=("-C", cert, "-K", key))
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
        s.starttls()
        s.ehlo("client.example")
        s.sendmail("alice@example.org", ["bob@my.domain"], MESSAGE)
    conn = next(s for s in f.sessions if b"M" in s.commands())
    assert conn.commands().count(b"H") == 2         # again after STARTTLS
    h = conn.macros[b"H"]
    assert h[b"{tls_version}"].startswith(b"TLSv1.") and h[b"{cipher}"] and \
        int(h[b"{cipher_bits}"]) >= 128


def test_the_rules_decide_first(smtpd, filters):
    f = filters()
    srv = gate(smtpd, f, rules="noto:ALL:ALL:spam@my.domain:550 not here\n" + ALLOW)
    out = session(srv, rcpts=("<spam@my.domain>", "<bob@my.domain>"))
    assert out["rcpt"][0] == (550, ["5.7.1 not here"]) and out["end"][0] == 250
    conn = next(s for s in f.sessions if b"M" in s.commands())
    assert [p for c, p in conn.events if c == b"R"] == [b"<bob@my.domain>\0"]


def test_proxied_client_is_the_one_reported(daemon_, filters):
    f = filters()
    d = daemon_(ALLOW, "-X", "127.0.0.0/8", "-f", f.spec).wait_ready()
    c = d.connect()
    c.send("PROXY TCP4 192.0.2.7 127.0.0.1 40001 25\r\n")
    assert c.code() == 220
    assert transaction(c)["end"][0] == 250
    conn = next(s for s in f.sessions if b"M" in s.commands())
    assert dict(conn.events)[b"C"] == b"[192.0.2.7]\x004" + struct.pack("!H", 40001) + \
        b"192.0.2.7\0"
    assert conn.macros[b"C"][b"{client_addr}"] == b"192.0.2.7"


# ----------------------------------------------------------- the verdicts ----

STAGES = [b"C", b"H", b"M", b"R", b"T", b"L", b"N", b"B", b"E"]
VERDICTS = {"reject": [pkt(b"r")], "tempfail": [pkt(b"t")],
            "replycode": [reply(b"554 5.7.1 Go away%%, spammer")],
            "accept": [pkt(b"a")], "discard": [pkt(b"d")]}
WHERE = {b"C": "helo", b"H": "helo", b"M": "mail", b"R": "rcpt", b"T": "data"}


def expected(stage, verdict, daemon=False):
    """(step that gets the filter's reply or None, its reply, spooled?).
    In -D mode the front stage answers EHLO: the filters hear CONNECT and
    HELO when the client reaches a worker, at MAIL, which gets their refusal
    (unless it had mail accepted before: passed at once, as in inetd mode)."""
    said = {"reject": (550, ["5.7.1 Command rejected"]),
            "tempfail": (451, ["4.7.1 Service unavailable - try again later"]),
            "replycode": (554, ["5.7.1 Go away%, spammer"])}.get(verdict)
    if verdict in ("accept",) or (verdict == "discard" and stage in (b"C", b"H")):
        return None, None, True
    if verdict == "discard":
        return "end", (250, ["2.0.0 Message accepted for delivery"]), False
    where = {**WHERE, b"C": "mail", b"H": "mail"} if daemon else WHERE
    return where.get(stage, "end"), said, False


def check_verdict(srv, f, stage, verdict, daemon=False, source=None):
    out = session(srv, source)
    step, said, spooled = expected(stage, verdict, daemon)
    if step is None:
        assert out["end"][0] == 250, out
    else:
        got = out[step][0] if step == "rcpt" else out[step]
        assert got == said, (stage, verdict, out)
    assert bool(spool_files(srv.jail)) == spooled, (stage, verdict)
    if verdict == "accept":
        conn = next(s for s in f.sessions if stage in s.commands())
        later = conn.commands()[conn.commands().index(stage) + 1:]
        assert b"E" not in later                # nothing more of this message
    for name in spool_files(srv.jail):
        os.unlink(os.path.join(srv.jail, name))


@pytest.mark.parametrize("verdict", sorted(VERDICTS))
@pytest.mark.parametrize("stage", STAGES, ids=[s.decode() for s in STAGES])
def test_each_verdict_at_each_stage_inetd(smtpd, filters, stage, verdict):
    f = filters({stage: VERDICTS[verdict]})
    check_verdict(gate(smtpd, f), f, stage, verdict)


def test_each_verdict_at_each_stage_daemon(daemon_, filters):
    f = filters()
    d = daemon_(ALLOW, "-f", f.spec).wait_ready()
    n = 0
    for stage in STAGES:
        for verdict in sorted(VERDICTS):
            f.script = {stage: VERDICTS[verdict]}
            f.sessions.clear()
            n += 1          # a client new each time: none had mail accepted (passed at once)
            check_verdict(d, f, stage, verdict, daemon=True, source="127.0.1.%d" % n)
    assert "unexpected error" not in d.log()


def test_a_refusal_at_connect_holds_for_the_session(smtpd, filters):
    f = filters({b"C": [reply(b"554 5.7.1 Not from you")]})
    srv = gate(smtpd, f)
    c = srv.connect()
    assert c.code() == 220
    assert c.cmd("EHLO a") == (554, ["5.7.1 Not from you"])
    assert c.cmd("HELO a") == (554, ["5.7.1 Not from you"])
    assert c.cmd("MAIL FROM:<a@b.example>")[0] == 503
    assert c.cmd("QUIT")[0] == 221


def test_a_rcpt_refusal_refuses_that_recipient_only(smtpd, filters):
    f = filters({b"R": lambda conn, p: [pkt(b"r")] if p.startswith(b"<bad") else None})
    srv = gate(smtpd, f)
    out = session(srv, rcpts=("<bob@my.domain>", "<bad@my.domain>", "<carol@my.domain>"))
    assert [r[0] for r in out["rcpt"]] == [250, 550, 250] and out["end"][0] == 250
    (name,) = spool_files(srv.jail)
    env, _ = message_of(srv.jail, name)
    assert env == ["FROM <alice@example.org>", "RCPT <bob@my.domain>", "RCPT <carol@my.domain>"]


def test_multi_line_replycode_is_bounded_and_printable(smtpd, filters):
    lines = [b"550-5.7.1 line %d \x1b[2J" % i for i in range(30)] + [b"550 5.7.1 end"]
    f = filters({b"M": [reply(b"\r\n".join(lines))]})
    out = session(gate(smtpd, f))
    code, texts = out["mail"]
    assert code == 550 and len(texts) == 10
    assert texts[0] == "5.7.1 line 0 ?[2J"


@pytest.mark.parametrize("bad", [b"250 2.0.0 ok", b"550 4.7.1 mixed classes", b"550",
                                 b"55x 5.7.1 x", b"550 5.7.1 a\r\n451 4.7.1 b",
                                 b"hello", b"550 5.7.1 a\0b", b""])
def test_a_replycode_that_is_no_reply_gives_451(smtpd, filters, bad):
    f = filters({b"M": [pkt(b"y", bad + b"\0")]})
    out = session(gate(smtpd, f))
    assert out["mail"] == (451, ["4.3.5 Server configuration problem - try again later"])


def test_shutdown_ends_the_session(smtpd, filters):
    f = filters({b"M": [pkt(b"4")]})
    srv = gate(smtpd, f)
    c = srv.connect()
    assert c.code() == 220
    c.cmd("EHLO a")
    assert c.cmd("MAIL FROM:<a@b.example>")[0] == 421
    assert c.closed()


def test_first_refusal_wins_and_later_filters_are_not_asked(smtpd, filters):
    first, second = filters({b"M": [pkt(b"r")]}), filters()
    session(gate(smtpd, first, second))
    assert all(b"M" not in s.commands() for s in second.sessions)


def test_progress_keeps_the_client_waiting(smtpd, filters):
    def slow(conn, payload):
        for _ in range(3):
            time.sleep(0.8)
            conn.sock.sendall(pkt(b"p"))
        return [pkt(b"c")]
    f = filters({b"E": slow})
    out = session(gate(smtpd, f, **FAST))       # 2.4 s > the 2 s timeout
    assert out["end"][0] == 250


# ------------------------------------------------------------ the changes ----

def eom(*packets):
    return {b"E": list(packets) + [pkt(b"a")]}


def accepted(smtpd, *f, **kw):
    srv = gate(smtpd, *f, **kw)
    out = session(srv, rcpts=kw.pop("rcpts", ("<bob@my.domain>",)))
    assert out["end"][0] == 250, out
    (name,) = spool_files(srv.jail)
    return srv, name


def test_header_changes_land_as_asked(smtpd, filters):
    f = filters(eom(pkt(b"h", strs(b"X-Added", b"yes")),
                    pkt(b"i", struct.pack("!I", 0) + strs(b"X-Top", b"first")),
                    pkt(b"i", struct.pack("!I", 3) + strs(b"X-Third", b"3\n\tfolded")),
                    pkt(b"m", struct.pack("!I", 1) + strs(b"subject", b"[SPAM] hello")),
                    pkt(b"m", struct.pack("!I", 1) + strs(b"To", b"")),
                    pkt(b"m", struct.pack("!I", 2) + strs(b"Subject", b"")),
                    pkt(b"m", struct.pack("!I", 5) + strs(b"X-New", b"beyond the last"))))
    srv, name = accepted(smtpd, f)
    _, msg = message_of(srv.jail, name)
    # (Postfix counts its Received header as the 0th: index 3 is before From.)
    assert msg == (b"X-Top: first\nsubject: [SPAM] hello\nX-Third: 3\n\tfolded\n"
                   b"From: Alice <alice@example.org>\nX-Folded: one\n\ttwo\nX-Added: yes\n"
                   b"X-New: beyond the last\n\nHi Bob,\n. a dot line\nbye\n")
    assert "changed by the filters" not in srv.log()      # headers only: not logged
    assert "replaced by the filters" not in srv.log()


def test_changes_to_a_message_too_big_to_rewrite_in_place(smtpd, filters):
    """A body over rewrite.IN_PLACE goes to a second draft by copy, not
    through memory; the result is the same as for a small one."""
    lines = [b"%06d " % i + b"y" * 90 for i in range((rewrite.IN_PLACE // 97) + 1000)]
    body = b"\r\n".join(lines) + b"\r\n"
    f = filters(eom(pkt(b"h", strs(b"X-Added", b"yes")),
                    pkt(b"e", strs(b"<bounces@example.org>"))))
    srv = gate(smtpd, f)
    out = session(srv, data=b"Subject: big\r\n\r\n" + body)
    assert out["end"][0] == 250, out
    (name,) = spool_files(srv.jail)
    env, msg = message_of(srv.jail, name)
    assert env == ["FROM <bounces@example.org>", "RCPT <bob@my.domain>"]
    assert msg == b"Subject: big\nX-Added: yes\n\n" + body.replace(b"\r\n", b"\n")
    assert len(body) > rewrite.IN_PLACE
    assert os.listdir(srv.jail).count(name) == 1 and not [
        n for n in os.listdir(srv.jail) if n.startswith(spool.DRAFT_PREFIX)]


def test_envelope_and_body_changes_land_and_are_delivered(smtpd, filters, tree_factory):
    f = filters(eom(pkt(b"e", strs(b"<bounces@example.org>", b"SIZE=100")),
                    pkt(b"+", strs(b"<carol@my.domain>")),
                    pkt(b"2", strs(b"dave@my.domain", b"NOTIFY=NEVER")),
                    pkt(b"-", strs(b"<bob@my.domain>")),
                    pkt(b"b", b"New body\r\nsecond line\r"), pkt(b"b", b"\nend")))
    srv, name = accepted(smtpd, f)
    env, msg = message_of(srv.jail, name)
    assert env == ["FROM <bounces@example.org>", "RCPT <carol@my.domain>",
                   "RCPT dave@my.domain"]
    assert msg == SPOOLED.split(b"\n\n")[0] + b"\n\nNew body\nsecond line\nend\n"
    assert re.search(r"milter: %s envelope changed by the filters: "
                     r"from=<bounces@example.org>, 2 recipients" % name, srv.log())
    assert "milter: %s body replaced by the filters" % name in srv.log()
    agent = Agent()
    fwd = Fwd(tree_factory(**FWD_CONSTANTS), srv.jail, agent.path)
    try:
        assert wait_for(lambda: agent.calls())
    finally:
        fwd.stop()
    (call,) = agent.calls()
    argv = call["argv"]
    assert argv[argv.index("-f") + 1] == "bounces@example.org"
    assert argv[-2:] == ["carol@my.domain", "dave@my.domain"]
    assert call["stdin"].endswith("\n\nNew body\nsecond line\nend\n")
    assert "subject: hello" in call["stdin"].lower()


def test_the_next_filter_sees_the_changes_of_the_one_before(smtpd, filters):
    first = filters(eom(pkt(b"h", strs(b"X-First", b"1"))))
    second = filters()
    srv, name = accepted(smtpd, first, second)
    conn = next(s for s in second.sessions if b"L" in s.commands())
    assert conn.headers()[-1] == (b"X-First", b"1")


def test_no_changes_no_second_draft(smtpd, filters):
    srv, name = accepted(smtpd, filters())
    assert message_of(srv.jail, name)[1] == SPOOLED


@pytest.mark.parametrize("change", [
    pkt(b"h", strs(b"X-Bad", b"one\ntwo")),                 # a break that is no fold
    pkt(b"h", strs(b"X-Bad", b"one\r\n\r\nbody?")),         # a header ending the header
    pkt(b"h", strs(b"X-Bad", b"a\rb")),                     # a bare CR
    pkt(b"h", strs(b"Bad Name", b"x")),                     # a space in the name
    pkt(b"h", strs(b"Bad:Name", b"x")),
    pkt(b"h", strs(b"", b"x")),
    pkt(b"h", strs(b"X-Long", b"y" * 70000)),
    pkt(b"+", strs(b"<relay@elsewhere.example>")),          # refused by the rules
    pkt(b"+", strs(b"<bad address>")),
    pkt(b"+", strs(b"<>")),
    pkt(b"e", strs(b"<-oQ/etc/passwd@x.example>")),
    pkt(b"-", strs(b"<bob@my.domain>")),                    # nobody left
    pkt(b"b", b"bare\rCR\r\n"),
    pkt(b"b", b"a NUL\0\r\n"),
], ids=lambda p: repr(p[5:25]))
def test_a_change_that_spoils_the_spool_file_gives_the_default_action(smtpd, filters, change):
    f = filters(eom(change))
    rules = "allow:ALL:ALL:*@my.domain\nnoto:ALL:ALL:ALL:550 no relaying\n"
    srv = gate(smtpd, f, rules=rules)
    out = session(srv)
    assert out["end"] == (451, ["4.7.1 Service unavailable - try again later"])
    assert spool_files(srv.jail) == [] and not [n for n in os.listdir(srv.jail)
                                                if n.startswith("draft.")]
    assert "change refused" in srv.log()


def test_a_change_it_did_not_negotiate_is_a_broken_filter(smtpd, filters):
    f = filters(eom(pkt(b"h", strs(b"X-A", b"b"))), actions=0x02)    # CHGBODY only
    assert session(gate(smtpd, f))["end"][0] == 451


def test_with_default_accept_a_refused_change_leaves_the_message_as_it_was(smtpd, filters):
    f = filters(eom(pkt(b"h", strs(b"X-Bad", b"one\ntwo"))))
    srv, name = accepted(smtpd, f, SMTPD_MILTER_DEFAULT_ACTION="accept")
    assert message_of(srv.jail, name)[1] == SPOOLED


def test_size_limit_holds_for_changes(smtpd, filters):
    f = filters(eom(pkt(b"b", b"x" * 3000 + b"\r\n")))
    srv = gate(smtpd, f, flags=("-s", "1000"))
    assert session(srv)["end"][0] == 451


def peak_kb(pid):
    return int(open("/proc/%d/status" % pid).read().split("VmHWM:")[1].split()[0])


@pytest.mark.parametrize("what", ["body", "headers"])
def test_a_filters_changes_are_checked_as_they_arrive(daemon_, filters, what):
    """Issue 34, item 5: a new body is written as its packets come, held to
    the size limit; header changes are bounded in all (CHANGES_MAX): 40
    packets of about 1 MiB cost a worker a few MiB, not 40, and the default
    action comes the moment the bound is passed (the filter is cut off)."""
    big = (1 << 20) - 200
    packets = ([pkt(b"b", b"y" * (big - 2) + b"\r\n")] * 40 if what == "body" else
               [pkt(b"h", strs(b"X-Big-%d" % i, b"z" * 60000)) for i in range(40)])
    f = filters(eom(*packets))
    d = daemon_(ALLOW, "-H", "-f", f.spec, "-s", "2000000", SMTPD_PREFORK=1,
                SMTPD_MAXCHILDREN=1, **FAST).wait_ready()
    c = d.connect()                         # the readiness checks are served
    assert c.code() == 220 and c.cmd("QUIT")[0] == 221
    (worker,) = d.workers()
    before = peak_kb(worker)
    assert session(d)["end"] == (451, ["4.7.1 Service unavailable - try again later"])
    assert peak_kb(worker) - before < 12 * 1024, (before, peak_kb(worker))
    assert spool_files(d.jail) == []
    assert re.search(r"change refused: (the new body exceeds 2000000 octets|header and "
                     r"envelope changes of more than 1048576 octets)", d.log()), d.log()


# ------------------------------------------------------------ quarantine ----

def test_quarantine_holds_until_released(smtpd, filters, tree_factory):
    f = filters(eom(pkt(b"q", b"looks like phishing\x1b[2J\0")))
    srv = gate(smtpd, f)
    out = session(srv)
    assert out["end"] == (250, ["2.0.0 Message accepted for delivery"])
    assert spool_files(srv.jail) == []
    held = os.listdir(os.path.join(srv.jail, "hold"))
    name = next(n for n in held if not n.endswith(".reason"))
    assert "looks like phishing\\x1b[2J" in open(os.path.join(srv.jail, "hold",
                                                              name + ".reason")).read()
    tree = tree_factory(**FWD_CONSTANTS)
    q = lambda *a: subprocess.run([PYTHON, os.path.join(tree, "smtpfwdd.py"), "-d", srv.jail,
                                   "-Q"] + list(a), capture_output=True, text=True)
    listed = [json.loads(line) for line in q("list", "-j").stdout.splitlines()]
    assert [(e["id"], e["state"], e["queue"]) for e in listed] == [(name, "held", "hold")]
    assert "phishing" in listed[0]["reason"] and "\x1b" not in listed[0]["reason"]
    r = q("requeue", name)              # it is there, but held (issue 35, item 11): not 66
    assert r.returncode == os.EX_DATAERR and "held by a mail filter; `release`" in r.stderr
    agent = Agent()
    fwd = Fwd(tree, srv.jail, agent.path)
    try:
        time.sleep(2.5)
        assert agent.calls() == []                      # smtpfwdd leaves hold/ alone
        r = q("release", name)
        assert r.returncode == 0, r.stderr
        r = q("release", name)
        assert r.returncode in (os.EX_DATAERR, os.EX_NOINPUT), r      # queued, or delivered
        assert wait_for(lambda: agent.calls())
    finally:
        fwd.stop()
    assert os.listdir(os.path.join(srv.jail, "hold")) == []


# --------------------------------------------------------- broken filters ----

def down_spec():
    return "inet:127.0.0.1:%d" % free_port()


BROKEN = {
    "garbage": {b"M": [b"\x00\x00\x00\x05zzzzz"]},
    "length-zero": {b"M": [b"\x00\x00\x00\x00"]},
    "oversized": {b"M": [b"\x7f\xff\xff\xff" + b"y" * 100]},
    "unknown-reply": {b"M": [pkt(b"Z")]},
    "continue-with-data": {b"M": [pkt(b"c", b"extra")]},
    "change-too-early": {b"M": [pkt(b"h", strs(b"X", b"y"))]},
    "half-a-packet": {b"M": [b"\x00\x00\x00\x09c", CLOSE]},
    "closes": {b"M": [CLOSE]},
    "closes-mid-message": {b"B": [CLOSE]},
    "stalls": {b"M": [STALL]},
    "stalls-at-eom": {b"E": [STALL]},
    "two-replies": {b"M": [pkt(b"c"), pkt(b"c")]},
}


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_a_broken_filter_gives_the_default_action(smtpd, filters, how):
    f = filters(BROKEN[how])
    srv = gate(smtpd, f, **FAST)
    started = time.time()
    out = session(srv)
    assert time.time() - started < 15
    last = out.get("end") or out.get("data") or out["mail"]
    if how == "two-replies":            # the stray reply is seen at the next event
        last = out["rcpt"][0]
    assert last == (451, ["4.7.1 Service unavailable - try again later"]), out
    assert spool_files(srv.jail) == []
    assert "default action: tempfail" in srv.log()


@pytest.mark.parametrize("optneg", [
    pkt(b"O", struct.pack("!III", 7, 0x1FF, 0)),        # a version we do not speak
    pkt(b"O", struct.pack("!III", 6, 0x3FF, 0)),        # actions we do not offer
    pkt(b"O", struct.pack("!II", 6, 0)),                # short
    pkt(b"c"),                                          # no negotiation
    pkt(b"O", struct.pack("!III", 6, 0x1FF, 0) + struct.pack("!I", 2) + b"i"),  # no NUL
])
def test_a_bad_negotiation_gives_the_default_action(smtpd, filters, optneg):
    f = filters(optneg=optneg)
    out = session(gate(smtpd, f, **FAST))
    assert out["helo"] == (451, ["4.7.1 Service unavailable - try again later"])


def test_symbol_lists_choose_the_macros(smtpd, filters):
    lists = struct.pack("!I", 2) + b"{mail_addr} {nonesuch}\0" + struct.pack("!I", 0) + b"j\0"
    f = filters(symlists=lists)
    session(gate(smtpd, f))
    conn = next(s for s in f.sessions if b"M" in s.commands())
    assert conn.macros[b"M"] == {b"{mail_addr}": b"alice@example.org"}
    assert conn.macros[b"C"] == {b"j": b"mx.my.domain"}


@pytest.mark.parametrize("action,reply", [
    ("tempfail", (451, ["4.7.1 Service unavailable - try again later"])),
    ("reject", (550, ["5.5.0 Service unavailable"])),
    ("accept", (250, ["mx.my.domain pleased to meet you, client.example",
                      "PIPELINING", "8BITMIME", "SIZE 10240000",
                      "ENHANCEDSTATUSCODES", "DSN", "SMTPUTF8", "CHUNKING"]))])
def test_a_filter_that_is_down(smtpd, action, reply):
    srv = gate(smtpd, down_spec(), SMTPD_MILTER_DEFAULT_ACTION=action)
    out = session(srv)
    assert out["helo"] == reply
    if action == "accept":
        assert out["end"][0] == 250 and len(spool_files(srv.jail)) == 1


def test_the_worker_serves_the_next_session_after_a_broken_filter(daemon_, filters):
    f = filters({b"B": [CLOSE]})
    d = daemon_(ALLOW, "-f", f.spec, SMTPD_PREFORK=1, SMTPD_MAXCHILDREN=1, **FAST).wait_ready()
    assert session(d)["end"][0] == 451
    f.script = {}
    assert session(d)["end"][0] == 250
    f.script = {b"E": [STALL]}
    assert session(d)["end"][0] == 451
    f.script = {}
    assert session(d)["end"][0] == 250
    assert len(d.workers()) == 1 and "unexpected error" not in d.log()


# ------------------------------------------------- kept connections ----

def one_worker(daemon_, f, **constants):
    """smtpd -D with one worker and filter f (a FakeMilter or a Relay).  The
    readiness checks never reach the worker (the front stage answers them):
    the filter has seen nothing yet.  No client is passed at once (its
    allow-list off): each session's first command on the worker is MAIL,
    whether or not the worker was idle yet when it connected."""
    d = daemon_(ALLOW, "-f", f.spec, SMTPD_PREFORK=1, SMTPD_MAXCHILDREN=1,
                **(dict(FAST, SMTPD_SCREEN_ALLOW_TTL=0) | constants)).wait_ready()
    c = d.connect()
    assert c.code() == 220 and c.cmd("QUIT")[0] == 221
    c.close()
    assert (f.accepted if isinstance(f, Relay) else len(f.sessions)) == 0
    return d


def spool_ids(conn):
    """The spool id (macro i) of each MAIL the filter saw on conn."""
    return [p[1:].split(b"\0")[1].decode() for c, p in conn.events
            if c == b"D" and p[:1] == b"M"]


def test_a_worker_keeps_the_connection_for_its_next_session(daemon_, filters):
    f = filters()
    d = one_worker(daemon_, f)
    assert session(d)["end"][0] == 250
    c = d.connect()
    assert c.code() == 220 and transaction(c)["end"][0] == 250
    assert c.cmd("RSET")[0] == 250 and c.cmd("NOOP")[0] == 250     # nothing for the filter
    c.cmd("QUIT")
    c.close()
    assert session(d)["end"][0] == 250
    assert len(f.sessions) == 1
    assert wait_for(lambda: f.sessions[0].commands()[-1:] == [b"K"])
    cmds = f.sessions[0].commands()
    one = [b"C", b"H", b"M", b"R", b"T"] + [b"L"] * 4 + [b"N", b"B", b"E", b"K"]
    assert cmds == [b"O"] + one * 3, cmds              # negotiated once; no ABORT, no QUIT
    assert sorted(spool_ids(f.sessions[0])) == sorted(spool_files(d.jail))
    conns = [p for c, p in f.sessions[0].events if c == b"C"]
    assert len(set(conns)) == 3                         # each its client's port
    assert "milter" not in d.log()


@pytest.mark.parametrize("how", ["reject", "discard", "rset", "mid-transaction",
                                 "second-transaction"])
def test_a_connection_is_kept_only_after_a_message_let_through(daemon_, filters, how):
    """libmilter takes QUIT_NC only right after an end of message it let
    through: otherwise QUIT, and the next session a new connection."""
    f = filters({b"E": [pkt({"reject": b"r", "discard": b"d"}[how])]}
                if how in ("reject", "discard") else {})
    d = one_worker(daemon_, f)
    c = d.connect()
    assert c.code() == 220
    assert transaction(c)["end"][0] in (250, 550)
    if how == "rset":
        assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
        assert c.cmd("RSET")[0] == 250
    elif how == "mid-transaction":
        assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    elif how == "second-transaction":
        assert transaction(c, helo="RSET")["end"][0] == 250
        assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    c.cmd("QUIT")
    c.close()
    assert wait_for(lambda: f.sessions[0].closed.is_set(), timeout=10)
    assert f.sessions[0].commands()[-1] == b"Q" and b"K" not in f.sessions[0].commands()
    f.script = {}
    assert session(d)["end"][0] == 250
    assert len(f.sessions) == 2 and f.sessions[1].commands()[0] == b"O"


def test_a_kept_connection_the_filter_closed_is_not_used(daemon_, filters):
    f = filters()
    d = one_worker(daemon_, f)
    assert session(d)["end"][0] == 250
    f.sessions[0].sock.shutdown(socket.SHUT_RDWR)       # an idle timeout, a restart
    assert session(d)["end"][0] == 250
    assert len(f.sessions) == 2 and f.sessions[1].commands()[0] == b"O"
    assert "milter" not in d.log()


def test_a_filter_that_lacks_quit_nc(daemon_, filters):
    """It hangs up at QUIT_NC, as libmilter before 8.14 would: every session
    then opens a new connection, and nothing else changes."""
    f = filters(quit_nc=False)
    d = one_worker(daemon_, f)
    for _ in range(3):
        assert session(d)["end"][0] == 250
    assert [c.commands()[0] for c in f.sessions] == [b"O"] * 3
    assert "milter" not in d.log()


def test_a_client_passed_at_once_is_heard_at_its_greeting_on_the_kept_connection(
        daemon_, filters):
    """A client that had mail accepted goes to the worker before its
    greeting: the filter hears CONNECT then, and HELO at its EHLO, on the
    connection the worker kept from the session before."""
    f = filters()
    d = one_worker(daemon_, f, SMTPD_SCREEN_ALLOW_TTL=86400)
    for _ in range(3):
        assert session(d)["end"][0] == 250
        time.sleep(0.3)         # (the worker is idle again: the next is passed at once)
    assert len(f.sessions) == 1
    assert f.sessions[0].commands().count(b"C") == 3
    assert f.sessions[0].commands().count(b"H") == 3
    assert len(re.findall(r'worker: EHLO from UNKNOWN\(127\.0\.0\.1\) as "client\.example"',
                          d.log())) == 3


def test_a_filter_that_answers_quit_nc(daemon_, filters):
    """QUIT_NC wants no answer: one that comes anyway spoils the kept
    connection (it is seen while the connection waits, or as a packet
    nobody asked for before the first MAIL), and no session suffers."""
    f = filters(quit_nc="answer")
    d = one_worker(daemon_, f)
    for _ in range(4):
        assert session(d)["end"][0] == 250
    assert all(c.commands()[:2] == [b"O", b"C"] and c.commands().count(b"M") <= 1
               for c in f.sessions)
    assert "default action" not in d.log()


def test_a_late_answer_to_quit_nc_is_caught_and_the_session_asked_again(daemon_, filters):
    """The answer comes after the next session's CONNECT went out, so it is
    read as CONNECT's, and the real one is a packet nobody asked for at
    HELO: a new connection is asked CONNECT and HELO again, and what it
    says holds (here a reject at CONNECT, which the worker's first command,
    MAIL, then gets: the front stage answered EHLO)."""
    def connect(conn, payload):
        return [pkt(b"r")] if len(f.sessions) > 1 and conn is f.sessions[1] else None
    f = filters({b"C": connect}, quit_nc="late")
    d = one_worker(daemon_, f)
    assert session(d)["end"][0] == 250
    assert session(d)["mail"] == (550, ["5.7.1 Command rejected"])
    assert [c.commands()[:3] for c in f.sessions] == [[b"O", b"C", b"H"], [b"O", b"C"]]
    assert f.sessions[0].commands()[-2:] == [b"K", b"C"]      # HELO never went out on it
    assert re.search(r"a connection kept after continue: a packet nobody asked for at HELO; "
                     r"none kept after any message again", d.log())
    f.script = {}
    assert session(d)["end"][0] == 250
    assert len(f.sessions) == 3 and b"K" not in f.sessions[2].commands()


def test_a_session_on_a_kept_connection_that_fails_later_stops_the_keeping(daemon_, filters):
    """Past the first MAIL nothing is asked again: the default action, as
    with any broken filter, and that worker keeps no more connections."""
    def body(conn, payload):
        return [CLOSE] if conn.commands().count(b"C") > 1 else None
    f = filters({b"B": body})
    d = one_worker(daemon_, f)
    assert [session(d)["end"][0] for _ in range(4)] == [250, 451, 250, 250]
    assert [c.commands().count(b"M") for c in f.sessions] == [2, 1, 1]


def test_a_kept_connection_that_fails_at_connect_is_replaced(daemon_, filters):
    """Closed between our look and our CONNECT: a new connection, at once."""
    def close_when_reused(conn, payload):
        return [CLOSE] if conn.commands().count(b"C") > 1 else None
    f = filters({b"C": close_when_reused})
    d = one_worker(daemon_, f)
    for _ in range(3):
        assert session(d)["end"][0] == 250
    assert [c.commands().count(b"C") for c in f.sessions] == [2, 2, 1]
    assert "milter" not in d.log()


def test_a_filter_that_ignores_quit_nc_is_not_kept_again(daemon_, filters):
    """One that then stalls at CONNECT costs one command timeout: a new
    connection, a warning, and that worker keeps no more connections to it."""
    def stall_when_reused(conn, payload):
        return [STALL] if conn.commands().count(b"C") > 1 else None
    f = filters({b"C": stall_when_reused})
    d = one_worker(daemon_, f)
    assert session(d)["end"][0] == 250
    started = time.monotonic()
    assert session(d)["end"][0] == 250
    assert 0.9 < time.monotonic() - started < 10        # KEPT_WAIT
    assert session(d)["end"][0] == 250
    assert [c.commands().count(b"C") for c in f.sessions] == [2, 1, 1]
    assert b"K" not in f.sessions[1].commands()
    assert re.search(r"milter inet:127.0.0.1:\d+: a connection kept after continue: timed out "
                     r"at CONNECT; none kept after any message again", d.log())


def test_a_filter_that_ignores_quit_nc_after_an_accept(daemon_, filters):
    """libmilter after it accepted a message: it ignores QUIT_NC and CONNECT.
    A second's wait (KEPT_WAIT), a new connection; then no connection is
    kept after an accept, but still after a continue."""
    ended = []

    def eom(conn, payload):
        conn.last = ended.pop(0)
        return [pkt(conn.last)]

    def connect(conn, payload):
        return [STALL] if getattr(conn, "last", None) == b"a" else None
    f = filters({b"E": eom, b"C": connect})
    d = one_worker(daemon_, f)
    took = []
    for how in (b"a", b"a", b"a", b"c", b"c"):
        ended.append(how)
        started = time.monotonic()
        assert session(d)["end"][0] == 250
        took.append(time.monotonic() - started)
    assert took[1] > 0.9, took
    # 1: accept, kept; 2: the kept one stalls, a new one, accept, not kept;
    # 3: a new one, accept, not kept; 4: a new one, continue, kept; 5: on it
    assert [c.commands().count(b"C") for c in f.sessions] == [2, 1, 1, 2]
    assert [c.commands()[-1] for c in f.sessions[1:3]] == [b"Q", b"Q"]
    assert "none kept after an accept again" in d.log()


def test_a_kept_connection_the_filter_spoke_on_is_not_used(daemon_, filters):
    f = filters()
    d = one_worker(daemon_, f)
    assert session(d)["end"][0] == 250
    f.sessions[0].sock.sendall(pkt(b"c"))               # nobody asked
    assert session(d)["end"][0] == 250
    assert len(f.sessions) == 2


@pytest.mark.parametrize("idle", [0, 1])
def test_kept_no_longer_than_smtpd_milter_keep_idle(daemon_, filters, idle):
    f = filters()
    d = one_worker(daemon_, f, SMTPD_MILTER_KEEP_IDLE=idle)
    assert session(d)["end"][0] == 250
    time.sleep(1.5)
    assert session(d)["end"][0] == 250
    assert len(f.sessions) == 2
    assert (b"K" in f.sessions[0].commands()) == (idle > 0)


@pytest.fixture
def libmilter_filter():
    if subprocess.run(["/usr/bin/python3", "-c", "import Milter"],
                      capture_output=True).returncode:
        pytest.skip("needs Debian's python3-milter (.ci/run installs it)")
    port = free_port()
    p = subprocess.Popen(["/usr/bin/python3", os.path.join(ROOT, "t", "lib",
                                                           "libmilter_filter.py"), str(port)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert p.stdout.readline() == b"ready\n"
    assert wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0)
    relay = Relay(port)
    yield relay
    relay.close()
    p.kill()
    p.wait()


def test_libmilter_takes_a_kept_connection(daemon_, libmilter_filter):
    """Sendmail's libmilter: QUIT_NC after a message it let through, then
    CONNECT; each session is judged, with its own client, on one connection.
    After a message it accepted, libmilter ignores both: one second, a new
    connection, and none kept after an accept again."""
    d = one_worker(daemon_, libmilter_filter)
    bodies = [MESSAGE, b"Subject: x\r\n\r\nACCEPTME\r\n", b"Subject: x\r\n\r\nREJECTME\r\n",
              MESSAGE, MESSAGE]
    codes = []
    for n, body in enumerate(bodies):
        c = d.connect(source="127.0.0.%d" % (n + 2))
        assert c.code() == 220
        codes.append(transaction(c, data=body)["end"])
        c.cmd("QUIT")
        c.close()
    assert codes[2] == (550, ["5.7.1 rejected by libmilter"])
    assert [c[0] for n, c in enumerate(codes) if n != 2] == [250] * 4
    # sessions 1-2 on one connection; 3 on a second, after the kept one was
    # ignored (and a third, as the reject ends the keeping), 4-5 on a third
    assert libmilter_filter.accepted == 3, d.log()
    seen = sorted(re.search(rb"^X-Libmilter: .*", message_of(d.jail, name)[1], re.M)[0]
                  for name in spool_files(d.jail))
    assert seen == [b"X-Libmilter: 1 127.0.0.2", b"X-Libmilter: 2 127.0.0.3",
                    b"X-Libmilter: 4 127.0.0.5", b"X-Libmilter: 5 127.0.0.6"]
    log = d.log()
    assert "a connection kept after accept: timed out at CONNECT" in log
    assert "default action" not in log


def test_an_ipv6_filter(smtpd, filters):
    f = filters({b"M": [reply(b"550 5.7.1 six")]}, addr="::1")
    assert f.spec.startswith("inet6:[::1]:")
    assert session(gate(smtpd, f))["mail"] == (550, ["5.7.1 six"])


@pytest.mark.parametrize("spec", ["unix:/run/x.sock", "inet:localhost:11332",
                                  "inet:127.0.0.1", "inet6:::1:11332", "inet:127.0.0.1:0",
                                  "inet6:[127.0.0.1]:5"])
def test_a_bad_milter_list_stops_smtpd(tree_factory, spec):
    from harness import make_jail, smtpd_argv, TEST_CONSTANTS
    tree = tree_factory(**TEST_CONSTANTS)
    r = subprocess.run(smtpd_argv(tree, make_jail(), "-f", spec, "-D", "-F", "-p",
                                  str(free_port()), "-l", "127.0.0.1"),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == os.EX_USAGE and "milter" in r.stderr, r.stderr


# ------------------------------------------------------------- durability ----

def test_sigkill_between_the_verdict_and_250_loses_nothing_acknowledged(daemon_, filters):
    """Kill the workers at moments around the filter's accept (with changes
    to apply): a 250 means a complete, changed file; without a 250 there is
    at most a complete file (the client sends again), never a draft
    delivered nor a message half written."""
    f = filters(eom(pkt(b"h", strs(b"X-Checked", b"yes")), pkt(b"+", strs(b"<carol@my.domain>"))))
    d = daemon_(ALLOW, "-f", f.spec).wait_ready()
    acked = 0
    for i in range(24):
        c = d.connect()
        assert c.code() == 220
        for line in ("EHLO a", "MAIL FROM:<alice@example.org>", "RCPT TO:<bob@my.domain>"):
            assert c.cmd(line)[0] == 250
        assert c.cmd("DATA")[0] == 354
        workers = d.workers()
        c.send(MESSAGE + b".\r\n")
        time.sleep(0.003 * (i % 12))
        for p in workers:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass            # a spare the master retired in the meantime
        try:
            code = c.reply()[0]
        except (EOFError, OSError):
            code = None
        c.close()
        files = spool_files(d.jail)
        for name in files:
            env, msg = message_of(d.jail, name)
            assert env == ["FROM <alice@example.org>", "RCPT <bob@my.domain>",
                           "RCPT <carol@my.domain>"]
            assert msg == SPOOLED.replace(b"\n\nHi", b"\nX-Checked: yes\n\nHi")
            os.unlink(os.path.join(d.jail, name))
        if code == 250:
            acked += 1
            assert files, "a 250 without a committed file"
        # (A client passed to a killed worker before it is gone is lost with
        # it: nothing was acknowledged to it, but this test wants each to
        # reach DATA.)
        assert wait_for(lambda: all(gone(p) for p in workers), timeout=20)
        assert wait_for(lambda: d.workers(), timeout=20)
    assert 0 < acked < 24, acked


# ------------------------------------------------------------ a real rspamd ----

GTUBE = (b"Subject: test\r\nFrom: alice@example.org\r\n\r\n"
         b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n")
CLEAN = (b"Subject: lunch\r\nFrom: Alice <alice@example.org>\r\nTo: bob@my.domain\r\n"
         b"Message-ID: <lunch.1@example.org>\r\nDate: Sun, 06 Dec 2026 12:00:00 +0000\r\n"
         b"\r\nHi Bob, lunch tomorrow at noon?\r\n")


@pytest.fixture(scope="module")
def spamd(dns_server):
    if not rspamd.available():
        pytest.skip("needs root and Debian's rspamd (.ci/run installs it)")
    with rspamd.instance(dns_port=dns_server.port) as r:
        yield r


@pytest.mark.parametrize("mode", ["inetd", "daemon"])
def test_rspamd_rejects_gtube_and_marks_clean_mail(smtpd, daemon_, spamd, mode):
    spec = "inet:127.0.0.1:%d" % spamd.milter
    srv = gate(smtpd, spec) if mode == "inetd" else \
        daemon_(ALLOW, "-f", spec).wait_ready()
    out = session(srv, data=GTUBE)
    assert out["end"] == (554, ["5.7.1 Gtube pattern"]), spamd.log()
    assert spool_files(srv.jail) == []
    out = session(srv, data=CLEAN)
    assert out["end"][0] == 250
    (name,) = spool_files(srv.jail)
    _, msg = message_of(srv.jail, name)
    head = msg.split(b"\n\n")[0]
    assert re.search(rb"^X-Spamd-Result: default: False \[", head, re.M), msg
    assert b"X-Rspamd-Queue-Id: " + name.encode() in head      # our spool id, macro i
    assert msg.endswith(b"\n\nHi Bob, lunch tomorrow at noon?\n")


def test_rspamd_on_a_kept_connection(daemon_, spamd):
    """rspamd takes QUIT_NC and judges the next session's message afresh."""
    relay = Relay(spamd.milter)
    try:
        d = one_worker(daemon_, relay)
        assert session(d, data=CLEAN)["end"][0] == 250
        assert session(d, data=GTUBE)["end"] == (554, ["5.7.1 Gtube pattern"])
        assert session(d, data=CLEAN.replace(b"lunch.1", b"lunch.2"))["end"][0] == 250
        assert relay.accepted == 2          # kept for the second; a reject ends the keeping
        names = spool_files(d.jail)
        assert len(names) == 2
        for name in names:
            head = message_of(d.jail, name)[1].split(b"\n\n")[0]
            assert re.search(rb"^X-Spamd-Result: default: False \[", head, re.M), head
            assert b"X-Rspamd-Queue-Id: " + name.encode() in head
        assert "kept" not in d.log() and "default action" not in d.log()
    finally:
        relay.close()


def test_a_filter_that_stops_reading_times_out_the_write():
    """The filter's socket is non-blocking: a write it does not take waits in
    our poll, within the session's deadline, and the filter is then Broken;
    the worker is never stuck in send()."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    f = milter.Filter(net.Endpoint("pair", socket.AF_UNIX, "", 0), "tempfail",
                      time.monotonic() + 1.0)
    ours.setblocking(False)
    f.sock, f.poller = ours, select.poll()
    f.poller.register(ours, select.POLLIN)
    started = time.monotonic()
    with pytest.raises(milter.Broken, match="write: timed out"):
        f.send(milter.packet(milter.BODY, b"x" * 1000000), "content")
    assert 0.9 < time.monotonic() - started < 5
    ours.close()
    theirs.close()


def test_an_answer_in_pieces_is_one_packet():
    """A filter may write its packets an octet at a time, or several at once."""
    ours, theirs = socket.socketpair()
    f = milter.Filter(net.Endpoint("pair", socket.AF_UNIX, "", 0), "tempfail",
                      time.monotonic() + 10)
    ours.setblocking(False)
    f.sock, f.poller = ours, select.poll()
    f.poller.register(ours, select.POLLIN)
    f.actions = milter.F_ADDHDRS
    answer = pkt(b"h", strs(b"X-A", b"b")) + pkt(b"c")

    def drip():
        theirs.recv(100)
        for i in range(len(answer)):
            theirs.send(answer[i:i + 1])
            time.sleep(0.002)
    t = threading.Thread(target=drip)
    t.start()
    edits = rewrite.Changes("/tmp", 0)
    assert f.event(milter.BODYEOB, b"", {}, "content", edits) == milter.CONTINUE
    t.join()
    assert edits.edits == [("add", b"X-A", b"b")]
    ours.close()
    theirs.close()


def test_a_bdat_message_reaches_the_filters_as_a_data_one_does(smtpd, filters):
    """CHUNKING (issue 38): the filters' DATA stage at the first chunk,
    the body and end of message after the last; their changes apply and
    their refusal is the last chunk's reply."""
    f = filters(eom(pkt(b"h", strs(b"X-Chunked", b"yes"))))
    srv = gate(smtpd, f)
    c = srv.connect()
    assert c.code() == 220
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<alice@example.org>")
    c.cmd("RCPT TO:<bob@my.domain>")
    c.send(b"BDAT 20\r\nSubject: b\r\n\r\nbody\r\n")
    assert c.reply()[0] == 250
    c.send(b"BDAT 6 LAST\r\nmore\r\n")
    assert c.reply()[0] == 250
    conn = f.sessions[-1]
    assert b"".join(p for cmd, p in conn.events if cmd == b"B") == b"body\r\nmore\r\n"
    cmds = conn.commands()
    assert cmds.index(b"T") < cmds.index(b"B") < cmds.index(b"E")
    (name,) = spool_files(srv.jail)
    assert b"X-Chunked: yes\n" in message_of(srv.jail, name)[1]
    f2 = filters({b"E": [reply(b"550 5.7.1 no chunks")]})
    srv = gate(smtpd, f2)
    c = srv.connect()
    assert c.code() == 220
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<alice@example.org>")
    c.cmd("RCPT TO:<bob@my.domain>")
    c.send(b"BDAT 20 LAST\r\nSubject: b\r\n\r\nbody\r\n")
    assert c.reply() == (550, ["5.7.1 no chunks"])
    assert spool_files(srv.jail) == []


def test_dsn_parameters_survive_a_filters_envelope_change(smtpd, filters):
    """The filters see MAIL's and RCPT's ESMTP parameters as Postfix passes
    them; one adds a recipient and deletes another: those kept keep their
    NOTIFY and ORCPT, MAIL's RET and ENVID stay, the added one has none
    (issue 38)."""
    f = filters(eom(pkt(b"+", strs(b"<carol@my.domain>")), pkt(b"-", strs(b"<bob@my.domain>")),
                    pkt(b"b", b"New body\r\n")))
    srv = gate(smtpd, f)
    c = srv.connect()
    assert c.code() == 220
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<alice@example.org> RET=HDRS ENVID=e1")[0] == 250
    assert c.cmd("RCPT TO:<bob@my.domain> NOTIFY=NEVER")[0] == 250
    assert c.cmd("RCPT TO:<dave@my.domain> NOTIFY=FAILURE ORCPT=rfc822;dave@my.domain")[0] \
        == 250
    assert c.cmd("DATA")[0] == 354
    c.send(MESSAGE + b".\r\n")
    assert c.reply()[0] == 250
    conn = f.sessions[-1]
    assert [p for cmd, p in conn.events if cmd == b"M"] == [b"<alice@example.org>\0RET=HDRS\0"
                                                            b"ENVID=e1\0"]
    assert [p for cmd, p in conn.events if cmd == b"R"] == [
        b"<bob@my.domain>\0NOTIFY=NEVER\0",
        b"<dave@my.domain>\0NOTIFY=FAILURE\0ORCPT=rfc822;dave@my.domain\0"]
    (name,) = spool_files(srv.jail)
    env, _ = message_of(srv.jail, name)
    assert env == ["FROM <alice@example.org>", "SENT ;DSN RET=HDRS ENVID=e1",
                   "SENT ;DSN NOTIFY=FAILURE ORCPT=rfc822;dave@my.domain",
                   "RCPT <dave@my.domain>", "RCPT <carol@my.domain>"]
