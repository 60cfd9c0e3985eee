#!/usr/bin/env python3
"""bench/rules.py - load and evaluation time of a 2,000-line rules file

Generates a realistic rules file (IP, CIDR, globs, regex, EXCEPT; no DNS),
then reports the load time and the per-RCPT evaluation time (median, p99)
for recipients that match early, late and not at all.  Not a test.
Targets (issue 3): load <= 200 ms, evaluation <= 1 ms median.
"""

import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from smtpgate.rules import ruleset as engine  # noqa: E402

N = 2000


def generate(n, rnd):
    lines = ["# generated benchmark rules"]
    for i in range(n - 1):
        k = i % 6
        a, b = rnd.randrange(1, 224), rnd.randrange(256)
        if k == 0:
            lines.append("allow:%d.%d.0.0/16:ALL:ALL" % (a, b))
        elif k == 1:
            lines.append("noto:ALL:ALL:*@host%d.example.com:551 no relay to %%T" % i)
        elif k == 2:
            lines.append("deny:*.spam%d.example EXCEPT mail.spam%d.example:ALL:ALL" % (i, i))
        elif k == 3:
            lines.append("noto:ALL:/^[0-9]+@bulk%d\\./:ALL" % i)
        elif k == 4:
            lines.append("allow:%d.%d.%d.*:ALL:*@dom%d.example" % (a, b, rnd.randrange(256), i))
        else:
            lines.append("noto:%d.%d.%d.%d:user%d@*:ALL" % (a, b, 1, 2, i))
    lines.append("noto:ALL:ALL:ALL:550 default")
    return "\n".join(lines) + "\n"


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main():
    rnd = random.Random(1)
    text = generate(N, rnd)
    with tempfile.NamedTemporaryFile("w", suffix=".rules", delete=False) as f:
        f.write(text)
    loads = []
    for _ in range(10):
        t0 = time.perf_counter()
        rules, _ = engine.load(f.name)
        loads.append(time.perf_counter() - t0)
    os.unlink(f.name)
    client = engine.Client("203.0.113.77", "mx.customer.example")
    cases = {"late match (default)": "<bob@elsewhere.example>",
             "early match": "<x@host1.example.com>"}
    print("rules: %d lines" % len(rules))
    print("load: median %.1f ms, max %.1f ms" % (statistics.median(loads) * 1e3,
                                                 max(loads) * 1e3))
    for label, rcpt in cases.items():
        times = []
        for _ in range(300):
            t0 = time.perf_counter()
            engine.evaluate(rules, client, "<alice@example.org>", rcpt)
            times.append(time.perf_counter() - t0)
        print("evaluate, %s: median %.3f ms, p99 %.3f ms"
              % (label, statistics.median(times) * 1e3, pct(times, 0.99) * 1e3))


if __name__ == "__main__":
    main()
