#!/usr/bin/env python3
"""bench/maxuse.py - does a worker's memory stay flat over many sessions?

SYNOPSIS
    bench/maxuse.py [-n sessions]
DESCRIPTION
    One smtpd -D from this tree with SMTPD_MAX_USE above n and one worker
    (SMTPD_PREFORK=1, -M 1), fed n sessions of the target cell's kind
    (smtp-source, 10 KB, a new connection per message), in steps; after
    each step the worker's RSS (VmRSS) and peak (VmHWM).  The basis for
    SMTPD_MAX_USE's default.  Writes bench/results-maxuse.md.  A
    measurement, never a test.
"""

import getopt
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import ab  # noqa: E402
import run  # noqa: E402


def status(pid, field):
    for line in open("/proc/%d/status" % pid):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def worker_of(master):
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(open("/proc/%s/stat" % d).read().rsplit(")", 1)[1].split()[1]) == master \
                        and open("/proc/%s/comm" % d).read().strip() == "smtpd: worker":
                    return int(d)
            except OSError:
                continue
    return None


def main(argv):
    opts, _ = getopt.getopt(argv, "n:")
    n = int(dict(opts).get("-n", 10000))
    work = tempfile.mkdtemp(prefix="smtpd-maxuse-", dir="/tmp")
    os.chmod(work, 0o755)
    p, jail = ab.start(TOP, work, 2691, "-M 1", ["SMTPD_MAX_USE=%d" % (n + 1000),
                                               "SMTPD_PREFORK=1"])
    rows = []
    try:
        step, done = n // 10, 0
        run.source(2691, 1, 10240, 10, False)
        pid = worker_of(p.pid)
        rows.append((10, status(pid, "VmRSS"), status(pid, "VmHWM")))
        while done < n:
            run.source(2691, 4, 10240, step, False)
            done += step
            run.park(jail)
            assert worker_of(p.pid) == pid, "the worker was replaced"
            rows.append((done, status(pid, "VmRSS"), status(pid, "VmHWM")))
    finally:
        p.terminate()
        p.wait()
        run.discard(work)
    lines = ["", "## One worker over %d sessions (SMTPD_MAX_USE)" % n, "",
             "| sessions | RSS MB | peak RSS MB |", "|---:|---:|---:|"]
    lines += ["| %d | %.1f | %.1f |" % r for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    open(os.path.join(HERE, "results-maxuse.md"), "w").write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
