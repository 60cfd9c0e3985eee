"""A protocol-level fake mail filter for the tests: it listens on loopback,
negotiates as told, records every packet of every connection and answers
each event from a script.

    f = FakeMilter({b"R": [pkt(b"r")]})     # reject every RCPT
    smtpd ... -f f.spec
    f.sessions[0].events  ->  [(b"O", ...), (b"C", ...), ...]

A script maps an event's command letter to the packets to send after it
(a list, used for every such event), or to a function(conn, payload)
returning them.  Anything may be raw bytes: garbage, a huge length, half a
packet.  STALL waits (the client must time out), CLOSE hangs up.  Events
without an entry get SMFIR_CONTINUE, unless the negotiated protocol says
the client expects no reply."""

import socket
import struct
import threading
import time

STALL, CLOSE = "stall", "close"
NO_REPLY = {b"C": 1 << 12, b"H": 1 << 13, b"M": 1 << 14, b"R": 1 << 15, b"T": 1 << 16,
            b"L": 1 << 7, b"N": 1 << 18, b"B": 1 << 19}
STAGES = {0: b"C", 1: b"H", 2: b"M", 3: b"R", 4: b"T", 5: b"E", 6: b"N"}


def pkt(code, data=b""):
    return struct.pack("!I", len(data) + 1) + code + data


def strs(*items):
    return b"".join(s + b"\0" for s in items)


def reply(text):
    """SMFIR_REPLYCODE with text."""
    return pkt(b"y", text + b"\0")


class Conn:
    """One connection from the client, as the filter saw it."""

    def __init__(self, sock):
        self.sock = sock
        self.events = []            # (command letter, payload), macros included
        self.macros = {}            # command letter -> {name: value}
        self.offer = None           # (version, actions, protocol) the client offered
        self.closed = threading.Event()
        self.owed = False           # quit_nc="late": an answer to QUIT_NC still to send

    def commands(self):
        return [c for c, _ in self.events if c != b"D"]

    def headers(self):
        out = []
        for c, p in self.events:
            if c == b"L":
                name, value, _ = p.split(b"\0")
                out.append((name, value))
        return out

    def body(self):
        return b"".join(p for c, p in self.events if c == b"B")


class FakeMilter:
    def __init__(self, script=None, version=6, actions=0x1FF, protocol=0, symlists=b"",
                 optneg=None, addr="127.0.0.1", quit_nc=True):
        self.script = dict(script or {})
        self.quit_nc = quit_nc          # False: hang up at QUIT_NC (a filter that lacks it);
                                        # "answer": answer it, against the protocol;
                                        # "late": answer it after the next command
                                        # arrived, in one write with that one's answer
        self.version, self.actions, self.protocol = version, actions, protocol
        self.symlists, self.optneg = symlists, optneg
        self.lsock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((addr, 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.spec = ("inet:%s:%d" if ":" not in addr else "inet6:[%s]:%d") % (addr, self.port)
        self.sessions = []
        self.stopped = False
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self):
        while not self.stopped:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = Conn(s)
            self.sessions.append(c)
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def close(self):
        self.stopped = True
        self.lsock.close()
        for c in self.sessions:
            try:
                c.sock.close()
            except OSError:
                pass

    # -- one connection --

    def read(self, c, n):
        data = b""
        while len(data) < n:
            chunk = c.sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def serve(self, c):
        try:
            while True:
                (length,) = struct.unpack("!I", self.read(c, 4))
                data = self.read(c, length)
                cmd, payload = data[:1], data[1:]
                c.events.append((cmd, payload))
                if not self.handle(c, cmd, payload):
                    break
        except (EOFError, OSError):
            pass
        finally:
            c.closed.set()
            try:
                c.sock.close()
            except OSError:
                pass

    def handle(self, c, cmd, payload):
        if cmd == b"O":
            c.offer = struct.unpack("!III", payload[:12])
            answer = self.optneg if self.optneg is not None else pkt(
                b"O", struct.pack("!III", self.version, self.actions, self.protocol)
                + self.symlists)
            return self.send(c, [answer])
        if cmd == b"D":
            stage, rest = payload[:1], payload[1:].split(b"\0")
            c.macros.setdefault(stage, {}).update(zip(rest[0:-1:2], rest[1:-1:2]))
            return True
        if cmd == b"Q":
            return False
        if cmd == b"K":                 # QUIT_NC: a CONNECT follows (or a close)
            if self.quit_nc == "late":  # against the protocol, behind the next answer
                c.owed = True
                return True
            if self.quit_nc == "answer":
                return self.send(c, [pkt(b"c")])
            return self.quit_nc
        if cmd == b"A":
            return True
        todo = self.script.get(cmd)
        if callable(todo):
            todo = todo(c, payload)
        if todo is None:
            if self.protocol & NO_REPLY.get(cmd, 0):
                return True
            todo = [pkt(b"c")]
        if c.owed and todo and isinstance(todo[0], bytes):
            c.owed = False              # one write: the late answer, then this one
            todo = [pkt(b"c") + todo[0]] + list(todo[1:])
        return self.send(c, todo)

    def send(self, c, items):
        for item in items:
            if item == STALL:
                time.sleep(30)
                continue
            if item == CLOSE:
                c.sock.close()
                return False
            c.sock.sendall(item)
        return True


class Relay:
    """A TCP relay on loopback in front of a real filter, counting the
    connections the client opens: Relay(port).spec, .accepted."""

    def __init__(self, port):
        self.target = ("127.0.0.1", port)
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.spec = "inet:127.0.0.1:%d" % self.lsock.getsockname()[1]
        self.accepted = 0
        self.open = 0           # directions of connections not yet closed
        self.lock = threading.Lock()
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self):
        while True:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.open += 2
            t = socket.create_connection(self.target)
            for a, b in ((s, t), (t, s)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    def pipe(self, a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self.lock:
                self.open -= 1

    def close(self):
        self.lsock.close()
