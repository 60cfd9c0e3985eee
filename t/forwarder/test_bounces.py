"""Nothing vanishes (issue 15): delivery status notifications, end to end
through a real Postfix, no loops, crash safety and delay warnings."""

import email
import email.policy
import glob
import os
import re
import shutil
import smtplib
import subprocess
import tempfile
import time

import pytest

import postfix
from smtpgate import spool
from harness import (children, Fwd, needs_gdb, put, PYTHON, RECEIVED, run_inside,
                     spool_files, TEST_CONSTANTS, wait_for)

SENDER = "alice@localhost"


def failed_path(spooldir, name):
    return os.path.join(spooldir, "failed", name)


def queued(spooldir):
    """(name, sender, recipients) of every message in the spool."""
    out = []
    for n in spool_files(spooldir):
        try:
            with open(os.path.join(spooldir, n), "rb") as f:
                m = spool.parse(f)
        except (FileNotFoundError, spool.Malformed):
            continue
        out.append((n, m.sender.decode(), [r.decode() for _, r in m.recipients]))
    return out


class ScriptAgent:
    """A mail agent written as a shell script, reachable by nobody: each
    call is recorded (its arguments, without argv[0], and stdin) in calls/,
    and the script ($d is its directory) decides."""

    def __init__(self, body):
        self.dir = tempfile.mkdtemp(prefix="agent-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        os.mkdir(os.path.join(self.dir, "calls"))
        os.chmod(os.path.join(self.dir, "calls"), 0o777)
        self.path = os.path.join(self.dir, "agent")
        with open(self.path, "w") as f:
            f.write("#!/bin/sh\nd=%s\nn=$(mktemp $d/calls/XXXXXX)\ncat > $n.stdin\n"
                    "printf '%%s\\n' \"$@\" > $n.tmp\nmv $n.tmp $n.argv\n%s\n" % (self.dir, body))
        os.chmod(self.path, 0o755)

    def calls(self):
        out = []
        for p in sorted(glob.glob(self.dir + "/calls/*.argv"), key=os.path.getmtime):
            out.append((open(p).read().split("\n")[:-1],
                        open(p[:-5] + ".stdin", "rb").read()))
        return out

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def the_report(data):
    """The parsed notification, from its spool file or its mailbox entry."""
    if data.startswith(b"Received: by "):
        data = data.split(b"\n", 2)[2]
    return email.message_from_bytes(data, policy=email.policy.default)


def check_report(m, failed, status, diagnostic, subject="Subject: first"):
    assert m.get_content_type() == "multipart/report"
    assert m.get_param("report-type") == "delivery-status"
    text, ds, headers = list(m.iter_parts())
    assert text.get_content_type() == "text/plain"
    assert ds.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    per_message, *per_rcpt = ds.get_payload()
    assert per_message["Reporting-MTA"].startswith("dns; ")
    assert per_message["Arrival-Date"]
    assert [b["Final-Recipient"] for b in per_rcpt] == ["rfc822; %s" % r for r in failed]
    for b in per_rcpt:
        assert b["Action"] == "failed" and b["Status"] == status
        assert b["Diagnostic-Code"].startswith("x-unix; ") and diagnostic in b["Diagnostic-Code"]
    original = headers.get_content()
    assert subject in original and "the body, never returned" not in original
    assert "Received: from" in original
    return text.get_content()


# -- end to end: the bounce reaches the sender's mailbox through Postfix --

@pytest.mark.skipif(not postfix.available(), reason="needs root and Debian's postfix")
def test_bounce_reaches_the_senders_mailbox_through_postfix(smtpd, tree_factory):
    with postfix.instance(users=["alice", "carol"]) as mta:
        sendmail = mta.agent()
        agent = ScriptAgent('for a; do case "$a" in bob@*) echo "bob: user unknown in '
                            'our directory" >&2; exit 67;; esac; done\nexec %s "$@" < $n.stdin'
                            % sendmail)
        try:
            srv = smtpd("allow:ALL:ALL:ALL\n", "-H")
            with smtplib.SMTP(srv.addr, srv.port, timeout=30) as s:
                s.sendmail(SENDER, ["carol@localhost", "bob@my.domain"],
                           b"Subject: first\r\nX-Test: kept\r\n\r\nthe body, never returned\r\n")
            (name,) = spool_files(srv.jail)
            tree = tree_factory(**dict(TEST_CONSTANTS, MAXARGS=6))
            fwd = subprocess.Popen([PYTHON, os.path.join(tree, "smtpfwdd.py"), "-F", "-P", "1",
                                    "-d", srv.jail, "-s", agent.path, "-u", "nobody",
                                    "-g", "nogroup"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                box = mta.wait_for_mail("alice")
                mta.wait_for_mail("carol")
            finally:
                fwd.terminate()
                log = fwd.communicate(timeout=30)[0].decode(errors="replace")
        finally:
            agent.close()
    assert os.path.exists(failed_path(srv.jail, name)), log
    assert "Return-Path: <>" in box.decode() or "From MAILER-DAEMON" in box.decode(), box
    m = the_report(box.split(b"\n", 1)[1])
    text = check_report(m, ["bob@my.domain"], "5.1.1", "bob: user unknown in our directory")
    assert "bob@my.domain: bob: user unknown in our directory" in text
    assert "carol" not in str(list(m.iter_parts())[1])    # delivered: not listed
    assert m["To"] == SENDER and m["Auto-Submitted"] == "auto-replied"
    assert "delivery status notification smtpd" in log


# -- which failures are reported, and how --

def test_unsafe_recipient_is_reported_as_5_1_3(fwd_env):
    name = put(fwd_env.spool, sender=b"<alice@example.org>", rcpts=[b"<-oQ/x@y>"])
    fwd_env.start()
    reason = failed_path(fwd_env.spool, name) + ".reason"
    assert wait_for(lambda: os.path.exists(reason))
    assert wait_for(lambda: fwd_env.agent.calls())
    (call,) = fwd_env.agent.calls()     # only the notification reaches the agent
    assert call["argv"][2:] == ["-f", "<>", "--", "alice@example.org"]
    m = the_report(call["stdin"].encode("latin-1"))
    check_report(m, ["-oQ/x@y"], "5.1.3", "starts with '-'", "Subject: test")


@pytest.mark.parametrize("status,code", [(67, "5.1.1"), (68, "5.1.2"), (69, "5.3.0"),
                                         (77, "5.7.0"), (65, "5.6.0")])
def test_status_comes_from_the_exit_status(fwd_env, status, code):
    fwd_env.agent.statuses(status, 0)
    put(fwd_env.spool)
    fwd_env.start()
    assert wait_for(lambda: len(fwd_env.agent.calls()) == 2)
    m = the_report(fwd_env.agent.calls()[1]["stdin"].encode("latin-1"))
    check_report(m, ["bob@my.domain"], code, "fake-sendmail call 0 exiting %d" % status,
                 "Subject: test")


def test_expired_message_is_reported_as_4_4_7_failed(fwd_env):
    fwd_env.agent.statuses(75, 0)
    old = b"Tue, 14 Jul 1998 10:00:00 +0000"
    name = put(fwd_env.spool, body=RECEIVED % old + b"Subject: old\n\nx\n")
    fwd_env.start()
    assert wait_for(lambda: len(fwd_env.agent.calls()) == 2)
    assert os.path.exists(failed_path(fwd_env.spool, name))
    m = the_report(fwd_env.agent.calls()[1]["stdin"].encode("latin-1"))
    check_report(m, ["bob@my.domain"], "4.4.7", "expired", "Subject: old")


def test_null_sender_failure_sends_no_notification(fwd_env):
    fwd_env.agent.statuses(67)
    name = put(fwd_env.spool, sender=b"<>")
    f = fwd_env.start()
    assert wait_for(lambda: os.path.exists(failed_path(fwd_env.spool, name) + ".reason"))
    time.sleep(1.5)
    assert len(fwd_env.agent.calls()) == 1 and queued(fwd_env.spool) == []
    assert "no notification for <bob@my.domain>: the sender is null" in f.log()


def test_unsafe_sender_gets_no_notification(fwd_env):
    fwd_env.agent.statuses(67)
    name = put(fwd_env.spool, sender=b"<-oQ/tmp/x@example.org>")
    f = fwd_env.start()
    assert wait_for(lambda: os.path.exists(failed_path(fwd_env.spool, name) + ".reason"))
    time.sleep(1.5)
    assert queued(fwd_env.spool) == []
    assert "is unsafe for a command line" in f.log()


def test_a_failing_bounce_is_retried_then_quarantined_never_bounced(fwd_env):
    fwd_env.agent.statuses(67, 75)          # the original fails; the bounce waits
    name = put(fwd_env.spool)
    f = fwd_env.start(QUEUE_LIFETIME=4)
    assert wait_for(lambda: len(glob.glob(fwd_env.spool + "/failed/smtpd*.reason")) == 2, 30)
    assert os.path.exists(failed_path(fwd_env.spool, name))
    calls = [c["argv"] for c in fwd_env.agent.calls()]
    assert calls[0][2:4] == ["-f", "alice@example.org"]
    assert len(calls) >= 3 and all(c[2:4] == ["-f", "<>"] for c in calls[1:])
    assert len({c[-1] for c in calls[1:]}) == 1     # one bounce, retried
    assert queued(fwd_env.spool) == []
    assert "the sender is null" in f.log()


CRASH_AFTER_NOTIFY = """
from smtpgate.forwarder import bounce
queue = bounce.queue
def queue_then_die(*args, **kw):
    queue(*args, **kw)
    os.kill(os.getpid(), 9)
bounce.queue = queue_then_die
found["patched"] = 1
"""


@needs_gdb
def test_crash_after_the_notification_loses_nothing(fwd_env):
    """The delivery process dies (SIGKILL) the moment the notification is
    queued, before the original leaves the queue: nothing is lost (gdb
    makes the live delivery process die there, as a crash would)."""
    # The original always fails for good; notifications wait until allowed.
    agent = ScriptAgent('for a; do [ "$a" = "<>" ] && exit $(cat $d/null-status); done\n'
                        'exit 67')
    agent_dir = agent.dir
    with open(os.path.join(agent_dir, "null-status"), "w") as s:
        s.write("0\n")
    os.chmod(os.path.join(agent_dir, "null-status"), 0o644)
    try:
        f = fwd_env.start(agent_path=agent.path, RETRY_DELAY_TIME=600)
        warm = put(fwd_env.spool, sender=b"<>")             # a delivery process, idle after
        assert wait_for(lambda: not os.path.exists(os.path.join(fwd_env.spool, warm)))
        (delivering,) = children(f.proc.pid)
        assert run_inside(delivering, fwd_env.spool, CRASH_AFTER_NOTIFY) == {"patched": 1}
        before = len(agent.calls())
        with open(os.path.join(agent_dir, "null-status"), "w") as s:
            s.write("75\n")
        name = put(fwd_env.spool)
        assert wait_for(lambda: "died delivering %s" % name in f.log())
        f.stop()
        bounces = [q for q in queued(fwd_env.spool) if q[1] == "<>"]
        assert len(bounces) == 1 and bounces[0][2] == ["<alice@example.org>"]
        # The original is still queued: it never left before the crash.
        assert os.path.exists(os.path.join(fwd_env.spool, name))
        assert not os.path.exists(failed_path(fwd_env.spool, name))
        # Without the crash it fails again: a duplicate notification, never a lost one.
        with open(os.path.join(agent_dir, "null-status"), "w") as s:
            s.write("0\n")
        fwd_env.start(agent_path=agent.path)
        assert wait_for(lambda: os.path.exists(failed_path(fwd_env.spool, name) + ".reason"))
        assert wait_for(lambda: queued(fwd_env.spool) == [])
        to_sender = [a for a, _ in agent.calls()[before:] if a[1:3] == ["-f", "<>"]]
        assert len(to_sender) >= 2 and all(a[-1] == "alice@example.org" for a in to_sender)
    finally:
        agent.close()


def test_delay_warning_is_sent_once(fwd_env):
    agent = ScriptAgent('for a; do [ "$a" = "<>" ] && exit 0; done\nexit 75')
    try:
        name = put(fwd_env.spool)
        path = os.path.join(fwd_env.spool, name)
        f = fwd_env.start(agent_path=agent.path, DELAY_WARNING_TIME=1, RETRY_DELAY_TIME=1)
        assert wait_for(lambda: sum(a[1:3] == ["-f", "<>"] for a, _ in agent.calls()) == 1)
        time.sleep(4)                       # more retries: no second warning
        warnings = [s for a, s in agent.calls() if a[1:3] == ["-f", "<>"]]
        assert len(warnings) == 1
        assert sum(a[1:3] == ["-f", "alice@example.org"] for a, _ in agent.calls()) >= 3
        m = the_report(warnings[0])
        assert m["Subject"].startswith("Delayed Mail")
        block = list(m.iter_parts())[1].get_payload()[1]
        assert block["Action"] == "delayed" and block["Status"] == "4.3.0"
        assert os.stat(path).st_mode & 0o1000       # the durable mark
        assert "delay notification" in f.log()
    finally:
        agent.close()


def test_delivered_batches_are_not_listed_and_the_others_still_go(fwd_env):
    fwd_env.agent.statuses(0, 67, 0, 0)
    rcpts = [b"<a@my.domain>", b"<b@my.domain>", b"<c@my.domain>"]
    name = put(fwd_env.spool, rcpts=rcpts)
    fwd_env.start(MAXARGS=6)                # one recipient per call
    assert wait_for(lambda: os.path.exists(failed_path(fwd_env.spool, name)))
    assert wait_for(lambda: len(fwd_env.agent.calls()) == 4)
    calls = [c["argv"][-1] for c in fwd_env.agent.calls()]
    assert calls == ["a@my.domain", "b@my.domain", "c@my.domain", "alice@example.org"]
    m = the_report(fwd_env.agent.calls()[3]["stdin"].encode("latin-1"))
    check_report(m, ["b@my.domain"], "5.1.1", "exiting 67", "Subject: test")


# -- a temporary failure that waiting cannot cure (issue 22, item 1) --

@pytest.mark.parametrize("words", ["postdrop: warning: message file too big",
                                   "Message too large for this system",
                                   "552 message size exceeds fixed maximum message size"])
def test_too_big_for_the_mta_fails_at_once_and_tells_the_sender(fwd_env, words):
    agent = ScriptAgent('for a; do [ "$a" = "<>" ] && exit 0; done\n'
                        'echo "%s" >&2\nexit 75' % words)
    try:
        name = put(fwd_env.spool)
        f = fwd_env.start(agent_path=agent.path, RETRY_DELAY_TIME=600)
        assert wait_for(lambda: os.path.exists(failed_path(fwd_env.spool, name) + ".reason"))
        assert wait_for(lambda: sum(a[1:3] == ["-f", "<>"] for a, _ in agent.calls()) == 1)
        bounce = [s for a, s in agent.calls() if a[1:3] == ["-f", "<>"]][0]
        check_report(the_report(bounce), ["bob@my.domain"], "5.3.4", words,
                     subject="Subject: test")
        assert "not retried: the message is too big" in f.log()
        assert len([a for a, _ in agent.calls() if a[1:3] != ["-f", "<>"]]) == 1  # tried once
    finally:
        agent.close()


def test_other_temporary_words_are_still_retried(fwd_env):
    agent = ScriptAgent('echo "temporary lookup failure" >&2\nexit 75')
    try:
        name = put(fwd_env.spool)
        fwd_env.start(agent_path=agent.path, RETRY_DELAY_TIME=600)
        assert wait_for(lambda: len(agent.calls()) == 1)
        time.sleep(1.5)
        assert os.stat(os.path.join(fwd_env.spool, name)).st_mode & 0o777 == 0o755
        assert not os.path.exists(failed_path(fwd_env.spool, name))
    finally:
        agent.close()


# -- DSN (issue 38): the sender's wishes reach the agent and our notices --

def test_dsn_wishes_reach_the_agent_one_call_per_notify(fwd_env):
    """RET and ENVID become -R and -V, each recipient's NOTIFY -N, and
    recipients whose NOTIFY differs go in separate calls."""
    rcpts = [b"<a@my.domain>", b"<b@my.domain>", b"<c@my.domain>", b"<d@my.domain>"]
    put(fwd_env.spool, rcpts=rcpts,
        dsn=("RET=HDRS ENVID=QQ+2B1", ["NOTIFY=NEVER", "NOTIFY=SUCCESS,FAILURE", None,
                                       "NOTIFY=NEVER ORCPT=rfc822;d@my.domain"]))
    fwd_env.start()
    assert wait_for(lambda: len(fwd_env.agent.calls()) == 3)
    calls = sorted(c["argv"][1:] for c in fwd_env.agent.calls())
    assert calls == sorted([
        ["-oi", "-f", "alice@example.org", "-R", "hdrs", "-V", "QQ+1", "-N", "never", "--",
         "a@my.domain", "d@my.domain"],
        ["-oi", "-f", "alice@example.org", "-R", "hdrs", "-V", "QQ+1", "-N", "success,failure",
         "--", "b@my.domain"],
        ["-oi", "-f", "alice@example.org", "-R", "hdrs", "-V", "QQ+1", "--", "c@my.domain"]])


def test_an_envid_that_looks_like_an_option_is_not_passed(fwd_env):
    put(fwd_env.spool, rcpts=[b"<a@my.domain>"], dsn=("ENVID=-oQ/tmp/x", [None]))
    fwd_env.start()
    assert wait_for(lambda: len(fwd_env.agent.calls()) == 1)
    assert fwd_env.agent.calls()[0]["argv"][1:] == ["-oi", "-f", "alice@example.org", "--",
                                                     "a@my.domain"]


def test_a_message_without_dsn_is_called_as_ever(fwd_env):
    put(fwd_env.spool, rcpts=[b"<a@my.domain>", b"<b@my.domain>"])
    fwd_env.start()
    assert wait_for(lambda: len(fwd_env.agent.calls()) == 1)
    assert fwd_env.agent.calls()[0]["argv"][1:] == ["-oi", "-f", "alice@example.org", "--",
                                                     "a@my.domain", "b@my.domain"]


def test_notify_never_gets_no_notification_and_orcpt_envid_are_reported(fwd_env):
    fwd_env.agent.statuses(67, 67, 75)       # the notification then waits
    name = put(fwd_env.spool, rcpts=[b"<a@my.domain>", b"<b@my.domain>"],
               dsn=("ENVID=env-1", ["NOTIFY=NEVER", "NOTIFY=FAILURE ORCPT=rfc822;B+2Bx@my.domain"]))
    f = fwd_env.start()
    assert wait_for(lambda: os.path.exists(failed_path(fwd_env.spool, name) + ".reason"))
    assert wait_for(lambda: len(queued(fwd_env.spool)) == 1)
    (bounce_name, to, rcpts), = queued(fwd_env.spool)
    assert rcpts == ["<alice@example.org>"]
    m = the_report(open(os.path.join(fwd_env.spool, bounce_name), "rb").read().split(b"BODY\n", 1)[1])
    per_message, *per_rcpt = list(m.iter_parts())[1].get_payload()
    assert per_message["Original-Envelope-Id"] == "env-1"
    assert [b["Final-Recipient"] for b in per_rcpt] == ["rfc822; b@my.domain"]
    assert per_rcpt[0]["Original-Recipient"] == "rfc822; B+2Bx@my.domain"
    assert "no delivery status notification for <a@my.domain>: NOTIFY=NEVER" in f.log()


def test_notify_never_for_all_sends_nothing(fwd_env):
    fwd_env.agent.statuses(67)
    name = put(fwd_env.spool, rcpts=[b"<a@my.domain>"], dsn=(None, ["NOTIFY=NEVER"]))
    f = fwd_env.start()
    assert wait_for(lambda: os.path.exists(failed_path(fwd_env.spool, name) + ".reason"))
    time.sleep(1.5)
    assert queued(fwd_env.spool) == []
    assert "NOTIFY=NEVER" in f.log()


@pytest.mark.skipif(not postfix.available(), reason="needs root and Debian's postfix")
def test_dsn_wishes_reach_a_real_postfix_through_its_sendmail(smtpd, tree_factory):
    """A client asks for success notices with an envelope id: smtpd keeps
    the wishes, smtpfwdd passes them as -N, -R, -V to Postfix's sendmail,
    and Postfix, having delivered, tells the sender so with that id."""
    with postfix.instance(users=["alice", "carol"]) as mta:
        srv = smtpd("allow:ALL:ALL:ALL\n", "-H")
        with smtplib.SMTP(srv.addr, srv.port, timeout=30) as s:
            s.ehlo("client.example")
            assert s.has_extn("dsn")
            s.sendmail(SENDER, ["carol@localhost"], b"Subject: dsn\r\n\r\nhello\r\n",
                       mail_options=["RET=HDRS", "ENVID=env-42"],
                       rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
        fwd = Fwd(tree_factory(**TEST_CONSTANTS), srv.jail, mta.agent())
        try:
            mta.wait_for_mail("carol")
            box = mta.wait_for_mail("alice").decode(errors="replace")
        finally:
            fwd.stop()
    assert "Subject: Successful Mail Delivery Report" in box, box
    assert "Original-Envelope-Id: env-42" in box
    assert re.search(r"Action: (delivered|expanded)\nStatus: 2\.0\.0", box), box


@pytest.mark.skipif(not postfix.available(), reason="needs root and Debian's postfix")
def test_smtputf8_mail_reaches_a_real_postfix_through_its_sendmail(smtpd, tree_factory):
    """A UTF-8 sender (SMTPUTF8, issue 38) is accepted, spooled as its
    octets and handed to Postfix's sendmail untouched; with
    smtputf8_enable = yes Postfix takes and delivers it."""
    sender = "jörg@exämple.org"
    with postfix.instance(users=["carol"], main={"smtputf8_enable": "yes"}) as mta:
        srv = smtpd("allow:ALL:ALL:ALL\n", "-H")
        with smtplib.SMTP(srv.addr, srv.port, timeout=30) as s:
            s.ehlo("client.example")
            assert s.has_extn("smtputf8")
            s.sendmail(sender, ["carol@localhost"],
                       "Subject: grüße\r\n\r\nhallo\r\n".encode("utf-8"),
                       mail_options=["SMTPUTF8"])
        fwd = Fwd(tree_factory(**TEST_CONSTANTS), srv.jail, mta.agent())
        try:
            box = mta.wait_for_mail("carol")
        finally:
            fwd.stop()
            log = fwd.log()
    assert ("Return-Path: <%s>" % sender).encode("utf-8") in box, (box, log)
    assert "Subject: grüße".encode("utf-8") in box


def test_a_notification_to_a_utf8_sender_is_international(fwd_env):
    """RFC 6533: to a UTF-8 sender, about a UTF-8 recipient, the report is
    message/global-delivery-status with headers in UTF-8, and its spool
    file is marked SMTPUTF8 (issue 38)."""
    fwd_env.agent.statuses(67, 75)         # the notification then waits in the queue
    sender, rcpt = "<jörg@exämple.org>".encode(), "<bøb@my.domain>".encode()
    name = put(fwd_env.spool, sender=sender, rcpts=[rcpt], dsn=None)
    fwd_env.start()
    assert wait_for(lambda: os.path.exists(failed_path(fwd_env.spool, name) + ".reason"))
    assert wait_for(lambda: len(queued(fwd_env.spool)) == 1)
    (bounce_name, _, rcpts), = queued(fwd_env.spool)
    data = open(os.path.join(fwd_env.spool, bounce_name), "rb").read()
    envelope, body = data.split(b"BODY\n", 1)
    assert envelope == b"FROM <>\nSENT ;SMTPUTF8\nRCPT " + sender + b"\n"
    assert "To: jörg@exämple.org\n".encode() in body
    assert b"Content-Type: message/global-delivery-status" in body
    assert "Final-Recipient: utf-8; bøb@my.domain".encode() in body
