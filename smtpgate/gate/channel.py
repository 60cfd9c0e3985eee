"""channel - the client side of an SMTP session: command lines, replies, DATA

DESCRIPTION
    Channel(rfd, wfd, read_timeout, deadline, sock=None, stress=None) reads
    and writes the client's descriptors without blocking past the deadline
    of the step -- a command line and its reply: READ_TIMEOUT; the DATA
    phase: SMTPD_DATA_TIMEOUT; the STARTTLS handshake: READ_TIMEOUT; each
    SMTPD_STRESS_TIMEOUT or SMTPD_STRESS_DATA_TIMEOUT at most while the
    front stage says it is under stress (stress.on()) -- nor past the
    session deadline: a client that drips one octet at a time holds a
    worker for one step, no more.  command() returns the next CRLF-terminated line,
    start_tls() puts TLS (ssl.SSLObject over memory BIOs) under the same
    line discipline,
    say() and flush() batch replies (chat.Reply), chunks() feeds DATA, linger()
    half-closes so a last reply is not lost to a reset.  DataReader reads a
    message to CRLF.CRLF, unstuffs dots, stores LF line ends and says why a
    message must be refused (bare CR/LF/NUL, size, write error).  Closed
    ends a session with an exit status.  session.py speaks the protocol.
"""

import math
import os
import re
import select
import socket
import ssl
import time

import buildconf
from smtpgate import log
from smtpgate.deadline import of as deadline_of

LINE_MAX = 512
CHUNK = 65536
BARE = re.compile(rb"\0|(?<!\r)\n|\r(?!\n)")     # what makes a message unsafe to relay


class Closed(Exception):
    """The session is over; .status is the exit status; .last_word: whether
    the client still gets a 421 (not after a 554 that said it all)."""

    def __init__(self, status, why="", last_word=True):
        super().__init__(why)
        self.status = status
        self.last_word = last_word


# ----------------------------------------------------------------- I/O ----

class Channel:
    """Buffered reads with timeouts and reply batching over two fds."""

    def __init__(self, rfd, wfd, read_timeout, deadline, sock=None, stress=None):
        self.rfd, self.wfd, self.sock = rfd, wfd, sock
        self.tls = self.tls_in = self.tls_out = None     # after STARTTLS
        self.broken = False         # a TLS handshake failed: say nothing more
        self.enhanced = False       # replies carry enhanced status codes (chat.enhanced)
        self.read_timeout, self.deadline = read_timeout, deadline_of(deadline)
        self.stress = stress        # admission.Stress, or None
        self.end = math.inf if self.deadline.at is None else self.deadline.at
        self.step("command")
        self.buf = bytearray()
        self.out = []
        self.read_poll = select.poll()
        self.read_poll.register(rfd, select.POLLIN)
        for fd in {rfd, wfd}:       # try first, poll only when it would block
            try:
                os.set_blocking(fd, False)
            except OSError:
                pass

    def say(self, reply):
        """Queue a chat.Reply: it goes out with the next read or flush."""
        self.out.append(reply.encode(self.enhanced))

    def flush(self, final=False):
        data = b"".join(self.out)
        self.out = []
        if self.broken:
            return          # a failed TLS handshake: nothing more goes out
        if self.tls is not None:
            if data:
                self.tls.write(data)
            data = self.tls_out.read()
        self.raw_write(data, final)

    def raw_write(self, data, final=False):
        while data:
            try:
                data = data[os.write(self.wfd, data):]
                continue
            except BlockingIOError:
                pass
            except OSError as e:
                raise Closed(os.EX_OSERR, "write to client: %s" % e.strerror) from None
            if final:       # the last words: past the deadline, but briefly
                p = select.poll()
                p.register(self.wfd, select.POLLOUT)
                if not p.poll(5000):
                    return
            else:
                self.wait(self.wfd, select.POLLOUT)

    def step(self, what):
        """A new step begins: a "command" (its line and our reply, or the
        STARTTLS handshake) or "DATA"; it must be over within its time."""
        if self.stress is not None and self.stress.on():
            seconds = min(buildconf.SMTPD_STRESS_DATA_TIMEOUT, buildconf.SMTPD_DATA_TIMEOUT) \
                if what == "DATA" else min(buildconf.SMTPD_STRESS_TIMEOUT, self.read_timeout)
        else:
            seconds = buildconf.SMTPD_DATA_TIMEOUT if what == "DATA" else self.read_timeout
        self.step_what, self.step_seconds = what, seconds
        self.step_end = time.monotonic() + seconds

    def wait(self, fd, event):
        # (deadline.within, spelt out: the hot loop of every session)
        now = time.monotonic()
        end = self.step_end if self.step_end < self.end else self.end
        if end <= now:
            raise self.step_timed_out(now)
        if fd == self.rfd and event == select.POLLIN:
            p = self.read_poll
        else:
            p = select.poll()
            p.register(fd, event)
        if not p.poll((end - now) * 1000):
            raise self.step_timed_out(time.monotonic())

    def step_timed_out(self, now):
        if now >= self.end:
            return self.timed_out()
        if self.step_what == "DATA":
            return Closed(os.EX_OSERR, "DATA timeout (%d seconds)" % self.step_seconds)
        return Closed(os.EX_OSERR, "read timeout (%d seconds)" % self.step_seconds)

    def fill(self):
        """Read more input (flushing replies first); Closed on EOF/timeout."""
        answered = bool(self.out)
        if answered:
            self.flush()
        self.check_deadline()       # also for a client that never pauses
        if answered and not self.tls_buffered():
            # A client that waits for each reply has sent nothing yet: poll
            # first rather than fail a read (pipelined input returns at once).
            self.wait(self.rfd, select.POLLIN)
        data = self.tls_read() if self.tls is not None else self.raw_read()
        if not data:
            raise Closed(os.EX_OSERR, "EOF on client fd")
        self.buf += data

    def raw_read(self):
        """What the client's descriptor has (b"" at EOF), within the timeouts."""
        while True:
            try:
                return os.read(self.rfd, CHUNK)
            except BlockingIOError:
                self.wait(self.rfd, select.POLLIN)
            except OSError as e:
                raise Closed(os.EX_OSERR, "read from client: %s" % e.strerror) from None

    # -- TLS: a change of transport under the same line discipline --

    def start_tls(self, context):
        """Discard what the client sent after STARTTLS (never executed
        inside TLS), then run the server handshake within READ_TIMEOUT and
        the deadline.  Returns the number of octets discarded; Closed (and
        nothing more is ever sent) if the handshake fails."""
        self.step("command")
        dropped = len(self.buf)
        del self.buf[:]
        self.tls_in, self.tls_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.tls_in, self.tls_out, server_side=True)
        try:
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self.raw_write(self.tls_out.read())
                    data = self.raw_read()
                    if not data:
                        raise Closed(os.EX_PROTOCOL, "client closed the connection")
                    self.tls_in.write(data)
                except ssl.SSLError as e:
                    self.raw_write(self.tls_out.read())      # the alert, if any
                    raise Closed(os.EX_PROTOCOL, tls_reason(e)) from None
            self.raw_write(self.tls_out.read())
        except Closed:
            self.broken = True
            raise
        return dropped

    def tls_read(self):
        """Plaintext from TLS records (b"" at the end of the stream)."""
        while True:
            try:
                data = self.tls.read(CHUNK)
                self.raw_write(self.tls_out.read())     # e.g. session tickets
                return data
            except ssl.SSLWantReadError:
                self.raw_write(self.tls_out.read())
                data = self.raw_read()
                if not data:
                    return b""
                self.tls_in.write(data)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except ssl.SSLError as e:
                self.broken = True
                raise Closed(os.EX_PROTOCOL, "TLS: %s" % tls_reason(e)) from None

    def tls_buffered(self):
        """Client input already inside the TLS layer (not on the socket)."""
        return self.tls is not None and bool(self.tls.pending() or self.tls_in.pending)

    def tls_info(self):
        """(version, cipher name) of the TLS session, or None."""
        if self.tls is None or self.broken:
            return None
        return self.tls.version(), self.tls.cipher()[0]

    def close_tls(self):
        """Best effort: send our close_notify after the last reply."""
        if self.tls is None or self.broken:
            return
        try:
            self.tls.unwrap()
        except ssl.SSLError:
            pass
        try:
            self.raw_write(self.tls_out.read(), final=True)
        except Closed:
            pass

    def command(self):
        """The next command line without CRLF, or None if it was bad.

        Only CRLF ends a line: a bare LF or CR inside it makes the whole
        text up to the CRLF one bad line (never two commands).  The session
        deadline is checked before every command, buffered or not; the
        command's own begins."""
        self.check_deadline()
        self.step("command")
        discarding = False
        while True:
            i = self.buf.find(b"\r\n")
            if i < 0:
                if len(self.buf) > LINE_MAX:
                    discarding = True       # keep a last CR: its LF may follow
                    del self.buf[:-1 if self.buf.endswith(b"\r") else len(self.buf)]
                self.fill()
                continue
            line = bytes(self.buf[:i])
            del self.buf[:i + 2]
            if discarding or i + 2 > LINE_MAX:
                return None, "Line too long"
            if b"\r" in line or b"\n" in line or b"\0" in line:
                return None, "Bare CR or LF or NUL in command"
            return line.decode("latin-1"), None

    def time_left(self):
        return self.end - time.monotonic()

    def talks_within(self, seconds, also=None):
        """Before the greeting: does the client send anything within seconds
        (never past the deadline)?  b"" if it closed, its first bytes if it
        talked, None if it stayed quiet -- an idle poll, nothing more; also
        None as soon as the descriptor also (the DNS lists' answers) is
        readable."""
        poll = self.read_poll
        if also is not None:
            poll = select.poll()
            poll.register(self.rfd, select.POLLIN)
            poll.register(also, select.POLLIN)
        events = poll.poll(max(0.0, min(seconds, self.time_left())) * 1000)
        if not any(fd == self.rfd for fd, _ in events):
            return None
        try:
            return os.read(self.rfd, LINE_MAX)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def check_deadline(self):
        if time.monotonic() >= self.end:
            raise self.timed_out()

    @staticmethod
    def timed_out(why=None):
        return Closed(os.EX_OSERR, "session timeout (%d seconds)" % buildconf.SESSION_TIMEOUT)

    def sleep(self, seconds):
        """Sleep, but never past the session deadline (then Closed)."""
        left = self.time_left()
        time.sleep(max(0.0, min(seconds, left)))
        if seconds >= left:
            self.check_deadline()

    def take(self, n, sink):
        """Exactly n octets of input to sink (a BDAT chunk), within the
        step's deadline; Closed on EOF or timeout."""
        while n > 0:
            if not self.buf:
                self.fill()
            piece = bytes(self.buf[:n])
            del self.buf[:n]
            n -= len(piece)
            sink(piece)

    def skip(self, n):
        """Read and drop n octets (a refused BDAT's chunk)."""
        self.take(n, lambda piece: None)

    def chunks(self):
        """Yield raw input for DATA: what is buffered, then fresh reads."""
        while True:
            if not self.buf:
                self.fill()
            data = bytes(self.buf)
            del self.buf[:]
            yield data

    def ready(self):
        """Has the client sent command input we have not read yet?  Reads
        what is there without waiting; under TLS the octets of a record not
        yet whole count too (they share a segment with what came before).
        A client that has only closed its side has not."""
        if self.buf:
            return True
        if not self.tls_buffered() and not self.read_poll.poll(0):
            return False
        encrypted = 0
        try:
            if self.tls is None:
                self.buf += os.read(self.rfd, CHUNK)
            else:
                if self.read_poll.poll(0):
                    self.tls_in.write(os.read(self.rfd, CHUNK))
                encrypted = self.tls_in.pending     # OpenSSL takes a partial record in
                self.buf += self.tls.read(CHUNK)
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        except (OSError, ssl.SSLError):
            return False            # the next read says what went wrong
        return bool(self.buf) or encrypted > 0

    def unread_input(self):
        """Input we have not consumed, buffered or waiting (or EOF)?  A
        close with unread data resets the connection, which can destroy
        our last reply before the client reads it; nothing else can."""
        if self.buf or self.tls_buffered():
            return True
        if self.sock is None:
            return bool(self.read_poll.poll(0))
        try:        # a peek tells EOF (nothing unread: no linger) from data
            return bool(self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return False        # reset: nobody is left to read our reply

    def unread(self, data):
        self.buf[0:0] = data

    def linger(self, seconds=1.0):
        """Half-close, then discard input briefly, so that our last reply
        is not lost to a reset caused by unread client data."""
        s = self.sock or dup_socket(self.wfd)
        if s is None:
            return
        try:
            s.shutdown(socket.SHUT_WR)
            s.settimeout(seconds)
            end = time.monotonic() + seconds
            while time.monotonic() < end and s.recv(CHUNK):
                pass
        except OSError:
            pass
        finally:
            if s is not self.sock:      # the caller's socket is the caller's to close
                s.close()


def tls_reason(e):
    """A short reason for an ssl.SSLError, for the log."""
    return "%s" % (e.reason or e.strerror or e.__class__.__name__)


def dup_socket(fd):
    """A socket object on a dup of fd, or None if fd is not a socket."""
    d = os.dup(fd)
    try:
        return socket.socket(fileno=d)
    except OSError:
        os.close(d)
        return None


# ---------------------------------------------------------------- DATA ----

class DataReader:
    """Read a message to CRLF.CRLF; unstuff dots; store LF line ends."""

    def __init__(self, channel, sink, maxsize):
        self.ch, self.sink, self.maxsize = channel, sink, maxsize
        self.size = 0
        self.problem = None      # None, "bare", "size" or "write"
        self.bare = None         # ("bare LF" | "bare CR" | "NUL", its line), the first
        self.lines = 0           # lines stored (or judged) so far
        self.headers = bytearray()
        self.in_headers = True

    def run(self):
        pending, mid_line = b"", False
        self.ch.step("DATA")
        for chunk in self.ch.chunks():
            pending += chunk
            if not mid_line and pending.startswith(b".\r\n"):
                self.ch.unread(pending[3:])
                return
            end = pending.find(b"\r\n.\r\n")
            if end >= 0:
                self.store(pending[:end + 2], mid_line)
                self.ch.unread(pending[end + 5:])
                return
            cut = pending.rfind(b"\r\n")
            if cut >= 0:
                self.store(pending[:cut + 2], mid_line)
                pending, mid_line = pending[cut + 2:], False
            elif len(pending) > CHUNK:
                # A very long line: store all but its last byte (a CR?).
                self.store(pending[:-1], mid_line, partial=True)
                pending, mid_line = pending[-1:], True

    def store(self, data, mid_line, partial=False):
        """Lines ending CRLF (or, if partial, a piece of one long line)."""
        crlf = 0 if partial else data.count(b"\r\n")
        if (b"\0" in data or data.count(b"\r") != crlf
                or data.count(b"\n") != crlf) and self.bare is None:
            m = BARE.search(data)
            self.bare = ({b"\0": "NUL", b"\n": "bare LF"}.get(m.group(), "bare CR"),
                         self.lines + data.count(b"\r\n", 0, m.start()) + 1)
            self.problem = self.problem or "bare"
        self.lines += crlf
        if self.problem:
            return
        if not mid_line and data.startswith(b"."):
            data = data[1:]
        self.write(data.replace(b"\r\n.", b"\r\n").replace(b"\r\n", b"\n"))

    def write(self, data):
        self.size += len(data)
        if self.maxsize and self.size > self.maxsize:
            self.problem = "size"
            return
        if self.in_headers:
            self.note_headers(data)
        try:
            self.sink(data)
        except OSError as e:
            log.err("write to spool file: %s", e.strerror)
            self.problem = "write"

    def note_headers(self, data):
        end = data.find(b"\n\n")
        if data.startswith(b"\n") and not self.headers:
            end = 0
        self.headers += data if end < 0 else data[:end + 1]
        if end >= 0 or len(self.headers) > 1 << 20:
            self.in_headers = False


def header_oddity(headers):
    """-P: a header byte that is a control (but TAB) or 8-bit character."""
    for b in headers:
        if (b < 0x20 and b not in (0x09, 0x0A)) or b >= 0x7F:
            return True
    return False
