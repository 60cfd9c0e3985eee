"""The spool is hostile input (issue 12, items 4-6 and 9): odd entries never
stop delivery, the agent is fed from the locked descriptor, the arrival time
is smtpd's own, and a message in many small pieces is written whole."""

import os
import socket
import stat
import time

import pytest
from hypothesis import given, settings, strategies as st

from smtpgate.rules import ruleset as engine
from smtpgate import libc, spool
from harness import BODY, give_to_nobody, is_root, now_date, put, RECEIVED, wait_for

OLD = b"Tue, 14 Jul 1998 10:00:00 +0000"


def spool_path(env, name):
    return os.path.join(os.fsencode(env.spool), os.fsencode(name))


def odd_entries(d):
    """Every kind of odd entry, each old enough for the stale-draft sweep."""
    made = []

    def old(path):
        if os.path.lexists(path) and not os.path.islink(path):
            os.utime(path, (time.time() - 3600,) * 2)
        made.append(path)
    os.mkdir(os.path.join(d, "smtpdDIR"))
    old(os.path.join(d, "smtpdDIR"))
    os.mkfifo(os.path.join(d, "smtpdFIFO"))
    old(os.path.join(d, "smtpdFIFO"))
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.path.join(d, "smtpdSOCK"))
    old(os.path.join(d, "smtpdSOCK"))
    os.symlink("/etc/passwd", os.path.join(d, "smtpdLINK"))
    old(os.path.join(d, "smtpdLINK"))
    os.mkfifo(os.path.join(d, "draft.fifo"))
    old(os.path.join(d, "draft.fifo"))
    os.mkdir(os.path.join(d, "draft.dir"))
    old(os.path.join(d, "draft.dir"))
    unreadable = os.path.join(d, "draft.unreadable")
    with open(unreadable, "w") as f:
        f.write("FROM <a@b>\n")
    os.chmod(unreadable, 0)     # root's when root; the daemon runs as nobody
    old(unreadable)
    bad_name = os.path.join(os.fsencode(d), b"draft.\xff\xfe")
    with open(bad_name, "w") as f:
        f.write("x")
    os.chmod(bad_name, 0)
    old(bad_name)
    return s


def test_odd_entries_never_stop_delivery_across_restarts(fwd_env):
    keep = odd_entries(fwd_env.spool)
    # A complete message whose name is not valid UTF-8: delivered all the same.
    good = put(fwd_env.spool)
    weird = os.path.join(os.fsencode(fwd_env.spool), b"smtpd\xff\xfe\x01x")
    os.rename(os.path.join(fwd_env.spool, good), weird)
    f = fwd_env.start()
    assert wait_for(lambda: not os.path.lexists(weird)), f.log()
    time.sleep(2.5)             # a few more scans: each odd entry logged once
    assert f.proc.poll() is None
    log = f.log()
    for name in ("smtpdDIR", "smtpdFIFO", "smtpdSOCK", "smtpdLINK"):
        assert log.count("%s is not a regular file; skipped" % name) == 1, log
    for name in ("draft.fifo", "draft.dir"):
        assert log.count("draft %s: not a regular file; skipped" % name) == 1, log
    if is_root:     # (as a normal user the owner may still remove it)
        assert log.count("draft draft.unreadable: Permission denied; skipped") == 1, log
    assert f.stop() == 0
    # After a restart: the same, and new mail still flows.
    second = put(fwd_env.spool)
    f = fwd_env.start()
    assert wait_for(lambda: not os.path.exists(os.path.join(fwd_env.spool, second)))
    assert f.proc.poll() is None
    assert len(fwd_env.agent.calls()) == 2
    keep.close()


def test_unopenable_message_is_logged_once_and_retried_when_it_changes(fwd_env):
    if not is_root:
        pytest.skip("needs a file the daemon's user cannot open")
    name = put(fwd_env.spool)
    path = os.path.join(fwd_env.spool, name)
    os.chown(path, 0, 0)        # complete (0750), but nobody may not open it
    f = fwd_env.start()
    assert wait_for(lambda: "Permission denied; skipped" in f.log())
    time.sleep(2.5)
    assert f.log().count("Permission denied; skipped") == 1
    give_to_nobody(path)
    os.chmod(path, 0o750)
    assert wait_for(lambda: not os.path.exists(path))


def swap_during_first_batch(fwd_env, swap):
    """Two recipients, one per agent call; swap the name during call 1."""
    fwd_env.agent.statuses("sleep 2", 0)
    name = put(fwd_env.spool, rcpts=[b"<a@my.domain>", b"<b@my.domain>"])
    path = os.path.join(fwd_env.spool, name)
    original = open(path, "rb").read()
    f = fwd_env.start(MAXARGS=6)
    assert wait_for(lambda: fwd_env.agent.calls())
    swap(path)
    # (a decoy left at the name may follow as a third call, once it is free)
    assert wait_for(lambda: len(fwd_env.agent.calls()) >= 2, 20), f.log()
    body = original[original.index(b"BODY\n") + 5:]
    for call in fwd_env.agent.calls()[:2]:
        assert call["stdin"].encode("latin-1") == body
    assert f.proc.poll() is None
    return f, path


def test_every_batch_reads_the_locked_file_not_a_swapped_name(fwd_env):
    def swap(path):
        decoy = path + ".decoy"
        with open(decoy, "wb") as d:
            d.write(b"FROM <evil@x>\nRCPT <victim@y>\nBODY\nDECOY\n")
        os.chmod(decoy, 0o750)
        give_to_nobody(decoy)
        os.rename(decoy, path)
    f, path = swap_during_first_batch(fwd_env, swap)
    # The decoy at the name was not delivered by that delivery, so it did not
    # remove it either: the decoy stays, a message of its own, until a later
    # scan delivers it as itself (it may have by now: scans follow at once).
    assert wait_for(lambda: "no longer holds" in f.log())
    evil = [c for c in fwd_env.agent.calls() if c["argv"][3] == "evil@x"]
    assert os.path.exists(path) or [c["stdin"] for c in evil] == ["DECOY\n"]


def test_a_fifo_swapped_in_never_hangs_a_batch(fwd_env):
    def swap(path):
        os.unlink(path)
        os.mkfifo(path)
    swap_during_first_batch(fwd_env, swap)


# -- the arrival time is smtpd's own --

def test_folded_body_line_cannot_expire_a_message_at_once(fwd_env):
    fwd_env.agent.statuses(75)
    body = RECEIVED % now_date() + \
        b" ; Fri, 02 Jan 1970 00:00:00 +0000\nSubject: x\n\nhi\n"
    name = put(fwd_env.spool, body=body)
    path = os.path.join(fwd_env.spool, name)
    f = fwd_env.start(QUEUE_LIFETIME=3600)
    assert wait_for(lambda: stat.S_IMODE(os.stat(path).st_mode) == 0o755), f.log()
    assert not os.path.exists(os.path.join(fwd_env.spool, "failed", name))


def test_folded_body_line_cannot_keep_a_message_for_ever(fwd_env):
    fwd_env.agent.statuses(75)
    body = RECEIVED % OLD + b" ; Fri, 01 Jan 2100 00:00:00 +0000\n" + BODY
    name = put(fwd_env.spool, body=body)
    fwd_env.start(QUEUE_LIFETIME=3600)
    reason = os.path.join(fwd_env.spool, "failed", name + ".reason")
    assert wait_for(lambda: os.path.exists(reason))
    assert "undeliverable for" in open(reason).read()


@pytest.mark.parametrize("sender", [b"<a\x01b@c>", b"<a\x00b@c>", b"<a\x7fb@c>"])
def test_control_byte_in_envelope_is_quarantined(fwd_env, sender):
    name = put(fwd_env.spool, sender=sender)
    fwd_env.start()
    reason = os.path.join(fwd_env.spool, "failed", name + ".reason")
    assert wait_for(lambda: os.path.exists(reason))
    assert "control character" in open(reason).read()
    assert fwd_env.agent.calls() == []


def received(lines):
    return b"\n".join(lines) + b"\nSubject: x\n\nbody\n"


@pytest.mark.parametrize("head,expected", [
    (received([b"Received: from h (n [192.0.2.1])", b"\tby mx (smtpd) with ESMTP id smtpdA;",
               b"\t" + OLD]), 900410400),
    (received([b"Received: from h (n [192.0.2.1])", b"\t(version=TLSv1.3 cipher=X)",
               b"\tby mx (smtpd) with ESMTPS id smtpdA;", b"\t" + OLD]), 900410400),
    (received([b"Received: from h (n [192.0.2.1])", b"\tby mx (smtpd) with ESMTP id smtpdA;",
               b"\t" + OLD, b" ; Fri, 01 Jan 2100 00:00:00 +0000"]), 900410400),
    (received([b"Received: from a(192.0.2.1), claiming to be \"x; Fri, 01 Jan 2100\"",
               b" via SMTP by mx, id smtpdA; Tue Jul 14 10:00:00 1998"]), "ctime"),
    (b"Subject: no received header\n\nx\n", None),
    (received([b"Received: from h (n [192.0.2.1]); Fri, 01 Jan 2100 00:00:00 +0000"]), None),
])
def test_received_time_reads_only_smtpds_lines(tmp_path, head, expected):
    p = tmp_path / "f"
    p.write_bytes(head)
    with open(p, "rb") as f:
        got = spool.received_time(f)
    if expected == "ctime":
        expected = time.mktime((1998, 7, 14, 10, 0, 0, 0, 0, -1))
    assert got == expected


def test_no_date_falls_back_to_the_files_birth_time(tmp_path, monkeypatch):
    p = tmp_path / "smtpdX"
    p.write_bytes(b"FROM <a@b>\nRCPT <c@d>\nBODY\nSubject: x\n\nno header\n")
    with open(p, "rb") as f:
        msg = spool.parse(f)
    if libc.birth_time(os.open(p, os.O_RDONLY)) is None:
        pytest.skip("this file system records no birth time")
    assert abs(msg.arrival - time.time()) < 60
    monkeypatch.setattr(libc, "STATX", None)
    with open(p, "rb") as f:
        assert spool.parse(f).arrival is None


def test_no_date_at_all_is_not_retried_for_ever(fwd_env, monkeypatch):
    from smtpgate.forwarder import delivery
    from smtpgate.forwarder.config import ForwarderConfig
    name = put(fwd_env.spool, body=b"Subject: none\n\nx\n")
    path = os.path.join(fwd_env.spool, name)
    monkeypatch.setattr(libc, "STATX", None)
    f = spool.open_for_delivery(path, time.time(), 0)
    cfg = ForwarderConfig(spooldir=fwd_env.spool, myname="mx.my.domain")
    d = delivery.Delivery(cfg, os.fsencode(name))
    d.f, d.msg = f, spool.parse(f)
    assert d.msg.arrival is None
    assert d.defer("agent exited 75", "busy", "<>", [(0, "<c@d>")], [], "4.3.0") \
        == os.EX_DATAERR
    assert "no arrival date" in open(os.path.join(fwd_env.spool, "failed",
                                                  name + ".reason")).read()


# -- a message in many small pieces (more than IOV_MAX) --

def test_draft_writes_more_pieces_than_iov_max(tmp_path):
    n = spool.IOV_MAX * 3 + 7
    with spool.Draft(str(tmp_path), b"<a@b>", [b"<c@d>"]) as d:
        for i in range(n):
            d.write(b"%d\n" % i)
        d.flush()
        name = d.commit()
    data = open(tmp_path / name, "rb").read()
    assert data.endswith(b"".join(b"%d\n" % i for i in range(n)))


def test_message_sent_one_line_per_packet_is_accepted(smtpd):
    srv = smtpd()
    c = srv.connect()
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.reply()
    c.cmd("EHLO x")
    c.cmd("MAIL FROM:<a@b.example>")
    c.cmd("RCPT TO:<bob@my.domain>")
    assert c.cmd("DATA")[0] == 354
    for i in range(2500):
        c.send(b"line %d\r\n" % i)
        if i % 2 == 0:
            time.sleep(0.0005)
    c.send(b".\r\n")
    assert c.reply()[0] == 250


# -- the parsers of hostile input raise only their own errors --

ENVELOPE = st.lists(st.one_of(
    st.sampled_from([b"FROM <a@b>", b"RCPT <c@d>", b"SENT <e@f>", b"BODY", b"FROM ", b"RCPT ",
                     b"Received: from h (n [192.0.2.1])", b"\tby mx (smtpd) with SMTP id x;",
                     b" via SMTP by mx, id smtpdA; Tue Jul 14 10:00:00 1998", b"\t" + OLD]),
    st.binary(max_size=600)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(ENVELOPE)
def test_spool_parse_raises_only_malformed(tmp_path_factory, lines):
    p = tmp_path_factory.mktemp("p") / "smtpdX"
    p.write_bytes(b"\n".join(lines))
    with open(p, "rb") as f:
        try:
            msg = spool.parse(f)
        except spool.Malformed:
            return
    assert msg.recipients or msg.sent
    assert msg.arrival is None or isinstance(msg.arrival, (int, float))


TOKENS = st.sampled_from(["ALL", "EXCEPT", "10.0.0.0/8", "[2001:db8::]/32", "*.x", "/(/",
                          "/a{99999999999}/", "/" + "(" * 300 + "a" + ")" * 300 + "/", "NS=x",
                          "u@h", "KNOWN", "RBL.z", ",", " ", "%F", "550 x"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(TOKENS, max_size=8).map(" ".join), min_size=1, max_size=6)
       .map(":".join))
def test_rules_compile_raises_only_rule_errors(line):
    try:
        engine.parse("deny:" + line + "\n")
    except engine.RuleError:
        pass
