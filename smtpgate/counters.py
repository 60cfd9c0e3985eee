"""counters - named counters the processes of a gate add to without a system call

DESCRIPTION
    A table of rows of 64-bit counters, one counter per name of NAMES, one
    row per process that counts: a process adds to its own row only, so an
    increment is one store to memory -- no system call, no lock, never lost
    to another writer.  The -D master makes the table in shared memory
    (share(), shm.Region) before it forks; a worker takes the row of its
    scoreboard slot (use_row(slot + 1)); row 0 is the master's, where it
    folds the row of a worker that ended (retire(), under the region's
    lock, as totals() reads), so nothing counted leaves with a process and
    the totals never go down.  Without share() (inetd mode, the tools) the
    table is this process's own memory.
NAMES
    sessions            sessions served
    messages            messages committed to the spool (or to hold/)
    message_bytes       their bodies' octets, as received
    spool_dir_fsyncs    fsyncs of the spool directory (group commit)
    refusals_temporary  replies of class 4 written (chat.py)
    refusals_permanent  replies of class 5
"""

from smtpgate import shm

NAMES = ("sessions", "messages", "message_bytes", "spool_dir_fsyncs", "refusals_temporary",
         "refusals_permanent")
(SESSIONS, MESSAGES, MESSAGE_BYTES, SPOOL_DIR_FSYNCS, REFUSALS_TEMPORARY,
 REFUSALS_PERMANENT) = range(len(NAMES))
WIDTH = len(NAMES)


class Counters:
    def __init__(self, rows=1, shared=False):
        size = rows * WIDTH * 8
        self.region = shm.Region("smtpd-counters", size) if shared else None
        self.all = memoryview(self.region.mm if shared else bytearray(size)).cast("Q")
        self.rows = rows
        self.row = self.all[:WIDTH]

    def use_row(self, n):
        self.row = self.all[n * WIDTH:(n + 1) * WIDTH]

    def totals(self):
        """{name: the sum over every row}."""
        with self.region if self.region is not None else _Nothing():
            return {name: sum(self.all[i::WIDTH]) for i, name in enumerate(NAMES)}

    def retire(self, n):
        """Fold row n (a process that ended) into row 0."""
        with self.region if self.region is not None else _Nothing():
            for i in range(WIDTH):
                self.all[i] += self.all[n * WIDTH + i]
                self.all[n * WIDTH + i] = 0


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


this = Counters()


def share(rows):
    """-D master, before it forks: a table in shared memory for rows
    processes (row 0 its own)."""
    global this
    this = Counters(rows, shared=True)
    return this


def use_row(n):
    this.use_row(n)


def add(counter, n=1):
    this.row[counter] += n
