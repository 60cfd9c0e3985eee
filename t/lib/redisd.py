"""A private redis-server on loopback for the tests (Debian's redis-server):
its own directory under /tmp, no persistence, a password; started,
killed and restarted on the same port by the tests."""

import os
import shutil
import socket
import subprocess
import tempfile
import time

from harness import free_port

PASSWORD = "test-password-7c1f"


def available():
    return shutil.which("redis-server") is not None


class RedisServer:
    """acl: more ACL lines (user NAME ...) beside the default user, who
    has the password."""

    def __init__(self, port=None, password=PASSWORD, acl=()):
        self.port = port or free_port()
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="redis-", dir="/tmp")
        self.proc = None
        self.auth = ["--requirepass", password]
        if acl:
            path = os.path.join(self.dir, "users.acl")
            with open(path, "w") as f:
                f.write("user default on >%s ~* &* +@all\n" % password)
                f.write("".join(line + "\n" for line in acl))
            self.auth = ["--aclfile", path]

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", self.dir, "--save", "", "--appendonly", "no",
             "--logfile", os.path.join(self.dir, "log"),
             "--daemonize", "no", "--protected-mode", "yes"] + self.auth,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if self.command("PING") == b"PONG":
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def command(self, *args, db=3, auth=None):
        """One command in db (the tests' gates use 3), as the default user
        or auth (user, password): its reply (bytes, int, a list or None; an
        error reply as bytes starting with b"-")."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            data = b""
            login = ("AUTH",) + tuple(auth or (self.password,))
            for cmd in (login, ("SELECT", db), args, ("QUIT",)):
                parts = [a if isinstance(a, bytes) else str(a).encode() for a in cmd]
                data += b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a)
                                                          for a in parts)
            s.sendall(data)
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        replies, pos = [], 0
        for _ in range(4):
            r, pos = parse(buf, pos)
            replies.append(r)
        return replies[2]

    def keys(self, pattern="*"):
        return sorted(self.command("KEYS", pattern))


def parse(buf, pos):
    end = buf.index(b"\r\n", pos)
    kind, line, pos = buf[pos:pos + 1], buf[pos + 1:end], end + 2
    if kind in (b"+", b"-"):
        return (line if kind == b"+" else b"-" + line), pos
    if kind == b":":
        return int(line), pos
    n = int(line)
    if kind == b"$":
        return (None, pos) if n < 0 else (buf[pos:pos + n], pos + n + 2)
    out = []
    for _ in range(max(n, 0)):
        r, pos = parse(buf, pos)
        out.append(r)
    return out, pos
