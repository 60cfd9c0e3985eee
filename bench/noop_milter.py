#!/usr/bin/env python3
"""bench/noop_milter.py PORT - a mail filter that continues at every stage

It negotiates protocol 6 wanting every event and answering each (no
SMFIP_NO* or SMFIP_NR_* flags), asks for no changes, and answers
SMFIR_CONTINUE to all but macros, ABORT, QUIT_NC and QUIT: the most a filter
costs the MTA in round trips, and almost nothing in the filter itself.
One thread per connection.  For bench/milter.py; never a test."""

import socket
import struct
import sys
import threading

OPTNEG = struct.pack("!IcIII", 13, b"O", 6, 0, 0)
CONTINUE = struct.pack("!Ic", 1, b"c")
SILENT = frozenset(b"DAK")     # macros, ABORT, QUIT_NC: no answer


def serve(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = conn.makefile("rb")
    try:
        while True:
            head = f.read(4)
            if len(head) < 4:
                return
            (n,) = struct.unpack("!I", head)
            data = f.read(n)
            cmd = data[0]
            if cmd == ord("O"):
                conn.sendall(OPTNEG)
            elif cmd == ord("Q"):
                return
            elif cmd not in SILENT:
                conn.sendall(CONTINUE)
    except OSError:
        pass
    finally:
        conn.close()


def main(port):
    s = socket.create_server(("127.0.0.1", port), backlog=128)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]))
