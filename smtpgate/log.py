"""log - syslog for smtpd, smtpfwdd and the tools, with a copy on stderr

DESCRIPTION
    One Log object per process, log: open() connects to LOG_SOCKET before
    any chroot; debug() ... alert() send one line; die() logs and exits
    with a sysexits status.  Every control character of a line is shown as
    \\xHH, whatever wrote it (a client, the jail, another program), so no
    line can forge another or drive a terminal that shows it.
"""

import os
import socket
import stat
import sys
import syslog
import time

# This process's pid, for every line: a system call saved per line (and
# refreshed in every forked child).
PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: PID.__setitem__(0, os.getpid()))

# Every C0 and C1 control and DEL, as a log line shows it: \n, \r, \x1b...
LOG_CONTROLS = {c: ("\\n" if c == 10 else "\\r" if c == 13 else "\\x%02x" % c)
                for c in list(range(32)) + list(range(127, 160))}


class Log:
    """syslog over the log socket, with an optional copy of every line on
    stderr.  Our own client rather than syslog(3): it never blocks a
    session on a stalled log daemon, and when the daemon restarts it
    reconnects by path -- inside the jail that path is JAIL/dev/log, the
    socket the rsyslog or syslog-ng snippet of `make install` provides."""

    RETRY = 1.0             # seconds between attempts to reach the socket
    LINE_MAX = 2048

    def __init__(self):
        self.ident = os.path.basename(sys.argv[0] or "python").removesuffix(".py")
        self.stderr = False
        self.opened = False
        self.role = ""          # e.g. "worker: ", to tell processes apart
        self.path = "/dev/log"
        self.facility = syslog.LOG_MAIL
        self.pid = True
        self.sock = None
        self.next_try = 0.0

    def open(self, ident, facility="mail", pid=True, stderr=False, path=None):
        """Connect to the log socket now (before any chroot)."""
        self.ident, self.stderr, self.pid = ident, stderr, pid
        self.facility = getattr(syslog, "LOG_" + facility.upper(), syslog.LOG_MAIL)
        self.path = path or self.path
        self.opened = True
        self.close()
        self.connect()

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def connect(self):
        """True if the log socket answers; tried at most once per RETRY."""
        self.next_try = time.monotonic() + self.RETRY
        try:        # out of descriptors (the front stage at its limit): no line, no crash
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except OSError:
            return False
        try:
            s.connect(self.path)
        except OSError:
            s.close()
            return False
        self.sock = s
        return True

    def reachable(self):
        return self.sock is not None

    def send(self, level, msg):
        head = "<%d>%s %s%s: " % (self.facility | level, time.strftime("%b %e %H:%M:%S"),
                                  self.ident, "[%d]" % PID[0] if self.pid else "")
        data = (head + msg).encode("utf-8", "backslashreplace")[:self.LINE_MAX]
        for attempt in (0, 1):
            if self.sock is None and (attempt or time.monotonic() >= self.next_try):
                if not self.connect():
                    return
            if self.sock is None:
                return
            try:
                self.sock.send(data, socket.MSG_DONTWAIT)
                return
            except BlockingIOError:
                return          # the daemon is swamped: drop, never stall a session
            except OSError:     # it restarted: reconnect by path, once
                self.close()

    def __call__(self, level, fmt, *args):
        msg = (self.role + (fmt % args if args else fmt)).translate(LOG_CONTROLS)
        if self.opened:
            self.send(level, msg)
        if self.stderr:
            try:
                os.write(2, ("%s[%d]: %s%s\n" % (self.ident, PID[0],
                                                  "(debug) " if level == syslog.LOG_DEBUG else "",
                                                  msg)).encode("utf-8", "backslashreplace"))
            except BlockingIOError:
                pass            # the master's relay is full: drop, never stall a session
            except OSError:
                self.stderr = False

    def say_if_unheard(self, program, stays):
        """At start: tell stderr once when no log destination is reachable
        (stays: standard error remains one, e.g. with -F)."""
        if self.opened and not self.reachable() and not stays and not stderr_is_socket():
            try:
                os.write(2, ("%s: no syslog daemon listens on %s; log lines are lost "
                             "until one does (-F logs to standard error)\n"
                             % (program, self.path)).encode())
            except OSError:
                pass


log = Log()


class Relay:
    """With -F, when standard error may reach a terminal (wanted()), the
    jailed processes' standard error: a pipe (they hold no terminal
    descriptor, so none can type into an operator's shell), whose lines the
    master copies to its own standard error -- every control character
    shown as \\xHH, whatever wrote it, and a line longer than LINE_MAX cut
    there.  Writers never block: a full pipe drops a line."""

    LINE_MAX = 4096

    def __init__(self):
        self.r, self.w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.partial = b""

    @staticmethod
    def wanted():
        """May fd 2 reach a terminal: a tty, or a pipe (tee, less, make)?
        A regular file, a socket (journald) or /dev/null cannot: the jailed
        processes keep writing there themselves."""
        try:
            return os.isatty(2) or stat.S_ISFIFO(os.fstat(2).st_mode)
        except OSError:
            return False

    def fileno(self):
        return self.r

    def pump(self):
        """Copy the complete lines waiting (a long partial one too)."""
        data = self.partial
        try:
            while True:
                chunk = os.read(self.r, 65536)
                if not chunk:
                    break
                data += chunk
        except BlockingIOError:
            pass
        lines = data.split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) >= self.LINE_MAX:
            lines.append(self.partial)
            self.partial = b""
        out = b"".join(line[:self.LINE_MAX].decode("utf-8", "backslashreplace")
                       .translate(LOG_CONTROLS).encode("utf-8", "backslashreplace") + b"\n"
                       for line in lines)
        try:
            os.write(2, out)
        except OSError:
            pass


def debug(fmt, *args):
    log(syslog.LOG_DEBUG, fmt, *args)


def info(fmt, *args):
    log(syslog.LOG_INFO, fmt, *args)


def notice(fmt, *args):
    log(syslog.LOG_NOTICE, fmt, *args)


def warn(fmt, *args):
    log(syslog.LOG_WARNING, fmt, *args)


def err(fmt, *args):
    log(syslog.LOG_ERR, fmt, *args)


def crit(fmt, *args):
    log(syslog.LOG_CRIT, fmt, *args)


def alert(fmt, *args):
    log(syslog.LOG_ALERT, fmt, *args)


def die(status, fmt, *args):
    """Log at LOG_ERR (LOG_CRIT for software errors) and exit."""
    log(syslog.LOG_CRIT if status == os.EX_SOFTWARE else syslog.LOG_ERR, fmt, *args)
    sys.exit(status)


def stderr_is_socket():
    """True when fd 2 is a socket (inetd hands the client over on 0, 1, 2)."""
    try:
        return stat.S_ISSOCK(os.fstat(2).st_mode)
    except OSError:
        return True
