"""tester - checkrules(8): what smtpd would answer to one recipient

DESCRIPTION
    run(flags, args) loads the rules file as smtpd does, makes the client
    (-a address, -n name or the DNS, -u ident user) and prints the verdict
    of judge.Judge -- the same code smtpd runs at each RCPT -- as
    "allow", "noto <reply>", "deny <reply>" (the action as the rule writes
    it, e.g. noto_delay), "tempfail <reply>" or "verify" (with -V, the
    backend is asked as smtpd would); with -v the deciding "file:line: rule"
    or "default".  An address smtpd refuses before any rule gives
    "refused <reply>".  -t validates the file: every error and warning as
    "file:line: message", then "file: N rules, no errors".
    Everything printed has its control characters made visible; run as
    root on the jail's rules, it first becomes the jail's owner.
EXIT STATUS
    0 allow, 1 noto, 2 deny, 3 refused by smtpd's address checks,
    4 verify (not asked), 75 temporary failure, 78 bad file.
    With -a and SMTPD_DNSBL_SITES, the DNS lists are asked as smtpd asks
    them: "dnsbl score N: ..." follows the verdict, which DNSBL= tokens see;
    a score at SMTPD_DNSBL_THRESHOLD is "refused 554 ...", as smtpd refuses
    such a client before its greeting.  A list that answered an error code
    or not at all is named there with why; -v adds each list's answer.
"""

import os

import buildconf
from smtpgate import net, privileges
from smtpgate.address import AddressError, mail_params, parse_path
from smtpgate.gate import chat, dnsbl, verify
from smtpgate.gate.engine import FrozenRules
from smtpgate.gate.judge import Judge
from smtpgate.net import normalize_ip
from smtpgate.options import UsageError
from smtpgate.rules import dnslookup
from smtpgate.rules.ruleset import Client, load, RuleError
from smtpgate.text import visible

EXIT = {"allow": 0, "noto": 1, "deny": 2, "refused": 3, "verify": 4, "tempfail": 75}


def cli_client(address, name, ident, resolver):
    lk = dnslookup.Lookup(resolver)
    try:
        ip = normalize_ip(address)
    except ValueError:
        raise UsageError("bad address %r" % address) from None
    name_error = None
    if name == "UNKNOWN":
        name = None
    elif name is None and ip is not None:
        try:
            name, why = lk.confirmed_name(ip)
        except dnslookup.TempFail as e:
            name_error = str(e)
    return Client(ip, name, lk, ident=ident, name_error=name_error)


def reputation(client, resolver, verbose=False):
    """With -a and SMTPD_DNSBL_SITES: ask the lists as smtpd would, set the
    client's score, and say it (["dnsbl score N: ...", with -v then each
    list's answer or error]); else None."""
    if client.ip is None or not buildconf.SMTPD_DNSBL_SITES.strip():
        return None
    try:
        sites = dnsbl.parse_sites(buildconf.SMTPD_DNSBL_SITES)
    except ValueError as e:
        raise UsageError(str(e)) from None
    rep = dnsbl.Reputation(sites)
    s = rep.start(client.ip, resolver, None)
    client.score = rep.finish(s)
    lines = ["dnsbl score %d: %s%s" % (client.score, s.detail(trouble=True),
                                       " (allow-listed)" if rep.allowlisted(client.score)
                                       else "")]
    if verbose:
        lines += ["dnsbl %s: %s" % (site.text, s.said(site)) for site in sites]
    return lines


def verifier(backend):
    """-V: the callouts of a verify rule, asked as smtpd asks them (judge.py),
    or None without -V (the verdict stays "verify")."""
    if backend is None:
        return None
    try:
        where = net.parse_backend(backend)
    except ValueError:
        raise UsageError("-V needs [lmtp:]address:port, not %r" % backend) from None
    return lambda: verify.Verifier(where, privileges.own_name(), None, None)


def line_number(message):
    """The N of 'file:N: message', for sorting."""
    try:
        return int(message.split(": ", 1)[0].rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return 0


def smtpd_refusal(sender, rcpt):
    """What smtpd answers before any rule: None, or (reply, command) for an
    address its MAIL or RCPT refuses; else the stored (sender, rcpt).  A
    UTF-8 address is taken as a client that said SMTPUTF8 sends it (as its
    octets), when smtpd offers SMTPUTF8."""
    sender, rcpt = octets_text(sender), octets_text(rcpt)
    utf8 = bool(buildconf.SMTPD_SMTPUTF8) and not (sender.isascii() and rcpt.isascii())
    try:
        stored, params = parse_path(sender, null_ok=True, utf8=utf8)
        mail_params(params)
        sender = stored
    except AddressError as e:
        return ("%d %s" % (e.code, e.text), "MAIL FROM"), None
    try:
        stored, params = parse_path(rcpt, null_ok=False, utf8=utf8)
        if params:
            raise AddressError(555, "MAIL FROM/RCPT TO parameters not recognized "
                                    "or not implemented")
    except AddressError as e:
        return ("%d %s" % (e.code, e.text), "RCPT TO"), None
    return None, (sender, stored)


def octets_text(arg):
    """A command-line argument as the gate holds text: one character an
    octet (of its UTF-8)."""
    return arg if arg.isascii() else arg.encode("utf-8", "surrogateescape").decode("latin-1")


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


def default_rules_path():
    return os.path.join(buildconf.SPOOLDIR, buildconf.CHECK_FILE.lstrip("/"))


def run(flags, args):
    """checkrules after its options: the exit status; UsageError."""
    path = flags.get("rules", default_rules_path())
    resolver = dnslookup.make_resolver()    # everything loaded before a change of user
    become_jail_owner(path)
    try:
        rules, warnings = load(path)
    except RuleError as e:      # every error and every warning, in line order
        for line in sorted(e.problems + e.warnings, key=line_number):
            say(line)
        return os.EX_CONFIG
    if flags.get("validate"):
        if args:
            raise UsageError("-t takes no FROM TO")
        return validated(path, rules, warnings)
    if len(args) != 2:
        raise UsageError("FROM and TO, please")
    return judged(flags, rules, resolver, *args)


def validated(path, rules, warnings):
    for line in warnings:
        say(line)
    say("%s: %d rule%s, no errors%s" % (path, len(rules), "" if len(rules) == 1 else "s",
                                      ", %d warning%s" % (len(warnings), "" if len(warnings)
                                                          == 1 else "s") if warnings else ""))
    return os.EX_OK


def judged(flags, rules, resolver, sender, rcpt):
    verbose = flags.get("verbose")
    refusal, stored = smtpd_refusal(sender, rcpt)
    if refusal:
        say("refused %s" % refusal[0])
        if verbose:
            say("smtpd refuses this %s address before any rule" % refusal[1])
        return EXIT["refused"]
    client = cli_client(flags.get("address"), flags.get("name"), flags.get("ident"), resolver)
    scored = reputation(client, resolver, verbose) or []
    if scored and client.score >= buildconf.SMTPD_DNSBL_THRESHOLD:
        say("refused %s" % (chat.REPUTATION % client.ip).last_line())
        for line in scored:
            say(line)
        return EXIT["refused"]
    judge = Judge(FrozenRules(rules), client, verifier(flags.get("backend")), "checkrules")
    v = judge.recipient(*stored)
    said = judge.verifier.said if judge.verifier is not None else None
    judge.close()
    written = v.rule.action if v.rule is not None and v.rule.action != "verify" else v.action
    say(written if v.reply is None else "%s %s" % (written, v.reply))
    for line in scored:
        say(line)
    if verbose:
        if said:
            say("backend: %s" % said)
        if v.detail:
            say("lookup failure: %s" % v.detail)
        say("%s: %s" % (v.rule.where, v.rule.text) if v.rule else "default")
        for r in v.debug:
            say("debug %s: %s" % (r.where, r.text))
    return EXIT[v.action]
