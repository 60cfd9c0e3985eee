#!/usr/bin/env python3
"""bench/scaleout.py - two gates behind HAProxy against one gate directly

SYNOPSIS
    bench/scaleout.py [-r runs] [-n messages]
DESCRIPTION
    Starts three smtpd -D gates from this tree: one alone, two behind a
    private HAProxy (send-proxy-v2, health checks; the gates trust it with
    -X), and drives both set-ups with smtp-source at 10 sessions x 10 KB, a
    new connection per message, interleaved.  Reports msgs/s and the CPU
    milliseconds per message of the gates and of HAProxy (from /proc): the
    price of the proxy hop.  This machine has two cores, so two gates
    cannot be faster than one.  A measurement, never a test.
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
import ab  # noqa: E402
import run  # noqa: E402

HAPROXY = """global
    pidfile %(dir)s/haproxy.pid
    maxconn 2000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend smtp
    bind 127.0.0.1:%(port)d
    default_backend gates
backend gates
    balance roundrobin
    option smtpchk HELO haproxy.bench
    server g1 127.0.0.1:%(g1)d send-proxy-v2 check check-send-proxy inter 5s
    server g2 127.0.0.1:%(g2)d send-proxy-v2 check check-send-proxy inter 5s
"""


def gate(work, name, port, flags):
    d = os.path.join(work, name)
    os.makedirs(d)
    os.chmod(d, 0o755)
    return ab.start(TOP, d, port, flags, [])


def main(argv):
    opts, _ = getopt.getopt(argv, "r:n:")
    o = dict(opts)
    runs, count = int(o.get("-r", 3)), int(o.get("-n", 1000))
    work = tempfile.mkdtemp(prefix="smtpd-scale-bench-", dir="/tmp")
    os.chmod(work, 0o755)
    procs = []
    try:
        alone = gate(work, "alone", 2641, "")
        g1 = gate(work, "g1", 2642, "-X 127.0.0.1/32")
        g2 = gate(work, "g2", 2643, "-X 127.0.0.1/32")
        procs = [alone[0], g1[0], g2[0]]
        with open(os.path.join(work, "haproxy.cfg"), "w") as f:
            f.write(HAPROXY % {"dir": work, "port": 2640, "g1": 2642, "g2": 2643})
        hap = subprocess.Popen(["haproxy", "-f", os.path.join(work, "haproxy.cfg"), "-db"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(hap)
        run.wait_port(2640)
        time.sleep(1)
        setups = {"one gate, direct": (2641, [alone[0].pid]),
                  "two gates behind HAProxy": (2640, [g1[0].pid, g2[0].pid, hap.pid])}
        results = {}
        for r in range(runs):
            for name in list(setups)[::1 if r % 2 == 0 else -1]:
                port, pids = setups[name]
                c0 = [ab.tree_cpu(p) for p in pids]
                rate = run.source(port, 10, 10 * 1024, count, False)
                time.sleep(0.5)
                cpus = [(ab.tree_cpu(p) - c) * 1000 / count for p, c in zip(pids, c0)]
                results.setdefault(name, []).append((rate, sum(cpus), cpus[-1]))
                for j in (alone[1], g1[1], g2[1]):
                    run.park(j)
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        run.discard(work)
    lines = []
    for name, rows in results.items():
        rates, cpus = [x[0] for x in rows], [x[1] for x in rows]
        hap = statistics.median([x[2] for x in rows]) if "HAProxy" in name else None
        lines.append("| %s | %.0f ±%.0f | %.2f | %s |" % (
            name, statistics.median(rates), (max(rates) - min(rates)) / 2,
            statistics.median(cpus), "%.2f" % hap if hap is not None else ""))
    cpu = {n: statistics.median([x[1] for x in rows]) for n, rows in results.items()}
    text = ("\n## Scale-out: two gates behind HAProxy, 10 sessions x 10 KB\n\n"
            "bench/scaleout.py, %d runs, smtp-source.\n\n| set-up | msgs/s | CPU ms/msg, "
            "all | of it HAProxy |\n|---|---:|---:|---:|\n" % runs + "\n".join(lines)
            + "\n\nThe proxy hop costs %.2f ms of CPU per message in all.\n"
            % (cpu["two gates behind HAProxy"] - cpu["one gate, direct"]))
    print(text)
    with open(os.path.join(HERE, "results-scaleout.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
