#!/usr/bin/env python3
"""bench/verify.py - what recipient verification adds to a RCPT

SYNOPSIS
    bench/verify.py [-n rcpts]
DESCRIPTION
    Starts a private Postfix (t/postfix.py) whose smtpd on 127.0.0.1 is the
    backend, and our smtpd -D twice from this tree: one whose rule for the
    domain is "allow", one whose rule is "verify" with -V naming Postfix.
    One client session sends -n RCPTs to each (MAIL FROM again every 50,
    so no session limit is reached) and times every RCPT round trip: first
    all cached (the addresses were verified before), then cold (new
    addresses: one callout each).  Reports the medians and what verification
    adds to a RCPT: the target is below 0.1 ms for a cached answer.  A
    measurement, never a test.
"""

import getopt
import os
import socket
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(TOP, "t", "lib"))
import ab  # noqa: E402
import postfix  # noqa: E402
import run  # noqa: E402


def session(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    f = s.makefile("rb")

    def cmd(line):
        s.sendall(line + b"\r\n")
        while True:
            reply = f.readline()
            if reply[3:4] != b"-":
                return int(reply[:3])
    f.readline()
    cmd(b"EHLO bench.example")
    return s, cmd


def rcpt_times(port, addresses):
    """Seconds per RCPT round trip, each address in turn."""
    s, cmd = session(port)
    times = []
    for i, a in enumerate(addresses):
        if i % 50 == 0:
            cmd(b"RSET")
            cmd(b"MAIL FROM:<alice@example.org>")
        t0 = time.perf_counter()
        code = cmd(b"RCPT TO:<%s>" % a.encode())
        times.append(time.perf_counter() - t0)
        if code != 250:
            raise SystemExit("RCPT %s: %d (see the gate's smtpd.log)" % (a, code))
    cmd(b"QUIT")
    s.close()
    return times


def gate(work, name, port, rules, flags, makevars):
    d = os.path.join(work, name)
    os.makedirs(d)
    os.chmod(d, 0o755)
    proc, jail = ab.start(TOP, d, port, flags, makevars)
    proc.logdir = d
    with open(os.path.join(jail, "etc", "smtpd_check_rules"), "w") as f:
        f.write(rules)
    time.sleep(1.5)         # the rules watcher sees the new file
    return proc


def main(argv):
    opts, _ = getopt.getopt(argv, "n:")
    n = int(dict(opts).get("-n", 1000))
    users = ["u%d" % i for i in range(2 * n)]
    work = tempfile.mkdtemp(prefix="smtpd-verify-bench-", dir="/tmp")
    os.chmod(work, 0o755)
    procs = []
    try:
        pf = postfix.PrivatePostfix(os.path.join(work, "postfix"), users=users,
                                    listen={2651: "smtpd"},
                                    main={"smtpd_peername_lookup": "no",
                                          "maillog_file": ""}).start()
        run.wait_port(2651)
        makevars = ["SMTPD_VERIFY_MAX=100000", "MAX_RCPT=100000", "SMTPD_SOFT_ERRORS=1000"]
        allow = gate(work, "allow", 2652, "allow:ALL:ALL:*@localhost\n", "", makevars)
        check = gate(work, "verify", 2653, "verify:ALL:ALL:*@localhost\n",
                     "-V 127.0.0.1:2651", makevars)
        procs = [allow, check]
        warm = ["%s@localhost" % u for u in users[:n]]
        cold = ["%s@localhost" % u for u in users[n:]]
        rcpt_times(2653, warm)                          # fill the cache
        base = rcpt_times(2652, warm)
        cached = rcpt_times(2653, warm)
        fresh = rcpt_times(2653, cold)
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        try:
            pf.stop()
        except NameError:
            pass
        if os.environ.get("KEEP"):
            print("kept", work)
        else:
            run.discard(work)
    med = {k: statistics.median(v) * 1000 for k, v in
           (("allow", base), ("cached", cached), ("cold", fresh))}
    text = ("\n## Recipient verification, per RCPT (%d RCPTs, one session)\n\n"
            "bench/verify.py: round trip of a RCPT to our smtpd -D, medians.\n\n"
            "| rule | ms per RCPT | added by verification |\n|---|---:|---:|\n"
            "| allow | %.3f | |\n| verify, cached | %.3f | %.3f |\n"
            "| verify, cold (a callout to the local Postfix) | %.3f | %.3f |\n"
            "\nTarget: a cached answer adds less than 0.1 ms.\n"
            % (n, med["allow"], med["cached"], med["cached"] - med["allow"], med["cold"],
               med["cold"] - med["allow"]))
    print(text)
    with open(os.path.join(HERE, "results-verify.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
