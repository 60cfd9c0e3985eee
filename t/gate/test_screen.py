"""smtpd -D's front stage (issue 37): one event loop holds every connection
until it has earned a worker, as postscreen does for Postfix.

Each test runs the daemon over loopback with a few hundred connections at
most: the hand-over keeps the session whole (PROXY's client, the DNS
lists' score, TLS, the filters), pregreet talkers and health checks never
reach a worker, idle bots take none, a client waits for a worker in the
front stage (then 421), nothing acknowledged is lost when a worker or the
front stage dies, stress mode comes and goes, the open-file limit gets
421 and one log line, and a worker's commands and DATA have deadlines of
their own."""

import array
import dataclasses
import json
import os
import re
import signal
import smtplib
import socket
import time

import pytest

import certs
from fakemilter import FakeMilter, pkt
from harness import needs_gdb, run_inside, send, spool_files, wait_for
from smtpgate.gate import handoff

ALLOW = "allow:ALL:ALL:ALL\n"
MESSAGE = b"Subject: hi\r\n\r\nHello.\r\n.\r\n"


def source(i):
    """A client address of its own network, for the i-th connection."""
    return "127.%d.%d.%d" % (10 + i // 60000, i // 250 % 240 + 1, i % 250 + 2)


def hold(d, n, first=0, say=None):
    """n connections from n networks, each greeted (and after say)."""
    held = []
    for i in range(first, first + n):
        c = d.connect(source(i))
        held.append(c)
    for c in held:
        assert c.code() == 220
        if say:
            assert c.cmd(say)[0] == 250
    return held


def mail(c, rcpt="bob@my.domain", helo="EHLO client.example"):
    """A whole transaction on a greeted connection: the last reply."""
    if helo:
        assert c.cmd(helo)[0] == 250
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<%s>" % rcpt)[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(MESSAGE)
    return c.reply()


def delivered(port):
    """A message sent and accepted (False while the gate says 421)."""
    try:
        return send(port) == {}
    except (smtplib.SMTPException, OSError):
        return False


def lines(d, pattern):
    return re.findall(pattern, d.log(), re.M)


def at_once(d, ip):
    """A connection from ip that the front stage passed to a worker before
    its greeting: the worker answers its EHLO (and logs it then, not at a
    MAIL).  The worker says it is idle a moment after its last session
    ends; until then the front stage greets a client itself."""
    for attempt in range(20):
        c = d.connect(ip)
        assert c.code() == 220
        assert c.cmd("EHLO try%d.example" % attempt)[0] == 250
        if wait_for(lambda: lines(d, r'worker: EHLO from UNKNOWN\(%s\) as "try%d\.example"'
                                  % (re.escape(ip), attempt)), 2):
            return c
        c.close()
    raise AssertionError("never passed at once:\n" + d.log())


# ------------------------------------------------------ the hand-over ----

def test_a_passed_session_is_whole_on_the_worker(daemon_, dnsz, tmp_path):
    """Behind a trusted proxy, scored by a DNS list, greeted and EHLO'd by
    the front stage, then STARTTLS and the message on a worker: the rules,
    the filter, Received and the log all see the proxied client, its score,
    its HELO and TLS."""
    pair = certs.make_pair(serial=3701)
    dnsz.add("7.2.0.192.bl.test", "A", "127.0.0.2")
    f = FakeMilter()
    try:
        d = daemon_("noto:DNSBL=1..5:ALL:carol@my.domain:550 5.7.1 scored\n" + ALLOW,
                    "-X", "127.0.0.0/8", "-f", f.spec, "-C", pair[0], "-K", pair[1],
                    SMTPD_DNSBL_SITES="bl.test*2", SMTPD_DNSBL_THRESHOLD=10).wait_ready()
        c = d.connect()
        c.send("PROXY TCP4 192.0.2.7 127.0.0.1 40001 25\r\n")
        assert c.code() == 220
        code, ehlo = c.cmd("EHLO client.example")
        assert code == 250 and "STARTTLS" in ehlo
        assert c.cmd("NOOP")[0] == 250
        assert c.cmd("STARTTLS")[0] == 220           # the first command a worker answers
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        c.sock = ctx.wrap_socket(c.sock)
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<carol@my.domain>") == (550, ["5.7.1 scored"])   # score 2
        assert c.cmd("RCPT TO:<bob@my.domain>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(MESSAGE)
        assert c.reply()[0] == 250
        c.cmd("QUIT")
        (name,) = spool_files(d.jail)
        data = open(os.path.join(d.jail, name), "rb").read()
        assert b"[192.0.2.7]" in data and b"client.example" in data
        assert re.search(rb"version=TLSv1\.[23]", data)
        conn = next(s for s in f.sessions if b"M" in s.commands())
        events = dict(conn.events)
        assert events[b"C"].startswith(b"[192.0.2.7]\x004")
        assert events[b"H"] == b"client.example\0"       # the front stage's EHLO, replayed
        assert conn.macros[b"C"][b"{client_addr}"] == b"192.0.2.7"
        assert [c for c, _ in conn.events].count(b"H") == 2     # and after STARTTLS
        assert conn.macros[b"H"][b"{tls_version}"].startswith(b"TLSv1.")
        log = d.log()
        assert re.search(r"screen: dnsbl: UNKNOWN\(192\.0\.2\.7\) scores 2", log), log
        assert re.search(r"worker: EHLO from UNKNOWN\(192\.0\.2\.7\) as \"client\.example\"",
                         log), log
    finally:
        f.close()


def test_a_filter_that_refuses_the_replayed_helo_refuses_every_later_command(daemon_):
    """The front stage said 250 to EHLO; the filter, asked on the worker,
    refuses it: its reply holds for the commands that follow, as a
    refusal at CONNECT does."""
    from fakemilter import reply
    f = FakeMilter({b"H": [reply(b"550 5.7.1 Not that name")]})
    try:
        d = daemon_(ALLOW, "-f", f.spec).wait_ready()
        c = d.connect()
        assert c.code() == 220
        assert c.cmd("EHLO bad.example")[0] == 250
        assert c.cmd("MAIL FROM:<alice@example.org>") == (550, ["5.7.1 Not that name"])
        assert "milter-reject: HELO from UNKNOWN(127.0.0.1)" in d.log()
        assert spool_files(d.jail) == []
    finally:
        f.close()


def test_pipelined_commands_read_by_the_front_stage_reach_the_worker(daemon_):
    d = daemon_().wait_ready()
    c = d.connect()
    assert c.code() == 220
    assert c.cmd("EHLO client.example")[0] == 250
    c.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@my.domain>\r\n")
    assert c.reply()[0] == 250 and c.reply()[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(MESSAGE)
    assert c.reply()[0] == 250
    assert len(spool_files(d.jail)) == 1


def test_a_client_that_had_mail_accepted_goes_to_a_worker_before_its_greeting(daemon_):
    """postscreen's PASS OLD: once a message of 127.0.0.9 was accepted, its
    next connection goes to the idle worker at once and the worker greets
    it; a client that only said EHLO before is still held by the front
    stage."""
    d = daemon_(ALLOW, "-M", "1", SMTPD_PREFORK=1, SMTPD_SCREEN_WAIT=2).wait_ready()
    ehlo_only = d.connect("127.0.0.8")
    assert ehlo_only.code() == 220
    assert ehlo_only.cmd("EHLO idle.example")[0] == 250
    ehlo_only.cmd("QUIT")
    c = d.connect("127.0.0.9")
    assert c.code() == 220 and mail(c)[0] == 250
    c.cmd("QUIT")

    again = d.connect("127.0.0.8")          # held: the worker stays free
    assert again.code() == 220
    other = d.connect("127.0.0.10")
    assert other.code() == 220
    assert mail(other)[0] == 250
    other.cmd("QUIT")
    again.close()

    old = at_once(d, "127.0.0.9")           # on the only worker, greeted by it
    late = d.connect("127.0.0.11")
    assert late.code() == 220
    assert late.cmd("EHLO late.example")[0] == 250
    assert late.cmd("MAIL FROM:<b@example.org>")[0] == 421     # no worker for it
    assert lines(d, r"screen: timeout: UNKNOWN\(127\.0\.0\.11\) waited for a worker")
    assert mail(old, helo=None)[0] == 250
    assert old.cmd("QUIT")[0] == 221
    assert len(spool_files(d.jail)) == 3


def test_a_message_a_filter_held_earns_its_client_nothing(daemon_):
    """Quarantined is not delivered: that client is still greeted, and
    held, by the front stage next time (the only worker stays free)."""
    f = FakeMilter({b"E": [pkt(b"q", b"suspect\0"), pkt(b"a")]})
    try:
        d = daemon_(ALLOW, "-M", "1", "-f", f.spec, SMTPD_PREFORK=1,
                    SMTPD_SCREEN_WAIT=2).wait_ready()
        c = d.connect("127.0.0.9")
        assert c.code() == 220 and mail(c)[0] == 250
        c.cmd("QUIT")
        assert os.listdir(os.path.join(d.jail, "hold"))
        again = d.connect("127.0.0.9")
        assert again.code() == 220
        other = d.connect("127.0.0.10")
        assert other.code() == 220
        assert other.cmd("EHLO other.example")[0] == 250
        assert other.cmd("MAIL FROM:<b@example.org>")[0] == 250     # the worker is free
        assert again.cmd("EHLO again.example")[0] == 250            # the front stage's
        assert not lines(d, r"worker: EHLO from UNKNOWN\(127\.0\.0\.9\) as \"again")
    finally:
        f.close()


def test_a_client_passed_before_its_greeting_is_checked_by_the_worker(daemon_):
    """The worker that greets a client passed at once refuses one that
    talks first (improper pipelining), as the front stage would have."""
    d = daemon_(ALLOW, SMTPD_PREFORK=3).wait_ready()
    c = d.connect("127.0.0.9")
    assert c.code() == 220 and mail(c)[0] == 250
    c.cmd("QUIT")
    for _ in range(20):     # (until a worker is idle: else the front stage greets at once)
        eager = d.connect("127.0.0.9")
        eager.send("EHLO eager.example\r\n")
        if eager.reply()[0] == 554:
            break
        time.sleep(0.2)
    assert eager.closed()
    assert wait_for(lambda: lines(d, r"worker: improper command pipelining after CONNECT "
                                     r"from UNKNOWN\(127\.0\.0\.9\)"))
    assert not lines(d, r"screen: improper command pipelining")


def test_a_client_that_had_mail_accepted_is_served_while_the_front_stage_is_stopped(daemon_):
    """An idle worker accepts a new connection itself (the front stage
    waits last on the listener): one from a client that had mail
    accepted, it serves -- greeted by the worker -- and any other it gives
    the front stage, which greets it.  With the front stage stopped, the
    first is served and the second waits."""
    d = daemon_(ALLOW, SMTPD_PREFORK=3).wait_ready()
    c = d.connect("127.0.0.9")
    assert c.code() == 220 and mail(c)[0] == 250
    c.cmd("QUIT")
    screen = d.screen()
    os.kill(screen, signal.SIGSTOP)
    try:
        old = d.connect("127.0.0.9")
        assert old.code() == 220
        assert mail(old)[0] == 250
        assert old.cmd("QUIT")[0] == 221
        new = socket.create_connection(("127.0.0.1", d.port), timeout=1,
                                       source_address=("127.0.0.10", 0))
        with pytest.raises(socket.timeout):
            new.recv(512)               # (given to the front stage, which is stopped)
    finally:
        os.kill(screen, signal.SIGCONT)
    new.settimeout(10)
    assert new.recv(512).startswith(b"220 ")
    new.close()
    assert len(spool_files(d.jail)) == 2
    assert lines(d, r'worker: EHLO from UNKNOWN\(127\.0\.0\.9\) as "client\.example"')


def test_after_new_settings_a_client_served_at_once_meets_them(daemon_, tmp_path):
    """A settings SIGHUP makes a new front stage with new workers, and the
    old ones stop accepting connections themselves: a client that had mail
    accepted, served by whichever worker wakes for it, meets the new
    settings."""
    settings = tmp_path / "smtpd.conf"
    settings.write_text("")
    d = daemon_(ALLOW, SMTPD_PREFORK=3, SETTINGS_FILE=str(settings)).wait_ready()
    c = d.connect("127.0.0.9")
    assert c.code() == 220 and mail(c)[0] == 250
    c.cmd("QUIT")
    held = d.connect("127.0.0.20")          # keeps the old front stage (and workers) alive
    assert held.code() == 220
    old_workers = set(d.workers())
    settings.write_text("SMTPD_CHUNKING = 0\n")
    os.kill(d.master_pid(), signal.SIGHUP)
    assert wait_for(lambda: "settings re-read" in d.log()), d.log()
    assert wait_for(lambda: set(d.workers()) - old_workers)
    for _ in range(6):
        again = d.connect("127.0.0.9")
        assert again.code() == 220
        keywords = again.cmd("EHLO client.example")[1]
        assert "CHUNKING" not in keywords, keywords
        again.cmd("QUIT")
    held.close()


def test_a_client_passed_at_once_is_asked_for_its_ident_user(daemon_, ident_server):
    """The front stage passes a client at once without asking its socket
    for our end's address; the worker does, so the ident question (which
    names both ports) is still asked, and a user@ rule still matches."""
    ident_server("127.0.0.32", "JOE")
    d = daemon_("allow:joe@ALL:ALL:ALL\nnoto:ALL:ALL:ALL:550 %U not allowed\n",
                SMTPD_PREFORK=2).wait_ready()
    c = d.connect("127.0.0.32")
    assert c.code() == 220 and mail(c)[0] == 250
    c.cmd("QUIT")
    old = at_once(d, "127.0.0.32")
    assert mail(old, helo=None)[0] == 250
    old.cmd("QUIT")
    assert len(spool_files(d.jail)) == 2


def test_a_scored_client_passed_at_once_keeps_its_cached_score(daemon_, dnsz):
    """With DNS lists, only a client whose score is cached (and below the
    threshold) is passed at once: the worker's rules see that score."""
    dnsz.add("8.2.0.192.bl.test", "A", "127.0.0.2")
    d = daemon_("noto:DNSBL=1..5:ALL:carol@my.domain:550 5.7.1 scored\n" + ALLOW,
                "-X", "127.0.0.0/8", SMTPD_PREFORK=3,       # (one idle at the second)
                SMTPD_DNSBL_SITES="bl.test*2", SMTPD_DNSBL_THRESHOLD=10).wait_ready()
    for _ in range(2):
        c = d.connect()
        c.send("PROXY TCP4 192.0.2.8 127.0.0.1 40001 25\r\n")
        assert c.code() == 220
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<carol@my.domain>") == (550, ["5.7.1 scored"])
        assert c.cmd("RCPT TO:<bob@my.domain>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(MESSAGE)
        assert c.reply()[0] == 250
        assert c.cmd("QUIT")[0] == 221
    assert len(lines(d, r"screen: dnsbl: UNKNOWN\(192\.0\.2\.8\) scores 2")) == 1


# ---------------------------------------------- what never takes a worker ----

def test_a_pregreet_talker_gets_554_from_the_front_stage(daemon_):
    """Who talks in the greeting pause gets 554 there; who waited is
    remembered and skips the pause next time (the allow-list)."""
    d = daemon_(SMTPD_GREET_PAUSE=1500).wait_ready()
    bot = d.connect("127.0.0.7")
    bot.send("EHLO bot.example\r\n")
    code, text = bot.reply()
    assert code == 554 and bot.closed()
    assert lines(d, r"screen: pregreet: UNKNOWN\(127\.0\.0\.7\) talked before the greeting")
    assert not lines(d, r"worker: .*127\.0\.0\.7")
    polite = d.connect("127.0.0.8")
    started = time.monotonic()
    assert polite.code() == 220
    assert time.monotonic() - started >= 1.2
    polite.cmd("QUIT")
    started = time.monotonic()
    again = d.connect("127.0.0.8")
    assert again.code() == 220
    assert time.monotonic() - started < 1.0           # it passed before: no pause
    assert mail(again)[0] == 250


def test_health_checks_are_answered_with_every_worker_busy(daemon_):
    """A balancer's checks (PROXY LOCAL, a silent TCP connect) are answered
    by the front stage: the only worker is busy all the while."""
    d = daemon_(ALLOW, "-M", "1", "-X", "127.0.0.0/8", SMTPD_PREFORK=1).wait_ready()
    busy = d.connect()
    busy.send("PROXY TCP4 192.0.2.9 127.0.0.1 40001 25\r\n")
    assert busy.code() == 220
    assert busy.cmd("HELO busy.example")[0] == 250
    assert busy.cmd("MAIL FROM:<a@example.org>")[0] == 250   # on the worker now
    for _ in range(3):
        h = d.connect()
        h.send("PROXY UNKNOWN\r\n")
        assert h.code() == 220
        assert h.cmd("EHLO balancer")[0] == 250
        assert h.cmd("QUIT")[0] == 221
        socket.create_connection(("127.0.0.1", d.port)).close()    # a TCP check
    assert busy.cmd("RCPT TO:<bob@my.domain>")[0] == 250
    assert not lines(d, r"^smtpd\[\d+\]: (?!\(debug\)).*(?:balancer|before the PROXY header)")


def test_idle_bots_after_ehlo_take_no_worker(daemon_):
    """200 clients that say EHLO and idle: the two workers stay free for a
    client with mail."""
    d = daemon_(ALLOW, "-M", "2", SMTPD_PREFORK=1, READ_TIMEOUT=60).wait_ready()
    bots = hold(d, 200, say="EHLO bot.example")
    c = d.connect()
    assert c.code() == 220
    assert mail(c)[0] == 250
    assert len(d.workers()) <= 2
    for b in bots:
        b.close()


# -------------------------------------------------- waiting for a worker ----

def test_a_client_waits_in_the_front_stage_for_a_worker_then_421(daemon_):
    d = daemon_(ALLOW, "-M", "1", SMTPD_PREFORK=1, SMTPD_SCREEN_WAIT=2).wait_ready()
    first = d.connect("127.0.0.2")
    assert first.code() == 220
    assert first.cmd("EHLO one.example")[0] == 250
    assert first.cmd("MAIL FROM:<a@example.org>")[0] == 250     # holds the only worker
    second = d.connect("127.0.0.3")
    assert second.code() == 220
    assert second.cmd("EHLO two.example")[0] == 250
    started = time.monotonic()
    assert second.cmd("MAIL FROM:<b@example.org>")[0] == 421
    assert 1.5 <= time.monotonic() - started < 10
    assert lines(d, r"screen: timeout: UNKNOWN\(127\.0\.0\.3\) waited for a worker")
    third = d.connect("127.0.0.4")                              # this one is in time
    assert third.code() == 220
    assert third.cmd("EHLO three.example")[0] == 250
    third.send("MAIL FROM:<c@example.org>\r\n")
    time.sleep(0.5)
    assert first.cmd("RCPT TO:<bob@my.domain>")[0] == 250
    assert first.cmd("DATA")[0] == 354
    first.send(MESSAGE)
    assert first.reply()[0] == 250
    first.cmd("QUIT")
    assert third.reply()[0] == 250                              # the worker took it
    assert third.cmd("RCPT TO:<bob@my.domain>")[0] == 250


def test_the_front_stage_limits_its_connections_and_each_networks_share(daemon_):
    d = daemon_(SMTPD_SCREEN_MAX=16, SMTPD_SCREEN_PER_NETWORK=3, SMTPD_MAX_PER_IP=3,
                SMTPD_GREET_PAUSE=20000).wait_ready()
    same = [d.connect("127.0.0.9") for _ in range(3)]
    time.sleep(0.3)
    fourth = d.connect("127.0.0.9")
    assert fourth.reply()[0] == 421 and fourth.closed()
    assert lines(d, r"refused 127\.0\.0\.9: 3 connections from 127\.0\.0\.9/32 held already "
                    r"\(SMTPD_SCREEN_PER_NETWORK\)")
    others = [d.connect(source(i)) for i in range(13)]          # 16 held in all
    time.sleep(0.3)
    over = d.connect(source(100))
    assert over.reply()[0] == 421
    assert lines(d, r"front stage holds 16 connections \(SMTPD_SCREEN_MAX\)")
    for c in same + others:
        c.close()


# ----------------------------------------------- nothing acknowledged lost ----

def test_a_front_stage_killed_loses_no_acknowledged_message(daemon_):
    """SIGKILL the front stage: what was acknowledged is spooled, a session
    already on a worker finishes, the master starts a new front stage."""
    d = daemon_(READ_TIMEOUT=30).wait_ready()
    for _ in range(3):
        assert send(d.port) == {}
    on_worker = d.connect("127.0.0.2")
    assert on_worker.code() == 220
    assert on_worker.cmd("EHLO client.example")[0] == 250
    assert on_worker.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    held = d.connect("127.0.0.3")
    assert held.code() == 220
    old = d.screen()
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: d.screen() not in (None, old))
    assert lines(d, r"front stage %d ended with .*; starting it again" % old), d.log()
    assert on_worker.cmd("RCPT TO:<bob@my.domain>")[0] == 250
    assert on_worker.cmd("DATA")[0] == 354
    on_worker.send(MESSAGE)
    assert on_worker.reply()[0] == 250
    assert held.closed()                     # held connections may drop: it did
    assert wait_for(lambda: delivered(d.port))
    assert len(spool_files(d.jail)) == 5


def test_a_front_stage_that_keeps_dying_at_its_start_is_restarted_ever_more_slowly(daemon_):
    """Killed the moment it starts, again and again (as one that cannot
    start would end): the first comes back at once, then after 1 s, 2 s
    -- not ten times a second with a log line each -- and once one runs,
    mail flows."""
    d = daemon_().wait_ready()
    seen, started = [], []
    while len(seen) < 3:
        assert wait_for(lambda: d.screen() not in [None] + seen, 10), d.log()
        pid = d.screen()
        seen.append(pid)
        started.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: d.screen() not in [None] + seen, 10)
    started.append(time.monotonic())
    assert lines(d, r"front stage %d ended with .*; starting it again$" % seen[0])
    assert lines(d, r"front stage %d ended with .*; starting it again in 1 seconds$" % seen[1])
    assert lines(d, r"front stage %d ended with .*; starting it again in 2 seconds$" % seen[2])
    assert started[2] - started[1] >= 0.9 and started[3] - started[2] >= 1.9
    assert wait_for(lambda: delivered(d.port))


def test_a_worker_killed_loses_no_acknowledged_message(daemon_):
    d = daemon_(READ_TIMEOUT=30).wait_ready()
    assert send(d.port) == {}
    c = d.connect()
    assert c.code() == 220
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<bob@my.domain>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: half\r\n\r\nnot yet")
    time.sleep(0.3)
    for p in d.workers():                   # the one in DATA among them
        os.kill(p, signal.SIGKILL)
    assert c.closed()
    assert wait_for(lambda: delivered(d.port))
    assert len(spool_files(d.jail)) == 2                    # the two acknowledged


# -------------------------------------------------------------- stress ----

def test_stress_mode_starts_and_ends_once_per_episode(daemon_):
    """Past three quarters of SMTPD_SCREEN_MAX held, the front stage is
    under stress: a connection idle before its first command gets 421
    after SMTPD_STRESS_TIMEOUT, and so does a worker's session idle in a
    command; below half, stress is over.  Each logged once."""
    d = daemon_(SMTPD_SCREEN_MAX=40, SMTPD_STRESS_TIMEOUT=2, READ_TIMEOUT=60).wait_ready()
    mid = d.connect("127.0.0.2")
    assert mid.code() == 220
    assert mid.cmd("EHLO client.example")[0] == 250
    assert mid.cmd("MAIL FROM:<alice@example.org>")[0] == 250   # on a worker
    bots = hold(d, 31)
    assert wait_for(lambda: lines(d, r"screen: stress: \d+ connections held \(of 40\)"))
    late = d.connect("127.0.0.3")
    assert late.code() == 220
    started = time.monotonic()
    assert late.reply()[0] == 421                         # idle: 2 s, not 60
    assert time.monotonic() - started < 10
    assert lines(d, r"timeout: UNKNOWN\(127\.0\.0\.3\) sent no command after [\d.]+ s "
                    r"\(stress\)")
    assert mid.cmd("RCPT TO:<bob@my.domain>")[0] == 250   # its next command: 2 s
    started = time.monotonic()
    assert mid.reply()[0] == 421
    assert time.monotonic() - started < 10
    assert lines(d, r"read timeout \(2 seconds\)")
    for b in bots[:-2]:
        b.close()
    assert wait_for(lambda: lines(d, r"screen: stress over: \d+ connections held"))
    assert len(lines(d, r"screen: stress: ")) == 1
    assert len(lines(d, r"screen: stress over: ")) == 1
    ok = d.connect("127.0.0.4")
    assert ok.code() == 220
    assert mail(ok)[0] == 250


# ------------------------------------------------- the open-file limit ----

@needs_gdb
def test_out_of_descriptors_the_front_stage_says_421_and_logs_once(daemon_):
    d = daemon_(SMTPD_MAX_PER_IP=100).wait_ready()
    assert wait_for(lambda: d.screen() is not None)
    found = run_inside(d.screen(), d.jail, """
import resource
def used(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
free, fd = 0, 0
while free < 20:
    free += not used(fd)
    fd += 1
found['limit'] = fd
resource.setrlimit(resource.RLIMIT_NOFILE, (fd, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
""")
    assert "error" not in found, found
    conns, codes = [], []
    for i in range(60):
        c = d.connect(source(i))
        conns.append(c)
    for c in conns:
        try:
            codes.append(c.code())
        except (EOFError, OSError):
            codes.append(None)
    assert 5 <= codes.count(220) <= 25, codes
    assert codes.count(421) >= 30, codes
    assert len(lines(d, r"screen: front stage: out of file descriptors")) == 1, d.log()
    for c in conns:
        c.close()
    assert wait_for(lambda: delivered(d.port))


# --------------------------------------------- deadlines in the workers ----

def test_a_dripping_client_holds_a_worker_for_one_command_only(daemon_):
    d = daemon_(READ_TIMEOUT=2, SESSION_TIMEOUT=120).wait_ready()
    c = d.connect()
    assert c.code() == 220
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    started = time.monotonic()
    try:
        for ch in "RCPT TO:<bob@my.domain>":
            c.send(ch)
            time.sleep(0.25)
    except OSError:
        pass
    assert c.reply()[0] == 421
    assert time.monotonic() - started < 6
    assert "read timeout (2 seconds)" in d.log()


def test_a_dripping_message_holds_a_worker_for_smtpd_data_timeout(daemon_):
    d = daemon_(READ_TIMEOUT=2, SMTPD_DATA_TIMEOUT=3, SESSION_TIMEOUT=120).wait_ready()
    c = d.connect()
    assert c.code() == 220
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<bob@my.domain>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    started = time.monotonic()
    try:
        for i in range(40):
            c.send("line %d\r\n" % i)              # a line a second: each read in time
            time.sleep(0.5)
            if time.monotonic() - started > 8:
                break
    except OSError:
        pass
    assert c.reply()[0] == 421
    assert time.monotonic() - started < 8
    assert "DATA timeout (3 seconds)" in d.log()
    assert spool_files(d.jail) == []


# ------------------------------------------------------- shutdown, reload ----

def test_sigterm_gives_held_connections_421(daemon_):
    d = daemon_().wait_ready()
    held = hold(d, 5, say="EHLO client.example")
    os.kill(d.master_pid(), signal.SIGTERM)
    for c in held:
        assert c.reply()[0] == 421
    assert d.proc.wait(30) == 0
    assert "accept:" not in d.log()         # the master's shutdown(2) is no error


# ------------------------------------------------ the hand-over message ----

def test_handoff_decode_checks_every_field():
    good = handoff.Passed(local=("127.0.0.1", 25), peer=("192.0.2.7", 40000),
                          origin="proxy", helo='x"\u00e9', esmtp=True, score=3, allowlisted=True,
                          unread=b"MAIL\r\n\xff", waited=1.5, age=2.25)
    assert all(getattr(good, f.name) != f.default for f in dataclasses.fields(good)
               if f.name != "greeted")      # (every field carried, as the next line sees)
    assert handoff.decode(good.encode()) == good
    at_once = handoff.Passed(local=("127.0.0.1", 25), peer=("192.0.2.7", 40000), greeted=False)
    assert handoff.decode(at_once.encode()) == at_once
    bad = [b"", b"[]", b"{", b'{"peer": ["1.2.3.4", 70000]}',
           b'{"peer": ["1.2.3.4"]}', b'{"peer": [5, 25]}', b'{"origin": "health"}',
           b'{"helo": 5}', json.dumps({"helo": "x" * 513}).encode(),
           json.dumps({"unread": "x" * (handoff.UNREAD_MAX + 1)}).encode(),
           b'{"score": "3"}', b'{"score": 9999999999999}', b'{"waited": -1}',
           b'{"local": ["' + b"1" * 65 + b'", 25]}', b'{"greeted": 0}',
           b'{"greeted": false, "helo": "x"}', b'{"greeted": false, "unread": "MAIL"}']
    for data in bad:
        with pytest.raises(handoff.Bad):
            handoff.decode(data)


def test_handoff_receive_refuses_a_message_without_exactly_one_descriptor():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        msg = handoff.Passed(peer=("127.0.0.1", 1)).encode()
        a.send(msg)                                       # no descriptor
        with pytest.raises(handoff.Bad):
            handoff.receive(b)
        x, y = socket.socketpair()
        a.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                           array.array("i", [x.fileno(), y.fileno()]))])
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(handoff.Bad):
            handoff.receive(b)                            # two: both closed
        assert len(os.listdir("/proc/self/fd")) == before
        a.sendmsg([b"not json"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", [x.fileno()]))])
        with pytest.raises(handoff.Bad):
            handoff.receive(b)
        assert len(os.listdir("/proc/self/fd")) == before
        handoff.send(a, handoff.Passed(peer=("127.0.0.1", 1), unread=b"\xff\r\n"), x.fileno())
        p, s = handoff.receive(b)
        assert p.peer == ("127.0.0.1", 1) and p.unread == b"\xff\r\n"
        s.close()
        x.close()
        y.close()
        a.close()
        assert handoff.receive(b) == (None, None)
    finally:
        a.close()
        b.close()


def test_a_given_connection_is_checked_and_its_descriptors_kept_or_closed():
    """A worker's GIVEN: exactly one descriptor, the peer as (address,
    port); anything else is refused and its descriptors are the caller's
    to close."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    x, y = socket.socketpair()
    try:
        handoff.give(a, x.fileno(), ("192.0.2.7", 40000, 0, 0))
        data, fds = handoff.receive_word(b)
        assert data[:1] == handoff.GIVEN and len(fds) == 1
        assert handoff.given_peer(data, fds) == ("192.0.2.7", 40000)
        os.close(fds[0])
        for data, fds in [(b'C["192.0.2.7",40000]', []), (b'C["192.0.2.7",40000]', [7, 8]),
                          (b"C{", [7]), (b"Cnull", [7]), (b'C["192.0.2.7",70000]', [7]),
                          (b'C[5,25]', [7])]:
            with pytest.raises(handoff.Bad):
                handoff.given_peer(data, fds)
        a.send(handoff.READY)
        assert handoff.receive_word(b) == (handoff.READY, [])
    finally:
        for s in (a, b, x, y):
            s.close()


def test_the_scoreboard_settles_a_hand_over_against_a_worker_own_accept():
    """reserve() takes an idle slot for a hand-over; a worker that accepted
    a connection meanwhile is told so by claim() (None: give it to the
    front stage); a busy slot cannot be reserved; unreserve() undoes a
    hand-over that failed."""
    from smtpgate.gate.admission import Scoreboard, MAPPED
    board, key = Scoreboard(2), MAPPED + bytes([192, 0, 2, 7])
    board.set(0, Scoreboard.IDLE)
    assert board.reserve(0)
    assert board.claim(0, key, 10, accepted=True) is None
    assert board.state(0) == Scoreboard.HANDED
    assert board.claim(0, key, 10) == 0 and board.state(0) == Scoreboard.BUSY
    assert not board.reserve(0)
    board.set(1, Scoreboard.IDLE)
    assert board.claim(1, key, 10, accepted=True) == 1      # its own: claimed
    assert not board.reserve(1)
    board.set(1, Scoreboard.IDLE)
    assert board.reserve(1)
    board.unreserve(1)
    assert board.state(1) == Scoreboard.IDLE
