#!/usr/bin/env python3
"""bench/e2e.py - from the client to Postfix's mailboxes: the forwarder's paths

SYNOPSIS
    bench/e2e.py [-n messages] [-k kb] [-M processes]
DESCRIPTION
    One private Postfix 3.7 (t/lib/postfix.py: its own configuration, queue
    and mailboxes under a temporary directory, on loopback; root) with two
    listeners: its plain smtpd, and the re-injection listener of
    etc/postfix-master.cf.smtpfwdd.  Four ways of getting `messages`
    messages of `kb` KB into bob's mailbox, each timed from its start to
    the last message in the mailbox:
      postfix     smtp-source, 10 sessions, into Postfix's smtpd
      sendmail    smtpfwdd -M processes draining a spool of them into
                  Postfix's sendmail (the original's way)
      smtp        the same spool drained over smtp: (kept connections)
      gate        smtp-source, 10 sessions, into smtpd -D, and smtpfwdd
                  forwarding over smtp: as the mail comes
    Goals (issue 40): smtp >= 0.9 x postfix, gate >= 0.9 x postfix.
    Prints a Markdown table.  A measurement, never a test.
"""

import getopt
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(TOP, "t", "lib"))
sys.path.insert(0, TOP)
import run  # noqa: E402
from ab import tree_cpu  # noqa: E402
import postfix  # noqa: E402
from smtpgate import spool  # noqa: E402

PORTS = {"postfix": 2691, "reinject": 2692, "gate": 2693}


def listener():
    text = open(os.path.join(TOP, "etc", "postfix-master.cf.smtpfwdd")).read()
    entry = " ".join(l.strip() for l in text.splitlines() if l and not l.startswith("#"))
    return entry.split(None, 7)[7]


class Mailbox:
    """Counts the messages Postfix appended to a mailbox file, reading only
    what is new."""

    def __init__(self, path):
        self.path, self.offset, self.count, self.tail = path, 0, 0, b"\n"

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.count
        self.offset += len(data)
        text = self.tail + data
        self.count += text.count(b"\nFrom ")
        self.tail = text[-6:]
        return self.count

    def wait(self, target, timeout=1800):
        deadline = time.monotonic() + timeout
        while self.poll() < target:
            if time.monotonic() > deadline:
                raise SystemExit("only %d of %d messages arrived" % (self.count, target))
            time.sleep(0.05)


def spool_of(d, n, size):
    os.makedirs(d)
    body = b"Subject: e2e\n\n" + (b"x" * 76 + b"\n") * (size * 1024 // 77)
    for _ in range(n):
        with spool.Draft(d, b"<alice@example.org>", [b"<bob@localhost>"]) as dr:
            dr.write(b"Received: from client.example (client.example [127.0.0.1])\n"
                     b"\tby bench.example (smtpd) with ESMTP id %s;\n\t%s\n"
                     % (dr.name.encode(), time.strftime("%a, %d %b %Y %H:%M:%S +0000",
                                                       time.gmtime()).encode()))
            dr.write(body)
            dr.commit()
    for name in os.listdir(d):
        shutil.chown(os.path.join(d, name), "nobody")
    shutil.chown(d, "nobody")
    os.chmod(d, 0o700)


def forwarder(tree, spooldir, agent, procs):
    return subprocess.Popen([run.PY, os.path.join(tree, "smtpfwdd.py"), "-F", "-q", "-P", "1",
                             "-M", str(procs), "-d", spooldir, "-s", agent,
                             "-u", "nobody", "-g", "nogroup"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def source(port, n, kb):
    subprocess.run(["smtp-source", "-s", "10", "-l", str(kb * 1024), "-m", str(n),
                    "-f", "alice@example.org", "-t", "bob@localhost", "-M", "client.example",
                    "127.0.0.1:%d" % port], check=True, timeout=1800,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv):
    opts, _ = getopt.getopt(argv, "n:k:M:")
    o = dict(opts)
    n, kb, procs = int(o.get("-n", 600)), int(o.get("-k", 10)), int(o.get("-M", 10))
    if os.geteuid() != 0:
        raise SystemExit("bench/e2e.py: a private Postfix needs root")
    work = tempfile.mkdtemp(prefix="bench-e2e-", dir="/tmp")
    os.chmod(work, 0o755)
    # bob's mailbox grows past Postfix's 50 MB limit; nothing leaves the
    # host (a notification to a remote sender would be discarded, never looked up)
    pf = postfix.PrivatePostfix(os.path.join(work, "postfix"), users=["bob"], listen={
        PORTS["postfix"]: "smtpd", PORTS["reinject"]: listener()}, main={
        "mailbox_size_limit": "0", "default_transport": "discard",
        "relay_transport": "discard", "disable_dns_lookups": "yes"}).start()
    gate = None
    try:
        run.wait_port(PORTS["postfix"])
        run.wait_port(PORTS["reinject"])
        box = Mailbox(pf.mailbox_path("bob"))
        tree = os.path.join(work, "tree")
        rows = []

        master = int(open(os.path.join(pf.queue, "pid", "master.pid")).read())

        def timed(name, start, done):
            before = box.poll()
            cpu0 = {"postfix": tree_cpu(master), "gate": tree_cpu(gate.pid) if gate else 0}
            t0 = time.perf_counter()
            procs_ = start()
            box.wait(before + n)
            rate = n / (time.perf_counter() - t0)
            cpu = {"postfix": tree_cpu(master) - cpu0["postfix"],
                   "gate": (tree_cpu(gate.pid) - cpu0["gate"]) if gate and name == "gate" else 0,
                   "smtpfwdd": sum(tree_cpu(p.pid) for p in procs_
                                   if p.args and "smtpfwdd.py" in " ".join(p.args))}
            for p in procs_:
                p.terminate()
                p.wait()
            rows.append((name, rate, cpu))
            print("%-10s %7.1f msgs/s  CPU ms/msg: %s" % (name, rate, ", ".join(
                "%s %.2f" % (k, v * 1e3 / n) for k, v in cpu.items() if v)), flush=True)

        timed("postfix", lambda: source(PORTS["postfix"], n, kb) or [], None)
        d = os.path.join(work, "spool-sendmail")
        spool_of(d, n, kb)
        gate, jail, tree = run.start_gate(TOP, os.path.join(work, "gate"), PORTS["gate"],
                                          ["SMTPD_MAX_PER_IP=200"], ["-M", "64"])
        timed("sendmail", lambda: [forwarder(tree, d, pf.agent(), procs)], None)
        d = os.path.join(work, "spool-smtp")
        spool_of(d, n, kb)
        agent = "smtp:127.0.0.1:%d" % PORTS["reinject"]
        timed("smtp", lambda: [forwarder(tree, d, agent, procs)], None)

        def through_gate():
            f = forwarder(tree, jail, agent, procs)
            source(PORTS["gate"], n, kb)
            return [f]
        timed("gate", through_gate, None)
    finally:
        if gate is not None:
            gate.terminate()
            gate.wait()
        pf.stop()
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0][1]
    print()
    print("| path into Postfix's mailboxes (%d x %d KB, -M %d) | msgs/s | x Postfix alone "
          "| CPU ms/msg: Postfix, gate, smtpfwdd |" % (n, kb, procs))
    print("|---|---|---|---|")
    for name, rate, cpu in rows:
        print("| %s | %.0f | %.2f | %s |" % (name, rate, rate / base, " / ".join(
            "%.2f" % (cpu[k] * 1e3 / n) for k in ("postfix", "gate", "smtpfwdd"))))


if __name__ == "__main__":
    main(sys.argv[1:])
