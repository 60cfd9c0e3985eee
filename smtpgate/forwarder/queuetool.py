"""queuetool - smtpfwdd -Q (smtpq): see and change what is queued

SYNOPSIS
    smtpfwdd.py [-d spooldir] -Q list [-j]
    smtpfwdd.py [-d spooldir] -Q show ID
    smtpfwdd.py [-d spooldir] -Q requeue ID | all-failed
    smtpfwdd.py [-d spooldir] -Q delete ID
    smtpfwdd.py [-d spooldir] -Q release ID
    smtpfwdd.py [-d spooldir] -Q flush
    (installed as `smtpq ...`, as `sendmail -bp` is a mode of sendmail)
DESCRIPTION
    list: every message in the spool, in failed/ and in hold/ with its id,
    state (writing, queued, deferred with its next retry, delivering, failed
    with its reason, held by a mail filter with its reason, malformed), age, size, sender and recipients (pending and
    sent), oldest first, aligned, with a summary line; -j prints one JSON
    object per message instead.  show: the envelope, state and headers of
    one, and its record (record.py: smtpd's field names).  requeue: a failed message back into the queue, or a deferred one
    due now.  release: a message a filter quarantined (hold/) into the
    queue.  delete: removes one (logged).  flush: asks the running smtpfwdd
    to scan now (SIGUSR1).
    It reads through spool.py, obeys its flock protocol (a file being
    written is never read as complete, a file another process holds is
    never changed).
SECURITY
    The spool is written by the jailed smtpd user: everything in it is
    hostile.  Started as root, the tool first becomes the spool directory's
    owner, before it reads anything there.  It works from descriptors of
    the spool and of failed/ (never a link), and only on names that are
    spool ids.  Every byte it prints from the spool has its control
    characters made visible (\\x1b), so a Subject cannot drive the
    terminal.  flush signals only the process the kernel says holds
    .smtpfwdd.lock (/proc/locks), and only if it is an smtpfwdd of the
    spool's owner -- never a pid read from a file.
EXIT STATUS
    0 done; 64 usage; 65 the message is not where the command acts (requeue
    of a held one: release it; release of one not held); 66 no such
    message, or no spool; 69 smtpfwdd is not
    running (flush); 73 the name is taken in the queue (requeue); 74 the
    spool cannot be read; 75 the message is being written or delivered.
"""

import getopt
import json
import os
import re
import signal
import stat
import sys
import time

import buildconf
from smtpgate import log, privileges, record
from smtpgate.text import visible
from smtpgate import spool, spooldir

USAGE = """usage: smtpfwdd.py [-d spooldir] -Q list [-j]
       smtpfwdd.py [-d spooldir] -Q show ID
       smtpfwdd.py [-d spooldir] -Q requeue ID|all-failed
       smtpfwdd.py [-d spooldir] -Q delete ID
       smtpfwdd.py [-d spooldir] -Q release ID
       smtpfwdd.py [-d spooldir] -Q flush"""
ID = re.compile(rb"^(draft\.)?smtpd[A-Za-z0-9]{1,64}$")
FAILED_ID = re.compile(rb"^smtpd[A-Za-z0-9]{1,64}$")
LOCKFILE = ".smtpfwdd.lock"
FORWARDER_TITLE = b"smtpfwdd"


class Failure(Exception):
    """A command that cannot be done: .status (sysexits) and the message."""

    def __init__(self, status, msg):
        super().__init__(msg)
        self.status = status


class Queue:
    """The spool as the tool sees it: a descriptor of its directory and one
    of failed/ and of hold/ (None when there is none, or it is not a real
    directory)."""

    def __init__(self, path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Failure(os.EX_NOINPUT, "%s: no such spool directory" % path) from None
        self.failed = spooldir.open_dir(spooldir.FAILED_DIR, dir_fd=self.fd)
        self.hold = spooldir.open_dir(spooldir.HOLD_DIR, dir_fd=self.fd)

    def where(self, place):
        return {"queue": self.fd, "failed": self.failed, "hold": self.hold}[place]


class Entry:
    """What list and show say of one message."""

    def __init__(self, name, where, st):
        self.id = visible(name)
        self.where = where              # "queue", "failed" or "hold"
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


def examine(dir_fd, name, where, now):
    """The Entry for one directory entry, or None (gone, not a file)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    e = Entry(name, where, st)
    complete = spool.is_complete(st.st_mode) and not name.startswith(
        spool.DRAFT_PREFIX.encode())
    if where == "queue" and not complete:
        e.state = "writing"             # never read as complete
        return e
    try:
        with spooldir.open_readonly(name, dir_fd=dir_fd) as f:
            if where == "queue" and spooldir.held(f):
                e.state = "delivering"
            read_envelope(e, f)
    except FileNotFoundError:
        return None
    except (spool.Odd, OSError) as x:
        e.state, e.reason = "unreadable", visible(str(x))
        return e
    if where in ("failed", "hold"):
        e.state = "failed" if where == "failed" else "held"
        e.reason = failure_reason(dir_fd, name)
    elif e.state is None:
        if spool.is_deferred(st.st_mode):
            e.state = "deferred"
            e.next_retry = max(now, st.st_mtime + buildconf.RETRY_DELAY_TIME)
            reason = spooldir.deferral(dir_fd, name)
            e.reason = visible(reason) if reason else None
        else:
            e.state = "queued"
    return e


def read_envelope(e, f):
    try:
        msg = spool.parse(f)
    except spool.Malformed as x:
        e.state, e.reason = "malformed", str(x)
        return None
    e.sender = visible(msg.sender)
    e.pending = [visible(r) for _, r in msg.recipients]
    e.sent = [visible(r) for r in msg.sent]
    e.arrival = msg.arrival
    return msg


def failure_reason(dir_fd, name):
    try:
        with spooldir.open_readonly(name + b".reason", dir_fd=dir_fd) as r:
            return visible(r.read(4096).strip())
    except (FileNotFoundError, spool.Odd, OSError):
        return None


def everything(q, now):
    out = []
    for prefix in (spool.PREFIX, spool.DRAFT_PREFIX.encode()):
        out += [examine(q.fd, n, "queue", now) for n in spooldir.names(q.fd, prefix)]
    for where in ("failed", "hold"):
        d = q.where(where)
        if d is not None:
            out += [examine(d, n, where, now) for n in spooldir.names(d)
                    if not n.endswith(b".reason") and not n.endswith(b".tmp")]
    return sorted((e for e in out if e is not None), key=lambda e: -e.age(now))


def age_text(seconds):
    seconds = int(max(0, seconds))
    if seconds < 3600:
        return "%dm%02ds" % divmod(seconds, 60)
    if seconds < 86400:
        return "%dh%02dm" % (seconds // 3600, seconds % 3600 // 60)
    return "%dd%02dh" % (seconds // 86400, seconds % 86400 // 3600)


# ----------------------------------------------------------------- commands ----

def cmd_list(q, args):
    opts, rest = getopt.getopt(args, "j", ["json"])
    if rest:
        raise getopt.GetoptError("list takes no arguments")
    now = time.time()
    entries = everything(q, now)
    if opts:
        for e in entries:
            print(json.dumps(e.as_dict(now)))
        return os.EX_OK
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
    return os.EX_OK


def find(q, ident):
    """(directory descriptor, name, where) of the message ident; Failure."""
    name = os.fsencode(ident)
    if not ID.match(name):
        raise Failure(os.EX_NOINPUT, "%s: not a queue id (smtpd followed by letters "
                                     "and digits)" % visible(ident))
    for where in ("queue", "failed", "hold"):
        d = q.where(where)
        if d is not None and exists(d, name):
            return d, name, where
    raise Failure(os.EX_NOINPUT, "%s: no such message in %s" % (ident, q.path))


def exists(dir_fd, name):
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def cmd_show(q, args):
    (ident,) = one_argument("show", args)
    d, name, where = find(q, ident)
    e = examine(d, name, where, time.time())
    if e is None:
        raise Failure(os.EX_NOINPUT, "%s: gone" % ident)
    print("id: %s\nqueue: %s\nstate: %s\nsize: %d" % (e.id, where, e.state, e.size))
    if e.state == "writing":
        print("(being written: not shown)")
        return os.EX_OK
    if e.reason:
        print("reason: %s" % e.reason)
    if e.sender is None:
        return os.EX_OK
    print("from: %s" % e.sender)
    for r in e.pending:
        print("to: %s" % r)
    for r in e.sent:
        print("sent: %s" % r)
    with spooldir.open_readonly(name, dir_fd=d) as f:
        msg = spool.parse(f)
        headers = spool.headers(f.fileno(), msg.body_offset)
        print("record: %s" % visible(the_record(e, name, headers, msg, time.time())))
        print("")
        sys.stdout.write(visible(headers, keep="\n\t"))
    return os.EX_OK


def the_record(e, name, headers, msg, now):
    """A queued message's record, in SMTPD_LOG_FORMAT (logfmt if classic)
    with the field names of smtpd's line for it: what the spool file
    holds (its envelope, our Received header) and where it is."""
    got = spool.our_received(headers, name) or {}   # (someone else's tells us nothing)
    fields = [("id", e.id), ("message_id", visible(spool.message_id(headers)))] + [
        (k, visible(got[g]) if got.get(g) is not None else None)
        for k, g in (("client_addr", "addr"), ("client_name", "name"), ("helo", "helo"),
                     ("tls_version", "tls_version"), ("tls_cipher", "tls_cipher"))] + [
        ("from", e.sender), ("to", e.pending), ("sent", e.sent or None),
        ("size", e.size), ("state", e.state), ("queue", e.where),
        ("age", int(e.age(now))), ("reason", e.reason)]
    form = buildconf.SMTPD_LOG_FORMAT
    return record.text("message", fields, "json" if form == "json" else "logfmt")


def cmd_requeue(q, args):
    (ident,) = one_argument("requeue", args)
    if ident == "all-failed":
        names = []
        if q.failed is not None:
            names = [n for n in spooldir.names(q.failed) if FAILED_ID.match(n)]
        for n in names:
            requeue_failed(q, n)
        print("%d failed message%s requeued" % (len(names), "" if len(names) == 1 else "s"))
        return os.EX_OK
    d, name, where = find(q, ident)
    if where == "failed":
        requeue_failed(q, name)
        print("%s: back in the queue" % ident)
        return os.EX_OK
    if where == "hold":
        raise Failure(os.EX_DATAERR, "%s: held by a mail filter; `release` lets it go"
                      % ident)
    with hold(d, name) as f:
        st = os.fstat(f.fileno())
        if not spool.is_deferred(st.st_mode):
            print("%s: already due" % ident)
            return os.EX_OK
        spool.make_due(f)
    log.notice("queue: %s made due now by uid %d", ident, INVOKER)
    print("%s: due now" % ident)
    return os.EX_OK


def cmd_release(q, args):
    (ident,) = one_argument("release", args)
    d, name, where = find(q, ident)
    if where != "hold":
        raise Failure(os.EX_DATAERR, "%s: not held (it is in the %s)" % (ident, where))
    requeue_failed(q, name, q.hold, "hold/")
    print("%s: released into the queue" % ident)
    return os.EX_OK


def requeue_failed(q, name, from_fd=None, place="failed/"):
    shown = visible(name)
    try:
        spooldir.unquarantine(q.fd, q.failed if from_fd is None else from_fd, name)
    except FileExistsError:
        raise Failure(os.EX_CANTCREAT, "%s: a message of that name is in the queue"
                      % shown) from None
    except spool.Odd as e:
        raise Failure(os.EX_NOINPUT, "%s: %s" % (shown, e)) from None
    log.notice("queue: %s moved back from %s by uid %d", shown, place, INVOKER)


class hold:
    """Open and lock a queued message for a change; Failure (75) if it is
    being written or delivered."""

    def __init__(self, dir_fd, name):
        self.dir_fd, self.name, self.ident = dir_fd, name, visible(name)

    def __enter__(self):
        try:
            st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
            if not spool.is_complete(st.st_mode) or self.name.startswith(
                    spool.DRAFT_PREFIX.encode()):
                raise Failure(os.EX_TEMPFAIL, "%s: being written; not touched" % self.ident)
            self.f = spooldir.open_readonly(self.name, dir_fd=self.dir_fd)
        except FileNotFoundError:
            raise Failure(os.EX_NOINPUT, "%s: gone" % self.ident) from None
        except spool.Odd as e:
            raise Failure(os.EX_NOINPUT, "%s: %s" % (self.ident, e)) from None
        if not spool.lock(self.f.fileno()):
            self.f.close()
            raise Failure(os.EX_TEMPFAIL, "%s: being delivered or written by another "
                                          "process; not touched" % self.ident)
        if not same_file(self.f, self.dir_fd, self.name):
            self.f.close()
            raise Failure(os.EX_TEMPFAIL, "%s: changed meanwhile; not touched" % self.ident)
        return self.f

    def __exit__(self, *exc):
        self.f.close()


def same_file(f, dir_fd, name):
    try:
        a = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    b = os.fstat(f.fileno())
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def cmd_delete(q, args):
    (ident,) = one_argument("delete", args)
    d, name, where = find(q, ident)
    if where in ("failed", "hold"):
        os.unlink(name, dir_fd=d)
        for extra in (b".reason", b".reason.tmp"):
            try:
                os.unlink(name + extra, dir_fd=d)
            except FileNotFoundError:
                pass
    else:
        with hold(d, name) as f:
            if same_file(f, d, name):
                os.unlink(name, dir_fd=d)
        spooldir.drop_deferral(q.path, name)
    spool.fsync_dir(d)
    log.notice("queue: %s deleted from %s by uid %d", ident, where, INVOKER)
    print("%s: deleted" % ident)
    return os.EX_OK


def cmd_flush(q, args):
    if args:
        raise getopt.GetoptError("flush takes no arguments")
    pid = forwarder(q)
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError as e:
        raise Failure(os.EX_UNAVAILABLE, "signal to smtpfwdd (pid %d): %s"
                      % (pid, e.strerror)) from None
    print("smtpfwdd (pid %d) asked to scan now" % pid)
    return os.EX_OK


def forwarder(q):
    """The pid of the smtpfwdd of this spool: the process that holds the
    flock of .smtpfwdd.lock, as the kernel says, if it is an smtpfwdd of
    the spool's owner.  Never the pid the file holds: the jail writes it."""
    try:
        fd = os.open(LOCKFILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=q.fd)
    except OSError as e:
        raise Failure(os.EX_UNAVAILABLE, "smtpfwdd is not running (%s/%s: %s)"
                      % (q.path, LOCKFILE, e.strerror)) from None
    try:
        pid = spooldir.lock_holder(fd)
    except OSError as e:
        raise Failure(os.EX_UNAVAILABLE, "cannot tell who holds %s: %s" % (LOCKFILE, e))
    finally:
        os.close(fd)
    if pid is None:
        raise Failure(os.EX_UNAVAILABLE, "smtpfwdd is not running (nobody holds %s/%s)"
                      % (q.path, LOCKFILE))
    owner = os.fstat(q.fd).st_uid
    title, uid = process_title(pid), process_uid(pid)
    if title != FORWARDER_TITLE or uid != owner:
        raise Failure(os.EX_UNAVAILABLE, "%s is held by pid %d (%s, uid %s), not by an "
                      "smtpfwdd of uid %d: not signalled" % (
                          LOCKFILE, pid, visible(title or b"?"), uid, owner))
    return pid


def process_title(pid):
    try:
        with open("/proc/%d/comm" % pid, "rb") as f:
            return f.read().rstrip(b"\n")
    except OSError:
        return None


def process_uid(pid):
    try:
        with open("/proc/%d/status" % pid, "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def one_argument(command, args):
    if len(args) != 1:
        raise getopt.GetoptError("%s takes one argument, an ID" % command)
    return args


COMMANDS = {"list": cmd_list, "show": cmd_show, "requeue": cmd_requeue,
            "delete": cmd_delete, "release": cmd_release, "flush": cmd_flush}
INVOKER = os.getuid()           # for the log: who asked, before any change of user


def become_owner(path):
    """As root: become the spool directory's owner before reading anything
    in it (privileges.become_owner)."""
    try:
        privileges.become_owner(path)
    except FileNotFoundError:
        raise Failure(os.EX_NOINPUT, "%s: no such spool directory" % path) from None


def main(path, args):
    """smtpfwdd -Q on the spool at path: args are the command and its arguments."""
    if not args or args[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return os.EX_USAGE
    try:
        become_owner(path)
        return COMMANDS[args[0]](Queue(path), args[1:])
    except getopt.GetoptError as e:
        print("smtpq: %s\n%s" % (e, USAGE), file=sys.stderr)
        return os.EX_USAGE
    except Failure as e:
        print("smtpq: %s" % e, file=sys.stderr)
        return e.status
    except OSError as e:
        where = os.fsdecode(e.filename) if e.filename is not None else path
        print("smtpq: %s: %s" % (visible(where), e.strerror), file=sys.stderr)
        return os.EX_IOERR
