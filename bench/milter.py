#!/usr/bin/env python3
"""bench/milter.py - what a mail filter costs us, and what it costs Postfix

SYNOPSIS
    bench/milter.py [-r rounds] [-n count]
DESCRIPTION
    The 10 sessions x 10 KB cell (a new connection per message, smtp-source)
    against our smtpd -D from this tree and a private Postfix (t/postfix.py,
    discard transports: every message queued with fsync, then dropped),
    each three ways: no filter, a no-op filter (bench/noop_milter.py:
    continue at every stage, every event answered) and a private rspamd's
    milter worker (t/rspamd.py); Postfix gets the same filters by
    smtpd_milters.  Ours once more with SMTPD_MILTER_KEEP_IDLE=0 and the
    no-op filter: a new filter connection each session, as Postfix.  The
    seven servers run side by side and are driven in turn, `rounds`
    times.  Reports msgs/s and the CPU milliseconds per
    message of the MTA's own processes (the filters' CPU is not counted),
    and the overhead of each filter: CPU per message with it minus without.
    The goal: our overhead at most Postfix's.  Writes
    bench/results-milter.md.  A measurement, never a test.
"""

import getopt
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(TOP, "t", "lib"))
import ab  # noqa: E402
import postfix  # noqa: E402
import rspamd  # noqa: E402
import run  # noqa: E402

NOOP_PORT = 2660
OURS = {"none": 2661, "noop": 2662, "rspamd": 2663, "noop-unkept": 2667}
POSTFIX = {"none": 2664, "noop": 2665, "rspamd": 2666}


def main(argv):
    opts, _ = getopt.getopt(argv, "r:n:")
    o = dict(opts)
    rounds, count = int(o.get("-r", 3)), int(o.get("-n", 1000))
    work = tempfile.mkdtemp(prefix="smtpd-milter-bench-", dir="/tmp")
    os.chmod(work, 0o755)
    procs, pf = [], None
    try:
        noop = subprocess.Popen([sys.executable, os.path.join(HERE, "noop_milter.py"),
                                 str(NOOP_PORT)], stdout=subprocess.PIPE)
        procs.append(noop)
        noop.stdout.readline()
        with rspamd.instance() as spamd:
            specs = {"none": "", "noop": "inet:127.0.0.1:%d" % NOOP_PORT,
                     "rspamd": "inet:127.0.0.1:%d" % spamd.milter}
            specs["noop-unkept"] = specs["noop"]
            ours = {}
            for name, port in OURS.items():
                d = os.path.join(work, "ours-" + name)
                os.makedirs(d)
                os.chmod(d, 0o755)
                flags = "-f " + specs[name] if specs[name] else ""
                ours[name] = ab.start(TOP, d, port, flags, ["SMTPD_MILTER_KEEP_IDLE=0"]
                                      if name.endswith("-unkept") else [])
                procs.append(ours[name][0])
            listen = {port: "smtpd" + (" -o smtpd_milters=" + specs[name] if specs[name] else "")
                      for name, port in POSTFIX.items()}
            pf = postfix.PrivatePostfix(os.path.join(work, "postfix"), listen=listen, main={
                "smtpd_peername_lookup": "no", "maillog_file": "", "mydestination": "",
                "default_transport": "discard", "local_transport": "discard",
                "relay_transport": "discard", "default_process_limit": "100",
                "smtpd_recipient_restrictions": "permit_mynetworks, reject",
                "milter_default_action": "tempfail"}).start()
            for port in POSTFIX.values():
                run.wait_port(port)
            master = int(open(os.path.join(pf.queue, "pid", "master.pid")).read())
            rates, cpu = {}, {}
            servers = [("ours", n) for n in OURS] + [("postfix", n) for n in POSTFIX]
            for r in range(rounds):
                k = r % len(servers)
                for srv in servers[k:] + servers[:k]:
                    who, name = srv
                    pid = ours[name][0].pid if who == "ours" else master
                    port = (OURS if who == "ours" else POSTFIX)[name]
                    c0 = ab.tree_cpu(pid)
                    rates.setdefault(srv, []).append(run.source(port, 10, 10240, count, False))
                    time.sleep(0.5)
                    cpu.setdefault(srv, []).append((ab.tree_cpu(pid) - c0) * 1000 / count)
                    if who == "ours":
                        run.park(ours[name][1])
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        if pf is not None:
            pf.stop()
        run.discard(work)
    report(rates, cpu, rounds, count)


def report(rates, cpu, rounds, count):
    med = {k: (statistics.median(v), statistics.median(cpu[k])) for k, v in rates.items()}
    lines = ["", "## Mail filters (milter): the 10 x 10 KB cell",
             "", "bench/milter.py: %d rounds of %d messages, 10 sessions, a new connection per "
             "message; CPU is the MTA's own (smtpd master and workers; Postfix's master, "
             "smtpd, cleanup...), not the filter's." % (rounds, count), "",
             "| server | filter | msgs/s | CPU ms/msg | filter overhead, CPU ms/msg |",
             "|---|---|---:|---:|---:|"]
    for who in ("ours", "postfix"):
        base = med[(who, "none")][1]
        for name in ("none", "noop", "rspamd", "noop-unkept"):
            if (who, name) not in med:
                continue
            rate, c = med[(who, name)]
            lines.append("| %s | %s | %.0f (%s) | %.2f | %s |" % (
                "smtpd (this tree)" if who == "ours" else "Postfix", name, rate,
                " ".join("%.0f" % x for x in rates[(who, name)]), c,
                "" if name == "none" else "%.2f" % (c - base)))
    over = {w: {n: med[(w, n)][1] - med[(w, "none")][1] for n in ("noop", "rspamd")}
            for w in ("ours", "postfix")}
    lines += ["", "Goal: our overhead per message at most Postfix's: no-op filter %.2f vs "
              "%.2f ms, rspamd %.2f vs %.2f ms." % (over["ours"]["noop"], over["postfix"]["noop"],
                                                    over["ours"]["rspamd"],
                                                    over["postfix"]["rspamd"]), ""]
    lines += ["noop-unkept: the no-op filter with SMTPD_MILTER_KEEP_IDLE=0, a new connection "
              "each session as Postfix does; noop and rspamd keep it between sessions.", ""]
    text = "\n".join(lines)
    print(text)
    path = os.path.join(HERE, "results-milter.md")
    try:        # the notes below the table (### sections) stay
        old = open(path).read()
        notes = old[old.index("\n### "):] if "\n### " in old else ""
    except OSError:
        notes = ""
    with open(path, "w") as f:
        f.write(text + notes)


if __name__ == "__main__":
    main(sys.argv[1:])
