"""admission - may this client have a session?  Answered in one place.

DESCRIPTION
    A client is its network: its address cut to SMTPD_V4_PREFIX (32) or
    SMTPD_V6_PREFIX (64) bits, since one host usually owns a whole IPv6 /64.
    Two tables in memory the -D master maps before it forks the workers,
    each changed under a POSIX record lock on its memfd:
      Scoreboard  each worker's state and client network: at most
                  SMTPD_MAX_PER_IP sessions at once per network;
      RateTable   at most SMTPD_MAX_RATE new sessions per network in any
                  SMTPD_RATE_WINDOW seconds (0: no limit).
    Networks in SMTPD_ADMISSION_EXEMPT (CIDRs) skip the rate limit, the
    greeting pause, the error delays and the DNS lists (dnsbl.py), never the
    concurrency cap; so does a client whose cached DNS lists' score
    allow-lists it, but for the rate limit only.
EVICTION
    The rate table holds SMTPD_RATE_TABLE networks in sets of 8: a network
    hashes to one set and takes a free entry there, or the entry of the set
    seen least recently.  The hash is keyed with a secret drawn at each
    start (blake2b), so nobody can choose networks that land in an abuser's
    set to evict its entry.  Its size is fixed when smtpd starts: 96 bytes a
    network, whatever the rate.  A flood from many networks can evict a
    quiet one, which then starts from zero.
"""

import fcntl
import hashlib
import ipaddress
import mmap
import os
import struct
import time

import buildconf

MAPPED = b"\0" * 10 + b"\xff\xff"


def network_key(ip):
    """16 bytes naming the client's network (IPv4 as ::ffff:a.b.c.d)."""
    if ip.version == 4:
        bits = buildconf.SMTPD_V4_PREFIX
        n = int(ip) >> (32 - bits) << (32 - bits) if bits else 0
        return MAPPED + n.to_bytes(4, "big")
    bits = buildconf.SMTPD_V6_PREFIX
    n = int(ip) >> (128 - bits) << (128 - bits) if bits else 0
    return n.to_bytes(16, "big")


def network_text(key):
    """The network of a key, for a log line."""
    if key.startswith(MAPPED):
        return "%s/%d" % (ipaddress.IPv4Address(key[12:]), buildconf.SMTPD_V4_PREFIX)
    return "%s/%d" % (ipaddress.IPv6Address(key), buildconf.SMTPD_V6_PREFIX)


class Shared:
    """A memfd mapped shared and an exclusive record lock on it."""

    def __init__(self, name, size):
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size)

    def __enter__(self):
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.lockf(self.fd, fcntl.LOCK_UN)


class Scoreboard(Shared):
    """One 32-byte slot per worker: its client's network key (16 bytes), a
    state byte, and when it last became idle.  The master reads it to keep
    spare workers; workers claim a slot per session."""

    SLOT, STATE, SINCE = 32, 16, 24
    FREE, IDLE, BUSY, ENDING = 0, 1, 2, 3     # ENDING: session over, closing

    def __init__(self, n):
        super().__init__("smtpd-scoreboard", n * self.SLOT)
        self.n = n

    def set(self, slot, state, key=b"\0" * 16):
        off = slot * self.SLOT
        self.mm[off:off + 16] = key
        self.mm[off + self.STATE] = state
        if state == self.IDLE:
            struct.pack_into("d", self.mm, off + self.SINCE, time.monotonic())

    def state(self, slot):
        return self.mm[slot * self.SLOT + self.STATE]

    def idle_since(self, slot):
        return struct.unpack_from("d", self.mm, slot * self.SLOT + self.SINCE)[0]

    def count(self, state):
        return self.mm[self.STATE::self.SLOT].count(state)

    def claim(self, slot, key, limit):
        """Mark slot busy with key unless limit slots already have it;
        the number of sessions key already had."""
        with self:
            n, pos = 0, self.mm.find(key)
            while pos >= 0:
                if pos % self.SLOT == 0 and self.mm[pos + self.STATE] == self.BUSY:
                    n += 1
                pos = self.mm.find(key, pos + 1)
            if n < limit:
                self.set(slot, self.BUSY, key)
            return n


class RateTable(Shared):
    """Attempts per network in a sliding window of BUCKETS buckets: an
    attempt is refused when the buckets of the last SMTPD_RATE_WINDOW
    seconds (to within one bucket, a sixteenth of it) already hold
    SMTPD_MAX_RATE.  Refused attempts count too, so a client that keeps
    hammering stays out until it pauses for a whole window.

    An entry: key (16 bytes), then 32-bit words: when it was last used (a
    sequence number of the table's, 0: free), the newest bucket's number,
    when a refusal was last logged, a spare, and the BUCKETS counters.
    Times are deciseconds since the table was made (0: never).  The last
    word of the mapping counts the attempts, so that the least recently
    used entry of a set is exactly that, even among attempts of the same
    instant; when it would wrap (every 4 billion attempts) every entry's
    use is reset to one."""

    WAYS, HEAD, BUCKETS = 8, 8, 16

    def __init__(self, entries, rate, window):
        self.rate, self.window = rate, window * 10
        self.span = self.window / self.BUCKETS      # deciseconds per bucket
        self.words_per = self.HEAD + self.BUCKETS
        self.sets = max(1, entries // self.WAYS)
        super().__init__("smtpd-rates", self.sets * self.WAYS * self.words_per * 4 + 4)
        self.w = memoryview(self.mm).cast("I")
        self.used = len(self.w) - 1         # the sequence of attempts
        self.base = time.monotonic()
        self.secret = os.urandom(16)        # never the same placement twice

    def now(self):
        return int((time.monotonic() - self.base) * 10) + 1

    def entry(self, key):
        """The index of key's entry (made, evicting, if it has none)."""
        h = hashlib.blake2b(key, key=self.secret, digest_size=8).digest()
        first = int.from_bytes(h, "little") % self.sets * self.WAYS
        oldest = None
        for e in range(first, first + self.WAYS):
            at = e * self.words_per * 4
            if self.mm[at:at + 16] == key and self.w[e * self.words_per + 4]:
                return e
            seen = self.w[e * self.words_per + 4]
            if oldest is None or seen < self.w[oldest * self.words_per + 4]:
                oldest = e
        at = oldest * self.words_per
        self.mm[at * 4:at * 4 + 16] = key
        self.w[at + 4:at + self.words_per] = memoryview(bytes(4 * (self.words_per - 4))).cast("I")
        return oldest

    def next_use(self):
        n = self.w[self.used] + 1
        if n >= 0xFFFFFFF0:             # wrap: keep "in use", lose the order once
            for e in range(self.sets * self.WAYS):
                if self.w[e * self.words_per + 4]:
                    self.w[e * self.words_per + 4] = 1
            n = 2
        self.w[self.used] = n
        return n

    def attempt(self, key):
        """(admitted, log this refusal) for a new session from key."""
        with self:
            now = self.now()
            at = self.entry(key) * self.words_per
            counts = at + self.HEAD
            bucket = int(now / self.span) + 1
            newest = self.w[at + 5]
            if bucket - newest >= self.BUCKETS:         # all older than the window
                for i in range(self.BUCKETS):
                    self.w[counts + i] = 0
            else:
                for b in range(newest + 1, bucket + 1):
                    self.w[counts + b % self.BUCKETS] = 0
            self.w[at + 5] = bucket
            seen = sum(self.w[counts:counts + self.BUCKETS])
            admitted = seen < self.rate
            self.w[counts + bucket % self.BUCKETS] += 1
            self.w[at + 4] = self.next_use()
            log = False
            if not admitted and (not self.w[at + 6] or now - self.w[at + 6] >= self.window):
                self.w[at + 6] = now
                log = True
            return admitted, log


class Admission:
    """What the -D workers share: the scoreboard, the rate table (None when
    SMTPD_MAX_RATE is 0), the exempt networks, and the gates' shared store
    (store.Redis, or None)."""

    def __init__(self, slots, exempt, shared=None):
        self.board = Scoreboard(slots)
        self.rates = None
        if buildconf.SMTPD_MAX_RATE > 0:
            self.rates = RateTable(buildconf.SMTPD_RATE_TABLE, buildconf.SMTPD_MAX_RATE,
                                   buildconf.SMTPD_RATE_WINDOW)
        self.exempt = exempt
        self.shared = shared

    def attempt(self, key):
        """(admitted, log this refusal) for a new session from key: the
        window all gates share when Redis answers, else this gate's own
        (which counts every attempt either way, to take over at once)."""
        local = self.rates.attempt(key)
        if self.shared is not None:
            shared = self.shared.rate(key, buildconf.SMTPD_MAX_RATE, buildconf.SMTPD_RATE_WINDOW)
            if shared is not None:
                return shared
        return local
