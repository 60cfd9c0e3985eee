"""daemonlib - plumbing shared by smtpd, smtpfwdd and checkrules

DESCRIPTION
    Logging (syslog, optionally mirrored to stderr), fatal errors with
    sysexits statuses, user/group resolution and the one function that
    drops privileges, with or without a chroot.
SECURITY
    enter_jail() chroots first, then clears supplementary groups, then sets
    gid and uid, and verifies that root cannot be regained.
"""

import encodings.idna  # noqa: F401  (socket and dnspython need it in the jail)
import grp
import ipaddress
import os
import pwd
import signal
import socket
import stat
import sys
import syslog
import time
import unicodedata

EX_OK = os.EX_OK
EX_USAGE = os.EX_USAGE
EX_DATAERR = os.EX_DATAERR
EX_NOUSER = os.EX_NOUSER
EX_UNAVAILABLE = os.EX_UNAVAILABLE
EX_SOFTWARE = os.EX_SOFTWARE
EX_OSERR = os.EX_OSERR
EX_OSFILE = os.EX_OSFILE
EX_CANTCREAT = os.EX_CANTCREAT
EX_IOERR = os.EX_IOERR
EX_TEMPFAIL = os.EX_TEMPFAIL
EX_PROTOCOL = os.EX_PROTOCOL
EX_NOPERM = os.EX_NOPERM
EX_CONFIG = os.EX_CONFIG


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
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
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
                                  self.ident, "[%d]" % os.getpid() if self.pid else "")
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
                os.write(2, ("%s[%d]: %s%s\n" % (self.ident, os.getpid(),
                                                  "(debug) " if level == syslog.LOG_DEBUG else "",
                                                  msg)).encode("utf-8", "backslashreplace"))
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
    log(syslog.LOG_CRIT if status == EX_SOFTWARE else syslog.LOG_ERR, fmt, *args)
    sys.exit(status)


def ignore_stop_signals():
    """On the way out: a late SIGTERM/SIGINT/SIGHUP must not turn a clean
    exit into death by signal (Python resets its handlers at exit)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def escape(text, limit=255):
    """Client text for a log line: printable ASCII stays, anything else and
    space, quote and backslash become \\xHH, so it cannot forge a field; at
    most limit characters (then "...")."""
    out = "".join(c if "!" <= c <= "~" and c not in '"\\' else "\\x%02x" % ord(c)
                  for c in text[:limit])
    return out + "..." if len(text) > limit else out


# Every C0 and C1 control and DEL, as a log line shows it: \n, \r, \x1b...
LOG_CONTROLS = {c: ("\\n" if c == 10 else "\\r" if c == 13 else "\\x%02x" % c)
                for c in list(range(32)) + list(range(127, 160))}


def visible(text, limit=None, keep=""):
    """Text someone else wrote (a spool file, a client, the jail) for a
    terminal or a log: what is printable stays, even beyond ASCII; every
    control, format (bidi), private-use or unassigned character becomes
    \\xHH, \\uHHHH or \\UHHHHHHHH, except those in keep (e.g. "\\n\\t").
    Bytes are read as UTF-8 (a bad byte shows as \\xHH).  At most limit
    characters of text (then "...")."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    cut = limit is not None and len(text) > limit
    if cut:
        text = text[:limit]
    if not text.isprintable():
        text = "".join(c if c.isprintable() or c in keep else hidden(c) for c in text)
    return text + "..." if cut else text


def hidden(c):
    n = ord(c)
    if n < 256:
        return "\\x%02x" % n
    if unicodedata.category(c) == "Zs":     # a space beyond ASCII: fine as it is
        return c
    return "\\u%04x" % n if n < 0x10000 else "\\U%08x" % n


def printable(text, limit=255):
    """Another program's words for a log line: control and 8-bit characters
    become \\xHH, spaces stay; at most limit characters."""
    out = "".join(c if " " <= c <= "~" else "\\x%02x" % ord(c) for c in text[:limit])
    return out + "..." if len(text) > limit else out


def child_signals(*defaults):
    """In a forked child whose parent decides when it ends: a Ctrl-C or a
    hangup sent to the whole process group is ignored, the signals listed
    get their default action back, and the parent's wakeup fd is let go."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    for sig in defaults:
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)


def normalize_ip(addr):
    """An ipaddress object; IPv4-mapped IPv6 becomes IPv4; None/"" -> None."""
    if addr is None or addr == "":
        return None
    ip = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def drain(fd):
    """Read a non-blocking pipe (a signal wakeup fd) empty."""
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def reaped():
    """Yield (pid, wait status) of every child that has finished, without
    waiting for the others."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def set_title(title):
    """Name the process (ps, top, /proc/PID/comm), e.g. "smtpd: worker"."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(title[:15])
    except OSError:
        pass


def stderr_is_socket():
    """True when fd 2 is a socket (inetd hands the client over on 0, 1, 2)."""
    try:
        return stat.S_ISSOCK(os.fstat(2).st_mode)
    except OSError:
        return True


def lookup_user(spec):
    """Resolve a user name or decimal uid; None when unknown."""
    try:
        return pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except (KeyError, ValueError):
        return None


def lookup_group(spec):
    """Resolve a group name or decimal gid; None when unknown."""
    try:
        return grp.getgrgid(int(spec)) if spec.isdigit() else grp.getgrnam(spec)
    except (KeyError, ValueError):
        return None


def resolve_identity(user, group):
    """Return (pw, gr) for -u/-g or die: unknown → 64, root → 78."""
    pw = lookup_user(user)
    if pw is None:
        die(EX_USAGE, "unknown user %r", user)
    gr = lookup_group(group)
    if gr is None:
        die(EX_USAGE, "unknown group %r", group)
    if pw.pw_uid == 0:
        die(EX_CONFIG, "refusing to run as uid 0 (user %s)", pw.pw_name)
    if gr.gr_gid == 0:
        die(EX_CONFIG, "refusing to run as gid 0 (group %s)", gr.gr_name)
    return pw, gr


def own_name():
    """This host's name, canonical if the resolver knows it."""
    name = socket.gethostname()
    if "." not in name:
        try:
            name = socket.getaddrinfo(name, None, flags=socket.AI_CANONNAME)[0][3] or name
        except OSError:
            pass
    return name


def prepare_jail():
    """Do now what a chrooted process could not do later."""
    time.tzset()
    socket.gethostname()


def enter_jail(pw, gr, jail):
    """Chroot to jail (unless None) and become pw/gr for good."""
    if jail is not None:
        try:
            os.chroot(jail)
            os.chdir("/")
        except OSError as e:
            die(EX_CONFIG, "chroot(%s): %s", jail, e.strerror)
    try:
        os.setgroups([gr.gr_gid])
        os.setresgid(gr.gr_gid, gr.gr_gid, gr.gr_gid)
        os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    except OSError as e:
        die(EX_OSERR, "dropping privileges to %s/%s: %s",
            pw.pw_name, gr.gr_name, e.strerror)
    try:
        os.setuid(0)
    except PermissionError:
        return
    die(EX_SOFTWARE, "setuid(0) succeeded after dropping privileges")
