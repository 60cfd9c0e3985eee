"""relay - smtpfwdd's SMTP and LMTP client: the mail agents smtp: and lmtp:

DESCRIPTION
    MAIL_AGENT (-s) is a program (sendmail, the original's way, the
    default) or a listener of the MTA: smtp:ADDRESS:PORT, lmtp:ADDRESS:PORT
    or lmtp:/path/to/socket (numeric addresses, an IPv6 one in brackets),
    with "+tls" at the end for STARTTLS, required and verified against
    SMTPFWDD_TLS_CA (the name in the certificate checked against
    SMTPFWDD_TLS_NAME when set).  parse() tells which.

    A delivery process keeps one Link for many messages: EHLO (LHLO) once,
    RSET between messages, QUIT after SMTPFWDD_KEEP_IDLE seconds unused.
    transfer() sends one transaction: XFORWARD first when the MTA offers it
    (Postfix: its log then names the original client, HELO and our queue
    id), MAIL with SIZE, BODY=8BITMIME, SMTPUTF8, RET and ENVID as the MTA
    offers them, each RCPT with NOTIFY and ORCPT under DSN, pipelined when
    it offers PIPELINING, then the message from the spool file (LF to
    CRLF, dot-stuffed).  Its answer is one Reply per recipient: the RCPT's
    refusal, or the reply to the data (LMTP: the recipient's own).
    Trouble is what leaves recipients unanswered (the MTA down, hung,
    talking nonsense, a reply past its bounds): the caller defers them.
    Every wait is bounded: SMTPFWDD_CONNECT_TIMEOUT, SMTPFWDD_COMMAND_TIMEOUT
    for each reply, SMTPFWDD_DATA_TIMEOUT for the message and its reply.
    A reply line is kept to LINE_MAX octets, a reply to LINES_MAX lines.
"""

import collections
import os
import re
import select
import socket
import ssl
import time

import buildconf
from smtpgate.text import visible

LINE_MAX = 2048             # octets of a reply line kept (the rest is read and dropped)
LINES_MAX = 100             # lines of one reply
RCPTS_MAX = 100             # recipients per transaction (RFC 5321 4.5.3.1.8: at least 100)
CHUNK = 65536
SPEC = re.compile(r"^(smtp|lmtp):(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+)):(\d{1,5})(\+tls)?$")
SOCKET_SPEC = re.compile(r"^lmtp:(/[^\0]*?)(\+tls)?$")
ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")

Spec = collections.namedtuple("Spec", "proto host port path tls text")


def parse(text):
    """A Spec for smtp:/lmtp: text, None for a program's path;
    ValueError for a listener that is not one."""
    if not text.startswith(("smtp:", "lmtp:")):
        return None
    m = SPEC.match(text)
    if m:
        import ipaddress
        host = m.group(2) or m.group(3)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("%s: %s is not a numeric address" % (text, host)) from None
        port = int(m.group(4))
        if not 0 < port < 65536:
            raise ValueError("%s: no such port" % text)
        return Spec(m.group(1), host, port, None, bool(m.group(5)), text)
    m = SOCKET_SPEC.match(text)
    if m:
        return Spec("lmtp", None, None, m.group(1), bool(m.group(2)), text)
    raise ValueError("%s: not smtp:ADDRESS:PORT, lmtp:ADDRESS:PORT or lmtp:/path "
                     "(numeric address; +tls at the end for STARTTLS)" % text)


class Trouble(Exception):
    """The recipients not yet answered cannot be now: defer them.  sent:
    the message's end was sent and no answer came (the MTA may have it)."""

    def __init__(self, why, status="4.4.2", sent=False, first=False):
        super().__init__(why)
        self.why, self.status, self.sent = why, status, sent
        self.first = first          # before the transaction's first answer


class Reply:
    def __init__(self, code, lines):
        self.code, self.lines = code, lines

    @property
    def text(self):
        return " ".join(self.lines)

    def status(self):
        """The RFC 3463 code it gave, or its class's x.0.0."""
        m = ENHANCED.match(self.lines[0] if self.lines else "")
        if m and m.group(1) == str(self.code)[0]:
            return "%s.%s.%s" % m.groups()
        return "%d.0.0" % (self.code // 100)

    def __str__(self):
        return "%d %s" % (self.code, visible(self.text, 600))


class Link:
    """One connection to the MTA (see above)."""

    def __init__(self, spec, myname):
        self.spec, self.myname = spec, myname
        self.sock = None
        self.buf = self.pending = b""
        self.ext = {}               # EHLO keyword -> its parameters
        self.used = 0               # transactions on this connection

    # -- the connection --

    def open(self):
        s = self.spec
        family = socket.AF_UNIX if s.path else socket.AF_INET6 if ":" in s.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(buildconf.SMTPFWDD_CONNECT_TIMEOUT)
        try:
            sock.connect(s.path or (s.host, s.port))
        except socket.timeout:
            sock.close()
            raise Trouble("connect to %s: timed out after %d seconds"
                          % (s.text, buildconf.SMTPFWDD_CONNECT_TIMEOUT), "4.4.1") from None
        except OSError as e:
            sock.close()
            raise Trouble("connect to %s: %s" % (s.text, e.strerror or e), "4.4.1") from None
        sock.setblocking(False)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buf, self.pending, self.used = sock, b"", b"", 0
        try:
            greeting = self.reply(buildconf.SMTPFWDD_COMMAND_TIMEOUT)
            if greeting.code != 220:
                raise Trouble("%s greeted with %s" % (s.text, greeting),
                              greeting.status() if greeting.code >= 400 else "4.4.2")
            self.hello()
            if s.tls:
                self.starttls()
                self.hello()
        except Trouble:
            self.close(polite=False)
            raise

    def hello(self):
        verb = "LHLO" if self.spec.proto == "lmtp" else "EHLO"
        r = self.command("%s %s" % (verb, self.myname))
        if r.code != 250:
            raise Trouble("%s said to %s: %s" % (self.spec.text, verb, r),
                          r.status() if r.code >= 400 else "4.5.0")
        self.ext = {}
        for line in r.lines[1:]:
            words = line.split()
            if words:
                self.ext[words[0].upper()] = words[1:]

    def starttls(self):
        if "STARTTLS" not in self.ext:
            raise Trouble("%s does not offer STARTTLS (the agent says +tls)" % self.spec.text,
                          "4.7.4")
        r = self.command("STARTTLS")
        if r.code != 220:
            raise Trouble("%s said to STARTTLS: %s" % (self.spec.text, r), "4.7.4")
        if self.buf:
            raise Trouble("%s sent octets before the TLS handshake" % self.spec.text, "4.7.4")
        ctx = ssl.create_default_context(cafile=buildconf.SMTPFWDD_TLS_CA or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        name = buildconf.SMTPFWDD_TLS_NAME
        ctx.check_hostname = bool(name)
        self.sock.setblocking(True)
        self.sock.settimeout(buildconf.SMTPFWDD_COMMAND_TIMEOUT)
        try:
            self.sock = ctx.wrap_socket(self.sock, server_hostname=name or None)
        except (ssl.SSLError, ssl.CertificateError, OSError) as e:
            raise Trouble("TLS with %s: %s" % (self.spec.text, visible(str(e), 300)),
                          "4.7.5") from None
        self.sock.setblocking(False)

    def ready(self):
        """Is the kept connection still there (nothing waiting on it, not
        closed by the MTA)?"""
        if self.sock is None:
            return False
        try:
            r, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not r and not self.buf

    def close(self, polite=True):
        if self.sock is None:
            return
        if polite:
            try:
                self.write(b"QUIT\r\n", time.monotonic() + 5)
                self.reply(5)
            except Trouble:
                pass
        try:
            self.sock.close()
        except OSError:
            pass
        self.sock, self.buf = None, b""

    # -- talking --

    def write(self, data, deadline, buffered=False):
        """Send data (after what was buffered); buffered: keep it for the
        next write instead (commands pipelined with the next ones)."""
        if buffered:
            self.pending += data
            return
        if self.pending:
            data, self.pending = self.pending + data, b""
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
                view = view[n:]
                continue
            except (BlockingIOError, ssl.SSLWantWriteError, InterruptedError):
                pass
            except ssl.SSLWantReadError:
                pass
            except OSError as e:
                raise Trouble("%s: write: %s" % (self.spec.text, e.strerror or e)) from None
            self.wait(deadline, write=True)

    def wait(self, deadline, write=False):
        left = deadline - time.monotonic()
        if left <= 0:
            raise Trouble("%s: no %s within the time allowed" % (
                self.spec.text, "room to write" if write else "reply"))
        try:
            select.select([] if write else [self.sock], [self.sock] if write else [], [], left)
        except (OSError, ValueError) as e:
            raise Trouble("%s: %s" % (self.spec.text, e)) from None

    def fill(self, deadline):
        while True:
            try:
                data = self.sock.recv(CHUNK)
            except (BlockingIOError, ssl.SSLWantReadError, InterruptedError):
                self.wait(deadline)
                continue
            except ssl.SSLWantWriteError:
                self.wait(deadline, write=True)
                continue
            except OSError as e:
                raise Trouble("%s: read: %s" % (self.spec.text, e.strerror or e)) from None
            if not data:
                raise Trouble("%s closed the connection" % self.spec.text)
            self.buf += data
            return

    def line(self, deadline):
        """One reply line (without CRLF), cut to LINE_MAX octets; the rest of
        a longer one is read and dropped, never kept."""
        kept = None
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                raw, self.buf = self.buf[:end], self.buf[end + 1:]
                return kept if kept is not None else raw[:LINE_MAX].rstrip(b"\r")
            if kept is None and len(self.buf) > LINE_MAX:
                kept = self.buf[:LINE_MAX]
            if kept is not None:
                self.buf = b""
            self.fill(deadline)

    def reply(self, seconds, first=False):
        """The next reply, within seconds (a deadline for the whole reply).
        first: the Trouble of a connection that fails here says so."""
        if self.pending:
            self.write(b"", time.monotonic() + seconds)
        try:
            return self.read_reply(time.monotonic() + seconds)
        except Trouble as e:
            e.first = first
            raise

    def read_reply(self, deadline):
        lines, code = [], None
        while True:
            raw = self.line(deadline)
            if len(raw) < 3 or not raw[:3].isdigit() or raw[3:4] not in (b" ", b"-", b""):
                raise Trouble("%s: not an SMTP reply: %s" % (self.spec.text, visible(raw, 200)),
                              "4.5.0")
            c = int(raw[:3])
            if code is not None and c != code or not 200 <= c <= 599:
                raise Trouble("%s: a reply out of step: %s" % (self.spec.text,
                                                              visible(raw, 200)), "4.5.0")
            code = c
            lines.append(raw[4:].decode("utf-8", "replace"))
            if raw[3:4] != b"-":
                return Reply(code, lines)
            if len(lines) >= LINES_MAX:
                raise Trouble("%s: a reply of more than %d lines" % (self.spec.text, LINES_MAX),
                              "4.5.0")

    def command(self, line, first=False):
        try:
            self.write(line.encode("latin-1", "replace") + b"\r\n",
                       time.monotonic() + buildconf.SMTPFWDD_COMMAND_TIMEOUT)
        except Trouble as e:
            e.first = first
            raise
        return self.reply(buildconf.SMTPFWDD_COMMAND_TIMEOUT, first)

    # -- one transaction --

    def reset(self):
        """RSET before a message on a kept connection; False if it is gone."""
        try:
            return self.command("RSET").code == 250
        except Trouble:
            return False

    def transfer(self, t):
        """Send the Transaction t: (one Reply per recipient, None where
        none came; the Trouble that left those unanswered, or None).
        Trouble itself when nothing was answered.  A kept connection that
        fails before its first answer (the MTA closed it as we wrote) is
        made anew, once."""
        kept = self.sock is not None and self.used
        if kept and not self.ready():
            self.close(polite=False)        # gone while kept: a new one
            kept = False
        if self.sock is None:
            self.open()
        try:
            return self.transaction(t, kept)
        except Trouble as e:
            if not (kept and e.first):
                raise
            self.close(polite=False)
        self.open()
        return self.transaction(t, False)

    def transaction(self, t, kept):
        self.used += 1
        n = len(t.rcpts)
        if t.utf8_needed and "SMTPUTF8" not in self.ext:
            if kept and not self.reset():
                raise Trouble("%s: RSET failed" % self.spec.text, first=True)
            return [Reply(554, ["5.6.7 SMTPUTF8 is required, but %s does not offer it"
                                % self.spec.text])] * n, None
        pipelining = "PIPELINING" in self.ext
        lead = ["RSET"] if kept else []             # (a kept connection: a clean slate)
        if "XFORWARD" in self.ext and t.xforward:
            lead += self.xforward_lines(t.xforward)
        if pipelining:                  # RSET and XFORWARD go in the same write
            self.write("".join(x + "\r\n" for x in lead).encode("latin-1", "replace"),
                       time.monotonic() + buildconf.SMTPFWDD_COMMAND_TIMEOUT, buffered=True)
        for i, x in enumerate(lead):
            r = self.reply(buildconf.SMTPFWDD_COMMAND_TIMEOUT, first=i == 0) if pipelining \
                else self.command(x, first=i == 0)
            if x == "RSET" and r.code != 250:
                raise Trouble("%s said to RSET: %s" % (self.spec.text, r), first=True)
        mail = "MAIL FROM:%s" % t.sender
        if "SIZE" in self.ext:
            mail += " SIZE=%d" % t.size
        if t.eightbit and "8BITMIME" in self.ext:
            mail += " BODY=8BITMIME"
        if t.utf8_needed:
            mail += " SMTPUTF8"
        dsn = "DSN" in self.ext
        if dsn and t.mail_dsn:
            mail += " " + t.mail_dsn
        lines = [mail] + ["RCPT TO:%s%s" % (r, " " + p if dsn and p else "")
                          for r, p in t.rcpts]
        if pipelining:
            self.write("".join(x + "\r\n" for x in lines + ["DATA"]).encode("latin-1", "replace"),
                       time.monotonic() + buildconf.SMTPFWDD_COMMAND_TIMEOUT)
            replies = [self.reply(buildconf.SMTPFWDD_COMMAND_TIMEOUT, first=not lead and i == 0)
                       for i in range(len(lines))]
            data = self.reply(buildconf.SMTPFWDD_COMMAND_TIMEOUT)
        else:
            replies = [self.command(lines[0], first=not lead)]
            if replies[0].code == 250:
                replies += [self.command(x) for x in lines[1:]]
            data = self.command("DATA") if any(r.code in (250, 251) for r in replies[1:]) \
                else None
        mail_reply, rcpt_replies = replies[0], replies[1:]
        accepted = [i for i, r in enumerate(rcpt_replies) if r.code in (250, 251)] \
            if mail_reply.code == 250 else []
        if data is not None and data.code == 354 and not accepted:
            self.close(polite=False)        # 354 with nobody to send to: out of step
            data = None
        if mail_reply.code != 250:
            return [mail_reply] * n, None
        if data is None or data.code != 354:
            return [rcpt_replies[i] if i not in accepted else data
                    for i in range(n)], None
        out = list(rcpt_replies)
        try:
            finals = self.send_body(t, len(accepted))
            trouble = None
        except Trouble as e:
            finals, trouble = e.answered, e
            self.close(polite=False)
        for k, i in enumerate(accepted):
            out[i] = finals[k] if k < len(finals) else None
        return out, trouble

    def xforward_lines(self, attrs):
        """XFORWARD commands of at most 512 octets, of the attributes the
        MTA named (a refusal of one changes nothing)."""
        offered = {a.upper() for a in self.ext.get("XFORWARD", [])}
        words = ["%s=%s" % (k, xtext(v) if v is not None else "[UNAVAILABLE]")
                 for k, v in attrs if k in offered]
        lines, line = [], ""
        for w in words:
            if line and len(line) + len(w) + 1 > 500:
                lines.append(line)
                line = ""
            line = (line or "XFORWARD") + " " + w
        return lines + ([line] if line else [])

    def send_body(self, t, accepted):
        """The message, then its final replies: one per accepted recipient
        (SMTP's one reply stands for all).  Trouble carries those that came
        (answered) and says whether the end of the message went out (sent)."""
        deadline = time.monotonic() + buildconf.SMTPFWDD_DATA_TIMEOUT
        try:
            os.lseek(t.fd, t.body_offset, os.SEEK_SET)
            at_start, last = True, b"\n"
            while True:
                chunk = os.read(t.fd, CHUNK)
                if not chunk:
                    break
                out = chunk.replace(b"\n.", b"\n..")
                if at_start and out[:1] == b".":
                    out = b"." + out
                at_start, last = chunk.endswith(b"\n"), chunk[-1:]
                self.write(out.replace(b"\n", b"\r\n"), deadline)
            self.write((b"" if last == b"\n" else b"\r\n") + b".\r\n", deadline)
        except Trouble as e:
            e.answered = []
            raise
        out = []
        try:
            for _ in range(accepted if self.spec.proto == "lmtp" else 1):
                out.append(self.reply(max(0.001, deadline - time.monotonic())))
        except Trouble as e:
            e.sent, e.answered = True, out
            raise
        return out if self.spec.proto == "lmtp" else out * accepted


def xtext(value):
    """RFC 3461 xtext: "+", "=" and what is not printable ASCII as +XX."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else "".join(
        "+%02X" % b for b in c.encode("utf-8")) for c in value)


Transaction = collections.namedtuple(
    "Transaction", "sender rcpts fd body_offset size eightbit utf8_needed mail_dsn xforward")
