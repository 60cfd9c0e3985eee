"""spooldir - the spool directory: hostile entries, who holds what, failed/

DESCRIPTION
    Every directory entry of the spool is hostile input (the jailed smtpd
    user can write it): names are bytes, entries are lstat()ed and only
    regular files are opened, with O_NOFOLLOW and O_NONBLOCK, from
    directory descriptors where a path could be swapped.  entries() and
    names() list the spool; remove_stale_drafts() removes what a dead smtpd
    left (never a 250 for it); held() and lock_holder() ask the kernel who
    holds a file's lock (/proc/locks: asking never gets in a delivery's
    way); quarantine() and unquarantine() move a message to failed/ and
    back, with its NAME.reason (unquarantine() also releases a message
    from hold/, where smtpd commits what a filter quarantined, and
    note_hold() keeps why); note_deferral() keeps why a message waits, in
    deferred/NAME, for the queue tool.  GroupSync lets the -D workers
    share the directory fsync of their commits.  The files themselves --
    their format, drafts, commits, marks -- are spool.py's.
"""

import errno
import fcntl
import os
import stat

from smtpgate import counters, shm, spool
from smtpgate.spool import (DRAFT_PREFIX, fsync_dir, lock, MODE_COMPLETE, Odd, OPEN_FLAGS,
                            PREFIX, rename_noreplace)

class GroupSync:
    """Group commit: one fsync of the spool directory for the renames of
    several workers.  A worker that named its file calls sync(path) and
    returns once an fsync of the directory that began after that has ended
    -- its own, or the one another worker began in the meantime -- so its
    250 still follows a directory fsync that covers its file.

    Memory the -D master maps before it forks (shm.Region): 64-bit words
    counting the files named and the count the last completed fsync
    covers.  fcntl record locks on it (released by the kernel if a worker
    dies): byte 0 guards the count of files named; byte 1 is held by the
    worker fsyncing, which alone writes the other word (aligned 64-bit
    words, read by the others as they are: an old value only makes one
    wait or fsync once more).  A worker that finds byte 1 held waits for
    that fsync, then looks again.  Four fcntl calls and one fsync for a
    worker alone; each process keeps the directory open.  Each fsync
    counts (counters.SPOOL_DIR_FSYNCS)."""

    NAMED, COVERED = 0, 1

    def __init__(self):
        self.region = shm.Region("smtpd-groupsync", 64)
        self.fd, self.w = self.region.fd, memoryview(self.region.mm).cast("Q")
        self.dir_fd, self.dir_path, self.pid = None, None, None
        self.fsync = os.fsync

    def directory(self, path):
        if self.pid != os.getpid() or self.dir_path != path:
            self.dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self.dir_path, self.pid = path, os.getpid()
        return self.dir_fd

    def __call__(self, path):
        dir_fd = self.directory(path)
        mine = None
        while True:
            with self.region.lock(0, 1):
                if mine is None:
                    self.w[self.NAMED] += 1
                    mine = self.w[self.NAMED]
                elif self.w[self.COVERED] >= mine:
                    return
                try:
                    fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1)
                    cover = self.w[self.NAMED]      # every file named before our fsync
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    cover = None
            if cover is None:                       # wait for the fsync under way
                with self.region.lock(1, 1):
                    pass
                continue
            try:
                self.fsync(dir_fd)
                if cover > self.w[self.COVERED]:
                    self.w[self.COVERED] = cover
                counters.add(counters.SPOOL_DIR_FSYNCS)
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 1)
            return


FAILED_DIR = "failed"
DEFERRED_DIR = "deferred"
HOLD_DIR = "hold"           # messages a filter quarantined: smtpq release


def open_dir(name, dir_fd=None):
    """A descriptor of the directory name (relative to dir_fd), never
    through a link; None if there is none."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:      # a link: not followed
            return None
        raise


def open_readonly(path, dir_fd=None):
    """A file of the spool (or failed/) opened to be read, never following a
    link nor blocking; Odd if it is not a regular file; FileNotFoundError."""
    try:
        fd = os.open(path, os.O_RDONLY | OPEN_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise Odd("open: %s" % e.strerror) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Odd("not a regular file")
    return open(fd, "rb", buffering=0)


def _flocks():
    """{(major, minor, inode): pid} of every flock, from /proc/locks (the
    pid that took the lock); None where there is no /proc."""
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[0][-1:] == ":":
            try:
                major, minor, ino = fields[5].split(":")
                out[(int(major, 16), int(minor, 16), int(ino))] = int(fields[4])
            except ValueError:
                continue
    return out


def _key(fd):
    st = os.fstat(fd)
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def held(f):
    """Does another process hold a lock on f (being written or delivered)?
    Read from /proc/locks, so asking never gets in a delivery's way."""
    locks = _flocks()
    if locks is not None:
        return _key(f.fileno()) in locks
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return False


def lock_holder(fd):
    """The pid holding a flock on the open file fd, per the kernel
    (/proc/locks), never per what a file says; None if nobody does;
    OSError where there is no /proc."""
    locks = _flocks()
    if locks is None:
        raise OSError(errno.ENOENT, "no /proc/locks to ask", "/proc/locks")
    return locks.get(_key(fd))


def unquarantine(spool_fd, failed_fd, name):
    """Move name from failed/ back into the spool, complete and due now
    (never replacing a file there: FileExistsError); drop its reason.
    Both directories are descriptors, so that a failed/ swapped for a link
    meanwhile changes nothing."""
    fd = os.open(name, os.O_RDONLY | OPEN_FLAGS, dir_fd=failed_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Odd("not a regular file")
        os.chmod(fd, MODE_COMPLETE)
        os.fsync(fd)
    finally:
        os.close(fd)
    rename_noreplace(name, name, failed_fd, spool_fd)
    try:
        os.unlink(os.fsencode(name) + b".reason", dir_fd=failed_fd)
    except FileNotFoundError:
        pass
    fsync_dir(spool_fd)


def quarantine(spooldir, name, reason):
    """Move name into failed/ and write NAME.reason; return the new path.
    name may be bytes (as smtpfwdd reads the directory) or str."""
    spooldir, name = os.fsencode(spooldir), os.fsencode(name)
    failed = os.path.join(spooldir, os.fsencode(FAILED_DIR))
    try:
        os.mkdir(failed, 0o700)
    except FileExistsError:
        pass
    dest = os.path.join(failed, name)
    os.rename(os.path.join(spooldir, name), dest)
    fd = os.open(dest + b".reason.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                 | os.O_NOFOLLOW, 0o600)
    with open(fd, "w", encoding="utf-8", errors="backslashreplace") as r:
        r.write(reason + "\n")
    os.rename(dest + b".reason.tmp", dest + b".reason")     # whole or not at all
    fsync_dir(spooldir)
    return os.fsdecode(dest)


def note_hold(spooldir, name, reason):
    """Write hold/NAME.reason (whole or not at all), from a directory
    descriptor of hold/, never through a link."""
    d = spool.open_subdir(spooldir, HOLD_DIR)
    try:
        tmp, path = name + ".reason.tmp", name + ".reason"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=d)
        with open(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(reason[:4000] + "\n")
        os.rename(tmp, path, src_dir_fd=d, dst_dir_fd=d)
    finally:
        os.close(d)


def note_deferral(spooldir, name, reason):
    """Keep why name was deferred, for smtpq (deferred/NAME, whole or not
    at all; not fsynced: it is advice, the mode bits are the protocol)."""
    d = os.path.join(os.fsencode(spooldir), DEFERRED_DIR.encode())
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    path = os.path.join(d, os.fsencode(name))
    fd = os.open(path + b".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600)
    with open(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(reason[:4000] + "\n")
    os.rename(path + b".tmp", path)


def drop_deferral(spooldir, name):
    try:
        os.unlink(os.path.join(os.fsencode(spooldir), DEFERRED_DIR.encode(), os.fsencode(name)))
    except (FileNotFoundError, NotADirectoryError):
        pass


def prune_deferrals(spooldir, present):
    """Drop the notes of files no longer in the spool (present: their
    names, bytes); a crash between a delivery and its note's removal."""
    d = os.path.join(os.fsencode(spooldir), DEFERRED_DIR.encode())
    try:
        notes = os.listdir(d)
    except (FileNotFoundError, NotADirectoryError):
        return
    for n in notes:
        if n not in present and not n.endswith(b".tmp"):
            try:
                os.unlink(os.path.join(d, n))
            except OSError:
                pass


def deferral(spool_fd, name):
    """Why name was last deferred (text), or None; read as hostile input."""
    d = open_dir(DEFERRED_DIR, dir_fd=spool_fd)
    if d is None:
        return None
    try:
        with open_readonly(name, dir_fd=d) as f:
            return f.read(4096).decode("utf-8", "backslashreplace").strip()
    except (OSError, Odd):
        return None
    finally:
        os.close(d)


def entries(spooldir, prefix=PREFIX):
    """Directory entries whose names start with prefix (smtpd), unsorted;
    the names are bytes (whatever they hold)."""
    with os.scandir(os.fsencode(spooldir)) as it:
        return [e for e in it if e.name.startswith(prefix)]


def names(dir_fd, prefix=PREFIX):
    """Names (bytes) in the directory open as dir_fd that start with prefix."""
    return [n for n in map(os.fsencode, os.listdir(dir_fd)) if n.startswith(prefix)]


def remove_stale_drafts(spooldir, max_age, now):
    """Unlink unlocked drafts older than max_age.  Returns (names removed,
    [(name, why)] for entries that could not be examined); names are bytes."""
    removed, problems = [], []
    with os.scandir(os.fsencode(spooldir)) as it:
        drafts = [e for e in it if e.name.startswith(os.fsencode(DRAFT_PREFIX))]
    for e in drafts:
        try:
            st = e.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                problems.append((e.name, "not a regular file"))
                continue
            if now - st.st_mtime < max_age:
                continue
            fd = os.open(e.path, os.O_RDONLY | OPEN_FLAGS)
        except FileNotFoundError:
            continue
        except OSError as x:
            problems.append((e.name, x.strerror))
            continue
        try:
            own = os.fstat(fd)
            if (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino) and lock(fd):
                os.unlink(e.path)
                removed.append(e.name)
        except OSError as x:
            problems.append((e.name, x.strerror))
        finally:
            os.close(fd)
    return removed, problems
