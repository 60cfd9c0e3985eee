"""counters - named counters the processes of a gate add to without a system call

DESCRIPTION
    A table of rows of 64-bit counters, one counter per key of its layout,
    one row per process that counts: a process adds to its own row only,
    so an increment is one store to memory -- no system call, no lock,
    never lost to another writer.  The -D master makes the table in shared
    memory (share(), shm.Region) before it forks; a worker takes the row of
    its scoreboard slot (use_row(slot + 1)), the front stage one of its
    own; row 0 is the master's, where it folds the row of a process that
    ended (retire(), under the region's lock, as totals() reads), so
    nothing counted leaves with a process and the totals never go down.
    Without share() (inetd mode, the tools) the table is this process's own
    memory, of the FIXED keys alone.

    A key is a name (FIXED) or a tuple: a metric family of metrics.py and
    its label values, e.g. ("recipients", "refused", "rules").  count(key)
    adds to it; a key the layout lacks (a filter named after the start)
    counts nowhere, so that no label can grow without bound.  A key in
    GAUGES holds a value its process sets (set()): retire() zeroes it
    rather than fold it, and totals() adds the rows' values.
FIXED
    sessions            sessions served
    messages            messages committed to the spool (or to hold/)
    message_bytes       their bodies' octets, as received
    spool_dir_fsyncs    fsyncs of the spool directory (group commit)
    refusals_temporary  replies of class 4 written (chat.py)
    refusals_permanent  replies of class 5
"""

from smtpgate import shm

FIXED = ("sessions", "messages", "message_bytes", "spool_dir_fsyncs", "refusals_temporary",
         "refusals_permanent")
(SESSIONS, MESSAGES, MESSAGE_BYTES, SPOOL_DIR_FSYNCS, REFUSALS_TEMPORARY,
 REFUSALS_PERMANENT) = range(len(FIXED))


class Counters:
    def __init__(self, rows=1, shared=False, keys=(), gauges=()):
        self.keys = FIXED + tuple(k for k in keys if k not in FIXED)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.gauges = [self.index[k] for k in gauges if k in self.index]
        self.width = width = len(self.keys)
        size = rows * width * 8
        self.region = shm.Region("smtpd-counters", size) if shared else None
        self.all = memoryview(self.region.mm if shared else bytearray(size)).cast("Q")
        self.rows = rows
        self.row = self.all[:width]

    def use_row(self, n):
        self.row = self.all[n * self.width:(n + 1) * self.width]

    def totals(self):
        """{key: the sum over every row}."""
        w = self.width
        with self.region if self.region is not None else _Nothing():
            return {k: sum(self.all[i::w]) for i, k in enumerate(self.keys)}

    def retire(self, n):
        """Fold row n (a process that ended) into row 0; zero it."""
        w = self.width
        with self.region if self.region is not None else _Nothing():
            for i in range(w):
                if i not in self.gauges:
                    self.all[i] += self.all[n * w + i]
                self.all[n * w + i] = 0


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


this = Counters()


def share(rows, keys=(), gauges=()):
    """-D master (smtpfwdd too), before it forks: a table in shared memory
    for rows processes (row 0 its own), of the FIXED keys and keys."""
    global this
    this = Counters(rows, shared=True, keys=keys, gauges=gauges)
    return this


def use_row(n):
    this.use_row(n)


def add(counter, n=1):
    this.row[counter] += n


def count(key, n=1):
    """Add n to key's counter, if the layout has it."""
    i = this.index.get(key)
    if i is not None:
        this.row[i] += n


def set(key, value):
    """A gauge of this process's row."""
    i = this.index.get(key)
    if i is not None:
        this.row[i] = max(0, int(value))
