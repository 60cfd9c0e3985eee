"""store - what several gates share: connection rates, verification and DNS lists' caches

DESCRIPTION
    One interface, two backends.  Local, the default: the rate table and
    the DNS lists' score cache in memory the -D master maps (admission.py,
    dnsbl.py), the verification cache in sqlite inside the jail (verify.py).
    Redis (SMTPD_SHARED_STORE=redis://[USER@]ADDRESS:PORT/DB, Valkey alike): the
    same three, shared by every gate that names the same server, under the
    keys PREFIX + "rate:" / "verify:" / "dnsbl:" + hex of the local key.
      Rates       the local table's sliding window (16 buckets), counted by
                  one Lua script (atomic: no race between gates); the local
                  table counts too, to take over when Redis fails.
      Caches      Layered: read locally first, then from Redis; written to
                  both.  Every value Redis holds is signed (HMAC-SHA256 with the
                  gates' key): an entry that does not verify is ignored and
                  logged, so that whoever can write to Redis cannot let an
                  unknown recipient or a listed client in.
    The per-network concurrency cap stays local to each gate.
FAILURE
    Every call is bounded by SMTPD_SHARED_STORE_TIMEOUT milliseconds and the
    session's deadline.  A refused connection, a timeout, an error reply
    (OOM: Redis full), garbage: the gate uses its local state, logs it once
    (Health, shared by a gate's workers), and asks Redis again once a second
    from one worker; the first answer brings sharing back, logged once.
    Nothing ever waits on Redis longer than the bound, and no client gets a
    4xx only because Redis is down.
SECRETS
    SMTPD_SHARED_STORE_SECRETS, read as root before the jail, only from a
    file no one but root may read: "key SECRET" (the signing key, the same
    on every gate, at least 16 characters), optionally "password PW" and
    "user NAME" (Redis AUTH; the user may be named in the URL instead).
    A Redis ACL user (etc/redis-acl.conf) limits what the gates -- and so a
    compromised worker, which holds both -- may do there: the commands
    below, on keys under the prefix.  A forged entry signed with the key is
    believed for at most its own TTL constant (an expiry further away is
    forged), a forged rate count for one window.
COMMANDS
    AUTH, SELECT, GET, SET (EX), EVALSHA and EVAL (RATE_SCRIPT: HGETALL,
    HDEL, HINCRBY, EXPIRE, SET NX EX), PING.
"""

import hashlib
import hmac
import os
import re
import select
import socket
import stat
import struct
import time

from smtpgate import log, shm
from smtpgate.deadline import NONE, of as deadline_of

URL = re.compile(r"^redis://(?:([A-Za-z0-9_.-]{1,64})@)?(\[[0-9A-Fa-f:.]+\]|[0-9.]+):(\d{1,5})"
                 r"(?:/(\d{1,2}))?$")
REPLY_MAX = 1 << 20             # octets of one reply, everything in it
ARRAY_MAX = 1024                # elements of one reply, at every depth
DEPTH_MAX = 2                   # arrays within arrays (ours: EVALSHA's answer is flat)
RETRY = 1.0                     # seconds between two tries while Redis is down
CLOCK_SLACK = 60                # seconds a gate's clock may be ahead of another's

RATE_SCRIPT = b"""
local bucket, nb, rate, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local seen, all = 0, redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local b = tonumber(all[i])
  if b and b > bucket - nb and b <= bucket then
    seen = seen + tonumber(all[i + 1])
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
redis.call('HINCRBY', KEYS[1], bucket, 1)
redis.call('EXPIRE', KEYS[1], window + 1)
if seen < rate then return {1, 0} end
if redis.call('SET', KEYS[2], 1, 'NX', 'EX', window) then return {0, 1} end
return {0, 0}
"""
RATE_SHA = hashlib.sha1(RATE_SCRIPT).hexdigest().encode()


class ConfigError(Exception):
    """SMTPD_SHARED_STORE or its secrets file is unusable; str() says why."""


class Unavailable(Exception):
    """Redis did not answer as it should; str() says how."""


class ReplyError(Exception):
    """An error reply (-ERR ...) of Redis."""


def parse_url(text):
    """redis://[USER@]ADDRESS:PORT/DB -> (user or None, address, port, db);
    ConfigError.  (The password is never in the URL: the secrets file
    holds it.)"""
    m = URL.match(text.strip())
    if not m:
        raise ConfigError("SMTPD_SHARED_STORE = %s: not redis://[USER@]ADDRESS:PORT/DB with "
                          "an IP address (the jailed workers resolve no names; the password "
                          "goes in the secrets file)" % text)
    user, addr, port, db = m.group(1), m.group(2).strip("[]"), int(m.group(3)), \
        int(m.group(4) or 0)
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)
    except OSError:
        raise ConfigError("SMTPD_SHARED_STORE = %s: %r is not an IP address" % (text, addr)) \
            from None
    if not 0 < port < 65536:
        raise ConfigError("SMTPD_SHARED_STORE = %s: bad port" % text)
    return user, addr, port, db


def read_secrets(path):
    """The secrets file (as root, before the jail): {"key": ..., "password":
    ..., "user": ...}; ConfigError if it is missing, readable by others than
    root, not a regular file, or lacks a key."""
    if not path:
        raise ConfigError("SMTPD_SHARED_STORE needs SMTPD_SHARED_STORE_SECRETS, a file "
                          "with the gates' signing key")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError("%s: %s (create it: echo \"key $(head -c 24 /dev/urandom | "
                          "base64)\" > %s; chmod 600 %s; the same key on every gate)"
                          % (path, e.strerror, path, path)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("%s: not a regular file" % path)
        if st.st_uid != 0 or st.st_mode & 0o077:
            raise ConfigError("%s: must be root's and readable by root only (chmod 600), "
                              "it holds the signing key and the Redis password" % path)
        text = os.read(fd, 65536).decode("utf-8", "replace")
    finally:
        os.close(fd)
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, value = line.partition(" ")
        if word not in ("key", "password", "user") or not value.strip():
            raise ConfigError("%s:%d: not 'key SECRET', 'password PW' or 'user NAME'"
                              % (path, n))
        out[word] = value.strip()
    if len(out.get("key", "")) < 16:
        raise ConfigError("%s: no 'key SECRET' of at least 16 characters" % path)
    return out


class Health(shm.Region):
    """Is Redis up, as a gate's processes last saw it: a word in memory the
    -D master maps before it forks (inetd: this process alone).  down, and
    when to try again (deciseconds since the mapping was made)."""

    def __init__(self):
        super().__init__("smtpd-store", 8)
        self.base = time.monotonic()

    def now(self):
        return int((time.monotonic() - self.base) * 10) + 1

    def usable(self):
        """May this process ask Redis now?  While it is down, one process
        a second may (it takes the turn)."""
        down, retry = struct.unpack("II", self.mm[:8])
        if not down:
            return True
        with self:
            down, retry = struct.unpack("II", self.mm[:8])
            now = self.now()
            if down and now < retry:
                return False
            self.mm[:8] = struct.pack("II", down, now + int(RETRY * 10))
            return True

    def change(self, down):
        """Record up or down: True if that is news (to be logged)."""
        if struct.unpack("I", self.mm[:4])[0] == int(down):
            return False
        with self:
            was = struct.unpack("I", self.mm[:4])[0]
            self.mm[:8] = struct.pack("II", int(down), self.now() + int(RETRY * 10))
            return was != int(down)


class Redis:
    """A small RESP client for the jailed workers: one connection per
    process, opened at first use, every call bounded (call() raises
    Unavailable; the caller falls back)."""

    def __init__(self, url, secrets, prefix, timeout_ms):
        self.url = url
        user, self.addr, self.port, self.db = parse_url(url)
        self.key = secrets["key"].encode("utf-8")
        user = user or secrets.get("user")
        self.auth = [a.encode("utf-8") for a in (user, secrets.get("password")) if a]
        self.prefix = prefix.encode("utf-8")
        self.timeout = timeout_ms / 1000.0
        self.health = Health()
        self.sock, self.buf = None, bytearray()
        self.got = self.elements = 0        # of the reply being read
        self.pid = None

    # -- the connection --

    def close(self):
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buf = None, bytearray()

    def connect(self, end):
        family = socket.AF_INET6 if ":" in self.addr else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.setblocking(False)
        try:
            s.connect((self.addr, self.port))
        except BlockingIOError:
            pass
        except OSError as e:
            s.close()
            raise Unavailable("connect: %s" % e.strerror) from None
        p = select.poll()
        p.register(s, select.POLLOUT)
        if not p.poll(max(0, int((end - time.monotonic()) * 1000))):
            s.close()
            raise Unavailable("connect: timed out")
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            s.close()
            raise Unavailable("connect: %s" % os.strerror(err))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buf, self.pid = s, bytearray(), os.getpid()
        self.readable = select.poll()
        self.readable.register(s, select.POLLIN)
        hello = []
        if self.auth:
            hello.append([b"AUTH"] + self.auth)
        if self.db:
            hello.append([b"SELECT", str(self.db).encode()])
        for args in hello:
            self.send(args, end)
        for args in hello:
            r = self.reply(end)
            if isinstance(r, ReplyError):
                raise Unavailable("%s: %s" % (args[0].decode(), r))

    def send(self, args, end):
        """The command, written at once when the socket takes it (it nearly
        always does: one small packet), else as it drains, within end."""
        data = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        p = None
        while data:
            try:
                data = data[self.sock.send(data):]
                continue
            except BlockingIOError:
                pass
            except OSError as e:
                raise Unavailable("write: %s" % e.strerror) from None
            if p is None:
                p = select.poll()
                p.register(self.sock, select.POLLOUT)
            if not p.poll(max(0, int((end - time.monotonic()) * 1000))):
                raise Unavailable("write: timed out")

    def fill(self, end):
        """More of the reply; the deadline holds even while data keeps
        coming, and the octets read count against REPLY_MAX."""
        left = end - time.monotonic()
        if left <= 0 or not self.readable.poll(int(left * 1000)):
            raise Unavailable("timed out after %d ms" % (self.timeout * 1000))
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            raise Unavailable("read: %s" % e.strerror) from None
        if not chunk:
            raise Unavailable("connection closed")
        self.buf += chunk
        self.got += len(chunk)
        if self.got > REPLY_MAX + 64:
            raise Unavailable("reply over %d octets" % REPLY_MAX)

    def line(self, end):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line
            if len(self.buf) > 4096:
                raise Unavailable("garbage: a line over 4096 octets")
            self.fill(end)

    def reply(self, end):
        """One reply: bytes, int, None, a list, or a ReplyError (returned);
        Unavailable past REPLY_MAX octets, ARRAY_MAX elements in all or
        DEPTH_MAX nested arrays, or the deadline end."""
        self.got, self.elements = len(self.buf), 0
        return self.value(end, 0)

    def value(self, end, depth):
        line = self.line(end)
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return ReplyError(rest.decode("latin-1")[:200])
        if kind in (b":", b"$", b"*"):
            try:
                n = int(rest)
            except ValueError:
                raise Unavailable("garbage: %r" % line[:40]) from None
            if kind == b":":
                return n
            if n < 0:
                return None
            if kind == b"$":
                if n > REPLY_MAX:
                    raise Unavailable("a reply of %d octets" % n)
                while len(self.buf) < n + 2:
                    self.fill(end)
                data = bytes(self.buf[:n])
                if self.buf[n:n + 2] != b"\r\n":
                    raise Unavailable("garbage after a bulk string")
                del self.buf[:n + 2]
                return data
            self.elements += n
            if self.elements > ARRAY_MAX:
                raise Unavailable("a reply of more than %d elements" % ARRAY_MAX)
            if depth >= DEPTH_MAX:
                raise Unavailable("arrays nested more than %d deep" % DEPTH_MAX)
            return [self.value(end, depth + 1) for _ in range(n)]
        raise Unavailable("garbage: %r" % line[:40])

    # -- calls --

    def call(self, args, deadline=NONE):
        """The reply to one command; Unavailable (then the caller uses its
        local state).  None without asking while Redis is known down."""
        if not self.health.usable():
            raise Unavailable("down")
        end = deadline_of(deadline).earliest(self.timeout)
        if self.pid != os.getpid():
            self.sock, self.buf = None, bytearray()     # the parent's connection
        while True:
            reused = self.sock is not None
            try:
                if not reused:
                    self.connect(end)
                self.send(args, end)
                r = self.reply(end)
                break
            except Unavailable as e:
                self.close()
                if reused and time.monotonic() < end:
                    continue        # a connection from before a restart: once more, anew
                self.went_down(args[0], e)
                raise
        if self.health.change(False):
            log.notice("shared store %s answers again: sharing state", self.url)
        return r

    def went_down(self, verb, why):
        if self.health.change(True):
            log.err("shared store %s: %s: %s; using this gate's own state until it answers "
                    "(rates count per gate meanwhile)", self.url, verb.decode("latin-1"), why)

    def sign(self, key, payload):
        return hmac.new(self.key, key + b"\0" + payload, hashlib.sha256).hexdigest()[:32].encode()

    def get_signed(self, key, deadline=NONE):
        """The payload stored under key if its signature holds; None (a
        missing, expired or forged entry, or Redis unavailable)."""
        key = self.prefix + key
        try:
            r = self.call([b"GET", key], deadline)
        except Unavailable:
            return None
        if not isinstance(r, bytes):
            return None
        payload, _, mac = r.rpartition(b" ")
        if not hmac.compare_digest(mac, self.sign(key, payload)):
            log_forged(key)
            return None
        return payload

    def put_signed(self, key, payload, ttl, deadline=NONE):
        if ttl <= 0:
            return
        key = self.prefix + key
        try:
            r = self.call([b"SET", key, payload + b" " + self.sign(key, payload), b"EX",
                           b"%d" % max(1, int(ttl))], deadline)
        except Unavailable:
            return
        if isinstance(r, ReplyError):
            self.went_down(b"SET", r)

    def rate(self, netkey, rate, window, deadline=NONE):
        """(admitted, log this refusal) from the gates' shared window, or
        None when Redis cannot say."""
        bucket = int(time.time() * 16 / window)
        keys = [self.prefix + b"rate:" + netkey.hex().encode(),
                self.prefix + b"ratelog:" + netkey.hex().encode()]
        args = [b"2"] + keys + [b"%d" % bucket, b"16", b"%d" % rate, b"%d" % window]
        try:
            r = self.call([b"EVALSHA", RATE_SHA] + args, deadline)
            if isinstance(r, ReplyError) and str(r).startswith("NOSCRIPT"):
                r = self.call([b"EVAL", RATE_SCRIPT] + args, deadline)
        except Unavailable:
            return None
        if isinstance(r, ReplyError) or not (isinstance(r, list) and len(r) == 2
                                             and all(isinstance(x, int) for x in r)):
            self.went_down(b"EVALSHA", r if isinstance(r, ReplyError) else "garbage")
            return None
        return bool(r[0]), bool(r[1])


_forged = {}


def log_forged(key):
    now = time.monotonic()
    if now - _forged.get("t", -60) >= 60:
        _forged["t"] = now
        log.warn("shared store: the entry %s is not signed with this gate's key; "
                    "ignored (another site's, or forged)", key.decode("latin-1")[:120])


class Layered:
    """A local cache and, behind it, the gates' Redis: read locally first,
    then from Redis, whose answer fills the local cache; written to both.
    local: get(item, now) and put(item, value, ttl=, now=), or None (inetd
    has no score cache); kind: the key's prefix (b"verify:"); name(item):
    the rest of the key; lifetime(value): the longest a value of that kind
    may live here, None for a value no gate writes.  In Redis an entry is
    "VALUE EXPIRES", signed (Redis.get_signed): one whose expiry lies
    further than its lifetime (and CLOCK_SLACK) is forged and ignored."""

    def __init__(self, local, redis, kind, name, lifetime):
        self.local, self.redis, self.kind = local, redis, kind
        self.name, self.lifetime = name, lifetime

    def get(self, item, now):
        value = self.local.get(item, now) if self.local is not None else None
        if value is not None:
            return value
        payload = self.redis.get_signed(self.kind + self.name(item))
        try:
            value, expires = [int(x) for x in payload.split()] if payload else (None, 0)
        except ValueError:
            return None
        longest = self.lifetime(value) if value is not None else None
        if longest is None or not now <= expires <= now + longest + CLOCK_SLACK:
            return None
        if self.local is not None:
            self.local.put(item, value, ttl=expires - now, now=now)
        return value

    def put(self, item, value, ttl, now):
        if self.local is not None:
            self.local.put(item, value, ttl=ttl, now=now)
        self.redis.put_signed(self.kind + self.name(item),
                              b"%d %d" % (value, int(now + ttl)), ttl)


def from_config(url, secrets_path, prefix, timeout_ms):
    """The gate's Redis (None when SMTPD_SHARED_STORE is empty), secrets read
    now (as root); ConfigError."""
    if not url.strip():
        return None
    user = parse_url(url)[0]
    secrets = read_secrets(secrets_path)
    if user and secrets.get("user", user) != user:
        raise ConfigError("%s: user %s, but SMTPD_SHARED_STORE names %s: name the ACL user "
                          "in one place" % (secrets_path, secrets["user"], user))
    if user and not secrets.get("password"):
        raise ConfigError("%s: no 'password PW' for the Redis user %s" % (secrets_path, user))
    return Redis(url.strip(), secrets, prefix, timeout_ms)
