"""ruleset - the smtpd_check_rules engine: parse the file, judge a recipient

DESCRIPTION
    parse(text) compiles a rules file (spec 4) into Rules, or RuleError with
    every problem as "file:line: message"; read_text() reads the file the
    careful way (the jail owns it); RulesFile re-reads it when it changes.
    evaluate(rules, client, sender, rcpt) gives the Verdict of the first
    rule that matches: allow, verify, noto or deny with its reply, or
    tempfail when a lookup could not be answered -- never a silent allow.
    smtpd runs it at each RCPT; checkrules(8) (tester.py) runs the same.
"""

import os
import re
import stat

import buildconf
from smtpgate import idn
from smtpgate import process
from smtpgate.rules import dnslookup
from smtpgate.rules.dnslookup import TempFail
from smtpgate.rules.tokens import Addr, Bad, compile_address, compile_source, TokenList

ACTIONS = ("allow", "deny", "noto", "deny_delay", "noto_delay", "debug", "verify")
DEFAULT_TEMPLATE = "550 Mail from %F to %T prohibited from your location (%U@%H ip=%I)"
REPLY_MAX = 510            # octets of a reply line before its CR LF (RFC 5321: 512)
TEMPFAIL_REPLY = "451 4.4.3 Requested action not taken: lookup failure, try again later"
IPV6_TOKEN = re.compile(r"\[[0-9A-Fa-f:.]*\](/[0-9]*)?")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RuleError(Exception):
    """An invalid rules file; .problems holds every 'file:line: message',
    .warnings the warnings about the lines that were valid."""

    def __init__(self, problems, warnings=()):
        super().__init__("\n".join(problems))
        self.problems = problems
        self.warnings = list(warnings)


# --------------------------------------------------------------- rules ----

class Rule:
    def __init__(self, filename, lineno, text, action, sources, froms, tos, template):
        self.where = "%s:%d" % (filename, lineno)
        self.text = text
        self.action = action
        # bound matchers: evaluate() calls them once per rule per RCPT
        self.src, self.frm, self.to = sources.match, froms.match, tos.match
        self.template = template


def split_fields(line):
    """Split on ':' except inside a [IPv6] token."""
    fields, cur, i = [], "", 0
    while i < len(line):
        m = IPV6_TOKEN.match(line, i) if not cur or cur[-1] in ", \t" else None
        if m:
            cur += m.group()
            i = m.end()
            continue
        if line[i] == ":":
            fields.append(cur)
            cur = ""
        else:
            cur += line[i]
        i += 1
    fields.append(cur)
    return fields


def check_template(t):
    if not re.match(r"^[45][0-9][0-9] ", t):
        raise Bad("reply %r must start with a 4xx or 5xx code and a space" % t)
    if CONTROL.search(t):
        raise Bad("control character in reply %r (it would reach the client)" % t)
    i = 0
    while i < len(t):
        if t[i] == "%":
            if i + 1 >= len(t) or t[i + 1] not in "FTHIUC%":
                raise Bad("unknown escape %r in reply (use %%F %%T %%H %%I %%U %%C %%%%)"
                          % t[i:i + 2])
            i += 1
        i += 1
    return t


def parse_line(filename, lineno, line, warnings):
    """One rule line -> Rule; raises Bad."""
    fields = split_fields(line)
    hint = " (an IPv6 token is [address] or [address]/bits)" if "[" in line else ""
    if len(fields) < 4:
        raise Bad("bad field count: %d fields, need action:sources:froms:tos%s"
                  % (len(fields), hint))
    for i, f in enumerate(fields[:5]):
        if not f.strip() and not (i == 4 and len(fields) == 5):
            raise Bad("empty field %d%s" % (i + 1, hint))
    action = fields[0]
    if action not in ACTIONS:
        raise Bad("unknown action %r (allow verify deny noto deny_delay noto_delay debug)"
                  % action)
    template = None
    if len(fields) > 4:
        msg = fields[4].lstrip()
        if msg.startswith("#"):
            fields = fields[:5]
        elif msg:
            template = check_template(msg)
            if len(fields) > 5 and not fields[5].lstrip().startswith("#"):
                raise Bad("junk after the message field: %r (a message cannot "
                          "contain ':', write %%C)" % ":".join(fields[5:]))
    return Rule(filename, lineno, line, action,
                TokenList(fields[1], compile_source, warnings),
                TokenList(fields[2], compile_address, warnings),
                TokenList(fields[3], compile_address, warnings), template)


def parse(data, filename="rules"):
    """Parse rules text (bytes or str) -> (rules, warnings); RuleError."""
    if isinstance(data, bytes):
        data = data.decode("latin-1")
    rules, problems, warnings = [], [], []
    for lineno, line in enumerate(data.split("\n"), 1):
        line = line[:-1] if line.endswith("\r") else line
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = "%s:%d: " % (filename, lineno)
        if "\0" in line:
            problems.append(where + "NUL byte in line")
            continue
        w = []
        try:
            rules.append(parse_line(filename, lineno, line, w))
        except Bad as e:
            problems.append(where + str(e))
        except Exception as e:      # never a crash: e.g. MemoryError, RecursionError
            problems.append(where + "cannot compile this line: %s: %s"
                            % (type(e).__name__, e))
        warnings.extend(where + "warning: " + x for x in w)
    if problems:
        raise RuleError(problems, warnings)
    return rules, warnings


def read_text(path, limit=None, shown=None):
    """The bytes of the rules file at path; RuleError if it cannot be read.

    Read the careful way, because the jail belongs to the smtpd user: the
    open never blocks (a FIFO), only a regular file is read (not a device
    or a socket), and at most RULES_MAX_SIZE bytes are accepted.  shown:
    the name for messages (default: path)."""
    limit = buildconf.RULES_MAX_SIZE if limit is None else limit
    name = shown or path
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):     # not even opened
            raise RuleError(["%s: not a regular file; not read" % name])
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise RuleError(["%s: cannot read: %s" % (name, e.strerror)]) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):      # swapped since
            raise RuleError(["%s: not a regular file; not read" % name])
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        raise RuleError(["%s: larger than %d bytes (RULES_MAX_SIZE); not read"
                         % (name, limit)])
    except OSError as e:
        raise RuleError(["%s: cannot read: %s" % (name, e.strerror)]) from None
    finally:
        os.close(fd)


def load(path):
    """Read and parse the file at path -> (rules, warnings); RuleError."""
    return parse(read_text(path), path)


class RulesFile:
    """The rules at path, re-read when the file changes (stat per call)."""

    def __init__(self, path):
        self.path = path
        self.stamp = None
        self.rules = None
        self.error = None

    def get(self):
        """The current rules; RuleError if the file is now invalid."""
        stamp = process.stamp(self.path)
        if stamp != self.stamp or isinstance(stamp, int):     # an errno: try again
            self.stamp = stamp
            try:
                self.rules, _ = load(self.path)
                self.error = None
            except RuleError as e:
                self.rules, self.error = None, e
        if self.error is not None:
            raise self.error
        return self.rules


# ------------------------------------------------------------ evaluation ----

class Client(Addr):
    """What the rules know about the SMTP client of one session (smtpd
    makes it of its gate.peer.Peer)."""

    score = 0               # the DNS lists' score (DNSBL=), once the greeting is out

    def __init__(self, ip=None, name=None, lookup_=None, ident=None,
                 ident_fn=None, name_error=None):
        super().__init__(ip, lookup_ or dnslookup.Lookup(None))
        self.name = name
        self.name_error = name_error     # a TempFail while finding the name
        # What host patterns see, in lower case; None (so known_name()
        # raises) on an error.
        self.host = None if name_error else (name or "UNKNOWN").lower()
        self.ident = ident.lower() if ident else None
        self.ident_fn = None if ident else ident_fn

    def known_name(self):
        if self.name_error is not None:
            raise TempFail(self.name_error)
        return self.name


    def get_ident(self):
        """The ident user; asks RFC 1413 once per session if needed."""
        if self.ident_fn is not None:
            fn, self.ident_fn = self.ident_fn, None
            user = fn()
            self.ident = user.lower() if user else None
        return self.ident


class Verdict:
    def __init__(self, action, reply=None, rule=None, delay=0, debug=(), detail=None):
        self.action = action         # allow, verify, noto, deny or tempfail
        self.reply = reply
        self.rule = rule
        self.delay = delay
        self.debug = list(debug)     # debug rules matched on the way
        self.detail = detail         # for the log only: why a lookup failed


def strip_brackets(addr):
    if addr.startswith("<") and addr.endswith(">") and len(addr) >= 2:
        return addr[1:-1].lstrip()
    return addr


def format_reply(template, client, sender, rcpt):
    """Expand %F %T %H %I %U %C %% (spec 4.7); at most REPLY_MAX bytes."""
    values = {"F": sender, "T": rcpt, "H": client.name or "UNKNOWN",
              "I": str(client.ip) if client.ip is not None else "",
              "U": client.ident or "UNKNOWN", "C": ":", "%": "%"}
    out, i = [], 0
    while i < len(template):
        ch = template[i]
        if ch == "%" and i + 1 < len(template):
            out.append(values[template[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)[:REPLY_MAX]


def evaluate(rules, client, sender, rcpt):
    """First matching rule decides (spec 4.6); TempFail -> tempfail."""
    f, t = strip_brackets(sender), strip_brackets(rcpt)
    if not (f.isascii() and t.isascii()):       # SMTPUTF8: domains as A-labels
        f, t = idn.canonical(f), idn.canonical(t)
    f, t = f.lower(), t.lower()
    debug = []
    try:
        for rule in rules:
            if not (rule.src(client) and rule.frm(f, client) and rule.to(t, client)):
                continue
            if rule.action == "debug":
                debug.append(rule)
                continue
            kind = rule.action.split("_")[0]
            delay = 0
            if rule.action == "noto_delay":
                delay = buildconf.NOTO_DELAY
            elif rule.action == "deny_delay":
                delay = buildconf.DENY_DELAY
            reply = None
            if kind not in ("allow", "verify"):
                reply = format_reply(rule.template or DEFAULT_TEMPLATE,
                                     client, sender, rcpt)
            return Verdict(kind, reply, rule, delay, debug)
    except TempFail as e:       # the reply is fixed: the detail is for the log
        return Verdict("tempfail", TEMPFAIL_REPLY, None, 0, debug, detail=str(e))
    if buildconf.CHECK_ADDRESS_DENY_ON_FAILURE:
        return Verdict("deny", format_reply(DEFAULT_TEMPLATE, client, sender, rcpt),
                       None, 0, debug)
    return Verdict("allow", None, None, 0, debug)
