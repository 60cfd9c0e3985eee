#!/usr/bin/env python3
"""bench/run.py - smtpd against Postfix and aiosmtpd, and smtpfwdd's drain rate

Run by `make bench` (never by `make test`).  In one run it:
  * installs what it needs (Debian's postfix for smtpd and smtp-source, and
    aiosmtpd in bench/.venv) unless already there;
  * starts our `smtpd.py -D -F -H` (fsync on, a few realistic rules), a
    second Postfix instance "postfix-bench" (loopback only, discard
    transports: every message queued with fsync, then dropped) and aiosmtpd
    with a handler that writes and fsyncs each message and its directory;
  * drives each with smtp-source at 1, 10 and 50 sessions x 1, 10, 100 KB,
    a new connection per message and reused connections (-d), the servers
    interleaved, RUNS times; reports the median and spread of msgs/s;
  * measures smtpfwdd draining 2,000 messages into an agent that reads stdin
    and exits 0, the peak RSS of a worker, inetd-mode connect-to-greeting
    time, smtpd -D's start to its first greeting (bench/startup.py), and
    the disk's fsync rate (the bound of any durable server);
  * prints one table and writes bench/results.md.
Environment: RUNS (default 3), QUICK=1 (only the 10 x 10 KB cells).
"""

import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, TOP)
sys.path.insert(0, HERE)
from smtpgate import spool  # noqa: E402
import startup  # noqa: E402  (bench/startup.py)

PY = os.path.join(TOP, ".venv", "bin", "python")
BENCH_VENV = os.path.join(HERE, ".venv")
RUNS = int(os.environ.get("RUNS", "3"))
PORTS = {"smtpd": 2601, "postfix": 2602, "aiosmtpd": 2603}
ROOT = os.geteuid() == 0
RULES = """# a few realistic lines
allow:127.0.0.0/8 [::1]:ALL:ALL
noto:ALL:ALL:*%*@* *!*@* *@*@*:551 no routing tricks
allow:ALL:ALL:*@my.domain *@*.my.domain
noto:ALL:ALL:ALL:551 no relaying to %T
"""
AIOSMTPD = r'''
import asyncio, os, sys, itertools
from aiosmtpd.controller import Controller
d, port = sys.argv[1], int(sys.argv[2])
n = itertools.count()
class FsyncHandler:
    async def handle_DATA(self, server, session, envelope):
        path = os.path.join(d, "msg%d-%d" % (os.getpid(), next(n)))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, envelope.original_content or envelope.content)
        os.fsync(fd)
        os.close(fd)
        dfd = os.open(d, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        return "250 Message accepted for delivery"
c = Controller(FsyncHandler(), hostname="127.0.0.1", port=port)
c.start()
print("ready", flush=True)
try:
    asyncio.get_event_loop().run_forever()
except KeyboardInterrupt:
    pass
'''


def sh(*argv, **kw):
    return subprocess.run(argv, check=True, **kw)


def ensure_tools():
    if not shutil.which("smtp-source") or not shutil.which("postmulti"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        sh("sh", "-c", "echo 'postfix postfix/main_mailer_type select Local only' "
           "| debconf-set-selections", env=env)
        sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", "postfix",
           env=env, stdin=subprocess.DEVNULL)
    if not os.path.exists(os.path.join(BENCH_VENV, "bin", "python")):
        sh(sys.executable, "-m", "venv", BENCH_VENV)
        sh(os.path.join(BENCH_VENV, "bin", "pip"), "install", "-q", "aiosmtpd==1.4.6")


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("nothing listens on port %d" % port)


# ---------------------------------------------------------------- servers ----

def start_ours(work):
    # One client address drives every session, so lift the per-address cap.
    return start_gate(TOP, work, PORTS["smtpd"], ["SMTPD_MAX_PER_IP=200", "SMTPD_PREFORK=8"],
                      ["-M", "64"])


def start_gate(src, work, port, makevars=(), flags=()):
    """smtpd -D -F -H -q built from the checkout src (flat, before the
    package, or not) with these Makefile variables, jailed in work/jail,
    listening on 127.0.0.1:port -> (Popen, jail, tree)."""
    tree = os.path.join(work, "tree")
    os.makedirs(tree)
    for f in os.listdir(src):
        if f.endswith(".py") and f != "buildconf.py" or f == "Makefile":
            shutil.copy(os.path.join(src, f), tree)
    if os.path.isdir(os.path.join(src, "smtpgate")):
        shutil.copytree(os.path.join(src, "smtpgate"), os.path.join(tree, "smtpgate"),
                        ignore=shutil.ignore_patterns("__pycache__"))
    sh("make", "-s", "-C", tree, "buildconf.py", *makevars, stdout=subprocess.DEVNULL)
    compiled(tree)
    jail = os.path.join(work, "jail")
    os.makedirs(os.path.join(jail, "etc"))
    open(os.path.join(jail, "etc", "smtpd_check_rules"), "w").write(RULES)
    ids = []
    if ROOT:
        shutil.chown(jail, "nobody")
        ids = ["-u", "nobody", "-g", "nogroup"]
    os.chmod(jail, 0o700)
    log = open(os.path.join(work, "smtpd.log"), "wb")
    p = subprocess.Popen([PY, os.path.join(tree, "smtpd.py"), "-D", "-F", "-H", "-q",
                          "-c", jail, "-l", "127.0.0.1", "-p", str(port),
                          "-m", "bench.example", "-i", os.path.join(work, "smtpd.pid")]
                         + ids + list(flags), stdout=log, stderr=log)
    wait_port(port)
    return p, jail, tree


def compiled(tree):
    """Byte-compile a tree, as make install does: a start (an inetd session
    above all) must not be measured compiling (PYTHONDONTWRITEBYTECODE may
    be set where the benchmark runs)."""
    sh(PY, "-m", "compileall", "-q", tree, stdout=subprocess.DEVNULL,
       env=dict(os.environ, PYTHONDONTWRITEBYTECODE=""))


def start_postfix():
    inst = "postfix-bench"
    if subprocess.run(["postmulti", "-l"], capture_output=True, text=True).stdout.find(inst) < 0:
        sh("postmulti", "-e", "init")
        sh("postmulti", "-I", inst, "-e", "create")
    pc = ["postmulti", "-i", inst, "-x", "postconf"]
    sh(*pc, "-e", "master_service_disable =", "multi_instance_enable = yes",
       "inet_interfaces = 127.0.0.1", "inet_protocols = ipv4",
       "mynetworks = 127.0.0.0/8", "mydestination =", "relay_domains =",
       "default_transport = discard", "local_transport = discard",
       "relay_transport = discard", "smtpd_recipient_restrictions = permit_mynetworks, reject",
       "default_process_limit = 100", "smtpd_client_connection_count_limit = 0",
       "smtpd_client_connection_rate_limit = 0", "anvil_rate_time_unit = 60s")
    sh(*pc, "-M#", "smtp/inet")
    sh(*pc, "-M", "127.0.0.1:%d/inet=127.0.0.1:%d inet n - y - - smtpd"
       % (PORTS["postfix"], PORTS["postfix"]))
    subprocess.run(["postmulti", "-i", inst, "-p", "stop"], capture_output=True)
    sh("postmulti", "-i", inst, "-p", "start", stdout=subprocess.DEVNULL,
       stderr=subprocess.DEVNULL)
    wait_port(PORTS["postfix"])
    return inst


def start_aiosmtpd(work):
    d = os.path.join(work, "aiosmtpd")
    os.makedirs(d)
    p = subprocess.Popen([os.path.join(BENCH_VENV, "bin", "python"), "-c", AIOSMTPD, d,
                          str(PORTS["aiosmtpd"])], stdout=subprocess.PIPE)
    p.stdout.readline()
    wait_port(PORTS["aiosmtpd"])
    return p, d


# ---------------------------------------------------------------- measure ----

def source(port, sessions, size, count, reuse):
    argv = ["smtp-source", "-s", str(sessions), "-l", str(size), "-m", str(count),
            "-f", "alice@example.org", "-t", "bob@my.domain", "-M", "client.example"]
    if reuse:
        argv.append("-d")
    t0 = time.perf_counter()
    subprocess.run(argv + ["127.0.0.1:%d" % port], check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return count / (time.perf_counter() - t0)


TRASH = "/var/tmp/smtpd-bench-trash"
TRASH_AGE = 600


def discard(path):
    """Instead of deleting a run's work directory (thousands of files), move
    it aside and delete what earlier runs set aside over TRASH_AGE seconds
    ago: on ext4 without a journal (as here) inodes deleted in the last
    60-360 seconds are skipped one by one by the inode allocator, so one
    benchmark's clean-up would tax the next one's servers."""
    os.makedirs(TRASH, exist_ok=True)
    now = time.time()
    for n in os.listdir(TRASH):
        p = os.path.join(TRASH, n)
        try:
            if now - os.lstat(p).st_mtime > TRASH_AGE:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
    if os.path.exists(path):
        dst = os.path.join(TRASH, "%d-%s" % (time.time_ns(), os.path.basename(path)))
        os.rename(path, dst)
        os.utime(dst)


def park(d):
    """Move a run's messages out of the spool into d/../parked-*/ instead of
    deleting them: on ext4 without a journal (as here) the inode allocator
    skips inodes deleted in the last 60-360 seconds one by one, so deleting
    thousands of files taxes whichever server writes next in that block
    group.  Everything is removed with the work directory at the end."""
    park_dir = os.path.join(os.path.dirname(d), "parked-" + os.path.basename(d))
    os.makedirs(park_dir, exist_ok=True)
    for n in os.listdir(d):
        p = os.path.join(d, n)
        if os.path.isfile(p) and (n.startswith("smtpd") or n.startswith("msg")):
            os.rename(p, os.path.join(park_dir, "%d-%s" % (time.monotonic_ns(), n)))


def fsync_rate(work, n=300):
    path = os.path.join(work, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    t0 = time.perf_counter()
    for _ in range(n):
        os.write(fd, b"x" * 1024)
        os.fsync(fd)
    rate = n / (time.perf_counter() - t0)
    os.close(fd)
    os.unlink(path)
    return rate


def drain_rate(work, tree, n=2000):
    d = os.path.join(work, "drain")
    os.makedirs(d)
    agent = os.path.join(work, "null-agent")
    open(agent, "w").write("#!/bin/sh\nexec cat >/dev/null\n")
    os.chmod(agent, 0o755)
    body = b"Received: test\n" + b"x" * 1000 + b"\n"
    for i in range(n):
        with spool.Draft(d, b"<a@b.example>", [b"<c@d.example>"]) as dr:
            dr.write(body)
            dr.commit()
    ids = []
    if ROOT:
        for name in os.listdir(d):
            shutil.chown(os.path.join(d, name), "nobody")
        shutil.chown(d, "nobody")
        ids = ["-u", "nobody", "-g", "nogroup"]
    t0 = time.perf_counter()
    p = subprocess.Popen([PY, os.path.join(tree, "smtpfwdd.py"), "-F", "-q", "-P", "1",
                          "-d", d, "-s", agent] + ids,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while any(x.startswith("smtpd") for x in os.listdir(d)):
        time.sleep(0.05)
    rate = n / (time.perf_counter() - t0)
    p.terminate()
    p.wait()
    return rate


def worker_rss(pidfile):
    master = int(open(pidfile).read())
    peak = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if int(open("/proc/%s/stat" % d).read().rsplit(")", 1)[1].split()[1]) != master:
                continue
            for line in open("/proc/%s/status" % d):
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return peak / 1024.0


def greeting_latency(work, tree, n=30):
    jail = os.path.join(work, "jail")
    ids = ["-u", "nobody", "-g", "nogroup"] if ROOT else []
    lst = socket.create_server(("127.0.0.1", 0))
    times = []
    for _ in range(n):
        c = socket.socket()
        t0 = time.perf_counter()
        c.connect(lst.getsockname())
        conn, _ = lst.accept()
        p = subprocess.Popen([PY, os.path.join(tree, "smtpd.py"), "-H", "-c", jail,
                              "-m", "bench.example"] + ids,
                             stdin=conn, stdout=conn, stderr=subprocess.DEVNULL)
        conn.close()
        data = c.recv(100)
        times.append(time.perf_counter() - t0)
        assert data.startswith(b"220"), data
        c.sendall(b"QUIT\r\n")
        c.recv(100)
        c.close()
        p.wait()
    lst.close()
    return statistics.median(times) * 1000, max(times) * 1000


# ------------------------------------------------------------------ main ----

def main():
    ensure_tools()
    work = tempfile.mkdtemp(prefix="smtpd-bench-", dir="/tmp")
    os.chmod(work, 0o755)
    ours, jail, tree = start_ours(work)
    inst = start_postfix()
    aio, aio_dir = start_aiosmtpd(work)
    cells = [(s, k, r) for r in (False, True) for s in (1, 10, 50) for k in (1, 10, 100)]
    if os.environ.get("QUICK"):
        cells = [(10, 10, False), (10, 10, True)]
    results = {}
    servers = list(PORTS)
    try:
        for sessions, kb, reuse in cells:
            count = {1: 300, 10: 1000, 50: 1500}[sessions] // (4 if kb == 100 else 1)
            for run in range(RUNS):
                order = servers[run % 3:] + servers[:run % 3]     # interleaved
                for srv in order:
                    rate = source(PORTS[srv], sessions, kb * 1024, count, reuse)
                    results.setdefault((sessions, kb, reuse, srv), []).append(rate)
                    park(jail)
                    park(aio_dir)
        rss = worker_rss(os.path.join(work, "smtpd.pid"))
    finally:
        ours.terminate()
        ours.wait()
        aio.terminate()
        aio.wait()
        subprocess.run(["postmulti", "-i", inst, "-p", "stop"], capture_output=True)
    greet_med, greet_max = greeting_latency(work, tree)
    start = startup.measure(tree)
    drain = drain_rate(work, tree)
    fsyncs = fsync_rate(work)
    report(results, cells, rss, greet_med, greet_max, start, drain, fsyncs)
    discard(work)


def fmt(rates):
    med = statistics.median(rates)
    return "%.0f ±%.0f" % (med, (max(rates) - min(rates)) / 2), med


def report(results, cells, rss, greet_med, greet_max, start, drain, fsyncs):
    lines = ["# Benchmark results", "",
             "Machine: %s, %d cores, Python %s, %s. Runs per cell: %d (median ±half-range)."
             % (platform.platform(), os.cpu_count(), platform.python_version(),
                time.strftime("%Y-%m-%d"), RUNS), "",
             "msgs/s with smtp-source; every server fsyncs each message before 250.", "",
             "| sessions | size | connection | ours | Postfix | aiosmtpd | ours/Postfix | ours/aiosmtpd |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for sessions, kb, reuse in cells:
        o, om = fmt(results[(sessions, kb, reuse, "smtpd")])
        p, pm = fmt(results[(sessions, kb, reuse, "postfix")])
        a, am = fmt(results[(sessions, kb, reuse, "aiosmtpd")])
        lines.append("| %d | %d KB | %s | %s | %s | %s | %.2f | %.2f |"
                     % (sessions, kb, "reused (-d)" if reuse else "new per message",
                        o, p, a, om / pm, om / am))
    lines += ["", "| measure | value | target |", "|---|---:|---:|",
              "| smtpfwdd drain, 2,000 messages into `cat >/dev/null` | %.0f msgs/s | ≥ 500 |" % drain,
              "| peak RSS of an smtpd worker | %.1f MB | ≤ 25 MB |" % rss,
              "| inetd mode connect-to-greeting, median (max) | %.1f ms (%.1f) | ≤ 80 ms |"
              % (greet_med, greet_max),
              "| smtpd -D start to first greeting, median (max) | %.0f ms (%.0f) | < 200 ms |"
              % (start[0] * 1000, start[1] * 1000),
              "| this disk: fsync of a 1 KB append, one process | %.0f /s | (bound) |" % fsyncs]
    text = "\n".join(lines) + "\n"
    print(text)
    open(os.path.join(HERE, "results.md"), "w").write(text)


if __name__ == "__main__":
    main()
