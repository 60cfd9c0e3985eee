#!/usr/bin/env python3
"""bench/store.py - what sharing state through Redis costs a connection

SYNOPSIS
    bench/store.py [-r rounds] [-n count]
DESCRIPTION
    The 10 sessions x 10 KB cell (smtp-source, a new connection per message)
    against four of our smtpd -D, side by side, driven in turn:
      rate, local    SMTPD_MAX_RATE on (high enough never to refuse)
      rate, Redis    the same, counted in a private redis-server (t/redisd.py)
      verify, local  a verify rule, every answer a hit of the sqlite cache
      verify, Redis  the same, every answer a hit of the Redis cache (signed)
    The verification backend (a small fake MTA here) is asked once, before
    the runs.  Reports msgs/s and CPU per message of each gate's processes;
    the cost of Redis is the difference with its local twin.  Goal: under
    0.2 ms per connection.  Writes bench/results-store.md.  A measurement,
    never a test.
"""

import getopt
import os
import shutil
import smtplib
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(TOP, "t", "lib"))
import ab  # noqa: E402
import redisd  # noqa: E402
import run  # noqa: E402
from test_shared_store import Backend  # noqa: E402

PORTS = {"rate, local": 2681, "rate, Redis": 2682, "verify, local": 2683, "verify, Redis": 2684}


def main(argv):
    opts, _ = getopt.getopt(argv, "r:n:")
    o = dict(opts)
    rounds, count = int(o.get("-r", 3)), int(o.get("-n", 1000))
    work = tempfile.mkdtemp(prefix="smtpd-store-bench-", dir="/tmp")
    os.chmod(work, 0o755)
    secret = os.path.join(work, "secret")
    with open(secret, "w") as f:
        f.write("key bench-signing-key-0123456789\npassword %s\n" % redisd.PASSWORD)
    os.chmod(secret, 0o600)
    r = redisd.RedisServer().start()
    backend = Backend(known="bob@my.domain")
    procs, gates = [], {}
    rates, cpu = {}, {}
    try:
        for name, port in PORTS.items():
            d = os.path.join(work, name.replace(", ", "-").lower())
            os.makedirs(d)
            make = ["SMTPD_MAX_RATE=100000"] if name.startswith("rate") else []
            if name.endswith("Redis"):
                make += ["SMTPD_SHARED_STORE=redis://127.0.0.1:%d/0" % r.port,
                         "SMTPD_SHARED_STORE_SECRETS=" + secret]
            if name == "verify, Redis":
                make.append("SMTPD_VERIFY_CACHE=")
            flags = "-V 127.0.0.1:%d" % backend.port if name.startswith("verify") else ""
            gates[name] = ab.start(TOP, d, port, flags, make)
            procs.append(gates[name][0])
            if name.startswith("verify"):
                jail = os.path.join(d, "jail")
                with open(os.path.join(jail, "etc", "smtpd_check_rules"), "w") as f:
                    f.write("verify:ALL:ALL:*@my.domain\nnoto:ALL:ALL:ALL:550 no\n")
        time.sleep(2.5)                 # the rules watchers read the verify rules
        for name, port in PORTS.items():               # warm: the one callout
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                c.sendmail("alice@example.org", ["bob@my.domain"], b"Subject: warm\r\n\r\nx\r\n")
        print("callouts before the runs: %d" % len(backend.rcpts), file=sys.stderr)
        cells = list(PORTS)
        for rnd in range(rounds):
            for name in cells[rnd % 4:] + cells[:rnd % 4]:
                pid = gates[name][0].pid
                c0 = ab.tree_cpu(pid)
                rates.setdefault(name, []).append(run.source(PORTS[name], 10, 10240, count,
                                                             False))
                time.sleep(0.5)
                cpu.setdefault(name, []).append((ab.tree_cpu(pid) - c0) * 1000 / count)
                run.park(gates[name][1])
        callouts = len(backend.rcpts)
        calls = per_call(r.port, secret)
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        backend.shutdown()
        r.close()
        run.discard(work)
    report(rates, cpu, rounds, count, callouts, calls)


def per_call(port, secret, n=5000):
    """CPU microseconds (this process) and wall microseconds per call: the
    rate limit and a verification cache hit, local and through Redis."""
    sys.path.insert(0, TOP)
    from smtpgate import store
    from smtpgate.gate import admission, verify
    import ipaddress
    redis = store.from_config("redis://127.0.0.1:%d/0" % port, secret, "bench:", 50)
    table = admission.RateTable(4096, 100000, 60)
    db = os.path.join(tempfile.mkdtemp(prefix="smtpd-store-db-"), "verify.db")
    local = verify.Cache(db)
    shared = store.VerifyCache(verify.Cache(""), redis)
    now = time.time()
    local.put("bob@my.domain", 250, now)
    shared.put("bob@my.domain", 250, now)
    key = admission.network_key(ipaddress.ip_address("192.0.2.1"))
    out = {}
    for name, fn in (("rate, local", lambda: table.attempt(key)),
                     ("rate, Redis", lambda: redis.rate(key, 100000, 60)),
                     ("verify hit, local", lambda: local.get("bob@my.domain", now)),
                     ("verify hit, Redis", lambda: shared.get("bob@my.domain", now))):
        assert fn() not in (None, (False, False)), name
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = ((time.process_time() - c0) * 1e6 / n, (time.perf_counter() - w0) * 1e6 / n)
    shutil.rmtree(os.path.dirname(db), ignore_errors=True)
    return out


def report(rates, cpu, rounds, count, callouts, calls):
    med = {k: (statistics.median(v), statistics.median(cpu[k])) for k, v in rates.items()}
    lines = ["", "## Shared state: local vs Redis", "",
             "bench/store.py: %d rounds of %d messages, 10 sessions x 10 KB, a new connection "
             "per message; CPU is the gate's own (master and workers), not Redis's.  The "
             "backend was asked %d times in all (every verification a cache hit)." % (
                 rounds, count, callouts), "",
             "| gate | msgs/s | CPU ms/msg |", "|---|---:|---:|"]
    for k in PORTS:
        lines.append("| %s | %.0f (%s) | %.3f |" % (k, med[k][0], " ".join(
            "%.0f" % x for x in rates[k]), med[k][1]))
    lines += ["", "Difference of the medians (noisy on this 2-core VM, where cells of the same "
              "tree differ by 0.5 ms between rounds): %.3f ms per connection for the rate "
              "limit, %.3f ms per verification cache hit." % (
                  med["rate, Redis"][1] - med["rate, local"][1],
                  med["verify, Redis"][1] - med["verify, local"][1]),
              "", "Per call, measured in one process (5000 calls each; CPU of the gate's side "
              "only, wall time including Redis's answer over loopback):", "",
              "| call | CPU us | wall us |", "|---|---:|---:|"]
    for k, (c, w) in calls.items():
        lines.append("| %s | %.1f | %.1f |" % (k, c, w))
    lines += ["", "Redis adds %.3f ms of CPU per connection for the rate limit and %.3f ms per "
              "verification cache hit (goal: under 0.2 ms)." % (
                  (calls["rate, Redis"][0] - calls["rate, local"][0]) / 1000,
                  (calls["verify hit, Redis"][0] - calls["verify hit, local"][0]) / 1000)]
    text = "\n".join(lines) + "\n"
    print(text)
    open(os.path.join(HERE, "results-store.md"), "w").write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
