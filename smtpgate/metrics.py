"""metrics - the counters in Prometheus's text format, served over HTTP by a process of their own

DESCRIPTION
    FAMILIES is every metric smtpd and smtpfwdd export: its name, type,
    help and labels, each label's values fixed here or by the
    configuration at start (a filter's name, a DNS list's zone), never by
    a client: no address, no sender is ever a label.  layout() makes the
    keys of counters.py's table for a configuration; render() writes the
    text exposition format (version 0.0.4, which OpenMetrics scrapers
    read) from the table's totals and the gauges of the moment.

    Server is the HTTP side: one process, one epoll loop, GET (or HEAD)
    /metrics and nothing else; a request line and headers of at most
    REQUEST_MAX octets within TIMEOUT seconds, at most CONNECTIONS_MAX at once
    (past that the oldest unanswered one is closed: a slow client cannot
    starve a scrape), HTTP/1.0 and 1.1, one request per connection.
    Handle forks it: smtpd's master after it binds SMTPD_METRICS_LISTEN
    (the process enters the jail and the sandbox as a worker does: it
    never runs as root, never reads a client's octets), smtpfwdd's after
    SMTPFWDD_METRICS_LISTEN (as smtpfwdd's user, in the seccomp sandbox);
    the parent starts it again if it ends.
"""

import bisect
import errno
import os
import select
import signal
import socket
import time

from smtpgate import counters, log, process

# name: (type, help, labels); a counter's exported name ends in _total.
FAMILIES = {
    "smtpd_connections": ("counter", "Connections, by what became of them before a session",
                          ("result", "reason")),
    "smtpd_sessions": ("counter", "Sessions served by the workers", ()),
    "smtpd_sessions_active": ("gauge", "Sessions running on a worker now", ()),
    "smtpd_front_connections": ("gauge", "Connections the front stage holds now", ()),
    "smtpd_workers": ("gauge", "Worker processes, by state", ("state",)),
    "smtpd_messages": ("counter", "Messages at the end of DATA, by outcome",
                       ("result", "reason")),
    "smtpd_message_bytes": ("counter", "Octets of the messages accepted, as received", ()),
    "smtpd_recipients": ("counter", "RCPT commands, by outcome", ("result", "reason")),
    "smtpd_replies": ("counter", "Replies of class 4 and 5 written", ("class",)),
    "smtpd_milter_verdicts": ("counter", "Mail filters' answers, by filter",
                              ("filter", "verdict")),
    "smtpd_dnsbl_lookups": ("counter", "DNS list questions, by list and answer",
                            ("list", "result")),
    "smtpd_tls_sessions": ("counter", "STARTTLS handshakes, by protocol version", ("version",)),
    "smtpd_spool_dir_fsyncs": ("counter", "fsyncs of the spool directory", ()),
    "smtpd_shared_store_up": ("gauge", "1 if the shared store answers, 0 if not", ()),
    "smtpd_message_seconds": ("histogram", "Seconds from the connection to a message's 250",
                              ()),
    "smtpfwdd_queue_messages": ("gauge", "Spool files, by state", ("state",)),
    "smtpfwdd_queue_oldest_seconds": ("gauge", "Age of the oldest message waiting in the "
                                      "spool (queued or deferred)", ()),
    "smtpfwdd_deliveries": ("counter", "Deliveries of a spool file, by outcome", ("result",)),
    "smtpfwdd_bounces": ("counter", "Delivery status notifications queued, by action",
                         ("action",)),
}

CONNECTION_REASONS = {
    "accepted": ("",),
    "refused": ("full", "network", "rate", "sessions", "dnsbl", "pregreet", "pipelining",
                "proxy", "command_timeout", "worker_wait", "descriptors", "health_check",
                "too_long", "stopping"),
    "closed": ("hangup", "quit"),
}
MESSAGE_REASONS = {
    "accepted": ("", "held"),
    "refused": ("size", "bare_line_ending", "milter", "headers"),
    "tempfail": ("spool", "milter", "data"),
    "discarded": ("milter",),
}
RECIPIENT_REASONS = {
    "accepted": ("",),
    "refused": ("rules", "verify", "milter", "syntax"),
    "tempfail": ("rules", "verify", "milter", "limit"),
}
MILTER_VERDICTS = ("continue", "refuse", "tempfail", "discard", "shutdown", "failed")
DNSBL_RESULTS = ("listed", "clean", "error", "timeout")
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3", "other", "failed")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
QUEUE_STATES = ("queued", "deferred", "held", "failed")
DELIVERY_RESULTS = ("sent", "deferred", "failed")
BOUNCE_ACTIONS = ("failed", "delayed")

GAUGES = [("smtpd_front_connections",)] + [("smtpfwdd_queue_messages", s) for s in QUEUE_STATES] \
    + [("smtpfwdd_queue_oldest_seconds",)]

CONNECTIONS_MAX = 16
LINGER, DRAIN_MAX = 2.0, 1 << 20    # after an answer: seconds and octets read and dropped
DRAINING = b"draining"
REQUEST_MAX = 8192
TIMEOUT = 5.0


def smtpd_layout(filters=(), lists=()):
    """The counters' keys of smtpd: the families' label values, with the
    configured filters' names and lists' zones."""
    keys = []
    for family, table in (("smtpd_connections", CONNECTION_REASONS),
                          ("smtpd_messages", MESSAGE_REASONS),
                          ("smtpd_recipients", RECIPIENT_REASONS)):
        keys += [(family, r, why) for r, whys in table.items() for why in whys]
    keys += [("smtpd_milter_verdicts", f, v) for f in filters for v in MILTER_VERDICTS]
    keys += [("smtpd_dnsbl_lookups", z, r) for z in lists for r in DNSBL_RESULTS]
    keys += [("smtpd_tls_sessions", v) for v in TLS_VERSIONS]
    keys += [("smtpd_message_seconds", le) for le in BUCKETS + (float("inf"),)]
    keys += [("smtpd_message_seconds_sum",), ("smtpd_front_connections",)]
    return keys


def smtpfwdd_layout():
    return ([("smtpfwdd_deliveries", r) for r in DELIVERY_RESULTS]
            + [("smtpfwdd_bounces", a) for a in BOUNCE_ACTIONS]
            + [("smtpfwdd_queue_messages", s) for s in QUEUE_STATES]
            + [("smtpfwdd_queue_oldest_seconds",)])


def observe(seconds):
    """One message's time to its 250, into the histogram (the sum kept in
    microseconds)."""
    i = bisect.bisect_left(BUCKETS, seconds)
    le = BUCKETS[i] if i < len(BUCKETS) else float("inf")
    counters.count(("smtpd_message_seconds", le))
    counters.count(("smtpd_message_seconds_sum",), int(seconds * 1e6))


# -- the text format --

def escape(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def labelled(name, names, values):
    pairs = ['%s="%s"' % (n, escape(v)) for n, v in zip(names, values) if v != ""]
    return "%s{%s}" % (name, ",".join(pairs)) if pairs else name


def number(v):
    if v == float("inf"):
        return "+Inf"
    return "%d" % v if float(v).is_integer() else repr(float(v))


SMTPD_FIXED = (("smtpd_sessions", (), "sessions"), ("smtpd_message_bytes", (), "message_bytes"),
               ("smtpd_spool_dir_fsyncs", (), "spool_dir_fsyncs"),
               ("smtpd_replies", ("4",), "refusals_temporary"),
               ("smtpd_replies", ("5",), "refusals_permanent"))


def render(totals, extra=(), fixed=()):
    """The exposition text: the families' samples from totals ({key:
    value} of counters.py), fixed ((family, labels, name) of counters'
    FIXED keys, smtpd's) and extra ((key, value) of gauges computed at the
    scrape); each family once, HELP and TYPE first."""
    by_family = {}
    for key, value in list(totals.items()) + list(extra):
        if isinstance(key, tuple):
            by_family.setdefault(key[0], []).append((key[1:], value))
    for family, labels, name in fixed:
        by_family.setdefault(family, []).append((labels, totals.get(name, 0)))
    out = []
    for family, (kind, text, labels) in FAMILIES.items():
        samples = by_family.get(family)
        if not samples:
            continue
        name = family + "_total" if kind == "counter" else family
        out.append("# HELP %s %s.\n# TYPE %s %s\n" % (name, text, name, kind))
        if kind == "histogram":
            total = 0
            for (le,), v in sorted(samples, key=lambda s: s[0][0]):
                total += v
                out.append('%s_bucket{le="%s"} %d\n' % (family, number(le), total))
            out.append("%s_sum %s\n%s_count %d\n" % (
                family, number(by_family.get(family + "_sum", [((), 0)])[0][1] / 1e6),
                family, total))
            continue
        for values, v in samples:
            out.append("%s %s\n" % (labelled(name, labels, values), number(v)))
    return "".join(out).encode()


# -- the server --

class Server:
    """GET /metrics over HTTP, bounded (see above); page() makes the body."""

    def __init__(self, listener, page):
        self.listener, self.page = listener, page
        self.listener.setblocking(False)
        self.ep = select.epoll()
        self.ep.register(listener.fileno(), select.EPOLLIN)
        self.conns = {}         # fd -> [socket, received, deadline, reply or None]
        self.stopping = False

    def run(self, parent=None):
        signal.signal(signal.SIGTERM, self.on_stop)
        log.info("metrics: serving /metrics on %s", shown(self.listener.getsockname()))
        while not self.stopping:
            if parent is not None and os.getppid() != parent:
                break           # the parent died: so do we
            try:
                events = self.ep.poll(1.0)
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == self.listener.fileno():
                    self.accept()
                elif fd in self.conns:
                    self.event(fd, ev)
            now = time.monotonic()
            for fd in [fd for fd, c in self.conns.items() if c[2] <= now]:
                self.close(fd)
        return os.EX_OK

    def on_stop(self, *a):
        self.stopping = True

    def accept(self):
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.err("metrics: accept: %s", e.strerror)
                    time.sleep(0.1)
                return
            if len(self.conns) >= CONNECTIONS_MAX:
                oldest = min(self.conns, key=lambda fd: self.conns[fd][2])
                self.close(oldest)
            sock.setblocking(False)
            self.conns[sock.fileno()] = [sock, b"", time.monotonic() + TIMEOUT, None]
            self.ep.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

    def event(self, fd, ev):
        c = self.conns[fd]
        if c[3] == DRAINING:
            return self.drain(fd)
        if c[3] is not None:
            return self.write(fd)
        try:
            data = c[0].recv(REQUEST_MAX + 1 - len(c[1]))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            return self.close(fd)
        c[1] += data
        end = c[1].find(b"\r\n\r\n")
        if end < 0:
            end = c[1].find(b"\n\n")
        if end >= 0:
            self.respond(fd, c[1][:end])
        elif len(c[1]) > REQUEST_MAX:
            self.respond(fd, None)

    def respond(self, fd, head):
        c = self.conns[fd]
        status, body, ctype = self.answer(head)
        method = head.split(b" ", 1)[0] if head else b""
        reply = ("HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                 "Connection: close\r\n\r\n" % (status, ctype, len(body))).encode()
        c[3] = reply + (b"" if method == b"HEAD" else body)
        c[2] = time.monotonic() + TIMEOUT
        self.ep.modify(fd, select.EPOLLOUT)
        self.write(fd)

    def answer(self, head):
        """(status line, body, content type) for a request head."""
        text = "text/plain; charset=utf-8"
        if head is None:
            return "431 Request Header Fields Too Large", b"request too large\n", text
        parts = head.split(b"\n", 1)[0].rstrip(b"\r").split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return "400 Bad Request", b"bad request\n", text
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"GET /metrics\n", text
        if target != b"/metrics":
            return "404 Not Found", b"GET /metrics\n", text
        try:
            return "200 OK", self.page(), "text/plain; version=0.0.4; charset=utf-8"
        except Exception as e:      # a scrape must never end the server
            log.err("metrics: rendering: %s: %s", type(e).__name__, e)
            return "500 Internal Server Error", b"error\n", text

    def write(self, fd):
        c = self.conns[fd]
        try:
            n = c[0].send(c[3])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self.close(fd)
        c[3] = c[3][n:]
        if not c[3]:
            # Half-close, then read what the client still sends until it
            # closes (LINGER at most): closing with unread input would reset
            # the connection, and the reset can destroy our answer unread.
            try:
                c[0].shutdown(socket.SHUT_WR)
            except OSError:
                return self.close(fd)
            c[1], c[2], c[3] = 0, time.monotonic() + LINGER, DRAINING
            self.ep.modify(fd, select.EPOLLIN | select.EPOLLRDHUP)

    def drain(self, fd):
        c = self.conns[fd]
        try:
            data = c[0].recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        c[1] += len(data)
        if not data or c[1] > DRAIN_MAX:
            self.close(fd)

    def close(self, fd):
        c = self.conns.pop(fd)
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass
        c[0].close()


def shown(addr):
    return "[%s]:%d" % addr[:2] if ":" in addr[0] else "%s:%d" % addr[:2]


def parse_listen(text):
    """"ADDRESS:PORT" (an IPv6 address in brackets) -> (address, port);
    ValueError.  Numeric only: no name is looked up as root."""
    import ipaddress
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("%r: not ADDRESS:PORT" % text)
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ipaddress.ip_address(host)
    return host, int(port)


def check_listen(name, text, problems):
    if text.strip():
        try:
            parse_listen(text)
        except ValueError:
            problems.append("%s = %s: not ADDRESS:PORT with a numeric address "
                            "(e.g. 127.0.0.1:9425, [::1]:9425)" % (name, text))


def bind(name, text):
    """The listening socket for name's value, or None if empty; exits 71
    (logged) when it cannot be bound."""
    if not text.strip():
        return None
    host, port = parse_listen(text)
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        log.die(os.EX_OSERR, "bind(%s port %d) for %s: %s", host, port, name, e.strerror)
    s.listen(64)
    s.setblocking(False)
    return s


class Handle:
    """The parent's hold on the metrics process: start() forks it with the
    listener; enter() (in the child) confines it; page() renders."""

    RESTART, RESTART_MAX = 1.0, 60.0     # seconds before a new one; doubled while it dies young

    def __init__(self, listener, title):
        self.listener, self.title = listener, title
        self.pid = None
        self.next_start = self.started = 0.0
        self.backoff = self.RESTART

    def due(self):
        return self.listener is not None and self.pid is None \
            and time.monotonic() >= self.next_start

    def start(self, close_in_child, enter, page, stderr=None):
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as e:
            log.err("fork of the metrics server: %s", e.strerror)
            self.next_start = time.monotonic() + self.RESTART
            return
        if pid == 0:
            status = os.EX_SOFTWARE
            try:
                process.close_all(close_in_child())
                process.child_signals(signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR1)
                process.leave_terminal(stderr)
                process.set_title(self.title)
                log.log.role = "metrics: "
                enter()
                status = Server(self.listener, page).run(parent)
            except BaseException as e:      # noqa: B036 -- a child never returns
                log.crit("metrics server: %s: %s", type(e).__name__, e)
            os._exit(status)
        self.pid, self.started = pid, time.monotonic()

    def ended(self, pid, status, stopping):
        """True if pid was the metrics process (it is started again)."""
        if pid != self.pid:
            return False
        young = time.monotonic() - self.started < 10
        self.backoff = min(self.backoff * 2, self.RESTART_MAX) if young else self.RESTART
        self.next_start = time.monotonic() + self.backoff
        if not stopping:
            log.warn("metrics server %d ended with %s; starting it again in %d seconds", pid,
                     process.describe(status), self.backoff)
        self.pid = None
        return True

    def stop(self):
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
