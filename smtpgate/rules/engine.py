#!/usr/bin/env python3
"""checkrules - the smtpd_check_rules engine and its tester

SYNOPSIS
    checkrules.py [-v] [-f rules] [-a address] [-n hostname] [-u identuser]
                  [-V backend] FROM TO
    checkrules.py -t [-f rules]
DESCRIPTION
    The rules engine smtpd(8) runs at each RCPT, and a tester that runs the
    same code: it prints "allow", "noto <reply>" or "deny <reply>" (or
    "tempfail <reply>" when a lookup failed) and, with -v, the deciding
    "file:line: rule" or "default".  An address smtpd itself refuses (a
    leading '-', an unquoted ',', ...) is reported first, as smtpd answers
    it: "refused <reply>".  A "verify" rule prints "verify"; with -V
    [lmtp:]address:port the tester asks that backend as smtpd would and
    prints the outcome (with -v, the backend's words).  -t validates the
    file and prints every error and warning as "file:line: message".
    -a is the client address (none: IP tokens never match); -n its confirmed
    host name, UNKNOWN for none (without -n the name comes from DNS as smtpd
    gets it); -u its ident user.  FROM and TO as the client typed them.
EXIT STATUS
    0 allow, 1 noto, 2 deny, 3 refused by smtpd's address checks,
    4 verify (not asked), 75 temporary failure, 64 usage, 78 bad file.
FILES
    SPOOLDIR/CHECK_FILE, normally /var/spool/smtpd/etc/smtpd_check_rules.
"""

import getopt
import os
import re
import stat
import sys

import buildconf
from smtpgate import privileges, process
from smtpgate.net import normalize_ip
from smtpgate.text import visible
from smtpgate.rules import lookup
from smtpgate.gate import verify
from smtpgate.address import AddressError, mail_params, parse_path
from smtpgate.rules.lookup import TempFail
from smtpgate.rules.tokens import Addr, Bad, compile_address, compile_source, TokenList

ACTIONS = ("allow", "deny", "noto", "deny_delay", "noto_delay", "debug", "verify")
DEFAULT_TEMPLATE = "550 Mail from %F to %T prohibited from your location (%U@%H ip=%I)"
REPLY_MAX = 510            # octets of a reply line before its CR LF (RFC 5321: 512)
TEMPFAIL_REPLY = "451 4.4.3 Requested action not taken: lookup failure, try again later"
IPV6_TOKEN = re.compile(r"\[[0-9A-Fa-f:.]*\](/[0-9]*)?")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
ESCAPES = {"F": "sender", "T": "rcpt", "H": "name", "I": "ip", "U": "ident"}


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
    """What the rules know about the SMTP client of one session."""

    exempt = False          # in SMTPD_ADMISSION_EXEMPT (smtpd sets it)
    health_check = False    # the trusted proxy's own connection (PROXY LOCAL)

    def __init__(self, ip=None, name=None, lookup_=None, ident=None,
                 ident_fn=None, name_error=None):
        super().__init__(ip, lookup_ or lookup.Lookup(None))
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
    f, t = strip_brackets(sender).lower(), strip_brackets(rcpt).lower()
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


# ------------------------------------------------------------------- CLI ----

USAGE = """usage: checkrules.py [-v] [-f rules] [-a address] [-n hostname] [-u identuser]
                     [-V backend] FROM TO
       checkrules.py -t [-f rules]"""
EXIT = {"allow": 0, "noto": 1, "deny": 2, "refused": 3, "verify": 4, "tempfail": 75}


def default_rules_path():
    return os.path.join(buildconf.SPOOLDIR, buildconf.CHECK_FILE.lstrip("/"))


def usage(msg=None):
    if msg:
        print("checkrules.py: " + msg, file=sys.stderr)
    print(USAGE, file=sys.stderr)
    return 64


def cli_client(address, name, ident, resolver):
    lk = lookup.Lookup(resolver)
    try:
        ip = normalize_ip(address)
    except ValueError:
        raise SystemExit(usage("bad address %r" % address))
    name_error = None
    if name == "UNKNOWN":
        name = None
    elif name is None and ip is not None:
        try:
            name, why = lk.confirmed_name(ip)
        except TempFail as e:
            name_error = str(e)
    return Client(ip, name, lk, ident=ident, name_error=name_error)


def callout(backend, v, rcpt):
    """Ask the backend as smtpd would for a verify rule: (verdict, what the
    backend said)."""
    try:
        where = verify.parse_backend(backend)
    except ValueError:
        raise SystemExit(usage("-V needs [lmtp:]address:port, not %r" % backend))
    checker = verify.Verifier(where, privileges.own_name(), None, None)
    refusal = checker.check(rcpt, "checkrules")
    checker.close()
    if refusal is None:
        return Verdict("allow", None, v.rule, 0, v.debug), checker.said
    return Verdict("noto" if refusal.startswith("5") else "tempfail", refusal, v.rule,
                   0, v.debug), checker.said


def line_number(message):
    """The N of 'file:N: message', for sorting."""
    try:
        return int(message.split(": ", 1)[0].rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return 0


def smtpd_refusal(sender, rcpt):
    """What smtpd answers before any rule: None, or (reply, command) for an
    address its MAIL or RCPT refuses; else the stored (sender, rcpt)."""
    try:
        stored, params = parse_path(sender, null_ok=True)
        mail_params(params)
        sender = stored
    except AddressError as e:
        return ("%d %s" % (e.code, e.text), "MAIL FROM"), None
    try:
        stored, params = parse_path(rcpt, null_ok=False)
        if params:
            raise AddressError(555, "MAIL FROM/RCPT TO parameters not recognized "
                                    "or not implemented")
    except AddressError as e:
        return ("%d %s" % (e.code, e.text), "RCPT TO"), None
    return None, (sender, stored)


def say(text):
    """Print what the rules file or the DNS said: their control characters
    made visible (the file may be the jail's), never sent to the terminal."""
    print(visible(text))


def become_jail_owner(path):
    """Run as root on a rules file inside SPOOLDIR (the jail, which the
    smtpd user owns and can fill with links): become that user first, as
    smtpd's own rules watcher reads it.  Elsewhere, nothing changes."""
    jail = os.path.realpath(buildconf.SPOOLDIR)
    where = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    if (where + "/").startswith(jail.rstrip("/") + "/"):
        try:
            privileges.become_owner(jail)
        except FileNotFoundError:
            pass


def main(argv):
    try:
        opts, args = getopt.getopt(argv, "tvf:a:n:u:V:")
    except getopt.GetoptError as e:
        return usage(str(e))
    o = dict(opts)
    path = o.get("-f", default_rules_path())
    resolver = lookup.make_resolver()       # everything loaded before a change of user
    become_jail_owner(path)
    try:
        rules, warnings = load(path)
    except RuleError as e:      # every error and every warning, in line order
        for line in sorted(e.problems + e.warnings, key=line_number):
            say(line)
        return 78
    if "-t" in o:
        if args:
            return usage("-t takes no FROM TO")
        for line in warnings:
            say(line)
        say("%s: %d rule%s, no errors%s" % (path, len(rules), "" if len(rules) == 1 else "s",
                                          ", %d warning%s" % (len(warnings), "" if len(warnings)
                                                              == 1 else "s") if warnings else ""))
        return 0
    if len(args) != 2:
        return usage()
    refusal, stored = smtpd_refusal(args[0], args[1])
    if refusal:
        say("refused %s" % refusal[0])
        if "-v" in o:
            say("smtpd refuses this %s address before any rule" % refusal[1])
        return EXIT["refused"]
    client = cli_client(o.get("-a"), o.get("-n"), o.get("-u"), resolver)
    v = evaluate(rules, client, *stored)
    said = None
    if v.action == "verify" and "-V" in o:
        v, said = callout(o["-V"], v, stored[1])
    written = v.rule.action if v.rule is not None and v.rule.action != "verify" else v.action
    say(written if v.reply is None else "%s %s" % (written, v.reply))
    if "-v" in o and said:
        say("backend: %s" % said)
    if "-v" in o and v.detail:
        say("lookup failure: %s" % v.detail)
    if "-v" in o:
        say("%s: %s" % (v.rule.where, v.rule.text) if v.rule else "default")
        for r in v.debug:
            say("debug %s: %s" % (r.where, r.text))
    return EXIT[v.action]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
