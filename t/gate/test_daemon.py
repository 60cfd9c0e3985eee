"""smtpd -D: the pre-fork daemon, its jail, pid file, pool and signals (issue 5)."""

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time

import pytest

from harness import (ROOT, comm, free_port, gone, make_jail, never_ignores_sigterm,
                     pid_as_soon_as_written, needs_root, NOBODY, send, SmtpdDaemon as Daemon,
                     spool_files, status_field, TEST_CONSTANTS, wait_for, write_rules)


@needs_root
def test_workers_are_jailed_unprivileged_with_one_group(daemon_):
    d = daemon_().wait_ready()
    import pwd
    pw = pwd.getpwnam(NOBODY)

    seen = []

    def settled():          # a worker is root for the instant before its jail
        seen[:] = d.workers()   # and the pool may fork one more after the probe
        return len(seen) >= 4 and all(
            (status_field(p, "Uid") or ["0"])[0] != "0" for p in seen)
    assert wait_for(settled)
    assert wait_for(lambda: len(d.watcher()) == 1)
    seen += d.watcher()     # the rules watcher is jailed like a worker
    assert wait_for(lambda: d.screen() is not None)
    seen.append(d.screen())     # and so is the front stage
    for pid in seen:
        assert status_field(pid, "Uid") == [str(pw.pw_uid)] * 4
        assert status_field(pid, "Gid") == [str(pw.pw_gid)] * 4
        assert status_field(pid, "Groups") == [str(pw.pw_gid)]
        assert status_field(pid, "CapEff") == ["0000000000000000"]
        assert os.readlink("/proc/%d/root" % pid) == d.jail
        assert comm(pid) in ("smtpd: worker", "smtpd: rules", "smtpd: screen")
    master = d.master_pid()
    assert open("/proc/%d/comm" % master).read().strip() == "smtpd: master"
    assert status_field(master, "Uid")[0] == "0"


def test_pid_file_holds_master_pid_and_goes_on_sigterm(daemon_):
    d = daemon_().wait_ready()
    assert d.master_pid() == d.proc.pid
    assert d.stop() == 0
    assert not os.path.exists(d.pidfile)


def test_detached_daemon_pid_file_and_sigterm(daemon_):
    d = daemon_(detach=True).wait_ready()
    assert d.proc.wait(10) == 0               # the foreground parent
    assert wait_for(lambda: os.path.exists(d.pidfile) and open(d.pidfile).read().endswith("\n"))
    pid = d.master_pid()
    assert pid != d.proc.pid and os.path.exists("/proc/%d" % pid)
    assert send(d.port) == {}
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not os.path.exists("/proc/%d" % pid) or
                    open("/proc/%d/stat" % pid).read().split()[2] == "Z", 20)
    assert not os.path.exists(d.pidfile)


@pytest.mark.parametrize("attempt", range(3))
def test_sigterm_the_moment_the_pid_file_appears_stops_the_master(daemon_, attempt):
    """An init script's start then stop: SIGTERM sent as soon as the pid
    file names the master, before it has set up its own handlers, must
    still stop it (python-daemon's signal map ignored it once)."""
    d = daemon_(detach=True)
    pid = pid_as_soon_as_written(d.pidfile)
    if attempt == 0:        # watch the window itself: SIGTERM never ignored
        never_ignores_sigterm(pid)
    os.kill(pid, signal.SIGTERM)
    assert d.proc.wait(20) == 0
    assert wait_for(lambda: gone(pid), 20), "the master ignored SIGTERM"


def listening_at_once(daemon_):
    """smtpd -D -F, returned the moment its port listens (before the
    master may have its handlers)."""
    d = daemon_()
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", d.port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.005)
    return d


@pytest.mark.parametrize("attempt", range(3))
def test_sigterm_the_moment_the_port_listens_is_a_clean_stop(daemon_, attempt):
    """In the foreground the port listens (and the title says master)
    before the master has its handlers: a SIGTERM then is a stop, exit
    0, never a death by the signal (CI caught -15)."""
    d = listening_at_once(daemon_)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(40) == 0, d.log()


@pytest.mark.parametrize("attempt", range(3))
def test_sighup_the_moment_the_port_listens_is_a_reload(daemon_, attempt):
    """The same window for SIGHUP (the certificate reload test saw the
    master die of it): the master lives, and reloads once it can."""
    d = listening_at_once(daemon_)
    d.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "SIGHUP: rules re-read" in d.log()), d.log()
    assert d.proc.poll() is None
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(40) == 0, d.log()


SIGNAL_AT_INSTALL = r"""
import os, signal, socket, sys
from smtpgate.gate import master
from smtpgate.gate.config import GateConfig
from smtpgate.gate.engine import in_process
from smtpgate.rules import ruleset

def install_then_signal(sig, handler):
    old = signal.signal(sig, handler)
    if sig in (signal.SIGHUP, signal.SIGTERM) and callable(handler):
        os.kill(os.getpid(), sig)       # runs the instant after the install
    return old

master.signal = type(signal)("signal")
master.signal.__dict__.update(signal.__dict__, signal=install_then_signal)
rules = ruleset.parse("allow:ALL:ALL:ALL\n")[0]
m = master.Master(GateConfig(myname="race.example", spooldir=sys.argv[1]),
                  in_process(rules), socket.socket(), rules, "", None)
print(m.hup, m.stopping)
"""


def test_a_signal_just_after_the_master_takes_it_over_is_kept(tmp_path):
    """The window the SIGHUP test above hits once in hundreds of CI runs,
    made certain: a SIGHUP or SIGTERM the instant the Master has installed
    its handler was overwritten by what the provisional handler saw."""
    out = subprocess.run([sys.executable, "-c", SIGNAL_AT_INSTALL, str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "True"], out.stderr


def test_stale_pid_file_is_replaced_and_second_instance_refused(daemon_, tree_factory):
    jail = make_jail()
    pidfile = jail + ".pid"
    dead = subprocess.Popen(["true"])
    dead.wait()
    with open(pidfile, "w") as f:
        f.write("%d\n" % dead.pid)
    tree = tree_factory(**TEST_CONSTANTS)
    d = Daemon(tree, jail).wait_ready()
    try:
        assert d.master_pid() == d.proc.pid
        second = Daemon(tree, jail, port=free_port())
        second.pidfile = pidfile
        assert second.proc.wait(20) == 1
        assert "already running as pid %d" % d.proc.pid in second.log()
    finally:
        assert d.stop() == 0


def test_fifty_concurrent_smtplib_clients(daemon_):
    d = daemon_().wait_ready()
    results = []

    def one(i):
        try:
            # different hosts: SMTPD_MAX_PER_IP is about one address
            results.append(send(d.port, "r%d@my.domain" % i, "127.0.1.%d" % (10 + i)))
        except Exception as e:          # noqa: BLE001 - recorded and asserted
            results.append(e)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [{}] * 50
    assert len(spool_files(d.jail)) == 50


def test_per_ip_cap(daemon_):
    d = daemon_(SMTPD_MAX_PER_IP=2).wait_ready()
    held = [d.connect("127.0.0.5") for _ in range(2)]
    for c in held:
        assert c.code() == 220
    third = d.connect("127.0.0.5")
    assert third.reply()[0] == 421
    assert third.closed()
    other = d.connect("127.0.0.6")
    assert other.code() == 220
    assert other.cmd("QUIT")[0] == 221
    held[0].cmd("QUIT")
    held[0].close()
    time.sleep(0.5)
    again = d.connect("127.0.0.5")
    assert again.code() == 220


def test_max_children_cap_holds_under_100_idle_connections(daemon_):
    """100 idle clients are held by the front stage, greeted, and take no
    worker: -M stays the bound of workers, and a client that sends mail
    meanwhile is served at once."""
    d = daemon_("allow:ALL:ALL:ALL\n", "-M", "5", READ_TIMEOUT=30).wait_ready()
    conns = []
    for i in range(100):
        s = socket.create_connection(("127.0.0.1", d.port), timeout=30,
                                     source_address=("127.0.%d.%d" % (1 + i // 200, 10 + i % 200), 0))
        conns.append(s)
    time.sleep(2)
    assert len(d.workers()) <= 5
    greeted = 0
    for s in conns:
        s.setblocking(False)
        try:
            if s.recv(100).startswith(b"220"):
                greeted += 1
        except BlockingIOError:
            pass
    assert greeted == 100
    assert send(d.port) == {}
    assert len(d.workers()) <= 5
    for s in conns:
        s.close()
    assert wait_for(lambda: send(d.port) == {}, 20)


def test_sighup_rereads_rules_and_keeps_them_when_broken(daemon_):
    d = daemon_("allow:ALL:ALL:ALL\n").wait_ready()
    assert send(d.port) == {}
    write_rules(d.jail, "noto:ALL:ALL:*@my.domain:550 no more\nallow:ALL:ALL:ALL\n")
    os.kill(d.master_pid(), signal.SIGHUP)
    assert wait_for(lambda: "rules re-read" in d.log())
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(d.port)
    write_rules(d.jail, "allow:ALL:ALL:ALL\nbroken line\n")
    os.kill(d.master_pid(), signal.SIGHUP)
    assert wait_for(lambda: "keeping the old rules" in d.log())
    assert "/etc/smtpd_check_rules:2: bad field count" in d.log()
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(d.port)
    assert send(d.port, "x@other.example") == {}


def test_invalid_rules_at_start_exit_78(tree_factory):
    jail = make_jail("allow:10/8:ALL:ALL\n")
    d = Daemon(tree_factory(**TEST_CONSTANTS), jail)
    assert d.proc.wait(20) == 78
    assert "/etc/smtpd_check_rules:1: bad IPv4 address or prefix '10/8'" in d.log()


def test_killed_worker_mid_data_is_replaced_and_leaves_no_message(daemon_):
    d = daemon_().wait_ready()
    c = d.connect()
    assert c.code() == 220
    assert c.cmd("HELO x")[0] == 250
    assert c.cmd("MAIL FROM:<a@b.example>")[0] == 250
    assert c.cmd("RCPT TO:<c@d.example>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send("Subject: doomed\r\n\r\nhalf")
    time.sleep(0.3)
    # the worker serving us is the one with an established TCP socket
    busy = [pid for pid in d.workers() if any(
        os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:")
        for fd in os.listdir("/proc/%d/fd" % pid) if int(fd) > 2)]
    victim = max(busy, key=lambda p: len(os.listdir("/proc/%d/fd" % p)))
    os.kill(victim, signal.SIGKILL)
    assert c.closed()
    assert wait_for(lambda: victim not in d.workers() and len(d.workers()) >= 4)
    assert spool_files(d.jail) == []
    assert send(d.port) == {}
    assert len(spool_files(d.jail)) == 1


@needs_root
def test_port_25_bound_as_root_served_unprivileged(daemon_):
    try:
        socket.create_connection(("127.0.0.1", 25), timeout=1).close()
        pytest.skip("something already listens on 127.0.0.1:25")
    except OSError:
        pass
    d = daemon_(port=25).wait_ready()
    assert send(25) == {}
    (name,) = spool_files(d.jail)
    import pwd
    assert os.stat(os.path.join(d.jail, name)).st_uid == pwd.getpwnam(NOBODY).pw_uid



def port_is_free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
            return True
        except OSError:
            return False


def test_master_killed_mid_session_frees_the_port_and_the_session_ends_well(daemon_):
    d = daemon_().wait_ready()
    c = d.connect()
    assert c.code() == 220
    assert c.cmd("HELO x")[0] == 250
    os.kill(d.master_pid(), signal.SIGKILL)
    d.proc.wait()
    # Workers share the listening socket; the parent-death signal makes them
    # let go of it, so a new master can bind while this session goes on.
    assert wait_for(lambda: port_is_free(d.port), 5)
    d2 = daemon_(port=d.port).wait_ready()
    assert send(d2.port) == {}
    assert len(spool_files(d2.jail)) == 1
    assert c.cmd("MAIL FROM:<a@b.example>")[0] == 250
    assert c.cmd("RCPT TO:<c@d.example>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    assert c.cmd("Subject: still here\r\n\r\nbody\r\n.")[0] == 250
    assert c.cmd("QUIT")[0] == 221
    assert len(spool_files(d.jail)) == 1


def test_the_workers_share_directory_fsyncs_under_load(daemon_):
    """Group commit (issue 27): ten clients at once, 200 messages; the
    master's last line counts the commits and the directory fsyncs; every
    message is there, and fewer fsyncs did it."""
    d = daemon_("allow:ALL:ALL:ALL\n", SMTPD_PREFORK=10).wait_ready()
    errors = []

    def client():
        try:
            for _ in range(20):
                send(d.port)
        except Exception as e:          # noqa: the assertion below shows it
            errors.append(e)
    threads = [threading.Thread(target=client) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(spool_files(d.jail)) == 200
    assert d.stop() == 0
    m = re.search(r"stopped: (\d+) messages committed with (\d+) fsyncs of the spool directory",
                  d.log())
    assert m, d.log()
    committed, fsyncs = int(m.group(1)), int(m.group(2))
    assert committed == 200 and 1 <= fsyncs < 200, (committed, fsyncs)
