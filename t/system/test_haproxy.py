"""Scale-out behind a real HAProxy (issue 17): two gates, each with its own
jail, spool and smtpfwdd, behind a private HAProxy that sends PROXY v2 or
v1 headers and checks their health; clients from several loopback
addresses; one gate killed in the middle of the load and drained."""

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from harness import (Agent, free_port, FWD_CONSTANTS, Fwd, give_to_nobody, make_jail, ROOT,
                     SmtpdDaemon, spool_files, TEST_CONSTANTS, wait_for)

pytestmark = pytest.mark.skipif(not shutil.which("haproxy"),
                                reason="needs haproxy (installed by .ci/run)")
RULES = "noto:127.0.0.66:ALL:ALL:550 not from %I\nallow:ALL:ALL:ALL\n"


class HAProxy:
    """A private haproxy: its own configuration and pid file under /tmp."""

    def __init__(self, ports, send_proxy):
        self.dir = tempfile.mkdtemp(prefix="haproxy-test-", dir="/tmp")
        self.port = free_port()
        self.cfg = os.path.join(self.dir, "haproxy.cfg")
        servers = "\n".join("    server gate%d 127.0.0.1:%d %s check check-send-proxy "
                            "inter 300ms fall 1 rise 1" % (i, p, send_proxy)
                            for i, p in enumerate(ports, 1))
        with open(self.cfg, "w") as f:
            f.write("""global
    pidfile %s/haproxy.pid
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend smtp
    bind 127.0.0.1:%d
    default_backend gates
backend gates
    balance source
    option smtpchk HELO haproxy.test
    source 127.0.0.1
%s
""" % (self.dir, self.port, servers))
        self.log = open(os.path.join(self.dir, "haproxy.log"), "wb")
        self.proc = subprocess.Popen(["haproxy", "-f", self.cfg, "-db"], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log)

    def text(self):
        return open(os.path.join(self.dir, "haproxy.log"), errors="replace").read()

    def close(self):
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Gate:
    """One smtpd -D (trusting HAProxy's 127.0.0.1) with its spool and smtpfwdd."""

    def __init__(self, tree, fwd_tree, agent, fwd_flags=()):
        self.jail = make_jail(RULES)
        self.smtpd = SmtpdDaemon(tree, self.jail, "-q", "-X", "127.0.0.1/32").wait_ready()
        self.fwd = Fwd(fwd_tree, self.jail, agent.path, *fwd_flags)

    def kill(self):
        """The whole gate dies at once: master, workers, smtpfwdd."""
        pids = [self.smtpd.master_pid()] + self.smtpd.workers() + self.smtpd.watcher()
        for pid in pids + [self.fwd.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.fwd.proc.wait()
        self.smtpd.proc.wait()

    def stop(self):
        for d in (self.smtpd, self.fwd):
            if d.proc.poll() is None:
                d.stop()


@pytest.fixture
def scaled_out(tree_factory):
    made = []

    def make(send_proxy, fwd_flags=(), **constants):
        tree = tree_factory(**dict(TEST_CONSTANTS, **constants))
        fwd_tree = tree_factory(**FWD_CONSTANTS)
        agent = Agent()
        gates = [Gate(tree, fwd_tree, agent, fwd_flags) for _ in range(2)]
        proxy = HAProxy([g.smtpd.port for g in gates], send_proxy)
        made.append((gates, proxy, agent))
        checked = 'HELO "haproxy.test"'     # its checks, answered by the front stage
        assert wait_for(lambda: all(checked in g.smtpd.log() for g in gates), 20), proxy.text()
        return gates, proxy, agent
    yield make
    for gates, proxy, agent in made:
        proxy.close()
        for g in gates:
            g.stop()
        shutil.rmtree(agent.dir, ignore_errors=True)


def send(port, source, subject, rcpt="bob@my.domain"):
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as s:
        return s.sendmail("alice@example.org", [rcpt],
                          ("Subject: %s\r\n\r\nbody of %s\r\n" % (subject, subject)).encode())


def delivered(agent):
    """Subject -> how many times the agent delivered it."""
    out = {}
    for call in agent.calls():
        m = re.search(r"^Subject: (\S+)$", call["stdin"], re.M)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


@pytest.mark.parametrize("send_proxy", ["send-proxy-v2", "send-proxy"])
def test_real_clients_through_haproxy(scaled_out, send_proxy):
    gates, proxy, agent = scaled_out(send_proxy)
    clients = ["127.0.0.%d" % n for n in range(21, 29)]
    for c in clients:
        assert send(proxy.port, c, "from-%s" % c) == {}
    with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
        send(proxy.port, "127.0.0.66", "denied")
    assert e.value.recipients["bob@my.domain"] == (550, b"5.7.1 not from 127.0.0.66")
    assert wait_for(lambda: len(delivered(agent)) == len(clients), 30)
    texts = {c["stdin"].split("Subject: ")[1].split("\n")[0]: c["stdin"] for c in agent.calls()}
    for c in clients:
        assert re.search(r"Received: from \S+ \(unknown \[%s\]\)" % re.escape(c),
                         texts["from-%s" % c]), texts["from-%s" % c][:200]
    logs = gates[0].smtpd.log() + gates[1].smtpd.log()
    for c in clients:
        assert "relay=UNKNOWN/%s as" % c in logs
    assert all(re.search(r'screen: (health check from 127\.0\.0\.1: |disconnect: '
                         r'UNKNOWN\(127\.0\.0\.1\) said )HELO "haproxy\.test"', g.smtpd.log())
               for g in gates)
    # Both gates took clients (source hashing spreads them).
    assert all(re.search(r"relay=UNKNOWN/127\.0\.0\.2\d as", g.smtpd.log()) for g in gates)


def test_per_address_count_is_per_real_client_behind_haproxy(scaled_out):
    gates, proxy, agent = scaled_out("send-proxy-v2", SMTPD_MAX_PER_IP=1)
    held = smtplib.SMTP("127.0.0.1", proxy.port, timeout=30, source_address=("127.0.0.41", 0))
    try:
        with pytest.raises(smtplib.SMTPConnectError) as e:
            smtplib.SMTP("127.0.0.1", proxy.port, timeout=30, source_address=("127.0.0.41", 0))
        assert e.value.smtp_code == 421
        assert send(proxy.port, "127.0.0.42", "other-client") == {}
    finally:
        held.quit()


def test_a_gate_dies_under_load_and_nothing_acknowledged_is_lost(scaled_out):
    # smtpfwdd scans only at start and when asked: the spools fill up.
    gates, proxy, agent = scaled_out("send-proxy-v2", fwd_flags=("-P", "1000"))
    acked, retried, failures = set(), set(), []
    lock = threading.Lock()
    progress = threading.Event()

    def client(n):
        for i in range(12):
            subject = "m%d-%d" % (n, i)
            for attempt in range(8):
                try:
                    send(proxy.port, "127.0.0.%d" % (50 + n), subject)
                    with lock:
                        acked.add(subject)
                        if len(acked) >= 20:
                            progress.set()
                    break
                except (smtplib.SMTPException, OSError) as e:
                    with lock:
                        retried.add(subject)
                    if attempt == 7:
                        failures.append((subject, repr(e)))
                    time.sleep(0.3)
    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    assert progress.wait(60)
    busy_before = [len(spool_files(g.jail)) for g in gates]
    gates[0].kill()
    for t in threads:
        t.join(120)
    assert failures == []
    assert wait_for(lambda: " is DOWN" in proxy.text())
    # Drain the dead gate: its complete spool files go to the live gate.
    dead, live = gates[0].jail, gates[1].jail
    moved = 0
    for name in spool_files(dead):
        path = os.path.join(dead, name)
        if os.stat(path).st_mode & 0o110 == 0o110:      # complete (0750/0755)
            os.rename(path, os.path.join(live, name))
            give_to_nobody(os.path.join(live, name))
            moved += 1
    assert moved > 0
    gates[1].fwd.proc.send_signal(signal.SIGUSR1)      # scan now
    assert wait_for(lambda: acked <= set(delivered(agent)), 60), (
        sorted(acked - set(delivered(agent))), moved)
    counts = delivered(agent)
    twice = {s for s, n in counts.items() if n > 1}
    assert twice <= retried, twice - retried        # only what a client sent again
    assert all(busy_before), busy_before      # both gates had taken mail
    both = [re.search(r"relay=UNKNOWN/127\.0\.0\.5\d as", g.smtpd.log()) for g in gates]
    assert all(both)


# -- the example of etc/ (issue 22, item 5) --

def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def example_config(port, gate_ports, piddir):
    """etc/haproxy.cfg with test addresses, logging to its standard error."""
    text = open(os.path.join(ROOT, "etc", "haproxy.cfg")).read()
    text = text.replace("    log /dev/log local0\n", "    pidfile %s/haproxy.pid\n"
                        "    log stdout format raw local0\n" % piddir)
    text = text.replace("bind :25", "bind 127.0.0.1:%d" % port)
    for i, p in enumerate(gate_ports, 1):
        text = text.replace("192.0.2.1%d:25" % i, "127.0.0.1:%d" % p)
    text = text.replace("inter 10s fastinter 2s", "inter 1s fastinter 200ms")
    return text


def test_the_example_loses_no_client_to_a_dead_gate_and_checks_log_at_debug(tree_factory):
    tree = tree_factory(**TEST_CONSTANTS)
    agent = Agent()
    gates = [Gate(tree, tree_factory(**FWD_CONSTANTS), agent) for _ in range(2)]
    piddir = tempfile.mkdtemp(prefix="haproxy-example-", dir="/tmp")
    port = free_port()
    cfg = os.path.join(piddir, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(example_config(port, [g.smtpd.port for g in gates], piddir))
    log = open(os.path.join(piddir, "log"), "wb")
    hp = subprocess.Popen(["haproxy", "-f", cfg, "-db"], stdin=subprocess.DEVNULL,
                          stdout=log, stderr=log)
    try:
        checked = '(debug) screen: health check from 127.0.0.1: HELO "haproxy.example.org"'
        assert wait_for(lambda: all(checked in g.smtpd.log() for g in gates), 20)
        assert not any('haproxy.example.org' in l and "(debug)" not in l
                       for g in gates for l in g.smtpd.log().splitlines())
        gates[0].kill()
        dead = gates[0].smtpd.port
        assert wait_for(lambda: refused(dead), 5)     # its last worker has exited
        for n in range(12):        # at once: before any check has marked it down
            assert send(port, "127.0.0.%d" % (70 + n), "after-%d" % n) == {}
        # HAProxy's log: some went to the dead gate first, then elsewhere ("+1").
        assert re.search(r" smtp gates/gate2 \S+ \d+ -- \S+/\+\d+ ",
                         open(os.path.join(piddir, "log")).read())
    finally:
        hp.terminate()
        hp.wait(20)
        log.close()
        for g in gates:
            g.stop()
        shutil.rmtree(piddir, ignore_errors=True)
        shutil.rmtree(agent.dir, ignore_errors=True)


def test_health_checks_are_never_counted_scored_or_logged(scaled_out, dnsz):
    """Issue 35, item 2: with a rate limit below the check rate, the
    balancer's health checks (PROXY LOCAL) never count against it -- nor
    against the cap, the DNS lists or mail.info -- and the gates stay up."""
    dnsz.add("*.bl.test", "A", "127.0.0.2")             # every client listed: none may be
    gates, proxy, agent = scaled_out("send-proxy-v2", SMTPD_MAX_RATE=2, SMTPD_MAX_PER_IP=1,
                                     SMTPD_DNSBL_SITES="nothing.test")
    time.sleep(2.5)                                     # about eight checks a gate
    assert "no server available" not in proxy.text() and " is DOWN" not in proxy.text()
    assert send(proxy.port, "127.0.0.21", "after-checks") == {}
    assert wait_for(lambda: delivered(agent).get("after-checks") == 1, 30)
    for g in gates:
        lines = g.smtpd.log().splitlines()
        checks = [l for l in lines if "haproxy.test" in l]
        assert len(checks) >= 4, lines
        loud = [l for l in lines if l.startswith("smtpd[") and "(debug)" not in l
                and "127.0.0.21" not in l and not re.search(
                    r"ready to accept connections|front stage ready|open-file limit", l)]
        assert loud == [], loud
    assert not [q for q in dnsz.queries if q[0].endswith("nothing.test.")
                and q[0].startswith("1.0.0.127.")]
