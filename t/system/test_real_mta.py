"""End to end through a real MTA: smtpd -> spool -> smtpfwdd -> Postfix's
/usr/sbin/sendmail -> a mailbox (issues 6 and 13).  .ci/run installs postfix;
the test runs a private instance (t/postfix.py) and leaves the system's
configuration, services, users and mailboxes exactly as they were."""

import hashlib
import os
import smtplib
import subprocess
import time

import pytest

import postfix
from harness import PYTHON, spool_files, TEST_CONSTANTS

pytestmark = pytest.mark.skipif(not postfix.available(),
                                reason="needs root and Debian's postfix (installed by .ci/run)")


def host_state():
    """What a test must not change: the system's Postfix configuration and
    whether it runs, the users and groups, the system mailboxes."""
    def digest(path):
        try:
            return hashlib.sha256(open(path, "rb").read()).hexdigest()
        except FileNotFoundError:
            return None
    postconf = subprocess.run(["postconf", "-n"], capture_output=True, text=True).stdout
    running = subprocess.run(["postfix", "status"], capture_output=True).returncode
    mailboxes = sorted(os.listdir("/var/mail")) if os.path.isdir("/var/mail") else []
    return {"postconf -n": postconf, "postfix status": running,
            "main.cf": digest("/etc/postfix/main.cf"),
            "master.cf": digest("/etc/postfix/master.cf"),
            "passwd": digest("/etc/passwd"), "group": digest("/etc/group"),
            "/var/mail": mailboxes}


@pytest.fixture(scope="module")
def before():
    return host_state()


@pytest.fixture(scope="module")
def mta(before):
    with postfix.instance(users=["fwdtest"]) as pf:
        yield pf


def test_delivery_through_postfix_sendmail(mta, smtpd, tree_factory):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H")
    with smtplib.SMTP(srv.addr, srv.port, timeout=30) as s:
        s.sendmail("alice@example.org", ["fwdtest@localhost"],
                   b"Subject: through postfix\r\nX-Test: kept\r\n\r\nHello, Postfix.\r\n")
        s.sendmail("", ["fwdtest@localhost"],
                   b"Subject: a bounce\r\n\r\nNull sender.\r\n")
    assert len(spool_files(srv.jail)) == 2
    tree = tree_factory(**TEST_CONSTANTS)
    fwd = subprocess.Popen([PYTHON, os.path.join(tree, "smtpfwdd.py"), "-F", "-P", "1",
                            "-d", srv.jail, "-s", mta.agent(),
                            "-u", "nobody", "-g", "nogroup"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    try:
        got = mta.wait_for_mail("fwdtest", count=2)
        deadline = time.time() + 30
        while spool_files(srv.jail) and time.time() < deadline:
            time.sleep(0.2)
        assert spool_files(srv.jail) == []
    finally:
        fwd.terminate()
        out = fwd.communicate(timeout=30)[0].decode(errors="replace")
    assert b"Subject: through postfix\nX-Test: kept\n" in got, out
    assert b"Hello, Postfix.\n" in got
    assert b"by mx.my.domain (smtpd) with ESMTP id smtpd" in got
    assert b"Return-Path: <alice@example.org>" in got
    assert b"Subject: a bounce" in got and b"From MAILER-DAEMON" in got
    assert "status=sent (delivered to file: %s)" % mta.mailbox_path("fwdtest") in mta.log()


def test_the_host_is_as_it_was(mta, before):
    mta.stop()
    assert host_state() == before
