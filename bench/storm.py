#!/usr/bin/env python3
"""bench/storm.py - ten thousand hostile connections and one real sender

SYNOPSIS
    bench/storm.py [-n hostile] [-d seconds] [-w ours|postfix|both]
DESCRIPTION
    Starts our smtpd -D -F -H with the Makefile's defaults (no override but
    the jail's rules) and, in the same run, a private Postfix 3.7 with
    postscreen in front of its smtpd, defaults too (its queue discards:
    what is accepted is dropped after its fsync).  Against each in turn:
      * `hostile` bots (10000), each from an address of its own /24 in
        127/8, in three kinds: idle after connect; slow drip (after the
        greeting, one octet every 5 s, never a line end); pregreet
        talkers (EHLO before the greeting).  A bot whose connection the
        server closes connects again a second later, so the count holds.
      * once they are connected, a legitimate client (127.0.0.1) sends one
        10 KB message a second for `seconds` (60), each on a new
        connection, and the time from connect to the 250 after the dot is
        measured (a try is failed after 30 s or at any 4xx/5xx).
    Reported per server: messages delivered, median and worst time to
    250, the bots held when the client starts, the gate's processes and
    their total PSS (shared pages counted once) at that moment and at the
    end, and what the pregreet talkers were told.  Writes
    bench/results-storm.md.  Root, for the private Postfix and to raise
    the open-file limit (the bots' sockets are this process's).  A
    measurement, never a test.
GOALS (issue 37)
    60/60 delivered, median <= 0.5 s, worst <= 3 s, with 10000 held;
    PSS <= 400 MB; processes <= SMTPD_MAXCHILDREN + a few.
"""

import collections
import getopt
import os
import resource
import selectors
import smtplib
import socket
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(TOP, "t", "lib"))
import postfix  # noqa: E402
import run  # noqa: E402

PORTS = {"ours": 2681, "postfix": 2682}
MESSAGE = ("Subject: storm\r\nFrom: alice@example.org\r\nTo: bob@my.domain\r\n\r\n"
           + ("x" * 78 + "\r\n") * 128)                 # 10 KB
RECONNECT = 1.0         # seconds before a bot whose connection ended connects again
CONNECTS_PER_TICK = 200
DRIP_EVERY = 5.0


def source(i):
    """The i-th bot's address: one per /24 of 127.10.0.0 - 127.59.255.0."""
    return "127.%d.%d.2" % (10 + i // 250, i % 250 + 1)


class Bot:
    __slots__ = ("i", "kind", "sock", "state", "at", "greeted", "said")

    def __init__(self, i, kind):
        self.i, self.kind, self.sock, self.state, self.at = i, kind, None, "down", 0.0
        self.greeted, self.said = False, b""


class Storm:
    """The bots, in one thread and one epoll loop."""

    def __init__(self, port, n):
        self.port = port
        self.bots = [Bot(i, ("idle", "drip", "pregreet")[i % 3]) for i in range(n)]
        self.sel = selectors.DefaultSelector()
        self.stop = threading.Event()
        self.told = collections.Counter()       # first three octets of what pregreeters got
        self.connects = 0
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def held(self):
        return sum(b.state == "up" for b in self.bots)

    def loop(self):
        down = collections.deque(self.bots)
        next_drip = time.monotonic() + DRIP_EVERY
        while not self.stop.is_set():
            now = time.monotonic()
            for _ in range(min(CONNECTS_PER_TICK, len(down))):
                if down[0].at > now:
                    break
                self.connect(down.popleft())
            for key, ev in self.sel.select(0.05):
                b = key.data
                if ev & selectors.EVENT_WRITE and b.state == "connecting":
                    self.connected(b)
                elif ev & selectors.EVENT_READ:
                    self.readable(b)
                if b.state == "down":
                    down.append(b)
            if now >= next_drip:
                next_drip = now + DRIP_EVERY
                for b in self.bots:
                    if b.state == "up" and b.kind == "drip" and b.greeted:
                        try:
                            b.sock.send(b"X")
                        except OSError:
                            self.lost(b)
                            down.append(b)
        for b in self.bots:
            if b.sock is not None:
                b.sock.close()

    def connect(self, b):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.bind((source(b.i), 0))
            s.connect_ex(("127.0.0.1", self.port))
        except OSError:
            s.close()
            b.at = time.monotonic() + RECONNECT
            return
        b.sock, b.state, b.greeted, b.said = s, "connecting", False, b""
        self.connects += 1
        self.sel.register(s, selectors.EVENT_WRITE | selectors.EVENT_READ, b)

    def connected(self, b):
        if b.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            return self.lost(b)
        b.state = "up"
        self.sel.modify(b.sock, selectors.EVENT_READ, b)
        if b.kind == "pregreet":
            try:
                b.sock.send(b"EHLO bot.example\r\n")
            except OSError:
                self.lost(b)

    def readable(self, b):
        if b.state == "connecting":
            return self.connected(b)
        try:
            data = b.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if b.kind == "pregreet":
                self.told[b.said[:3].decode("latin-1") or "(closed)"] += 1
            return self.lost(b)
        b.said += data[:64]
        if data.startswith(b"220"):
            b.greeted = True

    def lost(self, b):
        try:
            self.sel.unregister(b.sock)
        except (KeyError, ValueError):
            pass
        b.sock.close()
        b.sock, b.state, b.at = None, "down", time.monotonic() + RECONNECT


def legitimate(port, seconds):
    """One message a second for seconds: [time to 250 or None]."""
    times = []
    t0 = time.monotonic()
    for k in range(seconds):
        wait = t0 + k - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        start = time.monotonic()
        try:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example",
                              timeout=30, source_address=("127.0.0.1", 0)) as c:
                c.sendmail("alice@example.org", ["bob@my.domain"], MESSAGE)
            times.append(time.monotonic() - start)
        except (smtplib.SMTPException, OSError) as e:
            times.append(None)
            print("  message %d: %s" % (k + 1, e), file=sys.stderr)
    return times


def pss_of(pids):
    total = 0
    for pid in pids:
        try:
            for line in open("/proc/%d/smaps_rollup" % pid):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024.0


def descendants(pid):
    kids = collections.defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open("/proc/%s/stat" % d).read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids[ppid].append(int(d))
    out, stack = [pid], [pid]
    while stack:
        for k in kids.get(stack.pop(), []):
            out.append(k)
            stack.append(k)
    return out


# ---------------------------------------------------------------- servers ----

def start_ours(work):
    """Our gate with the Makefile's defaults (no settings file either)."""
    p, jail, _ = run.start_gate(TOP, work, PORTS["ours"],
                                ["SETTINGS_FILE=/nonexistent/smtpd.conf"])
    return p, jail


class Postscreen(postfix.PrivatePostfix):
    def write(self):
        super().write()
        with open(os.path.join(self.etc, "master.cf"), "a") as f:
            f.write("127.0.0.1:%d inet n - n - 1 postscreen\n" % PORTS["postfix"])
            f.write("smtpd pass - - n - - smtpd\n")
            f.write("dnsblog unix - - n - 0 dnsblog\n")
            f.write("tlsproxy unix - - n - 0 tlsproxy\n")


def start_postfix(work):
    pf = Postscreen(os.path.join(work, "postfix"), listen={}, main={
        "master_service_disable": "", "smtpd_peername_lookup": "no",
        "mydestination": "my.domain", "local_recipient_maps": "",
        "local_transport": "discard", "default_transport": "discard",
        "relay_transport": "discard", "maillog_file": ""}).start()
    run.wait_port(PORTS["postfix"])
    return pf, int(open(os.path.join(pf.queue, "pid", "master.pid")).read())


# ---------------------------------------------------------------- a round ----

def storm(name, port, master, n, seconds):
    s = Storm(port, n)
    s.thread.start()
    t0 = time.monotonic()
    while s.held() < 0.95 * n and time.monotonic() - t0 < 120:
        time.sleep(1)
    time.sleep(3)
    held, pids = s.held(), descendants(master)
    before = (pss_of(pids), len(pids))
    print("%s: %d bots held after %.0f s (%d connects); %d processes, PSS %.0f MB"
          % (name, held, time.monotonic() - t0, s.connects, before[1], before[0]))
    times = legitimate(port, seconds)
    pids = descendants(master)
    after = (pss_of(pids), len(pids))
    held_after = s.held()
    s.stop.set()
    s.thread.join()
    ok = [t for t in times if t is not None]
    row = dict(name=name, held=held, held_after=held_after, delivered=len(ok), tried=len(times),
               median=statistics.median(ok) if ok else None, worst=max(ok) if ok else None,
               before=before, after=after, told=dict(s.told), connects=s.connects)
    print("%s: %d/%d delivered, median %s, worst %s, PSS %.0f MB (%d processes) at the end"
          % (name, row["delivered"], row["tried"], secs(row["median"]), secs(row["worst"]),
             after[0], after[1]))
    return row


def secs(x):
    return "-" if x is None else "%.3f s" % x


def report(rows, n, seconds):
    lines = ["", "## Ten thousand hostile connections (issue 37)", "",
             "bench/storm.py: %d bots (a third each: idle after connect, a drip of one octet "
             "every 5 s after the greeting, EHLO before the greeting), each from a /24 of "
             "its own in 127/8 and connecting again a second after it is closed; meanwhile "
             "one client sends a 10 KB message a second for %d s, a new connection each. "
             "Both servers with their defaults (ours: SMTPD_MAXCHILDREN 64, no greeting "
             "pause; Postfix 3.7: postscreen with its defaults in front of smtpd, "
             "default_process_limit 100). PSS: all the server's processes, shared pages "
             "counted once." % (n, seconds), "",
             "| server | bots held | delivered | median to 250 | worst | processes | PSS at start "
             "of sending | PSS at end | what pregreet talkers got |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append("| %s | %d | %d/%d | %s | %s | %d | %.0f MB | %.0f MB | %s |" % (
            r["name"], r["held"], r["delivered"], r["tried"], secs(r["median"]),
            secs(r["worst"]), max(r["before"][1], r["after"][1]), r["before"][0],
            r["after"][0], ", ".join("%s x%d" % kv for kv in sorted(r["told"].items())) or "-"))
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(HERE, "results-storm.md"), "a") as f:
        f.write(text)


def main(argv):
    opts, _ = getopt.getopt(argv, "n:d:w:")
    o = dict(opts)
    n, seconds, who = int(o.get("-n", 10000)), int(o.get("-d", 60)), o.get("-w", "both")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 1024
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if hard < want:
            sys.exit("storm: the open-file limit is %d; %d bots need %d" % (hard, n, want))
    work = tempfile.mkdtemp(prefix="smtpd-storm-", dir="/tmp")
    os.chmod(work, 0o755)
    rows = []
    try:
        if who in ("ours", "both"):
            p, jail = start_ours(work)
            try:
                rows.append(storm("ours", PORTS["ours"], p.pid, n, seconds))
            finally:
                p.terminate()
                p.wait(60)
            print("  ours: log lines: %s" % summary(os.path.join(work, "smtpd.log")))
        if who in ("postfix", "both"):
            pf, master = start_postfix(work)
            try:
                rows.append(storm("Postfix + postscreen", PORTS["postfix"], master, n, seconds))
            finally:
                pf.stop()
    finally:
        run.discard(work)
    report(rows, n, seconds)


def summary(path):
    """How many lines of each kind the gate logged: their first two words
    after the process's name ("screen: pregreet:", "worker: relay=...")."""
    kinds = collections.Counter()
    with open(path, "rb") as f:
        for line in f:
            kinds[" ".join(line.decode("latin-1").split()[1:3])[:40]] += 1
    return ", ".join("%s x%d" % kv for kv in kinds.most_common(8))


if __name__ == "__main__":
    main(sys.argv[1:])
