#!/usr/bin/env python3
"""bench/load.py - an SMTP load client with STARTTLS, for every server alike

SYNOPSIS
    bench/load.py [-s sessions] [-n messages] [-k kb] [-t] [-r] [-a address]
                  host:port
DESCRIPTION
    smtp-source has no TLS, so this is the client the STARTTLS cells of
    make bench share between our smtpd and Postfix: -s processes, each
    sending its share of -n messages of -k KB, one new connection per
    message (EHLO, STARTTLS with -t, EHLO, MAIL, RCPT, DATA, QUIT).  -r
    resumes TLS sessions (tickets) instead of a full handshake each time.
    Prints "msgs/s" on one line.  A measurement, never a test.
"""

import getopt
import multiprocessing
import socket
import ssl
import sys
import time


def session(addr, body, tls, ctx, state, source):
    s = socket.create_connection(addr, timeout=60, source_address=(source, 0))
    f = s.makefile("rb")

    def reply():
        while True:
            line = f.readline()
            if not line:
                raise EOFError("connection closed")
            if line[3:4] != b"-":
                return int(line[:3])

    def cmd(line, want):
        s.sendall(line + b"\r\n")
        code = reply()
        if code != want:
            raise RuntimeError("%s: %d" % (line[:20], code))
    try:
        if reply() != 220:
            raise RuntimeError("no greeting")
        cmd(b"EHLO load.example", 250)
        if tls:
            cmd(b"STARTTLS", 220)
            f.close()
            s = ctx.wrap_socket(s, session=state.get("session"))
            f = s.makefile("rb")
            cmd(b"EHLO load.example", 250)
            state["session"] = s.session    # TLS 1.3: the ticket came after the handshake
            state["reused"] = state.get("reused", 0) + s.session_reused
        cmd(b"MAIL FROM:<alice@example.org>", 250)
        cmd(b"RCPT TO:<bob@my.domain>", 250)
        cmd(b"DATA", 354)
        s.sendall(body)
        if reply() != 250:
            raise RuntimeError("DATA refused")
        s.sendall(b"QUIT\r\n")
        reply()
    finally:
        f.close()
        s.close()


def worker(addr, count, body, tls, resume, source):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    state = {}
    for _ in range(count):
        if not resume:
            state.clear()
        session(addr, body, tls, ctx, state, source)


def main(argv):
    opts, args = getopt.getopt(argv, "s:n:k:tra:")
    o = dict(opts)
    host, port = args[0].rsplit(":", 1)
    sessions, total, kb = int(o.get("-s", 10)), int(o.get("-n", 1000)), int(o.get("-k", 10))
    line = b"x" * 76 + b"\r\n"
    body = b"Subject: load\r\n\r\n" + line * (kb * 1024 // len(line)) + b".\r\n"
    per = total // sessions
    procs = [multiprocessing.Process(target=worker, args=(
        (host, int(port)), per, body, "-t" in o, "-r" in o, o.get("-a", "127.0.0.1")))
        for _ in range(sessions)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit("a load process failed")
    print("%.1f msgs/s" % (per * sessions / (time.perf_counter() - t0)))


if __name__ == "__main__":
    main(sys.argv[1:])
