"""Makefile constants reach buildconf.py, and overrides do not stick (issue 2)."""

import os
import shutil
import subprocess

from harness import ROOT


def read_conf(d):
    ns = {}
    exec(open(os.path.join(d, "buildconf.py")).read(), ns)
    return ns


def test_override_reaches_buildconf_and_default_comes_back(tmp_path):
    shutil.copy(os.path.join(ROOT, "Makefile"), tmp_path)
    subprocess.run(["make", "-s", "-C", str(tmp_path), "buildconf.py"], check=True)
    assert read_conf(tmp_path)["NOTO_DELAY"] == 60
    subprocess.run(["make", "-s", "-C", str(tmp_path), "buildconf.py", "NOTO_DELAY=5",
                    "SPOOLDIR=/srv/smtpd"], check=True)
    conf = read_conf(tmp_path)
    assert conf["NOTO_DELAY"] == 5 and conf["SPOOLDIR"] == "/srv/smtpd"
    subprocess.run(["make", "-s", "-C", str(tmp_path), "buildconf.py"], check=True)
    conf = read_conf(tmp_path)
    assert conf["NOTO_DELAY"] == 60 and conf["SPOOLDIR"] == "/var/spool/smtpd"
    assert open(tmp_path / "buildconf.py").readline().startswith(
        '"""Generated from Makefile; do not edit.')


def test_every_design_constant_is_generated():
    conf = read_conf(ROOT)
    for name in ("SPOOLDIR SPOOLSUBDIR SMTP_USER SMTP_GROUP CHECK_FILE "
                 "NOTO_DELAY DENY_DELAY READ_TIMEOUT SESSION_TIMEOUT CHECK_IDENT "
                 "IDENT_PORT CHECK_ADDRESS_DENY_ON_FAILURE MAIL_AGENT MAXCHILDREN "
                 "POLL_TIME MAXARGS RETRY_DELAY_TIME QUEUE_LIFETIME SMTPD_PREFORK "
                 "SMTPD_MAXCHILDREN SMTPD_MAX_PER_IP SMTPD_MAX_USE MAX_RCPT "
                 "PID_DIR LOG_FACILITY PREFIX").split():
        assert name in conf, name
