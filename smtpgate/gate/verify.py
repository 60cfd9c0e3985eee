"""verify - recipient verification: ask the MTA behind us before saying 250

DESCRIPTION
    A rule with the action "verify" allows a recipient only if the backend
    MTA (SMTPD_VERIFY_BACKEND or smtpd -V: [lmtp:]address:port, an IP
    literal the jailed worker reaches over TCP) would take it.  A callout
    is EHLO (LHLO), MAIL FROM:<>, RCPT TO:<address>, then RSET before the
    next one and QUIT at the end: one connection per session at a time,
    reused for its RCPTs, every step within SMTPD_VERIFY_TIMEOUT and the
    session's deadline.  The backend's 2xx allows; its 5xx gives our 550
    "5.1.1 <address>: Recipient address rejected: User unknown" (its own
    text goes to the log only); a 4xx gives 450, and no answer (refused,
    timeout, garbage) 451 -- or, with SMTPD_VERIFY_DEFER_OK=1, acceptance.
    A session makes at most SMTPD_VERIFY_MAX callouts; further unverified
    recipients get 450.
CACHE
    Answers are kept in an sqlite3 database inside the jail
    (SMTPD_VERIFY_CACHE), shared by every process of the gate and kept
    across restarts: a 2xx for SMTPD_VERIFY_POSITIVE_TTL seconds, a 5xx for
    SMTPD_VERIFY_NEGATIVE_TTL; at most SMTPD_VERIFY_CACHE_SIZE rows, the
    soonest to expire going first.  A cache that cannot be opened, read or
    written (corrupt, read-only, locked too long) is dropped with one log
    line: the session goes on without it.  Each session asks the backend
    about an address at most once.
"""

import hashlib
import select
import socket
import sqlite3
import time

import buildconf
from smtpgate import log
from smtpgate.deadline import of as deadline_of
from smtpgate.gate import chat
from smtpgate.text import visible
from smtpgate.address import bare

REPLY_LINE_MAX = 512
REPLY_LINES_MAX = 100
TRANSACTION_MAX = 50        # RCPTs per MAIL FROM:<> on one connection


def refusal(reply, address):
    """The line that refuses address (a rules Verdict's reply)."""
    return (reply % address).last_line()


def lifetime(code):
    """How long an answer is kept: a 250 (the user exists) or a 550 (it
    does not); None for anything else."""
    return {250: buildconf.SMTPD_VERIFY_POSITIVE_TTL,
            550: buildconf.SMTPD_VERIFY_NEGATIVE_TTL}.get(code)


class BackendError(Exception):
    """The backend did not answer as it should; str() says how."""


def exact(address):
    """What tells one recipient from another: the local part as it is
    (RFC 5321 2.4: case-sensitive; the backend decides what it folds), the
    domain in lower case."""
    local, at, domain = address.rpartition("@")
    return local + at + domain.lower() if at else address


class Callout:
    """One connection to the backend, reused for a session's questions."""

    def __init__(self, backend, myname, deadline):
        self.lmtp, self.host, self.port = backend
        self.myname, self.deadline = myname, deadline_of(deadline)
        self.sock = None
        self.buf = b""
        self.rcpts = None           # RCPTs in the open transaction, or None

    def timeout(self):
        return self.deadline.within(buildconf.SMTPD_VERIFY_TIMEOUT, BackendError)

    def ask(self, address):
        """(code, text) of the backend's answer to RCPT TO:<address>."""
        if self.sock is None:
            self.open()
        if self.rcpts is not None and self.rcpts >= TRANSACTION_MAX:
            self.command(b"RSET", 250)
            self.rcpts = None
        if self.rcpts is None:
            self.command(b"MAIL FROM:<>", 250)
            self.rcpts = 0
        self.rcpts += 1
        return self.exchange(b"RCPT TO:<%s>" % address.encode("latin-1"))

    def open(self):
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout())
        except OSError as e:
            self.sock = None
            raise BackendError("connect to %s port %d: %s" % (
                self.host, self.port, e.strerror or e)) from None
        self.expect(self.reply(), 220)
        self.command(b"%s %s" % (b"LHLO" if self.lmtp else b"EHLO", self.myname.encode()), 250)

    def command(self, line, want):
        self.expect(self.exchange(line), want)

    def expect(self, reply, want):
        if reply[0] // 100 != want // 100:
            raise BackendError("%d %s" % reply)

    def exchange(self, line):
        try:
            self.sock.settimeout(self.timeout())
            self.sock.sendall(line + b"\r\n")
        except OSError as e:
            raise BackendError("write to backend: %s" % (e.strerror or e)) from None
        return self.reply()

    def reply(self):
        """(code, text) of one reply, however many lines; bounded."""
        texts = []
        while len(texts) < REPLY_LINES_MAX:
            line = self.line()
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b""):
                raise BackendError("not an SMTP reply: %r" % line[:60])
            texts.append(line[4:].decode("latin-1"))
            if line[3:4] != b"-":
                return int(line[:3]), " ".join(texts)
        raise BackendError("reply of more than %d lines" % REPLY_LINES_MAX)

    def line(self):
        while b"\r\n" not in self.buf:
            if len(self.buf) > REPLY_LINE_MAX:
                raise BackendError("reply line longer than %d octets" % REPLY_LINE_MAX)
            p = select.poll()
            p.register(self.sock, select.POLLIN)
            if not p.poll(self.timeout() * 1000):
                raise BackendError("backend timed out")
            try:
                chunk = self.sock.recv(4096)
            except OSError as e:
                raise BackendError("read from backend: %s" % (e.strerror or e)) from None
            if not chunk:
                raise BackendError("backend closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def close(self, polite=True):
        if self.sock is None:
            return
        if polite:
            try:
                self.sock.settimeout(1)
                self.sock.sendall(b"QUIT\r\n")
            except OSError:
                pass
        self.sock.close()
        self.sock = None
        self.buf = b""
        self.rcpts = None


class Cache:
    """The shared verification cache (see CACHE above); None-safe."""

    def __init__(self, path):
        self.path = path
        self.db = None
        self.failed = False

    def open(self):
        if self.db is None and not self.failed and self.path:
            try:
                self.db = sqlite3.connect(self.path, timeout=0.2, isolation_level=None)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA temp_store=MEMORY")
                self.db.execute("CREATE TABLE IF NOT EXISTS verified (key BLOB PRIMARY KEY, "
                                "code INTEGER, expires REAL)")
            except sqlite3.Error as e:
                self.give_up("open", e)
        return self.db

    def give_up(self, what, e):
        log.err("verification cache %s: %s: %s; going on without it", self.path, what, e)
        self.failed = True
        if self.db is not None:
            try:
                self.db.close()
            except sqlite3.Error:
                pass
        self.db = None

    @staticmethod
    def key(address):
        return hashlib.blake2b(exact(address).encode("latin-1"), digest_size=16).digest()

    @staticmethod
    def name(address):
        """The address's key in the gates' Redis (store.Layered)."""
        return Cache.key(address).hex().encode()

    def get(self, address, now):
        """The cached code for address (250 or 550), or None."""
        db = self.open()
        if db is None:
            return None
        try:
            row = db.execute("SELECT code, expires FROM verified WHERE key = ?",
                             (self.key(address),)).fetchone()
        except sqlite3.Error as e:
            self.give_up("read", e)
            return None
        if row is None or row[1] < now or row[0] not in (250, 550):
            return None
        return row[0]

    def put(self, address, code, now, ttl=None):
        """Keep address's code for ttl seconds (its lifetime() if None)."""
        ttl = lifetime(code) if ttl is None else ttl
        db = self.open()
        if db is None or ttl <= 0:
            return
        try:
            db.execute("INSERT OR REPLACE INTO verified VALUES (?, ?, ?)",
                       (self.key(address), code, now + ttl))
            db.execute("DELETE FROM verified WHERE rowid IN (SELECT rowid FROM verified "
                       "ORDER BY expires LIMIT max(0, (SELECT count(*) FROM verified) - ?))",
                       (buildconf.SMTPD_VERIFY_CACHE_SIZE,))
        except sqlite3.Error as e:
            self.give_up("write", e)


class Verifier:
    """A session's recipient verification: check(address) -> None to allow,
    or the reply line that refuses it."""

    def __init__(self, backend, myname, deadline, cache):
        self.backend, self.myname, self.deadline = backend, myname, deadline
        self.cache = cache
        self.callout = None
        self.asked = {}             # address -> its reply, this session
        self.callouts = 0
        self.said = None            # the backend's last answer, for the tester

    def check(self, address, where=""):
        address = bare(address)
        if exact(address) in self.asked:
            return self.asked[exact(address)]
        now = time.time()
        code = self.cache.get(address, now) if self.cache else None
        if code is not None:
            answer = None if code == 250 else refusal(chat.USER_UNKNOWN, address)
        else:
            answer = self.ask(address, now, where)
        self.asked[exact(address)] = answer
        return answer

    def ask(self, address, now, where):
        if self.backend is None:
            log.err("a verify rule matched %s, but no backend is configured "
                   "(SMTPD_VERIFY_BACKEND, -V)", address)
            return refusal(chat.CANNOT_VERIFY, address)
        if self.callouts >= buildconf.SMTPD_VERIFY_MAX:
            return refusal(chat.TOO_MANY_UNVERIFIED, address)
        self.callouts += 1
        if self.callout is None:
            self.callout = Callout(self.backend, self.myname, self.deadline)
        try:
            code, text = self.callout.ask(address)
        except BackendError as e:
            self.said = str(e)
            self.callout.close(polite=False)
            log.notice("cannot verify %s for %s: %s", address, where, visible(str(e), 300))
            if buildconf.SMTPD_VERIFY_DEFER_OK:
                log.notice("accepting %s unverified (SMTPD_VERIFY_DEFER_OK)", address)
                return None
            return refusal(chat.CANNOT_VERIFY, address)
        self.said = "%d %s" % (code, text)
        log.info("verified %s for %s: backend said %d %s", address, where, code,
                visible(text, 300))
        if code // 100 in (2, 5):
            if self.cache is not None:
                code = code // 100 * 100 + 50
                self.cache.put(address, code, ttl=lifetime(code), now=now)
            return None if code // 100 == 2 else refusal(chat.USER_UNKNOWN, address)
        return refusal(chat.UNVERIFIED, address)

    def close(self):
        if self.callout is not None:
            self.callout.close()
