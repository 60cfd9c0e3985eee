"""shm - memory the processes of a gate share, mapped before the fork

DESCRIPTION
    Region(name, size): the one way a shared mapping is made: a memfd
    (close-on-exec), mapped shared, and POSIX record locks on it (lock(),
    a context manager; byte ranges for finer locks), which the kernel
    releases when a holder dies.  The -D master makes every region before
    it forks, so its workers inherit them: the scoreboard and the rate
    table (admission.py), the DNS lists' score cache (dnsbl.py), the
    shared store's health word (store.py), the group commit (spooldir.py)
    and the counters (counters.py).

    Table(name, entries, words): a table of fixed size in a Region, keyed
    by 16 octets: sets of WAYS entries, a key placed in one set by a hash
    keyed with a secret drawn at each start (blake2b), so that nobody can
    choose keys that land in another's set; a key takes its own entry, a
    free or expired one of its set, or the one used least recently.  An
    entry is the key, then `words` 32-bit words: USE (the table's sequence
    when it was last used; 0: free), EXPIRES (deciseconds since the table
    was made; 0: never) and the user's from VALUE on.  The last word of the
    mapping counts uses, so that "least recently" is exact even among uses
    of the same instant.  Callers hold lock() around find() and take();
    look() is find() for a reader without it (it writes nothing).
"""

import fcntl
import mmap
import os
import time
# hashlib's blake2b, without hashlib's OpenSSL (12 ms): inetd mode imports
# this module (counters, chat) before its greeting.
from _blake2 import blake2b


class Region:
    """A memfd mapped shared, with record locks."""

    def __init__(self, name, size):
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size)

    def lock(self, start=0, length=0):
        return _Lock(self.fd, start, length)

    def __enter__(self):
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.lockf(self.fd, fcntl.LOCK_UN)


class _Lock:
    def __init__(self, fd, start, length):
        self.fd, self.start, self.length = fd, start, length

    def __enter__(self):
        fcntl.lockf(self.fd, fcntl.LOCK_EX, self.length, self.start)
        return self

    def __exit__(self, *exc):
        fcntl.lockf(self.fd, fcntl.LOCK_UN, self.length, self.start)


class Table(Region):
    """A set-associative table of keyed entries (see above)."""

    WAYS, KEY = 8, 4                # entries a set; 32-bit words of a key
    USE, EXPIRES, VALUE = 4, 5, 6   # word offsets within an entry

    def __init__(self, name, entries, words):
        self.per = self.KEY + words             # 32-bit words an entry
        self.sets = max(1, entries // self.WAYS)
        super().__init__(name, self.sets * self.WAYS * self.per * 4 + 4)
        self.w = memoryview(self.mm).cast("I")
        self.used = len(self.w) - 1
        self.base = time.monotonic()
        self.secret = os.urandom(16)

    def now(self):
        """Deciseconds since the table was made (never 0)."""
        return int((time.monotonic() - self.base) * 10) + 1

    def slots(self, key):
        h = blake2b(key, key=self.secret, digest_size=8).digest()
        first = int.from_bytes(h, "little") % self.sets * self.WAYS
        return range(first, first + self.WAYS)

    def live(self, at, now):
        return self.w[at + self.USE] and not 0 < self.w[at + self.EXPIRES] <= now

    def look(self, key, now):
        """The word offset of key's live entry, or None; not counted as a
        use, so that a reader without the lock writes nothing."""
        for e in self.slots(key):
            at = e * self.per
            if self.mm[at * 4:at * 4 + 16] == key and self.live(at, now):
                return at
        return None

    def find(self, key, now):
        """The word offset of key's live entry, or None; it counts as used."""
        at = self.look(key, now)
        if at is not None:
            self.w[at + self.USE] = self.next_use()
        return at

    def take(self, key, now):
        """The word offset of key's entry, made if it has none (its words
        zero): a free or expired entry of its set, else the least recently
        used one."""
        found = self.find(key, now)
        if found is not None:
            return found
        victim = None
        for e in self.slots(key):
            at = e * self.per
            if not self.live(at, now):
                victim = at
                break
            if victim is None or self.w[at + self.USE] < self.w[victim + self.USE]:
                victim = at
        self.mm[victim * 4:victim * 4 + 16] = key
        self.w[victim + self.USE:victim + self.per] = \
            memoryview(bytes(4 * (self.per - self.KEY))).cast("I")
        self.w[victim + self.USE] = self.next_use()
        return victim

    def next_use(self):
        n = self.w[self.used] + 1
        if n >= 0xFFFFFFF0:             # wrap: keep "in use", lose the order once
            for e in range(self.sets * self.WAYS):
                if self.w[e * self.per + self.USE]:
                    self.w[e * self.per + self.USE] = 1
            n = 2
        self.w[self.used] = n
        return n
