"""A scripted SMTP or LMTP server on loopback (or a Unix socket) for the
smtp:/lmtp: agent's tests: it offers the extensions it is given, answers
each RCPT and each message as told, records every connection and
transaction, and can hang, talk nonsense or drop the line on cue.

    mta = FakeMTA(rcpt=lambda addr: "550 5.1.1 no such user" if "x@" in addr else None)
    smtpfwdd -s mta.spec ...
    mta.transactions -> [{"mail": ..., "rcpts": [...], "data": b"...", ...}]

rcpt(addr) and final(addr) (LMTP: per recipient; SMTP: called with None)
return a reply line, or None for 250.  Any of them may return STALL (no
answer, ever) or CLOSE (hang up)."""

import os
import socket
import ssl
import threading
import time

STALL, CLOSE = "stall", "close"
EXTENSIONS = ("PIPELINING", "SIZE 10240000", "8BITMIME", "DSN", "ENHANCEDSTATUSCODES",
              "XFORWARD NAME ADDR PROTO HELO IDENT SOURCE")


class Gone(Exception):
    pass


class FakeMTA:
    def __init__(self, lmtp=False, path=None, extensions=EXTENSIONS, rcpt=None, final=None,
                 greeting="220 fake.example ESMTP", tls=None, mail=None, hangup_after=False):
        self.lmtp, self.path = lmtp, path
        self.extensions = list(extensions) + (["STARTTLS"] if tls else [])
        self.rcpt_fn, self.final_fn, self.mail_fn = rcpt, final, mail
        self.greeting, self.tls = greeting, tls
        self.hangup_after = hangup_after      # close the connection after each message
        self.connections = 0
        self.transactions = []
        self.commands = []          # every command line, in order, per connection index
        self.pipelined = []         # True for each MAIL that came with its RCPTs in one read
        self.closed = False
        if path:
            self.lsock = socket.socket(socket.AF_UNIX)
            self.lsock.bind(path)
            os.chmod(path, 0o777)
            self.spec = "lmtp:%s" % path
        else:
            self.lsock = socket.create_server(("127.0.0.1", 0))
            self.port = self.lsock.getsockname()[1]
            self.spec = "%s:127.0.0.1:%d" % ("lmtp" if lmtp else "smtp", self.port)
        self.lsock.listen(64)
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self):
        while not self.closed:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.serve, args=(s, self.connections), daemon=True).start()

    def close(self):
        self.closed = True
        self.lsock.close()

    # -- one connection --

    def serve(self, s, n):
        c = Conn(s)
        try:
            if self.greeting is STALL:
                time.sleep(3600)
            c.say(self.greeting)
            self.session(c, n)
        except (Gone, OSError, ssl.SSLError):
            pass
        finally:
            try:
                c.sock.close()
            except OSError:
                pass

    def answer(self, c, reply, default):
        if reply is STALL:
            time.sleep(3600)
        if reply is CLOSE:
            raise Gone()
        c.say(reply or default)

    def session(self, c, n):
        t = None
        while True:
            line = c.line()
            self.commands.append((n, line))
            verb = line.split(b" ", 1)[0].upper()
            if verb in (b"EHLO", b"LHLO"):
                c.say("250-fake.example", *["250-" + e for e in self.extensions[:-1]],
                      "250 " + self.extensions[-1]) if self.extensions else c.say("250 fake")
            elif verb == b"HELO":
                c.say("250 fake.example")
            elif verb == b"STARTTLS" and self.tls:
                c.say("220 2.0.0 go ahead")
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(*self.tls)
                c.sock = ctx.wrap_socket(c.sock, server_side=True)
                c.buf = b""
            elif verb == b"XFORWARD":
                self.xforward = getattr(self, "xforward", []) + [line.decode()]
                c.say("250 2.0.0 Ok")
            elif verb == b"MAIL":
                self.pipelined.append(b"RCPT" in c.buf)
                t = {"mail": line.decode("latin-1"), "rcpts": [], "accepted": [],
                     "xforward": getattr(self, "xforward", []), "connection": n}
                self.xforward = []
                self.answer(c, self.mail_fn(line) if self.mail_fn else None, "250 2.1.0 Ok")
            elif verb == b"RCPT":
                addr = line.decode("latin-1")
                t["rcpts"].append(addr)
                r = self.rcpt_fn(addr) if self.rcpt_fn else None
                if r is None:
                    t["accepted"].append(addr)
                self.answer(c, r, "250 2.1.5 Ok")
            elif verb == b"DATA":
                if not t or not t["accepted"]:
                    c.say("554 5.5.1 no valid recipients")
                    continue
                c.say("354 go ahead")
                t["data"] = c.data()
                self.transactions.append(t)
                for addr in (t["accepted"] if self.lmtp else [None]):
                    self.answer(c, self.final_fn(addr) if self.final_fn else None,
                                "250 2.0.0 Ok: queued as FAKE%d" % len(self.transactions))
                t = None
                if self.hangup_after:
                    raise Gone()
            elif verb == b"RSET":
                t = None
                c.say("250 2.0.0 Ok")
            elif verb == b"NOOP":
                c.say("250 2.0.0 Ok")
            elif verb == b"QUIT":
                c.say("221 2.0.0 Bye")
                raise Gone()
            else:
                c.say("502 5.5.2 unrecognized")

    def wait(self, count, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline and len(self.transactions) < count:
            time.sleep(0.05)
        return len(self.transactions) >= count


class Conn:
    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def say(self, *lines):
        self.sock.sendall(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\r\n"
                                   for l in lines))

    def fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise Gone()
        self.buf += data

    def line(self):
        while b"\r\n" not in self.buf:
            self.fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def data(self):
        while b"\r\n.\r\n" not in b"\r\n" + self.buf:
            self.fill()
        if self.buf.startswith(b".\r\n"):
            self.buf = self.buf[3:]
            return b""
        body, self.buf = self.buf.split(b"\r\n.\r\n", 1)
        return body + b"\r\n"
