"""spool - the smtpd spool directory, its file format and its protocol

SYNOPSIS
    from smtpgate import spool
    with spool.Draft(spooldir, sender, recipients) as d:
        d.write(received_header); d.write(body); name = d.commit()
    msg = spool.parse(fileobj)

FORMAT
    One file per message, named "smtpd" followed by six random characters.
    Every line ends with a single LF; no line of the envelope is longer than
    512 bytes including its LF:

        FROM <sender as the client typed it, <> for the null sender>
        SENT ;SMTPUTF8              MAIL said SMTPUTF8 (RFC 6531): UTF-8 inside
        SENT ;DSN RET=.. ENVID=..   MAIL's DSN parameters (RFC 3461), if any
        SENT ;DSN NOTIFY=.. ORCPT=..  the next RCPT's DSN parameters, if any
        RCPT <recipient>            one line per recipient, in order
        SENT <recipient>            a RCPT already delivered by smtpfwdd
        BODY
        Received: ...               smtpd's own trace header
        <the message, dot-unstuffed, LF line ends>

    This is the format of the original Obtuse smtpd, so the C smtpfwdd can
    deliver our files and we deliver files of the C smtpd.  The ";" lines
    are ours: the C smtpfwdd skips every "SENT " line, so it delivers such a
    file as it always did, without the sender's DSN wishes; no address can
    begin with ";", so no recipient is ever read as one.

PROTOCOL
    The mode bits are the protocol (spec 5.4):
        0600    being written (the writer holds an exclusive flock)
        0750    complete: eligible for delivery
        0755    temporarily failed; eligible again RETRY_DELAY_TIME seconds
                after its mtime
        1755    the same, and the sender has been sent a delay warning
    A SENT line marks a recipient delivered, or failed and already reported
    to the sender in a delivery status notification.
    We write a draft under a name starting with DRAFT_PREFIX (never
    "smtpd"), mode 0600, O_EXCL, flock held; commit() flushes, chmods 0750,
    fsyncs (data and mode), renames it to its smtpd name (never replacing
    one) and fsyncs the directory -- only then may smtpd answer 250.
    smtpd's sessions write anonymous drafts instead (O_TMPFILE: no name, so
    nothing to remove after a crash, and no directory lock while the inode
    is allocated): commit() names the complete, fsync-ed file with
    linkat(2), never replacing a name; where the kernel refuses that to an
    unprivileged process (before Linux 6.10) the draft is copied once to a
    named one and the process writes named drafts from then on.  The original C smtpd
    writes in place under the smtpd name at 0600 and chmods 0750 at the end;
    such files are simply not eligible until complete.  Locks are flock(2),
    never lockf/fcntl record locks, so the C programs see them.

    Drafts whose writer died (unlocked and older than SESSION_TIMEOUT) are
    removed: their client never got a 250.  Why a file was last deferred is
    kept in deferred/NAME for the queue tool; it is advice, not protocol
    (the C programs know nothing of it), and goes with the file.  Messages that cannot be
    delivered are moved to failed/ with a NAME.reason file; nothing accepted
    is deleted unless delivered.

    An envelope line with a control character or NUL makes the file
    malformed.  The directory -- hostile entries, locks held, failed/,
    deferred/ -- is spooldir.py's.

ARRIVAL
    A message's age is taken from the date smtpd itself wrote in its
    Received header: the line after the one ending in "id NAME;" (ours), or
    the end of the " via SMTP by" line (the C smtpd's ctime date).  Nothing
    the client sent is read: a body whose first line starts with a blank
    folds into that header, but only smtpd's own lines are parsed.  A file
    without such a date counts from its creation time (statx(2) birth time);
    where the file system records none, its age is unknown (None).
"""

import _strptime  # noqa: F401  time.strptime imports it lazily; not after setuid
import email.utils
import errno
import fcntl
import os
import re
import stat
import string
import time

from smtpgate import libc
from smtpgate.text import escape

PREFIX = b"smtpd"
DRAFT_PREFIX = "draft."
LINE_MAX = 512
NAME_CHARS = string.ascii_letters + string.digits
MODE_DRAFT = 0o600
MODE_COMPLETE = 0o750
MODE_DEFERRED = 0o755


def is_complete(mode):
    """Is a file of this mode complete (smtpd committed it: owner and group
    may execute)?  A draft never is."""
    return mode & 0o110 == 0o110


def is_deferred(mode):
    """Is a file of this mode deferred (others may execute too: its mtime
    is when it was last tried)?"""
    return mode & 0o111 == 0o111
try:
    IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))    # buffers one writev(2) takes
except (ValueError, OSError):
    IOV_MAX = 16


CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class Malformed(Exception):
    """A spool file that cannot be delivered; str() is the reason."""


class Odd(Exception):
    """A directory entry that is not a spool file we may open (a link, a
    FIFO, a directory, unreadable...); str() says why."""


def envelope(sender, recipients, dsn=None, utf8=False):
    """The envelope bytes; ValueError if a line would exceed LINE_MAX.
    dsn: (MAIL's DSN parameters or None, [each recipient's or None]), as
    text "RET=HDRS ENVID=x", "NOTIFY=NEVER ORCPT=rfc822;a@b" (see FORMAT)."""
    lines = [b"FROM " + sender + b"\n"]
    if utf8:
        lines.append(UTF8_LINE)
    mail, each = dsn if dsn is not None else (None, ())
    if mail:
        lines.append(DSN_LINE + mail.encode("ascii") + b"\n")
    for i, r in enumerate(recipients):
        if i < len(each) and each[i]:
            lines.append(DSN_LINE + each[i].encode("ascii") + b"\n")
        lines.append(b"RCPT " + r + b"\n")
    for line in lines:
        if len(line) > LINE_MAX:
            raise ValueError("envelope line of %d bytes (max %d)"
                             % (len(line), LINE_MAX))
    return b"".join(lines) + b"BODY\n"


# A line the C smtpfwdd skips (it skips every "SENT " line) and no address
# can begin with (";" is not atext): the DSN parameters of MAIL (after FROM)
# or of the RCPT line that follows it.
DSN_LINE = b"SENT ;DSN "
UTF8_LINE = b"SENT ;SMTPUTF8\n"     # the client said SMTPUTF8 (RFC 6531), after FROM


def new_name():
    """smtpd + 6 random characters (one getrandom(2) call; 62**6 < 2**64,
    so the modulo bias is below 1e-8).  Uniqueness is rename_noreplace's."""
    n = int.from_bytes(os.urandom(8), "little")
    chars = []
    for _ in range(6):
        n, i = divmod(n, len(NAME_CHARS))
        chars.append(NAME_CHARS[i])
    return "smtpd" + "".join(chars)


def lock(fd, blocking=False):
    """flock(LOCK_EX); False if another process holds it (non-blocking)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


class Draft:
    """A message being written; invisible to smtpfwdd until commit().
    name: the spool id to commit it as (drawn at random if None); token:
    another id for the draft's own name, when a draft of name exists (a
    filter's changes are a second draft of the same message)."""

    BUFFER = 65536      # bytes gathered before a writev(2)
    anonymous_ok = True     # O_TMPFILE drafts work here (until shown otherwise)

    def __init__(self, spooldir, sender, recipients, name=None, token=None, anonymous=False,
                 dsn=None, utf8=False):
        data = envelope(sender, recipients, dsn, utf8)
        self.spooldir = spooldir
        self.name = name or new_name()
        self.draft = os.path.join(spooldir, DRAFT_PREFIX + (token or self.name))
        self.fd = None
        if anonymous and Draft.anonymous_ok:
            try:
                self.fd = os.open(spooldir, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, MODE_DRAFT)
                self.draft = None
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                Draft.anonymous_ok = False      # a file system without O_TMPFILE
        if self.fd is None:
            self.fd = os.open(self.draft, os.O_RDWR | os.O_CREAT | os.O_EXCL
                              | os.O_CLOEXEC, MODE_DRAFT)
            lock(self.fd, blocking=True)
        self.pending, self.npending = [data], len(data)
        self.body_offset = len(data)        # where "BODY\n" ends
        self.done = False

    def write(self, data):
        self.pending.append(data)
        self.npending += len(data)
        if self.npending >= self.BUFFER:
            self.flush()

    def flush(self):
        data, self.pending, self.npending = self.pending, [], 0
        i = 0
        while i < len(data):
            n = os.writev(self.fd, data[i:i + IOV_MAX])     # never more than IOV_MAX
            while i < len(data) and n >= len(data[i]):
                n -= len(data[i])
                i += 1
            if n:
                data[i] = data[i][n:]

    def overwrite(self, parts, body_offset):
        """Replace what was written with parts (a list of bytes), envelope
        first, body_offset octets long; before commit() only."""
        data, self.pending, self.npending = b"".join(parts), [], 0
        view, off = memoryview(data), 0
        while off < len(data):
            off += os.pwrite(self.fd, view[off:], off)
        os.ftruncate(self.fd, len(data))
        os.lseek(self.fd, len(data), os.SEEK_SET)
        self.body_offset = body_offset

    def commit(self, into=None, sync=None):
        """Make the message durable and visible; return its name.  into: a
        subdirectory of the spool (never a link) to commit it to instead,
        e.g. hold/ for a quarantined message; made if missing.  sync: what
        fsyncs the spool directory after the rename (fsync_dir; a -D gate's
        workers share theirs, spooldir.GroupSync)."""
        self.flush()
        os.fchmod(self.fd, MODE_COMPLETE)   # before the fsync, so the mode is durable too
        os.fsync(self.fd)
        dir_fd = open_subdir(self.spooldir, into) if into else libc.AT_FDCWD
        try:
            while True:
                dst = self.name if into else os.path.join(self.spooldir, self.name)
                try:
                    if self.draft is None:
                        self.link(dst, dir_fd)
                    else:
                        rename_noreplace(self.draft, dst, dst_dir_fd=dir_fd)
                    break
                except FileExistsError:
                    self.name = new_name()
            if into:
                fsync_dir(dir_fd)
        finally:
            if into:
                os.close(dir_fd)
        if into or sync is None:
            fsync_dir(self.spooldir)
        else:
            sync(self.spooldir)
        self.done = True
        os.close(self.fd)
        return self.name

    def link(self, dst, dir_fd):
        """Name the anonymous draft dst; where the kernel will not let us,
        through a named copy (and named drafts from now on)."""
        try:
            return libc.link_open_file(self.fd, dst, dir_fd)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
        Draft.anonymous_ok = False
        self.draft = os.path.join(self.spooldir, DRAFT_PREFIX + new_name())
        fd = os.open(self.draft, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, MODE_DRAFT)
        try:
            lock(fd, blocking=True)
            size, off = os.fstat(self.fd).st_size, 0
            while off < size:
                n = os.copy_file_range(self.fd, fd, size - off, off, off)
                if n <= 0:
                    raise OSError(errno.EIO, "short copy of a draft", self.draft)
                off += n
            os.fchmod(fd, MODE_COMPLETE)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(self.draft)
            raise
        os.close(self.fd)
        self.fd = fd
        rename_noreplace(self.draft, dst, dst_dir_fd=dir_fd)

    def abort(self):
        """Remove the draft; safe to call more than once."""
        if self.done:
            return
        self.done = True
        if self.draft is not None:
            try:
                os.unlink(self.draft)
            except FileNotFoundError:
                pass
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.abort()


def open_subdir(spooldir, name):
    """A descriptor of the spool's subdirectory name, made (0700) if
    missing; OSError (ELOOP, ENOTDIR) if it is a link or not a directory."""
    path = os.path.join(spooldir, name)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def rename_noreplace(src, dst, src_dir_fd=libc.AT_FDCWD, dst_dir_fd=libc.AT_FDCWD):
    """Rename src to dst atomically, never replacing dst (FileExistsError);
    each name relative to its directory descriptor, if given.

    renameat2(RENAME_NOREPLACE) where the kernel and file system have it,
    else link(2) then unlink(2): a message is never overwritten."""
    try:
        return libc.renameat2(src, dst, libc.RENAME_NOREPLACE, src_dir_fd, dst_dir_fd)
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
    fds = {"src_dir_fd": None if src_dir_fd == libc.AT_FDCWD else src_dir_fd,
           "dst_dir_fd": None if dst_dir_fd == libc.AT_FDCWD else dst_dir_fd}
    os.link(src, dst, follow_symlinks=False, **fds)
    os.unlink(src, dir_fd=fds["src_dir_fd"])


def fsync_dir(path):
    """fsync a directory, given by path or by an open descriptor."""
    if isinstance(path, int):
        os.fsync(path)
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Message:
    """A parsed spool file: sender, unsent recipients, where the body is."""

    def __init__(self, sender, recipients, body_offset, arrival, sent=(), dsn=None, utf8=False):
        self.sender = sender
        self.recipients = recipients        # [(offset of the RCPT, address)]
        self.dsn = dsn or {}                # "mail": MAIL's DSN text; RCPT offset: its own
        self.utf8 = utf8                    # sent with SMTPUTF8 (RFC 6531)
        self.sent = list(sent)              # addresses already delivered
        self.body_offset = body_offset
        self.arrival = arrival              # epoch (see ARRIVAL), or None


def _line(f, what):
    line = f.readline(LINE_MAX + 1)
    if line.endswith(b"\n") and len(line) <= LINE_MAX:
        if CONTROL.search(line, 0, len(line) - 1):
            raise Malformed("control character or NUL in %s line" % what)
        return line
    if len(line) >= LINE_MAX:
        raise Malformed("%s line too long" % what)
    raise Malformed("unexpected end of file in envelope")


def parse(f):
    """Parse the spool file open in binary mode f, as smtpfwdd did (6.3)."""
    f.seek(0)
    if f.read(5) != b"FROM ":
        raise Malformed("corrupt (no FROM line)")
    f.seek(0)
    sender = _line(f, "FROM")[5:-1]
    recipients, sent, dsn, pending, utf8 = [], [], {}, None, False
    while True:
        offset = f.tell()
        line = _line(f, "RCPT")
        if line.startswith(DSN_LINE):       # MAIL's (RET, ENVID) or the next RCPT's
            text = line[len(DSN_LINE):-1].decode("ascii", "replace")
            if text.startswith(("RET=", "ENVID=")):
                dsn["mail"] = text
            else:
                pending = text
            continue
        if line == UTF8_LINE:
            utf8 = True
            continue
        if line.startswith(b"SENT "):
            sent.append(line[5:-1])
        elif line.startswith(b"RCPT "):
            recipients.append((offset, line[5:-1]))
            if pending is not None:
                dsn[offset] = pending
        else:
            break
        pending = None
    if line != b"BODY\n":
        raise Malformed("corrupt (no BODY after RCPT)")
    if not recipients and not sent:
        raise Malformed("corrupt (no recipient)")
    body_offset = f.tell()
    arrival = received_time(f)
    if arrival is None:
        arrival = libc.birth_time(f.fileno())
    return Message(sender, recipients, body_offset, arrival, sent, dsn, utf8)


def received_time(f):
    """Epoch of the date smtpd wrote on its Received header (ours or the C
    one's), or None.  Only smtpd's own lines are read (see ARRIVAL)."""
    start = f.tell()
    head = f.read(2048)
    f.seek(start)
    if not head.startswith(b"Received: from "):
        return None
    lines = head.split(b"\n")[:8]
    for i, line in enumerate(lines[1:-1], 1):
        if line.startswith(b" via SMTP by "):           # the C smtpd: one line
            text = line.rsplit(b";", 1)[-1]
            break
        if line.startswith(b"\tby ") and line.endswith(b";"):
            text = lines[i + 1]                         # ours: the next line
            if not text.startswith(b"\t"):
                return None
            break
        if not line.startswith((b"\t", b" ")):
            return None
    else:
        return None
    return parse_date(text.decode("ascii", "replace").strip())


def parse_date(text):
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        pass
    try:
        return time.mktime(time.strptime(text, "%a %b %d %H:%M:%S %Y"))
    except (ValueError, OverflowError):
        return None


def eligible(st, now, retry_delay):
    """Spec 6.2: a complete regular file, not deferred too recently."""
    if not stat.S_ISREG(st.st_mode):
        return False
    if not is_complete(st.st_mode):
        return False
    if is_deferred(st.st_mode) and now - st.st_mtime < retry_delay:
        return False
    return True


OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


def open_for_delivery(path, now, retry_delay):
    """Open and lock path; None if busy, gone or no longer eligible; Odd if
    it is not a regular file we may open."""
    try:
        fd = os.open(path, os.O_RDWR | OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Odd("open: %s" % e.strerror) from None
    try:
        own = os.fstat(fd)
        if not stat.S_ISREG(own.st_mode):
            raise Odd("not a regular file")
        if not lock(fd):
            os.close(fd)
            return None
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    except BaseException:
        os.close(fd)
        raise
    if (st is None or (st.st_dev, st.st_ino) != (own.st_dev, own.st_ino)
            or not eligible(st, now, retry_delay)):
        os.close(fd)
        return None
    return open(fd, "r+b", buffering=0)


def headers(fd, body_offset, limit=65536):
    """The message's header section (after the envelope), at most limit."""
    data = os.pread(fd, limit, body_offset)
    end = data.find(b"\n\n")
    return data[:end + 1] if end >= 0 else data


MESSAGE_ID = re.compile(rb"^message-id:[ \t]*((?:[^\n]|\n[ \t])*)", re.IGNORECASE | re.MULTILINE)
MESSAGE_ID_MAX = 120


# smtpd's own trace header, the first of a spool file (session.py's received())
OUR_RECEIVED = re.compile(
    rb"Received: from (\S*) \((\S*) \[([^\]]*)\]\)\s+(?:\(version=(\S+) cipher=(\S+)\)\s+)?"
    rb"by \S+ \(smtpd\) with (\S+) id (\S+);")


def our_received(headers, name):
    """What smtpd's Received header says of the client of the message name
    (bytes): {helo, name, addr, tls_version, tls_cipher, proto} as text, or
    None when the first header is not smtpd's for this id."""
    m = OUR_RECEIVED.match(headers)
    if m is None or m.group(7) != (name if isinstance(name, bytes) else name.encode()):
        return None
    keys = ("helo", "name", "addr", "tls_version", "tls_cipher", "proto")
    return {k: v.decode("utf-8", "replace") if v is not None else None
            for k, v in zip(keys, m.groups())}


def message_id(headers):
    """The Message-ID of a header section (bytes, LF or CRLF line ends),
    unfolded, escaped for a log line and at most MESSAGE_ID_MAX characters;
    "-" when there is none.  The client wrote it: never trusted."""
    m = MESSAGE_ID.search(headers)
    if m is None:
        return "-"
    text = re.sub(rb"\r?\n[ \t]+", b" ", m.group(1)).strip().decode("latin-1")
    return escape(text, MESSAGE_ID_MAX) if text else "-"


def make_due(f):
    """A deferred file eligible now: mode 0750 (keeping the warned mark)."""
    mark = os.fstat(f.fileno()).st_mode & stat.S_ISVTX
    os.chmod(f.fileno(), MODE_COMPLETE | mark)
    os.fsync(f.fileno())


def reader(f):
    """A read-only descriptor of the same open spool file for the mail
    agent: /proc/self/fd reopens the inode itself (never the name), with
    its own offset and without our lock; without /proc, a duplicate."""
    fd = f.fileno()
    try:
        r = os.open("/proc/self/fd/%d" % fd, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return os.dup(fd)
    a, b = os.fstat(r), os.fstat(fd)
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
        os.close(r)
        return os.dup(fd)
    return r


def mark_sent(f, offsets):
    """Overwrite RCPT with SENT at each offset, durably."""
    fd = f.fileno()
    for off in offsets:
        if os.pread(fd, 5, off) != b"RCPT ":
            raise Malformed("no RCPT at offset %d" % off)
        os.pwrite(fd, b"SENT", off)
    os.fsync(fd)


def defer(f):
    """Mark the open file temporarily failed: mode 0755 (keeping the mark of
    warned()), mtime now."""
    mark = os.fstat(f.fileno()).st_mode & stat.S_ISVTX
    os.chmod(f.fileno(), MODE_DEFERRED | mark)
    os.utime(f.fileno())


def warned(f):
    """Has the sender been told that this message is delayed?  (Mode bit
    S_ISVTX, which the spool protocol of the C programs ignores.)"""
    return bool(os.fstat(f.fileno()).st_mode & stat.S_ISVTX)


def mark_warned(f):
    mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
    os.chmod(f.fileno(), mode | stat.S_ISVTX)
    os.fsync(f.fileno())


def holds(f, path):
    """Is path (not followed) still the file f has open?"""
    try:
        a, b = os.stat(path, follow_symlinks=False), os.fstat(f.fileno())
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def remove(path, f=None):
    """Unlink path; with f, only if the name still holds f's file (True)."""
    if f is not None and not holds(f, path):
        return False
    os.unlink(path)
    return True


