"""Attacks on the gate: SMTP smuggling and injection, end to end (issue 9)."""

import os
import re
import signal
import subprocess
import time

import pytest

from harness import Agent, is_root, PYTHON, spool_files, TEST_CONSTANTS

SMUGGLED = (b"MAIL FROM:<spoof@x.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nevil\r\n.\r\n")

# Each carrier "ends" in a way some MTA might take for the end of data, then
# carries a complete transaction; the real CRLF.CRLF comes at its very end.
CARRIERS = {
    "lf-dot-lf": b"Subject: c\r\n\r\nbody\n.\n",
    "lf-dot-crlf": b"Subject: c\r\n\r\nbody\n.\r\n",
    "crlf-dot-lf": b"Subject: c\r\n\r\nbody\r\n.\n",
    "cr-dot-crlf": b"Subject: c\r\n\r\nbody\r.\r\n",
    "crlf-dot-cr": b"Subject: c\r\n\r\nbody\r\n.\r",
    "crcrlf-dot-crcrlf": b"Subject: c\r\n\r\nbody\r\r\n.\r\r\n",
    "crlf-dot-lf-crlf": b"Subject: c\r\n\r\nbody\r\n.\n\r\n",
    "lf-dot-crcrlf": b"Subject: c\r\n\r\nbody\n.\r\r\n",
    "crlf-nul-dot-crlf": b"Subject: c\r\n\r\nbody\r\n\x00.\r\n",
    "bare-lf-in-header": b"Subject: c\nX-Other: d\r\n\r\nbody\r\n",
    "bare-cr-in-header": b"Subject: c\rX-Other: d\r\n\r\nbody\r\n",
    "bare-lf-in-body": b"Subject: c\r\n\r\nbo\ndy\r\n",
    "bare-cr-in-body": b"Subject: c\r\n\r\nbo\rdy\r\n",
}


def open_data(srv):
    c = srv.connect()
    assert c.code() == 220
    assert c.cmd("EHLO attacker.example")[0] == 250
    assert c.cmd("MAIL FROM:<carrier@a.example>")[0] == 250
    assert c.cmd("RCPT TO:<bob@my.domain>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    return c


def session_is_sane(c, srv):
    """After a refused carrier: no smuggled state, a real message still works."""
    assert c.cmd("RCPT TO:<victim@y.example>")[0] == 503     # no smuggled MAIL
    assert c.cmd("MAIL FROM:<honest@a.example>")[0] == 250
    assert c.cmd("RCPT TO:<bob@my.domain>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: honest\r\n\r\nhello\r\n.\r\n")
    assert c.code() == 250
    assert c.cmd("QUIT")[0] == 221
    (name,) = spool_files(srv.jail)
    data = open(os.path.join(srv.jail, name), "rb").read()
    assert b"honest" in data and b"smuggled" not in data and b"carrier" not in data


@pytest.mark.parametrize("carrier", CARRIERS, ids=list(CARRIERS))
def test_smuggling_in_one_write(smtpd, carrier):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H")
    c = open_data(srv)
    c.send(CARRIERS[carrier] + SMUGGLED)
    code, text = c.reply()
    assert code == 550, text
    assert spool_files(srv.jail) == []
    session_is_sane(c, srv)


@pytest.mark.parametrize("carrier", ["lf-dot-lf", "cr-dot-crlf", "crlf-dot-lf-crlf",
                                     "crlf-nul-dot-crlf", "crlf-dot-cr"])
def test_smuggling_split_across_writes(smtpd, carrier):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H")
    c = open_data(srv)
    data = CARRIERS[carrier] + SMUGGLED
    for i in range(0, len(data), 3):       # three bytes a packet
        c.send(data[i:i + 3])
        time.sleep(0.002)
    assert c.code() == 550
    assert spool_files(srv.jail) == []
    session_is_sane(c, srv)


# ------------------------------------------------------------- injection ----

ATTACKS = [
    # (RCPT argument, refused?)
    ("<-oQ/tmp/x@a.example>", True),
    ("-oQ/tmp/x@a.example", True),
    ("<-X/tmp/log>", True),
    ("-X/tmp/log", True),
    ("<a@b.example,c@d.example>", True),
    ("<a@b.example>,c@d.example", True),
    ('<"a,b"@c.example>', False),
    ("<a@b.example> NOTIFY=NEVER,-oQ/tmp/x", True),     # (NOTIFY=NEVER alone is DSN's)
    ("<a@b.example> FOO=BAR", True),
    ("<a\x01b@c.example>", True),
    ("<a\x7fb@c.example>", True),
    ("<a\xe9b@c.example>", True),
    ("<" + "a" * 60 + "@" + "b" * 237 + ".example>", True),      # 300 bytes
    ("<a b@c.example>", True),
    ('<"a b"@c.example>', False),
    ("<a@b.example>\t<c@d.example>", True),
    ("<<a@b.example>>", True),
]


def run_smtpfwdd(tree, spooldir, agent, seconds=20):
    argv = [PYTHON, os.path.join(tree, "smtpfwdd.py"), "-F", "-P", "1", "-d", spooldir,
            "-s", agent.path]
    if is_root:
        argv += ["-u", "nobody", "-g", "nogroup"]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + seconds
    while spool_files(spooldir) and time.time() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0


def test_injection_through_addresses_is_harmless_end_to_end(smtpd, tree_factory):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H")
    expected = {}
    for n in range(0, len(ATTACKS), 8):         # 10 errors end a session
        c = srv.connect()
        assert c.code() == 220
        assert c.cmd("EHLO x")[0] == 250
        assert c.cmd("MAIL FROM:<sender@a.example>")[0] == 250
        accepted = []
        for rcpt, refused in ATTACKS[n:n + 8]:
            code = c.cmd("RCPT TO:" + rcpt)[0]
            assert (code >= 500) == refused, (rcpt, code)
            if code == 250:
                accepted.append(rcpt.strip("<>"))
        assert c.cmd("RCPT TO:<bob@my.domain>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send("Subject: attack %d\r\n\r\nbody\r\n.\r\n" % n)
        assert c.code() == 250
        assert c.cmd("QUIT")[0] == 221
        expected["attack %d" % n] = accepted + ["bob@my.domain"]
    agent = Agent()
    run_smtpfwdd(tree_factory(**TEST_CONSTANTS), srv.jail, agent)
    calls = agent.calls()
    assert len(calls) == len(expected)
    for call in calls:
        subject = call["stdin"].split("Subject: ", 1)[1].split("\n", 1)[0]
        argv = call["argv"][1:]
        assert argv[:4] == ["-oi", "-f", "sender@a.example", "--"]
        assert argv[4:] == expected[subject]
        # every recipient is one argument after "--": none can be an option
        # or a list of recipients
        assert all(not a.startswith("-") and "," not in a.replace('"a,b"', "")
                   for a in argv[4:])


@pytest.mark.parametrize("sender", ["-oQ/tmp/x@a.example", "<-f@x.example>",
                                    "<a@b.example,c@d.example>", "<a@b.example> RET=-oQ",
                                    "<a@b.example> ENVID=a=b", "<a@b.example> NOTIFY=NEVER"])
def test_hostile_senders_refused(smtpd, sender):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H")
    c = srv.connect()
    assert c.code() == 220
    assert c.cmd("EHLO x")[0] == 250
    assert c.cmd("MAIL FROM:" + sender)[0] >= 500


def test_helo_cannot_inject_headers_or_reply_lines(smtpd):
    srv = smtpd("noto:ALL:ALL:*@refuse.example:550 no %H %F\nallow:ALL:ALL:ALL\n", "-H")
    c = srv.connect()
    assert c.code() == 220
    c.send(b"HELO evil.example\rX-Injected: yes\r\n")
    assert c.code() == 500                          # bare CR: the line is dropped
    assert c.cmd("HELO evil(x);$(id)`id`<>\"\\ X-Injected:yes")[0] == 250
    assert c.cmd("MAIL FROM:<a@b.example>")[0] == 250
    code, text = c.cmd("RCPT TO:<x@refuse.example>")
    assert (code, text) == (550, ["no UNKNOWN <a@b.example>"])
    assert c.cmd("RCPT TO:<bob@my.domain>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send("Subject: t\r\n\r\nb\r\n.\r\n")
    assert c.code() == 250
    (name,) = spool_files(srv.jail)
    data = open(os.path.join(srv.jail, name), "rb").read()
    received = data.split(b"BODY\n", 1)[1].split(b"\nSubject:", 1)[0]
    first = received.split(b"\n")[0]
    helo = first.split(b" ")[2]
    assert re.match(rb"^evil[A-Za-z0-9.:\[\]_?-]*X-Injected:yes$", helo), first
    assert b"\nX-Injected" not in data
    assert received.count(b"\n") == 2               # still a three-line header


def finishes(fn, seconds=5):
    """fn() returns within seconds (run in a thread we can abandon)."""
    import threading
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


def test_address_parser_is_linear_on_hostile_domains():
    # Found by fuzz/fuzz_address.py: the domain regex backtracked
    # exponentially ('a' * 24 + '!' took a second, 40 would take days).
    from smtpgate import address

    def parse():
        for n in (30, 60, 200):
            with pytest.raises(address.AddressError):
                address.parse_path("<a@" + "a" * n + "!>", False)
            with pytest.raises(address.AddressError):
                address.parse_path("<a@" + "a-" * (n // 2) + "!.x>", False)
    assert finishes(parse)


def test_glob_rules_are_linear_on_hostile_addresses():
    from smtpgate.rules import ruleset as engine
    rules, _ = engine.parse("noto:ALL:ALL:*a*a*a*a*a*a*a*a*a*a*z:550 no\n"
                                "allow:ALL:ALL:ALL\n")
    client = engine.Client("192.0.2.1", None)
    verdicts = []
    assert finishes(lambda: verdicts.append(engine.evaluate(
        rules, client, "<x@y.example>", "<" + "a" * 200 + "@b.example>")))
    assert verdicts[0].action == "allow"


@pytest.mark.parametrize("addr,comma", [
    ('<"\\","@x.example>', False),        # found by fuzz/fuzz_address.py
    ('<"a,b"@x.example>', False), ('<"a\\"b,c"@x.example>', False),
    ('<"a"b,c@x.example>', True), ("<a,b@x.example>", True)])
def test_smtpd_and_smtpfwdd_agree_on_commas(addr, comma):
    from smtpgate import address
    from smtpgate.forwarder import delivery
    try:
        stored = address.parse_path(addr, False)[0]
    except address.AddressError:
        stored = None
    assert (stored is None) == comma
    assert (delivery.check_recipient(addr) is not None) == comma


def test_sessions_on_non_socket_fds_leak_no_descriptors(tmp_path, monkeypatch):
    # Found by fuzz/fuzz_commands.py: a dup() per session was never closed
    # when the descriptors were not sockets.  (A pipe holds the whole
    # session at once: the pipelining check is off for it.)
    import buildconf
    monkeypatch.setattr(buildconf, "SMTPD_FORBID_UNAUTH_PIPELINING", 0)
    from smtpgate.gate import session
    from smtpgate.gate.config import GateConfig
    from smtpgate.gate.connection import Connection
    from smtpgate.gate.engine import in_process
    from smtpgate.gate.peer import Peer
    from smtpgate.rules import ruleset as engine
    cfg = GateConfig(myname="fuzz.example", spooldir=str(tmp_path))
    rules = in_process(engine.parse("allow:ALL:ALL:ALL\n")[0])
    out = os.open(os.devnull, os.O_WRONLY)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        r, w = os.pipe()
        os.write(w, b"HELO x\r\nQUIT\r\n")
        os.close(w)
        assert session.Session(cfg, rules, Peer.around(engine.Client(None)),
                               Connection(r, out)).run() == 0
        os.close(r)
    assert len(os.listdir("/proc/self/fd")) == before
    os.close(out)
