"""queuetool - smtpfwdd -Q (smtpq): see and change what is queued

SYNOPSIS
    smtpfwdd.py [-d spooldir] -Q list [-j]
    smtpfwdd.py [-d spooldir] -Q show ID
    smtpfwdd.py [-d spooldir] -Q requeue ID | all-failed
    smtpfwdd.py [-d spooldir] -Q delete ID
    smtpfwdd.py [-d spooldir] -Q flush
    (installed as `smtpq ...`, as `sendmail -bp` is a mode of sendmail)
DESCRIPTION
    list: every message in the spool and in failed/ with its id, state
    (writing, queued, deferred with its next retry, delivering, failed with
    its reason, malformed), age, size, sender and recipients (pending and
    sent), oldest first, aligned, with a summary line; -j prints one JSON
    object per message instead.  show: the envelope, state and headers of
    one.  requeue: a failed message back into the queue, or a deferred one
    due now.  delete: removes one (logged).  flush: asks the running
    smtpfwdd to scan now (SIGUSR1).
    It reads through spool.py, obeys its flock protocol (a file being
    written is never read as complete, a file another process holds is
    never changed) and works as root or as the spool's user.
EXIT STATUS
    0 done; 64 usage; 66 no such message; 69 smtpfwdd is not running
    (flush); 73 the name is taken in the queue (requeue); 75 the message
    is being written or delivered.
"""

import fcntl
import getopt
import json
import os
import re
import signal
import stat
import sys
import time

import buildconf
import daemonlib as dl
import spool
from delivery import shown

USAGE = """usage: smtpfwdd.py [-d spooldir] -Q list [-j]
       smtpfwdd.py [-d spooldir] -Q show ID
       smtpfwdd.py [-d spooldir] -Q requeue ID|all-failed
       smtpfwdd.py [-d spooldir] -Q delete ID
       smtpfwdd.py [-d spooldir] -Q flush"""
ID = re.compile(r"^(draft\.)?smtpd[A-Za-z0-9]{1,64}$")
EX_NOINPUT, EX_UNAVAILABLE, EX_CANTCREAT = os.EX_NOINPUT, os.EX_UNAVAILABLE, os.EX_CANTCREAT


class Failure(Exception):
    """A command that cannot be done: .status (sysexits) and the message."""

    def __init__(self, status, msg):
        super().__init__(msg)
        self.status = status


class Entry:
    """What list and show say of one message."""

    def __init__(self, name, where, st):
        self.id = shown(name)
        self.where = where              # "queue" or "failed"
        self.size = st.st_size
        self.state = None
        self.sender = None
        self.pending, self.sent = [], []
        self.arrival = None
        self.next_retry = None
        self.reason = None
        self.mtime = st.st_mtime

    def age(self, now):
        return now - (self.arrival or self.mtime)

    def as_dict(self, now):
        return {"id": self.id, "queue": self.where, "state": self.state,
                "age": int(self.age(now)), "size": self.size, "sender": self.sender,
                "recipients": {"pending": self.pending, "sent": self.sent},
                "next_retry": int(self.next_retry) if self.next_retry else None,
                "reason": self.reason}


def examine(dirpath, name, where, now):
    """The Entry for one directory entry, or None (gone, not a file)."""
    path = os.path.join(dirpath, name)
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    e = Entry(name, where, st)
    complete = st.st_mode & 0o110 == 0o110 and not name.startswith(spool.DRAFT_PREFIX.encode())
    if where == "queue" and not complete:
        e.state = "writing"             # never read as complete
        return e
    try:
        with spool.open_readonly(path) as f:
            if where == "queue" and spool.held(f):
                e.state = "delivering"
            read_envelope(e, f)
    except FileNotFoundError:
        return None
    except (spool.Odd, OSError) as x:
        e.state, e.reason = "unreadable", str(x)
        return e
    if where == "failed":
        e.state = "failed"
        e.reason = failure_reason(path)
    elif e.state is None:
        if st.st_mode & 0o111 == 0o111:
            e.state = "deferred"
            e.next_retry = max(now, st.st_mtime + buildconf.RETRY_DELAY_TIME)
        else:
            e.state = "queued"
    return e


def read_envelope(e, f):
    try:
        msg = spool.parse(f)
    except spool.Malformed as x:
        e.state, e.reason = "malformed", str(x)
        return None
    e.sender = msg.sender.decode("latin-1")
    e.pending = [r.decode("latin-1") for _, r in msg.recipients]
    e.sent = [r.decode("latin-1") for r in msg.sent]
    e.arrival = msg.arrival
    return msg


def failure_reason(path):
    try:
        with spool.open_readonly(path + b".reason") as r:
            return r.read(4096).decode("utf-8", "replace").strip()
    except (FileNotFoundError, spool.Odd, OSError):
        return None


def everything(spooldir, now):
    out = []
    sd = os.fsencode(spooldir)
    for prefix in (spool.PREFIX, spool.DRAFT_PREFIX.encode()):
        out += [examine(sd, e.name, "queue", now) for e in spool.entries(sd, prefix)]
    failed = failed_dir(spooldir)
    if failed:
        out += [examine(failed, e.name, "failed", now) for e in spool.entries(failed)
                if not e.name.endswith(b".reason") and not e.name.endswith(b".tmp")]
    return sorted((e for e in out if e is not None), key=lambda e: -e.age(now))


def failed_dir(spooldir):
    """spool/failed/ if it is a real directory (never a link to follow, as
    root, into somewhere else), else None."""
    path = os.path.join(os.fsencode(spooldir), spool.FAILED_DIR.encode())
    try:
        return path if stat.S_ISDIR(os.lstat(path).st_mode) else None
    except FileNotFoundError:
        return None


def age_text(seconds):
    seconds = int(max(0, seconds))
    if seconds < 3600:
        return "%dm%02ds" % divmod(seconds, 60)
    if seconds < 86400:
        return "%dh%02dm" % (seconds // 3600, seconds % 3600 // 60)
    return "%dd%02dh" % (seconds // 86400, seconds % 86400 // 3600)


# ----------------------------------------------------------------- commands ----

def cmd_list(cfg, args):
    opts, rest = getopt.getopt(args, "j", ["json"])
    if rest:
        raise getopt.GetoptError("list takes no arguments")
    now = time.time()
    entries = everything(cfg.spooldir, now)
    if opts:
        for e in entries:
            print(json.dumps(e.as_dict(now)))
        return dl.EX_OK
    print("%-18s %-10s %7s %8s  %s" % ("ID", "STATE", "AGE", "SIZE", "SENDER"))
    for e in entries:
        print("%-18s %-10s %7s %8d  %s" % (e.id, e.state, age_text(e.age(now)), e.size,
                                            e.sender if e.sender is not None else "-"))
        for r in e.pending:
            print("%46s to %s" % ("", r))
        for r in e.sent:
            print("%46s sent %s" % ("", r))
        if e.next_retry:
            print("%46s next retry %s" % ("", time.strftime("%Y-%m-%d %H:%M:%S",
                                                              time.localtime(e.next_retry))))
        if e.reason:
            print("%46s reason: %s" % ("", e.reason))
    counts = {}
    for e in entries:
        counts[e.state] = counts.get(e.state, 0) + 1
    print("-- %d message%s%s%s" % (
        len(entries), "" if len(entries) == 1 else "s",
        ": " + ", ".join("%d %s" % (n, s) for s, n in sorted(counts.items())) if counts else "",
        "; oldest %s" % age_text(entries[0].age(now)) if entries else ""))
    return dl.EX_OK


def find(cfg, ident):
    """(directory, name, where) of the message ident; Failure if none."""
    if not ID.match(ident):
        raise Failure(EX_NOINPUT, "%s: not a queue id (smtpd followed by letters "
                                  "and digits)" % ident)
    sd = os.fsencode(cfg.spooldir)
    name = os.fsencode(ident)
    for d, where in ((sd, "queue"), (failed_dir(cfg.spooldir), "failed")):
        if d and os.path.lexists(os.path.join(d, name)):
            return d, name, where
    raise Failure(EX_NOINPUT, "%s: no such message in %s" % (ident, cfg.spooldir))


def cmd_show(cfg, args):
    (ident,) = one_argument("show", args)
    d, name, where = find(cfg, ident)
    e = examine(d, name, where, time.time())
    if e is None:
        raise Failure(EX_NOINPUT, "%s: gone" % ident)
    print("id: %s\nqueue: %s\nstate: %s\nsize: %d" % (e.id, where, e.state, e.size))
    if e.state == "writing":
        print("(being written: not shown)")
        return dl.EX_OK
    if e.reason:
        print("reason: %s" % e.reason)
    if e.sender is None:
        return dl.EX_OK
    print("from: %s" % e.sender)
    for r in e.pending:
        print("to: %s" % r)
    for r in e.sent:
        print("sent: %s" % r)
    with spool.open_readonly(os.path.join(d, name)) as f:
        msg = spool.parse(f)
        print("")
        sys.stdout.write(spool.headers(f.fileno(), msg.body_offset).decode("utf-8", "replace"))
    return dl.EX_OK


def cmd_requeue(cfg, args):
    (ident,) = one_argument("requeue", args)
    if ident == "all-failed":
        failed = failed_dir(cfg.spooldir)
        names = [e.name for e in spool.entries(failed)] if failed else []
        names = [n for n in names if not n.endswith((b".reason", b".tmp"))]
        for n in names:
            requeue_failed(cfg, n)
        print("%d failed message%s requeued" % (len(names), "" if len(names) == 1 else "s"))
        return dl.EX_OK
    d, name, where = find(cfg, ident)
    if where == "failed":
        requeue_failed(cfg, name)
        print("%s: back in the queue" % ident)
        return dl.EX_OK
    with hold(d, name) as f:
        st = os.fstat(f.fileno())
        if st.st_mode & 0o111 != 0o111:
            print("%s: already due" % ident)
            return dl.EX_OK
        spool.make_due(f)
    dl.notice("queue: %s made due now by uid %d", ident, os.getuid())
    print("%s: due now" % ident)
    return dl.EX_OK


def requeue_failed(cfg, name):
    try:
        spool.unquarantine(cfg.spooldir, name)
    except FileExistsError:
        raise Failure(EX_CANTCREAT, "%s: a message of that name is in the queue"
                      % shown(name)) from None
    except spool.Odd as e:
        raise Failure(EX_NOINPUT, "%s: %s" % (shown(name), e)) from None
    dl.notice("queue: %s moved back from failed/ by uid %d", shown(name), os.getuid())


class hold:
    """Open and lock a queued message for a change; Failure (75) if it is
    being written or delivered."""

    def __init__(self, d, name):
        self.path, self.ident = os.path.join(d, name), shown(name)

    def __enter__(self):
        try:
            st = os.stat(self.path, follow_symlinks=False)
            if st.st_mode & 0o110 != 0o110 or os.path.basename(self.path).startswith(b"draft."):
                raise Failure(dl.EX_TEMPFAIL, "%s: being written; not touched" % self.ident)
            self.f = spool.open_readonly(self.path)
        except FileNotFoundError:
            raise Failure(EX_NOINPUT, "%s: gone" % self.ident) from None
        except spool.Odd as e:
            raise Failure(EX_NOINPUT, "%s: %s" % (self.ident, e)) from None
        if not spool.lock(self.f.fileno()):
            self.f.close()
            raise Failure(dl.EX_TEMPFAIL, "%s: being delivered or written by another "
                                          "process; not touched" % self.ident)
        if not spool.holds(self.f, self.path):
            self.f.close()
            raise Failure(dl.EX_TEMPFAIL, "%s: changed meanwhile; not touched" % self.ident)
        return self.f

    def __exit__(self, *exc):
        self.f.close()


def cmd_delete(cfg, args):
    (ident,) = one_argument("delete", args)
    d, name, where = find(cfg, ident)
    path = os.path.join(d, name)
    if where == "failed":
        os.unlink(path)
        for extra in (b".reason", b".reason.tmp"):
            try:
                os.unlink(path + extra)
            except FileNotFoundError:
                pass
    else:
        with hold(d, name) as f:
            spool.remove(path, f)
    spool.fsync_dir(d)
    dl.notice("queue: %s deleted from %s by uid %d", ident, where, os.getuid())
    print("%s: deleted" % ident)
    return dl.EX_OK


def cmd_flush(cfg, args):
    if args:
        raise getopt.GetoptError("flush takes no arguments")
    path = os.path.join(cfg.spooldir, ".smtpfwdd.lock")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise Failure(EX_UNAVAILABLE, "smtpfwdd is not running (%s: %s)"
                      % (path, e.strerror)) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            raise Failure(EX_UNAVAILABLE, "smtpfwdd is not running (nobody holds %s)" % path)
        except BlockingIOError:
            pass
        pid = int(os.pread(fd, 32, 0).decode("ascii", "replace").strip() or 0)
    except ValueError:
        raise Failure(EX_UNAVAILABLE, "%s holds no pid" % path) from None
    finally:
        os.close(fd)
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError as e:
        raise Failure(EX_UNAVAILABLE, "signal to smtpfwdd (pid %d): %s" % (pid, e.strerror)) \
            from None
    print("smtpfwdd (pid %d) asked to scan now" % pid)
    return dl.EX_OK


def one_argument(command, args):
    if len(args) != 1:
        raise getopt.GetoptError("%s takes one argument, an ID" % command)
    return args


COMMANDS = {"list": cmd_list, "show": cmd_show, "requeue": cmd_requeue,
            "delete": cmd_delete, "flush": cmd_flush}


def main(cfg, args):
    """smtpfwdd -Q: args are the command and its arguments."""
    if not args or args[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return dl.EX_USAGE
    try:
        return COMMANDS[args[0]](cfg, args[1:])
    except getopt.GetoptError as e:
        print("smtpq: %s\n%s" % (e, USAGE), file=sys.stderr)
        return dl.EX_USAGE
    except Failure as e:
        print("smtpq: %s" % e, file=sys.stderr)
        return e.status
    except OSError as e:
        print("smtpq: %s: %s" % (e.filename or cfg.spooldir, e.strerror), file=sys.stderr)
        return dl.EX_IOERR
