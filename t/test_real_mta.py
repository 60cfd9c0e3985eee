"""End to end through a real MTA: smtpd -> spool -> smtpfwdd -> Postfix's
/usr/sbin/sendmail -> a local mailbox (issue 6).  .ci/run installs postfix;
this test configures it for local delivery only (no network listener)."""

import os
import shutil
import smtplib
import subprocess
import time

import pytest

from harness import is_root, PYTHON, spool_files, TEST_CONSTANTS

USER = "fwdtest"
MAILBOX = "/var/mail/" + USER

pytestmark = pytest.mark.skipif(
    not (is_root and shutil.which("postconf") and os.path.exists("/usr/sbin/sendmail")),
    reason="needs root and Debian's postfix (installed by .ci/run)")


@pytest.fixture(scope="module")
def postfix():
    subprocess.run(["postconf", "-e", "inet_interfaces = loopback-only",
                    "master_service_disable = inet", "mydestination = localhost",
                    "myhostname = localhost", "alias_maps =", "alias_database =",
                    "local_recipient_maps = proxy:unix:passwd.byname"], check=True)
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", USER], check=True)
    if subprocess.run(["postfix", "status"], capture_output=True).returncode == 0:
        subprocess.run(["postfix", "reload"], check=True, capture_output=True)
    else:
        subprocess.run(["postfix", "start"], check=True, capture_output=True)
    yield
    subprocess.run(["postfix", "stop"], capture_output=True)


def mailbox():
    try:
        return open(MAILBOX, "rb").read()
    except FileNotFoundError:
        return b""


def test_delivery_through_postfix_sendmail(postfix, smtpd, tree_factory):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H")
    before = len(mailbox())
    with smtplib.SMTP(srv.addr, srv.port, timeout=30) as s:
        s.sendmail("alice@example.org", [USER + "@localhost"],
                   b"Subject: through postfix\r\nX-Test: kept\r\n\r\nHello, Postfix.\r\n")
        s.sendmail("", [USER + "@localhost"],
                   b"Subject: a bounce\r\n\r\nNull sender.\r\n")
    assert len(spool_files(srv.jail)) == 2
    tree = tree_factory(**TEST_CONSTANTS)
    fwd = subprocess.Popen([PYTHON, os.path.join(tree, "smtpfwdd.py"), "-F", "-P", "1",
                            "-d", srv.jail, "-s", "/usr/sbin/sendmail",
                            "-u", "nobody", "-g", "nogroup"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and mailbox()[before:].count(b"\nFrom ") + \
                mailbox()[before:].startswith(b"From ") < 2:
            time.sleep(0.5)
        assert spool_files(srv.jail) == []
    finally:
        fwd.terminate()
        out = fwd.communicate(timeout=30)[0].decode(errors="replace")
    got = mailbox()[before:]
    assert b"Subject: through postfix\nX-Test: kept\n" in got, out
    assert b"Hello, Postfix.\n" in got
    assert b"by mx.my.domain (smtpd) with ESMTP id smtpd" in got
    assert b"Return-Path: <alice@example.org>" in got
    assert b"Subject: a bounce" in got and b"From MAILER-DAEMON" in got
