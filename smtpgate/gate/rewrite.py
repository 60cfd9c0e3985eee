"""rewrite - a message as the filters see it, and the changes they ask for

DESCRIPTION
    Message(fd, start, end, envelope, admit, spooldir, maxsize) reads the
    header of the message in a draft (descriptor fd, from start -- after
    smtpd's own Received header, which no filter sees, changes or moves --
    to end).  fields() and chunks() are what a filter is sent (milter.py);
    changes() collects one filter's changes as their packets arrive,
    checked at once (Invalid the moment one is too many or too large: a new
    body goes to a file as it comes, held to the size limit);
    apply() takes one filter's changes, all of them or none (Invalid);
    write() makes the changed message a new draft, which the session
    commits as it would have the first: fsync, rename, directory fsync,
    then 250.  Unchanged headers are written back byte for byte.
CHANGES
    add: a header after the last.  insert at index i: before the i-th
    header, counting smtpd's Received header as the 0th, as Postfix counts;
    0 is 1 here, for smtpd's Received header stays first (smtpfwdd dates a
    message by it).  change the i-th header of a name (0 is 1, the first):
    an empty value deletes it; a change beyond the last adds it.  from: a
    new sender; addrcpt, delrcpt; body: a new body (its CRLF line ends
    become LF).  ESMTP arguments of from and addrcpt are ignored: the spool
    file has no place for them.
REFUSED
    Any of these makes the filter's changes Invalid, and the default
    action applies: a header name that is not printable ASCII without ':';
    a value with a NUL, a CR not before LF, a line break not followed by a
    space or tab (only folds), or over HEADER_MAX octets; more than
    EDITS_MAX changes, or header and envelope changes of more than
    CHANGES_MAX octets in all; an address smtpd
    would refuse -- its syntax, or the rules, asked with the sender the
    message will have; no recipient left, or more than MAX_RCPT; a body
    with a NUL or a bare CR; a message over the size limit.
"""

import errno
import os
import re
import tempfile

import buildconf
from smtpgate import spool
from smtpgate.address import AddressError, bare, parse_path
from smtpgate.gate import verify

FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]{1,998}")
UNFOLDED = re.compile(rb"\n(?![ \t])")
HEADER_MAX = 65536
CHANGES_MAX = 1 << 20       # octets of one filter's header and envelope changes in all
EDITS_MAX = 10000           # changes one filter may ask for at the end of one message
READ = 65536
IN_PLACE = 1 << 20          # a changed message whose body is at most this is rewritten in place


class Invalid(Exception):
    """A change that would make an invalid spool file; str() says which."""


def exact(address):
    """What tells one recipient from another (verify.exact), brackets or not."""
    return verify.exact(bare(address))


def read_header(fd, start, end):
    """The header fields of the message at [start, end) of fd: ([name,
    [lines]] with each name as written before its colon and the value's
    lines without their LF), whether a blank line ends them, and where the
    body starts.  A line that is neither a field nor a fold starts the body."""
    headers, pos, buf = [], start, bytearray()
    while True:
        nl = buf.find(b"\n")
        if nl < 0:
            chunk = os.pread(fd, min(READ, end - pos), pos) if pos < end else b""
            if not chunk:
                return headers, False, pos - len(buf)
            pos += len(chunk)
            buf += chunk
            continue
        line = bytes(buf[:nl])
        if not line:
            return headers, True, pos - len(buf) + 1
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1][1].append(line)
        elif FIELD.match(line):
            name, _, value = line.partition(b":")
            headers.append([name, [value]])
        else:
            return headers, False, pos - len(buf)
        del buf[:nl + 1]


class Replacement:
    """A new body, as a filter sends it (SMFIR_REPLBODY, CRLF), kept in an
    unnamed file of the spool directory with LF line ends."""

    def __init__(self, spooldir, limit):
        self.f = tempfile.TemporaryFile(dir=spooldir, prefix=spool.DRAFT_PREFIX)
        self.limit, self.length, self.cr, self.last = limit, 0, b"", b""

    def write(self, data):
        data = self.cr + data
        self.cr = b"\r" if data.endswith(b"\r") else b""
        data = (data[:-1] if self.cr else data).replace(b"\r\n", b"\n")
        if b"\r" in data or b"\0" in data:
            raise Invalid("a bare CR or a NUL in the new body")
        self.length += len(data)
        if self.limit and self.length > self.limit:
            raise Invalid("the new body exceeds %d octets" % self.limit)
        self.f.write(data)
        self.last = data[-1:] or self.last

    def finish(self):
        if self.cr:
            raise Invalid("a bare CR at the end of the new body")
        if self.length and self.last != b"\n":
            self.write(b"\r\n")
        self.f.flush()
        return self.f.fileno(), 0, self.length


class Changes:
    """One filter's changes at the end of one message, taken as they arrive
    (milter.py): each checked at once against the bounds, a new body
    written to its file as it comes (Replacement), so that a filter's
    answer never costs more memory than CHANGES_MAX and a packet."""

    def __init__(self, spooldir, maxsize):
        self.spooldir, self.maxsize = spooldir, maxsize
        self.edits = []             # header and envelope changes, in order
        self.octets = 0
        self.count = 0
        self.replacement = None     # Replacement, at the first body change

    def add(self, edit):
        self.count += 1
        if self.count > EDITS_MAX:
            raise Invalid("more than %d changes" % EDITS_MAX)
        if edit[0] == "body":
            if self.replacement is None:
                self.replacement = Replacement(self.spooldir, self.maxsize)
            self.replacement.write(edit[1])
            return
        if edit[0] in ("add", "insert", "change") and len(edit[-1]) > HEADER_MAX:
            raise Invalid("header %r of %d octets" % (edit[-2][:40], len(edit[-1])))
        self.octets += sum(len(x) for x in edit[1:] if isinstance(x, bytes))
        if self.octets > CHANGES_MAX:
            raise Invalid("header and envelope changes of more than %d octets" % CHANGES_MAX)
        self.edits.append(edit)

    def __bool__(self):
        return bool(self.edits) or self.replacement is not None

    def close(self):
        if self.replacement is not None:
            self.replacement.f.close()
            self.replacement = None


class Message:
    """The message the filters judge: envelope, header, where its body is."""

    def __init__(self, fd, start, end, envelope, admit, spooldir, maxsize):
        self.sender, self.recipients = envelope         # stored texts, "<a@b>"
        self.headers, self.blank, body = read_header(fd, start, end)
        self.body = (fd, body, end)                     # descriptor, offset, end
        self.admit = admit          # (sender, recipient) -> may it pass the rules?
        self.spooldir, self.maxsize = spooldir, maxsize
        self.changed = self.reformed = False
        self.replaced = None        # Replacement, when a filter sent a new body
        self.dsn = None             # (MAIL's DSN text, {recipient: its DSN text}) or None
        self.utf8 = False           # MAIL said SMTPUTF8: so does the rewritten envelope

    def envelope_dsn(self):
        """spool.envelope's dsn for the recipients as they are now: one a
        filter added has none; one kept keeps its own."""
        if self.dsn is None:
            return None
        mail, each = self.dsn
        return mail, [each.get(r) for r in self.recipients]

    def fields(self, leading_space):
        """(name, value) of each header, as a filter sees them: without the
        one space after the colon unless it asked for it (SMFIP_HDR_LEADSPC),
        folded lines joined by LF."""
        for name, lines in self.headers:
            value = b"\n".join(lines)
            if not leading_space and value.startswith(b" "):
                value = value[1:]
            yield name.rstrip(b" \t"), value

    def chunks(self, size):
        """The body in pieces of at most size octets, CRLF line ends."""
        fd, pos, end = self.body
        while pos < end:
            data = os.pread(fd, min(size // 2, end - pos), pos)
            if not data:
                break
            pos += len(data)
            yield data.replace(b"\n", b"\r\n")

    # -- changes --

    def changes(self):
        """An empty Changes for the next filter's answer."""
        return Changes(self.spooldir, self.maxsize)

    def apply(self, changes, leading_space):
        """One filter's Changes, all or none; Invalid (the Changes are
        closed either way: a new body is the Message's from here)."""
        headers, sender, rcpts = list(self.headers), self.sender, list(self.recipients)
        replacement, changes.replacement = changes.replacement, None
        try:
            reformed = False
            for edit in changes.edits:
                kind = edit[0]
                if kind in ("add", "insert", "change"):
                    reformed = True
                    self.header_edit(headers, edit, leading_space)
                elif kind == "from":
                    sender = self.address(edit[1], null_ok=True)
                elif kind == "addrcpt":
                    rcpt = self.address(edit[1], null_ok=False)
                    if exact(rcpt) not in map(exact, rcpts):
                        rcpts.append(rcpt)
                elif kind == "delrcpt":
                    gone = exact(edit[1].decode("latin-1"))
                    rcpts = [r for r in rcpts if exact(r) != gone]
            body = replacement.finish() if replacement is not None else self.body
            self.check(sender, rcpts, headers, body)
        except BaseException:
            if replacement is not None:
                replacement.f.close()
            raise
        if replacement is not None:
            self.close()
            self.replaced = replacement
        self.headers, self.sender, self.recipients, self.body = headers, sender, rcpts, body
        self.reformed = self.reformed or reformed or replacement is not None
        self.changed = True

    def header_edit(self, headers, edit, leading_space):
        if edit[0] == "add":
            headers.append(field(edit[1], edit[2], leading_space))
        elif edit[0] == "insert":
            headers.insert(min(max(edit[1] - 1, 0), len(headers)),
                           field(edit[2], edit[3], leading_space))
        else:
            index, name, value = max(edit[1], 1), edit[2], edit[3]
            if not NAME.fullmatch(name):
                raise Invalid("header name %r" % name[:40])
            same = [i for i, h in enumerate(headers)
                    if h[0].rstrip(b" \t").lower() == name.lower()]
            if index <= len(same):
                if value:
                    headers[same[index - 1]] = field(name, value, leading_space)
                else:
                    del headers[same[index - 1]]
            elif value:
                headers.append(field(name, value, leading_space))

    def address(self, text, null_ok):
        try:
            return parse_path(text.decode("latin-1"), null_ok)[0]
        except AddressError as e:
            raise Invalid("address %r: %s" % (text[:80], e.text)) from None

    def check(self, sender, rcpts, headers, body):
        if not rcpts:
            raise Invalid("no recipient left")
        if len(rcpts) > buildconf.MAX_RCPT:
            raise Invalid("%d recipients (MAX_RCPT is %d)" % (len(rcpts), buildconf.MAX_RCPT))
        before = set(map(exact, self.recipients)) if sender == self.sender else set()
        for r in rcpts:
            if exact(r) not in before and not self.admit(sender, r):
                raise Invalid("recipient %s from %s: refused by the rules" % (r, sender))
        size = sum(len(n) + 1 + sum(len(v) + 1 for v in lines) for n, lines in headers)
        if self.maxsize and size + body[2] - body[1] > self.maxsize:
            raise Invalid("the message would exceed %d octets" % self.maxsize)

    # -- the new draft --

    def head(self, received):
        """The changed message's lines up to its body, after the envelope."""
        out = [received] + [n + b":" + b"\n".join(lines) + b"\n" for n, lines in self.headers]
        if self.blank or self.reformed:
            out.append(b"\n")
        return out

    def rewrite(self, draft, received):
        """Write the changed message over draft, which holds the original
        (not committed: nothing acknowledged is at stake), when its body
        (the draft's, or a filter's new one) is at most IN_PLACE octets: one
        file, not a second draft and a copy.  False when it is larger; OSError."""
        fd, pos, end = self.body
        if end - pos > IN_PLACE:
            return False
        body = os.pread(fd, end - pos, pos)
        if len(body) != end - pos:
            raise OSError(errno.EIO, "the message ended early while it was read")
        env = spool.envelope(self.sender.encode("latin-1"),
                             [r.encode("latin-1") for r in self.recipients],
                             self.envelope_dsn(), self.utf8)
        draft.overwrite([env] + self.head(received) + [body], len(env))
        return True

    def write(self, name, received):
        """A new draft of the changed message, to be committed as name."""
        d = spool.Draft(self.spooldir, self.sender.encode("latin-1"),
                        [r.encode("latin-1") for r in self.recipients], name=name,
                        token=spool.new_name(), anonymous=True, dsn=self.envelope_dsn(),
                        utf8=self.utf8)
        try:
            for data in self.head(received):
                d.write(data)
            d.flush()
            copy(self.body, d.fd)
        except BaseException:
            d.abort()
            raise
        return d

    def close(self):
        if self.replaced is not None:
            self.replaced.f.close()
            self.replaced = None


def field(name, value, leading_space):
    """[name, [lines]] of a header a filter adds; Invalid if it would not be one."""
    if not NAME.fullmatch(name):
        raise Invalid("header name %r" % name[:40])
    value = value.replace(b"\r\n", b"\n")
    if len(value) > HEADER_MAX:
        raise Invalid("header %s of %d octets" % (name.decode(), len(value)))
    if b"\r" in value or b"\0" in value or UNFOLDED.search(value):
        raise Invalid("header %s: a NUL, a bare CR or a line break that is not a fold"
                      % name.decode())
    return [name, ((b"" if leading_space else b" ") + value).split(b"\n")]


def copy(body, out_fd):
    """Append [offset, end) of the body's descriptor to out_fd."""
    fd, pos, end = body
    while pos < end:
        try:
            n = os.copy_file_range(fd, out_fd, end - pos, pos)
        except OSError:
            n = 0
        if n <= 0:
            data = os.pread(fd, min(READ, end - pos), pos)
            if not data:
                raise OSError("the message ended early while it was copied")
            n = os.write(out_fd, data)
        pos += n
