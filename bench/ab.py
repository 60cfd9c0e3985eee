#!/usr/bin/env python3
"""bench/ab.py - two versions of smtpd side by side, interleaved

SYNOPSIS
    bench/ab.py [-r rounds] [-s sessions] [-k kb] [-n count]
                A_SRC B_SRC [A_FLAGS] [B_FLAGS]
DESCRIPTION
    Builds a tree from each source directory (a checkout, e.g. a
    `git worktree` of the base commit, and this one), starts both as
    smtpd -D -F -H -q on ports 2611 and 2612, and drives them alternately
    with smtp-source (new connection per message), `rounds` times.  Prints
    the median msgs/s and the CPU milliseconds per message of each server
    (master, workers and their exited children, from /proc).  A_FLAGS and
    B_FLAGS are extra smtpd flags as one string each; MAKEVARS in the
    environment ("NAME=value ...") goes to both trees' make, A_MAKEVARS and
    B_MAKEVARS to one.  A measurement, never a test.
"""

import getopt
import os
import shlex
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402  (bench/run.py: servers and measures)

TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid):
    """CPU seconds of pid, its live descendants and the children it reaped."""
    total, stack, seen = 0, [pid], set()
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                f = open("/proc/%s/stat" % d).read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            kids.setdefault(int(f[1]), []).append((int(d), f))
    own = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    total = sum(int(x) for x in own[11:15])
    while stack:
        p = stack.pop()
        for child, f in kids.get(p, []):
            if child not in seen:
                seen.add(child)
                total += sum(int(x) for x in f[11:15])
                stack.append(child)
    return total / TICK


def start(src, work, port, flags, makevars):
    p, jail, _ = run.start_gate(src, work, port,
                                ["SMTPD_MAX_PER_IP=200", "SMTPD_PREFORK=8"] + list(makevars),
                                ["-M", "64"] + shlex.split(flags))
    return p, jail


def main(argv):
    opts, args = getopt.getopt(argv, "r:s:k:n:")
    o = dict(opts)
    rounds, sessions = int(o.get("-r", 5)), int(o.get("-s", 10))
    kb, count = int(o.get("-k", 10)), int(o.get("-n", 1000))
    if len(args) not in (2, 3, 4):
        raise SystemExit(__doc__)
    srcs = args[:2]
    flags = (args[2:] + ["", ""])[:2]
    common = os.environ.get("MAKEVARS", "").split()
    makevars = [common + os.environ.get(k, "").split() for k in ("A_MAKEVARS", "B_MAKEVARS")]
    work = tempfile.mkdtemp(prefix="smtpd-ab-", dir="/tmp")
    os.chmod(work, 0o755)
    servers = []
    try:
        for i, name in enumerate("AB"):
            w = os.path.join(work, name)
            os.makedirs(w)
            os.chmod(w, 0o755)
            servers.append(start(srcs[i], w, 2611 + i, flags[i], makevars[i]) + (2611 + i,))
        rates, cpu = {"A": [], "B": []}, {"A": [], "B": []}
        for r in range(rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                p, jail, port = servers[i]
                c0 = tree_cpu(p.pid)
                rates["AB"[i]].append(run.source(port, sessions, kb * 1024, count, False))
                time.sleep(0.5)     # let the workers' last exits be reaped
                cpu["AB"[i]].append((tree_cpu(p.pid) - c0) * 1000 / count)
                run.park(jail)
        for name, src in zip("AB", srcs):
            print("%s %-40s %7.0f msgs/s (%s)  %.2f CPU ms/msg" % (
                name, src, statistics.median(rates[name]),
                " ".join("%.0f" % x for x in rates[name]), statistics.median(cpu[name])))
        print("B/A msgs/s %.3f" % (statistics.median(rates["B"]) / statistics.median(rates["A"])))
    finally:
        for p, _, _ in servers:
            p.terminate()
            p.wait()
        run.discard(work)


if __name__ == "__main__":
    main(sys.argv[1:])
