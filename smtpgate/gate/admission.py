"""admission - may this client have a session?  Answered in one place.

DESCRIPTION
    A client is its network: its address cut to SMTPD_V4_PREFIX (32) or
    SMTPD_V6_PREFIX (64) bits, since one host usually owns a whole IPv6 /64.
    Two tables in memory the -D master maps before it forks the workers
    (shm.py), each changed under a POSIX record lock:
      Scoreboard  each worker's state and client network: at most
                  SMTPD_MAX_PER_IP sessions at once per network;
      RateTable   at most SMTPD_MAX_RATE new sessions per network in any
                  SMTPD_RATE_WINDOW seconds (0: no limit).
    Networks in SMTPD_ADMISSION_EXEMPT (CIDRs) skip the rate limit, the
    greeting pause, the error delays and the DNS lists (dnsbl.py), never the
    concurrency cap; so does a client whose cached DNS lists' score
    allow-lists it, but for the rate limit only.
EVICTION
    The rate table holds SMTPD_RATE_TABLE networks in sets of 8 (a
    shm.Table): a network hashes to one set and takes a free entry there,
    or the entry of the set seen least recently.  The hash is keyed with a
    secret drawn at each start, so nobody can choose networks that land in
    an abuser's set to evict its entry.  Its size is fixed when smtpd
    starts: 96 bytes a network, whatever the rate.  A flood from many
    networks can evict a quiet one, which then starts from zero.
"""

import ipaddress
import struct
import time

import buildconf
from smtpgate import shm

MAPPED = b"\0" * 10 + b"\xff\xff"
OLD_FOR, OLD_MAX = 10.0, 1024          # Admission.old()'s memory: seconds, clients


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


class Scoreboard(shm.Region):
    """One 32-byte slot per worker: its client's network key (16 bytes), a
    state byte, and when it last became idle.  The master reads it to keep
    spare workers; workers claim a slot per session."""

    SLOT, STATE, SINCE = 32, 16, 24
    FREE, IDLE, BUSY, ENDING = 0, 1, 2, 3     # ENDING: session over, closing
    HANDED = 4          # the front stage is sending it a client (reserve())

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

    def sessions(self, key):
        """The busy slots whose client is of network key."""
        n, pos = 0, self.mm.find(key)
        while pos >= 0:
            if pos % self.SLOT == 0 and self.mm[pos + self.STATE] == self.BUSY:
                n += 1
            pos = self.mm.find(key, pos + 1)
        return n

    def claim(self, slot, key, limit, accepted=False):
        """Mark slot busy with key unless limit slots already have it;
        the number of sessions key already had -- or None for a client the
        worker accepted itself while the front stage was reserving it for
        another (that one is on its way: this one goes to the front stage)."""
        with self:
            if accepted and self.mm[slot * self.SLOT + self.STATE] == self.HANDED:
                return None
            n = self.sessions(key)
            if n < limit:
                self.set(slot, self.BUSY, key)
            return n

    def reserve(self, slot):
        """The front stage: mark an idle worker's slot HANDED before it
        sends the worker a client; False if it is not idle (it accepted a
        client itself)."""
        with self:
            at = slot * self.SLOT + self.STATE
            if self.mm[at] != self.IDLE:
                return False
            self.mm[at] = self.HANDED
            return True

    def unreserve(self, slot):
        """The hand-over failed: the slot is idle again (if still HANDED)."""
        with self:
            at = slot * self.SLOT + self.STATE
            if self.mm[at] == self.HANDED:
                self.mm[at] = self.IDLE


class RateTable(shm.Table):
    """Attempts per network in a sliding window of BUCKETS buckets: an
    attempt is refused when the buckets of the last SMTPD_RATE_WINDOW
    seconds (to within one bucket, a sixteenth of it) already hold
    SMTPD_MAX_RATE.  Refused attempts count too, so a client that keeps
    hammering stays out until it pauses for a whole window.  An entry's
    words (shm.Table): the newest bucket's number, when a refusal was last
    logged (deciseconds; 0: never), then the BUCKETS counters: 96 bytes."""

    BUCKETS = 16
    NEWEST, LOGGED, COUNTS = shm.Table.VALUE, shm.Table.VALUE + 1, shm.Table.VALUE + 2

    def __init__(self, entries, rate, window):
        self.rate, self.window = rate, window * 10
        self.span = self.window / self.BUCKETS      # deciseconds per bucket
        super().__init__("smtpd-rates", entries, 4 + self.BUCKETS)

    def attempt(self, key):
        """(admitted, log this refusal) for a new session from key."""
        with self:
            now = self.now()
            at = self.take(key, now)
            counts = at + self.COUNTS
            bucket = int(now / self.span) + 1
            newest = self.w[at + self.NEWEST]
            if bucket - newest >= self.BUCKETS:         # all older than the window
                for i in range(self.BUCKETS):
                    self.w[counts + i] = 0
            else:
                for b in range(newest + 1, bucket + 1):
                    self.w[counts + b % self.BUCKETS] = 0
            self.w[at + self.NEWEST] = bucket
            seen = sum(self.w[counts:counts + self.BUCKETS])
            admitted = seen < self.rate
            self.w[counts + bucket % self.BUCKETS] += 1
            log = False
            if not admitted and (not self.w[at + self.LOGGED]
                                 or now - self.w[at + self.LOGGED] >= self.window):
                self.w[at + self.LOGGED] = now
                log = True
            return admitted, log


class PassTable(shm.Table):
    """The clients that passed the greeting pause (PAUSED) or had a message
    accepted (DELIVERED), by address, for SMTPD_SCREEN_ALLOW_TTL seconds
    (postscreen's temporary allow-list)."""

    PAUSED, DELIVERED = 1, 2

    def __init__(self, entries):
        super().__init__("smtpd-passed", entries, 3)

    def get(self, ip, now=None):
        with self:
            at = self.find(address_key(ip), self.now())
            return None if at is None else self.w[at + self.VALUE]

    def put(self, ip, value, ttl, now=None):
        with self:
            now = self.now()
            at = self.take(address_key(ip), now)
            self.w[at + self.EXPIRES] = now + max(1, int(ttl * 10))
            self.w[at + self.VALUE] = value

    def peek(self, key):
        """get() of address_key(ip) without the lock (the front stage, per
        connection): a word is read whole, so a write under way gives a
        miss or a value about to change, never garbage; the entry's use is
        not counted."""
        at = self.look(key, self.now())
        return None if at is None else self.w[at + self.VALUE]


def address_key(ip):
    return MAPPED + ip.packed if ip.version == 4 else ip.packed


class Stress(shm.Region):
    """One word the screen sets while it is under stress; the workers read
    it (channel.py: a command's deadline); one it sets while it is out of
    descriptors (crowded()).  And the front stage's generation, which the
    master counts up as it starts one: a worker accepts clients itself
    only while the front stage it was made for is the current one
    (worker.py)."""

    def __init__(self):
        super().__init__("smtpd-stress", 8)
        self.gen = memoryview(self.mm).cast("I")

    def on(self):
        return self.mm[0] == 1

    def set(self, on):
        self.mm[0] = int(on)

    def set_crowded(self, on):
        self.mm[1] = int(on)

    def crowded(self):
        """The front stage is out of descriptors: a worker refuses what it
        would give it."""
        return self.mm[1] == 1

    def generation(self):
        return self.gen[1]

    def next_generation(self):
        self.gen[1] = (self.gen[1] + 1) & 0xFFFFFFFF


class Admission:
    """What the -D workers and the front stage share: the scoreboard, the
    rate table (None when SMTPD_MAX_RATE is 0), the exempt networks, the
    gates' shared store (store.Redis, or None), the clients that passed
    the front stage (PassTable, over the store when there is one) and its
    stress word."""

    def __init__(self, slots, exempt, shared=None):
        self.board = Scoreboard(slots)
        self.stress = Stress()
        self.passes = self.passes_here = None     # passes_here: never over Redis
        if buildconf.SMTPD_SCREEN_ALLOW_TTL > 0:
            self.passes = self.passes_here = PassTable(buildconf.SMTPD_SCREEN_ALLOW_SIZE)
            if shared is not None:
                from smtpgate import store      # noqa: only with a shared store
                self.passes = store.Layered(self.passes, shared, b"pass:",
                                            lambda ip: ip.packed.hex().encode(),
                                            lambda v: buildconf.SMTPD_SCREEN_ALLOW_TTL
                                            if v in (PassTable.PAUSED, PassTable.DELIVERED)
                                            else None)
        self.rates = None
        if buildconf.SMTPD_MAX_RATE > 0:
            self.rates = RateTable(buildconf.SMTPD_RATE_TABLE, buildconf.SMTPD_MAX_RATE,
                                   buildconf.SMTPD_RATE_WINDOW)
        self.exempt = exempt
        self.shared = shared
        self.olds = {}          # address key -> until when old() need not look again

    def delivered(self, ip):
        """A worker's client had a message accepted: it is passed at once
        next time (screen.py, worker.py) -- recorded unless old() knows it
        already (its next messages change nothing there)."""
        if self.passes_here is not None and not self.old(address_key(ip)):
            self.passes.put(ip, PassTable.DELIVERED, ttl=buildconf.SMTPD_SCREEN_ALLOW_TTL,
                            now=time.time())        # (and to Redis: other gates skip the pause)

    def old(self, key):
        """Did the client of address_key key have mail accepted here
        (PassTable DELIVERED)?  A yes is kept OLD_FOR seconds at most (a
        tenth of the table's TTL): the next connections from it skip the
        table's keyed hash."""
        if self.passes_here is None:
            return False
        now = time.monotonic()
        if self.olds.get(key, 0.0) > now:
            return True
        if self.passes_here.peek(key) != PassTable.DELIVERED:
            return False
        if len(self.olds) >= OLD_MAX:
            self.olds.clear()
        self.olds[key] = now + min(OLD_FOR, buildconf.SMTPD_SCREEN_ALLOW_TTL / 10)
        return True

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
