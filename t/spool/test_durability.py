"""Crash durability: 500 messages through smtpd -D and smtpfwdd while a
killer SIGKILLs workers, the smtpd master and smtpfwdd (issue 9).

Every message that got a 250 must be delivered at least once and intact; a
message whose session died before its 250 may arrive too (the window every
MTA has between commit and reply) but never truncated or mixed; nothing is
left in the spool, no draft, nothing in failed/."""

import hashlib
import os
import random
import signal
import smtplib
import subprocess
import threading
import time

from harness import (Agent, children, free_port, is_root, make_jail, PYTHON, TEST_CONSTANTS,
                     wait_for)

CONSTANTS = dict(TEST_CONSTANTS, SESSION_TIMEOUT=4, RETRY_DELAY_TIME=1, READ_TIMEOUT=5,
                 SHUTDOWN_TIMEOUT=3, SMTPD_MAX_PER_IP=100)
N = 500


def body_of(i):
    """A message whose every byte is derived from its number."""
    lines = [b"Subject: msg-%04d" % i, b"X-Check: " + hashlib.sha1(b"%d" % i).hexdigest().encode(), b""]
    rnd = random.Random(i)
    for n in range(rnd.randrange(5, 60)):
        lines.append(b"%04d line %d " % (i, n) + b"x" * rnd.randrange(0, 200))
    return b"\r\n".join(lines) + b"\r\n"


class Cluster:
    def __init__(self, tree, jail, agent):
        self.tree, self.jail, self.agent = tree, jail, agent
        self.port = free_port()
        self.ids = ["-u", "nobody", "-g", "nogroup"] if is_root else []
        self.log = open(jail + ".log", "ab")
        self.smtpd = self.fwd = None
        self.start_smtpd()
        self.start_fwd()

    def start_smtpd(self):
        self.smtpd = subprocess.Popen(
            [PYTHON, os.path.join(self.tree, "smtpd.py"), "-D", "-F", "-H", "-q",
             "-c", self.jail, "-l", "127.0.0.1", "-p", str(self.port), "-m", "mx.test",
             "-i", self.jail + ".pid"] + self.ids, stdout=self.log, stderr=self.log)

    def start_fwd(self):
        self.fwd = subprocess.Popen(
            [PYTHON, os.path.join(self.tree, "smtpfwdd.py"), "-F", "-q", "-P", "1",
             "-d", self.jail, "-s", self.agent.path] + self.ids,
            stdout=self.log, stderr=self.log)

    def keep_alive(self):
        """Restart whatever died (smtpfwdd may refuse while its lock is held)."""
        if self.smtpd.poll() is not None:
            self.start_smtpd()
        if self.fwd.poll() is not None:
            self.start_fwd()

    def stop(self):
        for p in (self.smtpd, self.fwd):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = [p.wait(30) for p in (self.smtpd, self.fwd)]
        self.log.close()
        return codes


def killer(cl, stop, kills):
    rnd = random.Random(7)
    while not stop.is_set():
        time.sleep(rnd.uniform(0.1, 0.3))
        what = rnd.choices(["worker", "master", "smtpfwdd", "delivery"], [6, 1, 1, 1])[0]
        try:
            if what == "worker":
                pids = children(cl.smtpd.pid)
                if pids:
                    os.kill(rnd.choice(pids), signal.SIGKILL)
            elif what == "master":
                os.kill(cl.smtpd.pid, signal.SIGKILL)
                cl.smtpd.wait()
            elif what == "smtpfwdd":
                os.kill(cl.fwd.pid, signal.SIGKILL)
                cl.fwd.wait()
            else:
                pids = children(cl.fwd.pid)
                if pids:
                    os.kill(rnd.choice(pids), signal.SIGKILL)
            kills[what] = kills.get(what, 0) + 1
        except (ProcessLookupError, OSError):
            pass
        cl.keep_alive()


def sender(cl, queue, acked, failed):
    while queue:
        try:
            i = queue.pop()
        except IndexError:
            return
        try:
            with smtplib.SMTP("127.0.0.1", cl.port, timeout=10) as s:
                s.sendmail("load@test.example", ["rcpt%d@my.domain" % i], body_of(i))
            acked.add(i)
        except (OSError, smtplib.SMTPException):
            failed.add(i)
        time.sleep(0.2)             # spread the load over the killer's work


def test_nothing_acknowledged_is_lost_under_sigkill(tree_factory):
    tree = tree_factory(**CONSTANTS)
    jail = make_jail()
    agent = Agent()
    cl = Cluster(tree, jail, agent)
    assert wait_for(lambda: os.path.exists(jail + ".pid"), 20)
    time.sleep(0.5)
    queue, acked, failed, kills = list(range(N)), set(), set(), {}
    stop = threading.Event()
    k = threading.Thread(target=killer, args=(cl, stop, kills))
    k.start()
    senders = [threading.Thread(target=sender, args=(cl, queue, acked, failed))
               for _ in range(8)]
    t0 = time.time()
    for t in senders:
        t.start()
    for t in senders:
        t.join(120)
    stop.set()
    k.join()
    for _ in range(25):     # a new smtpfwdd may be refused while a killed one's
        cl.keep_alive()     # delivery processes still finish and hold the lock
        time.sleep(0.2)

    def settled():
        names = os.listdir(jail)
        return not any(n.startswith(("smtpd", "draft.")) for n in names)
    done = wait_for(settled, 40)
    codes = cl.stop()
    names = sorted(os.listdir(jail))

    delivered = {}
    for call in agent.calls():
        data = call["stdin"].encode("latin-1")
        head, _, rest = data.partition(b"\nSubject: ")
        i = int(rest[4:8])
        # never truncated, never mixed: the bytes after our Received header
        # are exactly the message that was sent
        assert b"Subject: " + rest == body_of(i).replace(b"\r\n", b"\n"), i
        assert call["argv"][-1] == "rcpt%d@my.domain" % i
        delivered[i] = delivered.get(i, 0) + 1
    lost = sorted(acked - set(delivered))
    print("\nsent %d, acknowledged %d, refused or cut %d, delivered %d distinct, "
          "%d duplicates; kills %s; %.1f s"
          % (N, len(acked), len(failed), len(delivered),
             sum(delivered.values()) - len(delivered), kills, time.time() - t0))
    assert lost == []
    assert set(delivered) <= acked | failed
    assert done, names
    assert "failed" not in names, names
    assert codes == [0, 0]
    assert sum(kills.values()) > 10
