#!/usr/bin/env python3
"""bench/profile_session.py - where one session's CPU goes (cProfile)

SYNOPSIS
    bench/profile_session.py [-n sessions] [-o stats-file] [-f milters]
DESCRIPTION
    Runs n sessions of the target cell's kind (a new TCP connection on
    loopback, EHLO, MAIL, RCPT, 10 KB of DATA, QUIT) through the worker's
    own path -- connection.serve: identify (-H), the session, the spool
    commit with its fsyncs -- in this process, under cProfile; a client
    thread plays smtp-source.  -f names mail filters as smtpd -f does
    (bench/noop_milter.py is one), to see what the milter client costs.
    CPU=1 in the environment times with process time, so that waits
    drop out.  Prints the functions by own time and by
    cumulative time, and the CPU per session.  No jail, no sandbox: a
    measurement of the Python path, never a test.
"""

import cProfile
import getopt
import os
import pstats
import shutil
import socket
import sys
import tempfile
import threading
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TOP)
from smtpgate import log, net  # noqa: E402
from smtpgate.gate import connection, engine as gate_engine  # noqa: E402
from smtpgate.gate.config import GateConfig  # noqa: E402
from smtpgate.rules import ruleset as engine  # noqa: E402

RULES = """allow:127.0.0.0/8 [::1]:ALL:ALL
noto:ALL:ALL:*%*@* *!*@* *@*@*:551 no routing tricks
allow:ALL:ALL:*@my.domain *@*.my.domain
noto:ALL:ALL:ALL:551 no relaying to %T
"""
BODY = b"Subject: bench\r\n\r\n" + b"".join(b"%07d " % i + b"x" * 92 + b"\r\n"
                                            for i in range(100))


def client(port, n):
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port)) as s:
            f = s.makefile("rb")

            def reply():
                while True:
                    line = f.readline()
                    if line[3:4] != b"-":
                        return line
            reply()
            for cmd in (b"EHLO client.example\r\n", b"MAIL FROM:<alice@example.org>\r\n",
                        b"RCPT TO:<bob@my.domain>\r\n", b"DATA\r\n"):
                s.sendall(cmd)
                reply()
            s.sendall(BODY + b".\r\n")
            reply()
            s.sendall(b"QUIT\r\n")
            reply()


def main(argv):
    opts, _ = getopt.getopt(argv, "f:n:o:")
    o = dict(opts)
    n = int(o.get("-n", 2000))
    spool = tempfile.mkdtemp(prefix="smtpd-profile-", dir="/var/tmp")
    log.log.open("smtpd", path="/nonexistent/log")
    cfg = GateConfig(myname="bench.example", spooldir=spool, hostchecks=False, quiet=True,
                    milters=net.parse_milters(o.get("-f", "")))
    eng = gate_engine.in_process(engine.parse(RULES)[0])
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]
    t = threading.Thread(target=client, args=(port, n), daemon=True)
    t.start()
    prof = cProfile.Profile(time.process_time) if os.environ.get("CPU") else cProfile.Profile()
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(n):
        sock, addr = lst.accept()
        prof.enable()
        connection.serve(cfg, eng, connection.Connection(
            sock.fileno(), sock.fileno(), sock=sock, local=sock.getsockname()[:2],
            peer=addr[:2]))
        prof.disable()
        sock.close()
    cpu = time.process_time() - c0
    print("%d sessions: %.3f ms CPU each (with the profiler), %.0f/s" % (
        n, cpu * 1000 / n, n / (time.perf_counter() - w0)))
    shutil.rmtree(spool, ignore_errors=True)
    st = pstats.Stats(prof)
    if "-o" in o:
        st.dump_stats(o["-o"])
    st.sort_stats("tottime").print_stats(30)
    st.sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main(sys.argv[1:])
