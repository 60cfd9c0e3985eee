#!/usr/bin/env python3
"""bench/scrape.py - what a scrape of smtpd's /metrics costs

SYNOPSIS
    bench/scrape.py [-n scrapes] [-m messages] [SRC]
DESCRIPTION
    Builds smtpd from SRC (this checkout by default) with
    SMTPD_METRICS_LISTEN on 127.0.0.1:2615, starts it as smtpd -D -F -H -q
    (-M 64: a full table of rows), sends `messages` messages with
    smtp-source so the counters hold something, then scrapes /metrics
    `scrapes` times, one after another, and prints the median and 99th
    percentile time of a scrape as the client sees it (connect to last
    octet) and the metrics process's CPU per scrape (/proc).  The goal
    (issue 39): under 5 ms.  A measurement, never a test.
"""

import getopt
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402

PORT, METRICS = 2614, 2615
TICK = os.sysconf("SC_CLK_TCK")


def scrape():
    s = socket.create_connection(("127.0.0.1", METRICS))
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    s.close()
    return out


def cpu(pid):
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def metrics_pid(master):
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                comm = open("/proc/%s/comm" % d).read().strip()
                ppid = int(open("/proc/%s/stat" % d).read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if comm == "smtpd: metrics" and ppid == master:
                return int(d)
    return None


def main(argv):
    opts, args = getopt.getopt(argv, "n:m:")
    o = dict(opts)
    n, messages = int(o.get("-n", 2000)), int(o.get("-m", 2000))
    src = os.path.abspath(args[0] if args else os.path.join(HERE, ".."))
    work = tempfile.mkdtemp(prefix="bench-scrape-")
    p, jail, _ = run.start_gate(src, work, PORT, ["SMTPD_METRICS_LISTEN=127.0.0.1:%d" % METRICS,
                                                  "SMTPD_MAX_PER_IP=200"], ["-M", "64"])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if scrape().startswith(b"HTTP/1.1 200"):
                    break
            except OSError:
                time.sleep(0.2)
        subprocess.run(["/usr/sbin/smtp-source", "-s", "10", "-m", str(messages), "-l", "10240",
                        "-f", "alice@example.org", "-t", "bob@bench.example",
                        "127.0.0.1:%d" % PORT], check=True)
        pid = metrics_pid(p.pid)
        body = scrape()
        times = []
        before = cpu(pid)
        for _ in range(n):
            t0 = time.perf_counter()
            scrape()
            times.append(time.perf_counter() - t0)
        used = cpu(pid) - before
        times.sort()
        print("%d scrapes of %d octets (%d series) after %d messages:" % (
            n, len(body), body.count(b"\n") - body.count(b"\n#"), messages))
        print("  client: median %.2f ms, 99th percentile %.2f ms, worst %.2f ms" % (
            statistics.median(times) * 1e3, times[int(n * 0.99)] * 1e3, times[-1] * 1e3))
        print("  metrics process CPU: %.3f ms per scrape" % (used / n * 1e3))
    finally:
        p.terminate()
        p.wait()


if __name__ == "__main__":
    main(sys.argv[1:])
