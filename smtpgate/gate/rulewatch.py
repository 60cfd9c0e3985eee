"""rulewatch - smtpd -D: the jailed process that reads the rules for the master

DESCRIPTION
    The jail (-c) belongs to the smtpd user: once a worker is compromised,
    anything in it may be a FIFO, a symbolic link to a root-only file or to
    an endless device.  So the root master never opens, stats or follows a
    path inside it.  A watcher process, forked by the master, enters the jail
    as a worker does and becomes -u/-g.  It stats the rules file once a
    second and, when it changed or when the master asks (SIGHUP), reads it
    with ruleset.read_text (never blocking, regular files only, at most
    RULES_MAX_SIZE bytes) and sends the text, or why it could not, to the
    master.  The master bounds what it accepts in size and time and compiles
    only the text it received.
PROTOCOL
    master -> watcher: b"R", read now.  watcher -> master: one frame per
    reading: b"T" (the text) or b"E" (why not), an 8-byte big-endian length,
    then that many bytes.  End of file on either side ends the watcher.
"""

import os
import select
import signal
import socket
import struct
import time

import buildconf
from smtpgate.gate.engine import enter_jail
from smtpgate.rules import ruleset
from smtpgate import log, process

HEADER = struct.Struct(">cQ")
FIRST_READ_TIMEOUT = 10     # seconds the master waits for the first text


class WatcherError(Exception):
    """The watcher broke the protocol or did not answer in time."""


class Watcher:
    """The master's end: start() forks the watcher, then frames() yields
    what it sent, as ("T", bytes) or ("E", message)."""

    def __init__(self, config, close_in_child=list, stderr=None):
        self.config = config
        self.close_in_child = close_in_child
        self.stderr = stderr        # the master's log.Relay (-F), or None
        self.pid = None
        self.sock = None
        self.buf = bytearray()
        self.limit = buildconf.RULES_MAX_SIZE + 4096

    def start(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            status = os.EX_SOFTWARE
            try:
                ours.close()
                process.close_all(self.close_in_child())
                status = self.child(theirs)
            except BaseException as e:      # noqa: B036 -- a child never returns
                log.crit("rules watcher: %s: %s", type(e).__name__, e)
            os._exit(status)
        theirs.close()
        ours.setblocking(False)
        self.pid, self.sock, self.buf = pid, ours, bytearray()
        return self

    def child(self, sock):
        process.child_signals(signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR2)
        process.leave_terminal(self.stderr and self.stderr.w)
        process.set_title("smtpd: rules")
        log.log.role = "rules: "
        enter_jail(self.config)
        return watch(self.config.rules_path, self.config.rules_shown, sock)

    def ask(self):
        """Ask for a reading now (SIGHUP)."""
        try:
            self.sock.send(b"R")
        except OSError:
            pass

    def frames(self):
        """The complete frames received so far; WatcherError on nonsense."""
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                raise WatcherError("read from rules watcher: %s" % e.strerror) from None
            if not chunk:
                raise WatcherError("rules watcher closed its socket")
            self.buf += chunk
            if len(self.buf) > self.limit:
                raise WatcherError("rules watcher sent more than %d bytes" % self.limit)
        out = []
        while len(self.buf) >= HEADER.size:
            kind, n = HEADER.unpack_from(self.buf)
            if kind not in (b"T", b"E") or n > buildconf.RULES_MAX_SIZE + 1024:
                raise WatcherError("rules watcher sent a bad frame")
            if len(self.buf) < HEADER.size + n:
                break
            data = bytes(self.buf[HEADER.size:HEADER.size + n])
            del self.buf[:HEADER.size + n]
            out.append((kind.decode(), data if kind == b"T" else
                        data.decode("utf-8", "backslashreplace")))
        return out

    def first(self, timeout=FIRST_READ_TIMEOUT):
        """Wait at most timeout seconds for the first frame."""
        p = select.poll()
        p.register(self.sock, select.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            got = self.frames()
            if got:
                return got[0]
            left = deadline - time.monotonic()
            if left <= 0 or not p.poll(left * 1000):
                raise WatcherError("no answer from the rules watcher in %d seconds"
                                   % timeout)

    def stop(self):
        """Close our end (the watcher leaves) and kill it, unless it was
        reaped already (pid None)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def watch(path, shown, sock):
    """The watcher's loop (jailed, unprivileged): a frame at start, on each
    change of the file and on each b"R"; returns when the master is gone."""
    p = select.poll()
    p.register(sock, select.POLLIN)
    last = None
    wait = 0                # the first reading at once: the master waits for it
    while True:
        asked = False
        if p.poll(wait):
            data = sock.recv(64)
            if not data:
                return os.EX_OK
            asked = True
        now = process.stamp(path)
        if asked or now != last:
            last = now
            try:
                frame = b"T", ruleset.read_text(path, shown=shown)
            except ruleset.RuleError as e:
                frame = b"E", str(e).encode("utf-8", "backslashreplace")
            try:
                sock.sendall(HEADER.pack(frame[0], len(frame[1])) + frame[1])
            except OSError:
                return os.EX_OK
        wait = 1000

