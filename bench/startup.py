#!/usr/bin/env python3
"""bench/startup.py - how long smtpd -D takes from exec to its first greeting

SYNOPSIS
    bench/startup.py [-n runs] [tree]
DESCRIPTION
    Starts `smtpd.py -D -F -H` from tree (default: this checkout) on
    127.0.0.1:2698 with a one-line rules file, n times, and measures from
    the exec to the first 220 a client reads; prints the median and the
    maximum.  After a crash this is how long mail is refused.  Target:
    under 0.2 s.  bench/run.py includes it in bench/results.md.  A
    measurement, never a test.
"""

import getopt
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
PY = os.path.join(TOP, ".venv", "bin", "python")
PORT = 2698


def first_greeting(tree, jail, pidfile):
    ids = ["-u", "nobody", "-g", "nogroup"] if os.geteuid() == 0 else []
    t0 = time.perf_counter()
    p = subprocess.Popen([PY, os.path.join(tree, "smtpd.py"), "-D", "-F", "-H", "-c", jail,
                          "-l", "127.0.0.1", "-p", str(PORT), "-i", pidfile] + ids,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with socket.create_connection(("127.0.0.1", PORT), timeout=5) as s:
                    if s.recv(100).startswith(b"220"):
                        return time.perf_counter() - t0
            except OSError:
                if p.poll() is not None:
                    raise RuntimeError("smtpd exited %s" % p.returncode) from None
                time.sleep(0.002)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)


def measure(tree=TOP, n=5):
    """(median, max) seconds from exec to the first greeting, byte-compiled
    as make install leaves it."""
    subprocess.run([PY, "-m", "compileall", "-q", tree], stdout=subprocess.DEVNULL,
                   env=dict(os.environ, PYTHONDONTWRITEBYTECODE=""))
    work = tempfile.mkdtemp(prefix="smtpd-startup-", dir="/tmp")
    try:
        jail = os.path.join(work, "jail")
        os.makedirs(os.path.join(jail, "etc"))
        with open(os.path.join(jail, "etc", "smtpd_check_rules"), "w") as f:
            f.write("allow:ALL:ALL:ALL\n")
        if os.geteuid() == 0:
            shutil.chown(jail, "nobody")
        os.chmod(work, 0o755)
        times = [first_greeting(tree, jail, os.path.join(work, "smtpd.pid")) for _ in range(n)]
        return statistics.median(times), max(times)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv):
    opts, args = getopt.getopt(argv, "n:")
    n = int(dict(opts).get("-n", 5))
    med, top = measure(args[0] if args else TOP, n)
    print("smtpd -D start to first greeting: median %.0f ms, max %.0f ms (%d runs)"
          % (med * 1000, top * 1000, n))


if __name__ == "__main__":
    main(sys.argv[1:])
