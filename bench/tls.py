#!/usr/bin/env python3
"""bench/tls.py - STARTTLS: our smtpd against Postfix, same certificate, same client

SYNOPSIS
    bench/tls.py [-r runs] [-n messages]
DESCRIPTION
    For an RSA 2048 and an ECDSA P-256 certificate, starts our smtpd -D and
    a private Postfix (t/postfix.py: smtpd_tls_security_level = may, the
    same certificate, discard transports, every message fsync-ed into its
    queue), and drives both, interleaved, with bench/load.py -t at 10
    sessions x 10 KB, a new connection and a full handshake per message
    (and once with session resumption).  Reports msgs/s and the servers'
    CPU milliseconds per message (their whole process trees, from /proc),
    and the peak RSS of our workers.  Appends its table to
    bench/results.md.  A measurement, never a test.
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
import certs  # noqa: E402
import postfix  # noqa: E402
import run  # noqa: E402


def load(port, total, resume=False):
    argv = [sys.executable, os.path.join(HERE, "load.py"), "-s", "10", "-n", str(total),
            "-k", "10", "-t", "127.0.0.1:%d" % port] + (["-r"] if resume else [])
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return float(out.split()[0])


def start_postfix(base, port, cert, key):
    main = {"smtpd_tls_security_level": "may", "smtpd_tls_cert_file": cert,
            "smtpd_tls_key_file": key, "default_transport": "discard",
            "local_transport": "discard", "relay_transport": "discard", "mydestination": "",
            "smtpd_recipient_restrictions": "permit_mynetworks, reject",
            "smtpd_peername_lookup": "no", "default_process_limit": "100",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0", "maillog_file": ""}
    pf = postfix.PrivatePostfix(base, listen={port: "smtpd"}, main=main).start()
    run.wait_port(port)
    return pf


def master_pid(pf):
    return int(open(os.path.join(pf.queue, "pid", "master.pid")).read().split()[0])


def measure(name, pid, port, total, resume, results):
    c0 = ab.tree_cpu(pid)
    rate = load(port, total, resume)
    time.sleep(0.5)
    cpu = (ab.tree_cpu(pid) - c0) * 1000 / total
    results.setdefault(name, []).append((rate, cpu))


def main(argv):
    opts, _ = getopt.getopt(argv, "r:n:")
    o = dict(opts)
    runs, total = int(o.get("-r", 3)), int(o.get("-n", 600))
    work = tempfile.mkdtemp(prefix="smtpd-tls-bench-", dir="/tmp")
    os.chmod(work, 0o755)
    lines = []
    try:
        for kind, keyspec in (("RSA 2048", "rsa:2048"), ("ECDSA P-256", "ec")):
            d = os.path.join(work, kind.split()[0])
            os.makedirs(d)
            os.chmod(d, 0o755)
            os.makedirs(os.path.join(d, "certs"))
            cert, key = certs.make_pair(os.path.join(d, "certs"), key=keyspec)
            ours_work = os.path.join(d, "ours")
            os.makedirs(ours_work)
            os.chmod(ours_work, 0o755)
            ours, jail = ab.start(TOP, ours_work, 2621, "-C %s -K %s" % (cert, key), [])
            pf = start_postfix(os.path.join(d, "postfix"), 2622, cert, key)
            results = {}
            servers = [("ours", ours.pid, 2621), ("postfix", master_pid(pf), 2622)]
            try:
                for r in range(runs):
                    for name, pid, port in servers[::1 if r % 2 == 0 else -1]:   # interleaved
                        measure(name, pid, port, total, False, results)
                        run.park(jail)
                for name, pid, port in servers:
                    measure(name + " resumed", pid, port, total, True, results)
                rss = run.worker_rss(os.path.join(ours_work, "smtpd.pid"))
            finally:
                ours.terminate()
                ours.wait()
                pf.stop()
            for name in ("ours", "postfix", "ours resumed", "postfix resumed"):
                rates = [x[0] for x in results[name]]
                cpus = [x[1] for x in results[name]]
                lines.append("| %s | %s | %.0f ±%.0f | %.2f |" % (
                    kind, name, statistics.median(rates), (max(rates) - min(rates)) / 2,
                    statistics.median(cpus)))
            lines.append("| %s | our worker peak RSS | %.1f MB | |" % (kind, rss))
    finally:
        run.discard(work)
    text = ("\n## STARTTLS, 10 sessions x 10 KB, new connection per message\n\n"
            "bench/tls.py, %d runs, bench/load.py -t for both servers.\n\n"
            "| key | server | msgs/s | CPU ms/msg |\n|---|---|---:|---:|\n" % runs
            + "\n".join(lines) + "\n")
    print(text)
    with open(os.path.join(HERE, "results-tls.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
