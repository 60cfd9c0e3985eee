#!/usr/bin/env python3
"""bench/handoff.py - the cost of one hand-over from the front stage to a worker

SYNOPSIS
    bench/handoff.py [count]
DESCRIPTION
    Sends a typical Passed (after EHLO, with the MAIL command it read) and a
    client descriptor over a SOCK_SEQPACKET pair, as the front stage does,
    and receives and validates it, as a worker does (handoff.send,
    handoff.receive), count times (20,000), in one process.  Prints the CPU
    and wall microseconds of one hand-over: both sides' system calls,
    encoding and checking.  A measurement, never a test.
"""

import os
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from smtpgate.gate import handoff  # noqa: E402


def main(argv):
    n = int(argv[0]) if argv else 20000
    front, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client, _ = socket.socketpair()
    passed = handoff.Passed(local=("127.0.0.1", 25), peer=("127.0.0.9", 40000),
                            helo="client.example", esmtp=True, score=0,
                            unread=b"MAIL FROM:<alice@example.org> SIZE=10240\r\n")
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        handoff.send(front, passed, client.fileno())
        got, sock = handoff.receive(worker)
        sock.close()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print("%d hand-overs: %.1f us CPU, %.1f us wall each" % (n, cpu / n * 1e6, wall / n * 1e6))


if __name__ == "__main__":
    main(sys.argv[1:])
