"""Logs from the jail are not lost (issue 13, item 2): with a real rsyslog
listening inside the jail, workers' lines reach it when it starts after
smtpd and again after it restarts, without a SIGHUP; with no log daemon at
all, the daemons say so once on standard error."""

import os
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time

import pytest

from harness import (FWD_CONSTANTS, make_jail, needs_root, PYTHON, SmtpdDaemon,
                     TEST_CONSTANTS, wait_for)

NOWHERE = "/nonexistent-smtpd-test/log"
JAIL_LOG = "/smtpd-test-dev/log"        # inside the jail; nothing on the host


def test_detached_smtpd_says_once_that_nothing_hears_it(tree_factory):
    tree = tree_factory(**dict(TEST_CONSTANTS, LOG_SOCKET=NOWHERE))
    jail = make_jail()
    d = SmtpdDaemon(tree, jail, detach=True)
    assert d.proc.wait(20) == 0
    # (the pid file exists an instant before the pid is in it)
    assert wait_for(lambda: os.path.exists(d.pidfile) and open(d.pidfile).read().strip())
    try:
        log = d.log()
        assert log.count("smtpd: no syslog daemon listens on %s" % NOWHERE) == 1, log
        if os.geteuid() == 0:
            assert "no log socket at %s%s" % (jail, NOWHERE) in log
    finally:
        os.kill(d.master_pid(), signal.SIGTERM)
        d.log_file.close()


def test_smtpd_in_the_foreground_does_not_complain(tree_factory):
    tree = tree_factory(**dict(TEST_CONSTANTS, LOG_SOCKET=NOWHERE))
    d = SmtpdDaemon(tree, make_jail()).wait_ready()
    assert "no syslog daemon" not in d.log()
    assert d.stop() == 0


def test_detached_smtpfwdd_says_once_that_nothing_hears_it(tree_factory):
    tree = tree_factory(**dict(FWD_CONSTANTS, LOG_SOCKET=NOWHERE))
    spool = tempfile.mkdtemp(prefix="spool-", dir="/tmp")
    if os.geteuid() == 0:
        shutil.chown(spool, "nobody")
    ids = ["-u", "nobody", "-g", "nogroup"] if os.geteuid() == 0 else []
    p = subprocess.run([PYTHON, os.path.join(tree, "smtpfwdd.py"), "-d", spool,
                        "-s", "/bin/true"] + ids, capture_output=True, text=True, timeout=30)
    try:
        assert p.returncode == 0
        assert p.stderr.count("smtpfwdd: no syslog daemon listens on %s" % NOWHERE) == 1
    finally:
        lockfile = os.path.join(spool, ".smtpfwdd.lock")
        assert wait_for(lambda: open(lockfile).read().strip())     # the daemon's pid
        os.kill(int(open(lockfile).read().strip()), signal.SIGTERM)
        shutil.rmtree(spool, ignore_errors=True)


class Rsyslog:
    """A private rsyslogd: one Unix socket (inside the jail), one file."""

    def __init__(self, socket_path):
        self.dir = tempfile.mkdtemp(prefix="rsyslog-test-", dir="/tmp")
        self.out = os.path.join(self.dir, "messages")
        self.conf = os.path.join(self.dir, "rsyslog.conf")
        with open(self.conf, "w") as f:
            f.write('global(workDirectory="%s")\n' % self.dir)
            f.write('module(load="imuxsock" SysSock.Use="off")\n')
            f.write('input(type="imuxsock" Socket="%s" CreatePath="on")\n' % socket_path)
            f.write('*.* action(type="omfile" file="%s")\n' % self.out)
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(["rsyslogd", "-n", "-f", self.conf, "-i",
                                      os.path.join(self.dir, "rsyslogd.pid")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def lines(self):
        try:
            return open(self.out, errors="replace").read()
        except FileNotFoundError:
            return ""

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def session(port, marker):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail("%s@example.org" % marker, ["bob@my.domain"], b"Subject: x\r\n\r\nhi\r\n")


@needs_root
@pytest.mark.skipif(not shutil.which("rsyslogd"), reason="needs rsyslog (installed by .ci/run)")
def test_worker_lines_reach_rsyslog_started_later_and_restarted(tree_factory):
    # The socket has a name of its own, so that the master (outside the
    # jail) never reaches a syslog daemon of the host and hands its
    # connection down to the workers: they must find the jail's by path.
    tree = tree_factory(**dict(TEST_CONSTANTS, SMTPD_PREFORK=1, LOG_SOCKET=JAIL_LOG))
    jail = make_jail()
    os.mkdir(os.path.join(jail, "smtpd-test-dev"))
    d = SmtpdDaemon(tree, jail, "-M", "1").wait_ready()
    rs = Rsyslog(os.path.join(jail, JAIL_LOG.lstrip("/")))
    try:
        session(d.port, "before")
        rs.start()
        assert wait_for(lambda: os.path.exists(os.path.join(jail, JAIL_LOG.lstrip("/"))))
        time.sleep(1.2)             # a worker retries a missing socket once a second
        session(d.port, "first")
        assert wait_for(lambda: "mail from <first@example.org>" in rs.lines()), rs.lines()
        assert "worker: " in rs.lines()
        pid = rs.lines().split("mail from <first@")[0].rsplit("smtpd[", 1)[1].split("]")[0]
        rs.stop()
        rs.start()
        assert wait_for(lambda: os.path.exists(os.path.join(jail, JAIL_LOG.lstrip("/"))))
        session(d.port, "second")
        assert wait_for(lambda: "mail from <second@example.org>" in rs.lines()), rs.lines()
        # The same worker, never replaced: no SIGHUP, no recycling.
        assert "smtpd[%s]: worker: mail from <second@" % pid in rs.lines()
    finally:
        rs.close()
        d.stop()


# -- following one message through the logs (issue 22, item 4) --

def test_one_message_followed_from_smtpd_to_the_agent(smtpd, tree_factory):
    from harness import Agent, FWD_CONSTANTS, Fwd, spool_files
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H", "-q")
    msgid = "<20261206.abc@client.example>"
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
        s.sendmail("alice@example.org", ["bob@my.domain"],
                   b"Subject: x\r\nMessage-ID:\r\n " + msgid.encode() + b"\r\n\r\nhi\r\n")
    (name,) = spool_files(srv.jail)
    gate = [l for l in srv.log().splitlines() if "id=" + name in l]
    assert len(gate) == 1 and gate[0].endswith("bytes=%s id=%s message-id=%s" % (
        gate[0].split("bytes=")[1].split()[0], name, msgid))
    agent = Agent()
    f = Fwd(tree_factory(**FWD_CONSTANTS), srv.jail, agent.path, "-q")
    try:
        assert wait_for(lambda: "status=delivered" in f.log())
    finally:
        f.stop()
    (line,) = [l for l in f.log().splitlines() if name in l]
    size = len(agent.calls()[0]["stdin"])
    assert "size=%d message-id=%s status=delivered" % (size, msgid) in line


def test_a_hostile_message_id_is_escaped_and_bounded(smtpd):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H")
    evil = b"<" + b"\x1b]0;x\x07" + b"a" * 300 + b">"
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
        s.sendmail("alice@example.org", ["bob@my.domain"],
                   b"Message-ID: " + evil + b"\r\n\r\nhi\r\n")
    (line,) = [l for l in srv.log().splitlines() if "message-id=" in l]
    assert "\x1b" not in line and "message-id=<\\x1b]0;x\\x07aaa" in line
    assert line.endswith("...") and len(line.split("message-id=")[1]) <= 4 * 120 + 3


def test_a_line_logged_out_of_descriptors_is_dropped_not_a_crash(tree_factory):
    """The front stage at its open-file limit logs it: with no syslog
    socket connected, that line's reconnect found no descriptor and the
    OSError ended the front stage (seen under load in the EMFILE test)."""
    tree = tree_factory(**FWD_CONSTANTS)
    code = """
import os, resource, sys
sys.path.insert(0, %r)
from smtpgate import log
log.log.open("smtpd", path="/nonexistent/log")
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
log.log.next_try = 0
log.err("out of descriptors: %%d held", len(held))
print("alive")
""" % tree
    p = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: __import__("resource").setrlimit(
                           __import__("resource").RLIMIT_NOFILE, (64, 64)))
    assert p.returncode == 0 and p.stdout.strip() == "alive", p.stderr
