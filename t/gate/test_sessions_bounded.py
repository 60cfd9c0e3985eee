"""Every session is bounded and clients reach nothing raw (issue 12, items
7, 8, 10 and 11): the deadline is checked before every command and caps
every sleep and lookup; noto and 451 count as errors; only CRLF ends a line;
the log and the replies carry no raw client text or internal detail; a
finished session frees its SMTPD_MAX_PER_IP slot at once."""

import smtplib
import threading
import time

import pytest

from smtpgate.rules import ruleset as engine
from harness import wait_for


def open_envelope(srv, source="127.0.0.1"):
    c = srv.connect(source)
    c.reply()
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<a@b.example>")[0] == 250
    return c


def replies_until_closed(c, limit=60):
    """Every reply code until the server closes, and how long that took."""
    start, codes = time.monotonic(), []
    c.sock.settimeout(limit)
    while True:
        try:
            codes.append(c.reply()[0])
        except (EOFError, ConnectionResetError):
            return codes, time.monotonic() - start


def test_pipelined_noto_delays_cannot_outlast_the_session(smtpd):
    srv = smtpd("noto_delay:ALL:ALL:ALL:550 go away\n", "-H", NOTO_DELAY=1, SESSION_TIMEOUT=3)
    c = open_envelope(srv)
    c.send("".join("RCPT TO:<u%d@my.domain>\r\n" % i for i in range(30)))
    codes, took = replies_until_closed(c)
    assert codes[-1] == 421 and took < 3 + 3, (codes, took)


def test_slow_lookups_cannot_outlast_the_session(smtpd, dnsz):
    for i in range(20):
        dnsz.fail("d%d.example" % i, "TIMEOUT")
    srv = smtpd("noto:ALL:ALL:*@NS=UNKNOWN:550 no\nallow:ALL:ALL:ALL\n", "-H",
                DNS_TIMEOUT=2, SESSION_TIMEOUT=3)
    c = open_envelope(srv)
    c.send("".join("RCPT TO:<u@d%d.example>\r\n" % i for i in range(20)))
    codes, took = replies_until_closed(c)
    assert codes[-1] == 421 and took < 3 + 3, (codes, took)


def test_noto_replies_count_toward_max_errors(smtpd):
    srv = smtpd("noto:ALL:ALL:ALL:550 go away\n", "-H")
    c = open_envelope(srv)
    c.send("".join("RCPT TO:<u%d@my.domain>\r\n" % i for i in range(30)))
    codes, _ = replies_until_closed(c)
    assert codes == [550] * 10 + [421]


def test_tempfails_count_toward_max_errors(smtpd):
    srv = smtpd("allow:10/8:ALL:ALL\n", "-H")       # invalid: every RCPT gets 451
    c = open_envelope(srv)
    c.send("".join("RCPT TO:<u%d@my.domain>\r\n" % i for i in range(30)))
    codes, _ = replies_until_closed(c)
    assert codes == [451] * 10 + [421]


# -- only CRLF ends a command --

def test_bare_lf_does_not_split_a_command(smtpd):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H")
    c = open_envelope(srv)
    c.send(b"RCPT TO:<a@my.domain>\nRCPT TO:<b@my.domain>\r\n")
    assert c.reply() == (500, ["5.5.2 Bare CR or LF or NUL in command"])
    assert c.cmd("DATA")[0] == 503      # neither recipient was taken
    assert c.cmd("QUIT")[0] == 221


def test_a_line_over_512_octets_with_bare_lfs_is_one_refusal(smtpd):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H")
    c = open_envelope(srv)
    c.send(b"NOOP\n" * 200 + b"\r\n")
    assert c.reply() == (500, ["5.5.2 Line too long"])
    assert c.cmd("HELP")[0] == 214


# -- clients reach logs and replies only escaped --

FORGED = 'x" bytes=999 id=smtpdFORGED\x1b[31m'


def test_helo_cannot_forge_the_summary_line(smtpd):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H", "-q")
    with smtplib.SMTP(srv.addr, srv.port, timeout=30) as s:
        s.ehlo(FORGED)
        s.sendmail("a@b.example", ["bob@my.domain"], b"Subject: x\r\n\r\nhi\r\n")
    log = srv.log()
    assert "bytes=999" not in log.replace("\\x20bytes=999", "")
    assert "\x1b" not in log
    assert 'as "x\\x22\\x20bytes=999\\x20id=smtpdFORGED\\x1b[31m"' in log


def test_helo_reply_is_bounded_and_clean(smtpd):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H")
    c = srv.connect()
    c.reply()
    c.send(b"HELO " + b"\x1b" + b"a" * 480 + b"\r\n")
    line = c.line().encode("latin-1")
    assert line.startswith(b"250 ") and len(line) + 2 <= 512 and b"\x1b" not in line


def test_tempfail_reply_is_fixed_and_hides_the_resolver(smtpd, dnsz):
    dnsz.fail("1.0.0.127.in-addr.arpa", "SERVFAIL")      # the client's PTR
    srv = smtpd("noto:UNKNOWN:ALL:ALL\nallow:ALL:ALL:ALL\n",
                env={"SMTPD_IDENT": "UNKNOWN"})
    c = srv.connect()
    c.reply()
    c.cmd("HELO x")
    c.cmd("MAIL FROM:<a@b.example>")
    code, texts = c.cmd("RCPT TO:<bob@my.domain>")
    assert code == 451
    assert texts == [engine.TEMPFAIL_REPLY[4:]]
    assert dnsz.spec.split("@")[0] not in " ".join(texts)


def test_rule_replies_fit_512_octets_with_crlf():
    rules, _ = engine.parse("noto:ALL:ALL:ALL:550 %F %T %F %T\n")
    c = engine.Client("192.0.2.1", None)
    v = engine.evaluate(rules, c, "<%s@b.example>" % ("f" * 240), "<%s@d.example>" % ("t" * 240))
    assert len(v.reply.encode("latin-1")) + 2 <= 512


# -- a finished session frees its per-address slot at once --

def test_clients_reconnecting_at_the_per_ip_cap_are_never_refused(daemon_):
    d = daemon_("allow:ALL:ALL:ALL\n", "-M", "16", SMTPD_MAX_PER_IP=4).wait_ready()
    refused, errors = [], []

    def client():
        for _ in range(40):
            try:
                with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
                    s.sendmail("a@b.example", ["bob@my.domain"], b"Subject: x\r\n\r\nhi\r\n")
            except smtplib.SMTPConnectError as e:
                refused.append(e.smtp_code)
            except (smtplib.SMTPException, OSError) as e:
                errors.append(repr(e))
    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert refused == [] and errors == []
    assert wait_for(lambda: "refused" not in d.log())


@pytest.mark.parametrize("n", [5])
def test_the_cap_still_holds_for_live_sessions(daemon_, n):
    d = daemon_("allow:ALL:ALL:ALL\n", "-M", "16", SMTPD_MAX_PER_IP=n - 1).wait_ready()

    def hold():
        """n - 1 sessions, once the readiness checks' sessions have ended."""
        held = [d.connect() for _ in range(n - 1)]
        if all(c.reply()[0] == 220 for c in held):
            return held
        for c in held:
            c.close()
    got = []
    assert wait_for(lambda: got.append(hold()) or got[-1])
    held = got[-1]
    extra = d.connect()
    assert extra.reply()[0] == 421
    for c in held:
        c.cmd("QUIT")


def test_an_ident_answer_reaches_the_log_escaped(smtpd, ident_server):
    ident_server("127.0.0.1", 'x"forged=1\\')
    srv = smtpd("noto:*@ALL:ALL:ALL:550 no\n", "-H")
    c = srv.connect()
    c.reply()
    c.cmd("HELO x")
    c.cmd("MAIL FROM:<a@b.example>")
    assert c.cmd("RCPT TO:<c@my.domain>")[0] == 550
    c.cmd("QUIT")
    assert "x\\x22forged=1\\x5c@UNKNOWN(127.0.0.1) from" in srv.log()
    assert 'x"forged' not in srv.log()
