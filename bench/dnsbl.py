#!/usr/bin/env python3
"""bench/dnsbl.py - what scoring clients against DNS lists costs a connection

SYNOPSIS
    bench/dnsbl.py [-r rounds] [-n connections]
DESCRIPTION
    Connections per second (10 clients in parallel, each connection: read
    the greeting, QUIT, read 221) and the server's CPU per connection, for:
    our smtpd -D without lists; with three lists (SMTPD_DNSBL_SITES), each
    connection from a new address (uncached: three questions each) and from
    ten addresses over and over (cached); and Postfix's postscreen with the
    same three lists (postscreen_dnsbl_sites) in front of its smtpd, from new
    addresses and from addresses it has already passed (its cache).  Every
    list answers NXDOMAIN, from one fake DNS server (t/fixtures.py) on
    127.0.5.3:53; Postfix's resolver is pointed at it by a private mount
    namespace in which a resolv.conf of ours covers /etc/resolv.conf (the
    host's file is never touched).  The goal: a cached score costs under
    0.1 ms per connection (CPU with lists, cached, minus CPU without).
    Writes bench/results-dnsbl.md.  A measurement, never a test.
"""

import getopt
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(TOP, "t", "lib"))
import ab  # noqa: E402
import postfix  # noqa: E402
import run  # noqa: E402
from fixtures import DNSServer  # noqa: E402

DNS_ADDR = "127.0.5.3"
SITES = "bl.test=127.0.0.[2..11]*3 spam.test*2 wl.test=127.0.[0..255].[1..3]*-2"
PS_SITES = "bl.test=127.0.0.[2..11]*3, spam.test*2, wl.test=127.0.[0..255].[1..3]*-2"
PORTS = {"none": 2671, "lists": 2672, "postscreen": 2673}


class Addresses:
    """Source addresses: fresh ones (never used before) or ten, again and again."""

    def __init__(self):
        self.n, self.lock = 0, threading.Lock()

    def fresh(self):
        with self.lock:
            self.n += 1
            n = self.n
        return "127.%d.%d.%d" % (100 + n // 65000, n // 250 % 260 % 250 + 1, n % 250 + 1)


def connections(port, count, source, parallel=10):
    """count connections (greeting, QUIT) from source() addresses: per second."""
    left = [count]
    lock = threading.Lock()
    errors = []

    def client():
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=30,
                                              source_address=(source(), 0)) as s:
                    f = s.makefile("rb")
                    line = f.readline()
                    while line[3:4] == b"-":
                        line = f.readline()
                    if not line.startswith(b"220"):
                        errors.append(line)
                    s.sendall(b"QUIT\r\n")
                    f.readline()
            except OSError as e:
                errors.append(str(e))
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print("errors on %d: %d, e.g. %r" % (port, len(errors), errors[0]), file=sys.stderr)
    return count / (time.perf_counter() - t0)


class Postscreen(postfix.PrivatePostfix):
    """A private Postfix with postscreen on PORTS["postscreen"], its DNS
    questions sent to our fake server through a private mount namespace."""

    def write(self):
        super().write()
        with open(os.path.join(self.etc, "master.cf"), "a") as f:
            f.write("127.0.0.1:%d inet n - n - 1 postscreen\n" % PORTS["postscreen"])
            f.write("smtpd pass - - n - - smtpd\n")
            f.write("dnsblog unix - - n - 0 dnsblog\n")
        with open(os.path.join(self.base, "resolv.conf"), "w") as f:
            f.write("nameserver %s\noptions timeout:2 attempts:1\n" % DNS_ADDR)

    def postfix(self, prog, *args, check=True):
        if args[:1] != ("start",):
            return super().postfix(prog, *args, check=check)
        script = "mount --bind %s /etc/resolv.conf && exec %s -c %s start" % (
            os.path.join(self.base, "resolv.conf"), prog, self.etc)
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               script], check=check, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)


def main(argv):
    opts, _ = getopt.getopt(argv, "r:n:")
    o = dict(opts)
    rounds, count = int(o.get("-r", 3)), int(o.get("-n", 2000))
    work = tempfile.mkdtemp(prefix="smtpd-dnsbl-bench-", dir="/tmp")
    os.chmod(work, 0o755)
    dns = DNSServer(DNS_ADDR, 53)
    os.environ["SMTPD_NAMESERVER"] = "%s@53" % DNS_ADDR
    procs, pf = [], None
    rates, cpu = {}, {}
    try:
        ours = {}
        for name, extra in (("none", []), ("lists", ["SMTPD_DNSBL_SITES=" + SITES,
                                                     "SMTPD_DNSBL_THRESHOLD=3"])):
            d = os.path.join(work, "ours-" + name)
            os.makedirs(d)
            ours[name] = ab.start(TOP, d, PORTS[name], "", extra)
            procs.append(ours[name][0])
        pf = Postscreen(os.path.join(work, "postfix"), listen={}, main={
            "master_service_disable": "", "smtpd_peername_lookup": "no", "maillog_file": "",
            "postscreen_dnsbl_sites": PS_SITES, "postscreen_dnsbl_threshold": "3",
            "postscreen_greet_action": "ignore", "postscreen_dnsbl_action": "enforce",
            "postscreen_access_list": "", "default_process_limit": "100",
            "postscreen_dnsbl_ttl": "1h", "postscreen_cache_retention_time": "1d",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0"}).start()
        run.wait_port(PORTS["postscreen"])
        master = int(open(os.path.join(pf.queue, "pid", "master.pid")).read())
        ten = ["127.0.9.%d" % i for i in range(1, 11)]
        # warm the caches: the ten addresses, once, through each server
        for port in (PORTS["lists"], PORTS["postscreen"]):
            for a in ten:
                connections(port, 1, lambda a=a: a, parallel=1)
        time.sleep(1)
        fresh = Addresses()
        cells = [("ours", "none", PORTS["none"], ours["none"][0].pid, "ten"),
                 ("ours", "lists, cached", PORTS["lists"], ours["lists"][0].pid, "ten"),
                 ("ours", "lists, uncached", PORTS["lists"], ours["lists"][0].pid, "fresh"),
                 ("postscreen", "lists, cached", PORTS["postscreen"], master, "ten"),
                 ("postscreen", "lists, uncached", PORTS["postscreen"], master, "fresh")]
        for r in range(rounds):
            for who, what, port, pid, src in cells[r % 5:] + cells[:r % 5]:
                n = count if not (who == "postscreen" and src == "fresh") else max(100, count // 20)
                i = [0]

                def source():
                    if src == "fresh":
                        return fresh.fresh()
                    i[0] += 1
                    return ten[i[0] % 10]
                q0 = len(dns.queries)
                c0 = ab.tree_cpu(pid)
                rates.setdefault((who, what), []).append(connections(port, n, source))
                time.sleep(0.5)
                cpu.setdefault((who, what), []).append((ab.tree_cpu(pid) - c0) * 1000 / n)
                rates.setdefault((who, what, "q"), []).append((len(dns.queries) - q0) / n)
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        if pf is not None:
            pf.stop()
        dns.close()
        run.discard(work)
    report(rates, cpu, rounds, count)


def report(rates, cpu, rounds, count):
    lines = ["", "## DNS lists before the greeting", "",
             "bench/dnsbl.py: %d rounds; %d connections a cell (postscreen uncached: %d), 10 "
             "in parallel, each: greeting, QUIT; three lists answering NXDOMAIN from one fake "
             "DNS server; CPU is the server's own (ours: master and workers; Postfix: master, "
             "postscreen, dnsblog, smtpd), not the DNS server's." % (
                 rounds, count, max(100, count // 20)), "",
             "| server | lists | connections/s | CPU ms/connection | DNS questions/connection |",
             "|---|---|---:|---:|---:|"]
    med = {}
    for key, v in rates.items():
        if len(key) == 3:
            continue
        med[key] = (statistics.median(v), statistics.median(cpu[key]),
                    statistics.median(rates[key + ("q",)]))
        lines.append("| %s | %s | %.0f (%s) | %.3f | %.2f |" % (
            key[0], key[1], med[key][0], " ".join("%.0f" % x for x in v), med[key][1],
            med[key][2]))
    base = med[("ours", "none")][1]
    lines += ["", "Cost of a cached score, ours: %.3f ms of CPU per connection (goal: under "
              "0.1 ms); uncached: %.3f ms." % (med[("ours", "lists, cached")][1] - base,
                                               med[("ours", "lists, uncached")][1] - base)]
    text = "\n".join(lines) + "\n"
    print(text)
    open(os.path.join(HERE, "results-dnsbl.md"), "w").write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
