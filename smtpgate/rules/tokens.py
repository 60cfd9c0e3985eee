"""ruletokens - the tokens of smtpd_check_rules: patterns, lists, EXCEPT

DESCRIPTION
    Compiles the three lists of a rule (spec 4.3-4.5, 4.8) into matchers:
    compile_source() for the client (host patterns, user@host ident,
    KNOWN/UNKNOWN, NS=, addresses, networks, RBL., DNSBL=), compile_address() for
    MAIL FROM and RCPT TO (globs, /regex/, USER@, NS=), and TokenList for
    a list with EXCEPT.  Every problem is Bad("message"); checkrules.py
    turns it into "file:line: message".  Globs match in linear time and
    EXCEPT chains are flat, so no rules text can make matching explode.
"""

import ipaddress
import re

from smtpgate import idn
from smtpgate.net import normalize_ip
from smtpgate.rules import dnslookup

SPECIALS = ("ALL", "KNOWN", "UNKNOWN", "EXCEPT")
TOKEN_SPLIT = re.compile(r"[, \t]+")
IPV4_CHARS = re.compile(r"^[0-9.]*$")
IP_GLOB_CHARS = re.compile(r"^[0-9A-Fa-f:.*]*$")


class Bad(Exception):
    """One problem with one line (raised while compiling it)."""


# ----------------------------------------------------------- primitives ----

def compile_string(pat, warnings):
    """ALL, /regex/ or glob -> f(text or None) -> bool.

    The text is in lower case already (evaluate() and Client see to it), so
    matching is case-insensitive without lowering it again per token."""
    if pat == "ALL":
        return lambda s, c=None: True
    if len(pat) >= 2 and pat[0] == "/" and pat[-1] == "/":
        try:
            rx = re.compile(pat[1:-1], re.IGNORECASE)
        except Exception as e:      # re.error, OverflowError, RecursionError, ...
            raise Bad("bad regex %s: %s" % (pat, e or type(e).__name__)) from None
        return lambda s, c=None: s is not None and rx.search(s) is not None
    if pat in ("all", "known", "unknown") or (pat.upper() in SPECIALS and pat != pat.upper()):
        warnings.append("lower-case %r is a literal pattern, not %s" % (pat, pat.upper()))
    if len(pat) > 1 and pat[0] == "*" and pat[1].isalnum() and "." in pat:
        warnings.append("%r has no dot boundary: it also matches x%s" % (pat, pat[1:]))
    if "*" not in pat:
        low = pat.lower()
        return lambda s, c=None: s is not None and s == low
    parts = pat.lower().split("*")
    if len(parts) == 2:                     # the common *.domain, user@*, ...
        head, tail = parts
        n = len(head) + len(tail)
        return lambda s, c=None: (s is not None and len(s) >= n
                                  and s.startswith(head) and s.endswith(tail))
    return lambda s, c=None: s is not None and glob_match(parts, s)


def glob_match(parts, s):
    """Does s match the glob whose pieces between '*'s are parts?

    Greedy, left to right: linear in len(s), whatever the pattern (a regex
    of many '.*' could take exponential time on a hostile address)."""
    first, last = parts[0], parts[-1]
    if not s.startswith(first) or len(s) < len(first) + len(last):
        return False
    pos, end = len(first), len(s) - len(last)
    for piece in parts[1:-1]:
        pos = s.find(piece, pos, end)
        if pos < 0:
            return False
        pos += len(piece)
    return s.endswith(last)


def compile_ip(tok, warnings):
    """An IP token (spec 4.3) -> f(Addr or Client) -> bool."""
    if tok == "ALL":
        return lambda a: a.ip is not None
    if tok.startswith("RBL."):
        zone = tok[3:]
        if len(zone) < 2:
            raise Bad("RBL token %r has no zone" % tok)
        return lambda a: a.ip is not None and a.lookup.rbl_listed(a.ip, zone)
    if tok.startswith("["):
        addr, _, bits = tok[1:].partition("]")
        if bits and not bits.startswith("/"):
            raise Bad("bad IPv6 token %r" % tok)
        try:
            net = ipaddress.IPv6Network(addr + bits, strict=False)
        except ValueError as e:
            raise Bad("bad IPv6 address or prefix %r: %s" % (tok, e)) from None
        return net_matcher(net)
    addr, slash, bits = tok.partition("/")
    if IPV4_CHARS.match(addr):
        try:
            if addr == "0":
                addr = "0.0.0.0"
            if addr.count(".") != 3 or (slash and not bits.isdigit()):
                raise ValueError("not a dotted quad with /bits")
            net = ipaddress.IPv4Network(addr + slash + bits, strict=False)
        except ValueError:
            raise Bad("bad IPv4 address or prefix %r (write a full dotted quad, "
                      "e.g. 10.0.0.0/8)" % tok) from None
        return net_matcher(net)
    glob = compile_string(tok, [])
    return lambda a: a.ip is not None and glob(a.ip_text)


class Addr:
    """An address as IP tokens see it (the Client is one too)."""

    def __init__(self, ip, lookup_):
        self.ip = normalize_ip(ip)
        self.ip_int = int(self.ip) if self.ip is not None else None
        self.ip_text = str(self.ip) if self.ip is not None else None
        self.lookup = lookup_


def net_matcher(net):
    """f(addr): addr.ip is inside net (integer compare: this is hot)."""
    version, base, mask = net.version, int(net.network_address), int(net.netmask)
    return lambda a: a.ip is not None and a.ip.version == version and \
        a.ip_int & mask == base


def ns_pattern(pat, warnings):
    """NS=pat -> f(name, lookup) -> bool (spec 4.8)."""
    if pat == "UNKNOWN":
        def unknown(name, lk):
            names, _, cropped = lk.nameservers(name)
            return not lk.addresses(name + ".") and (not names or cropped)
        return unknown
    if pat == "KNOWN":
        def known(name, lk):
            if lk.addresses(name + "."):
                return True
            names, _, cropped = lk.nameservers(name)
            return bool(names) and not cropped
        return known
    sfn = compile_string(pat, warnings)
    try:
        ipfn = compile_ip(pat, [])
    except Bad:
        ipfn = None

    def other(name, lk):
        names, addrs, _ = lk.nameservers(name)
        return (any(sfn(n) for n in names)
                or (ipfn is not None and any(ipfn(Addr(a, lk)) for a in addrs)))
    return other


def on_name(fn):
    """Adapt f(name, lk) to the empty domain: never matches."""
    return lambda name, lk: bool(name) and fn(name, lk)


# -------------------------------------------------------------- tokens ----

SCORE_RANGE = re.compile(r"^(-?\d{1,7})?(\.\.)?(-?\d{1,7})?$")


def score_range(tok):
    """DNSBL=LOW..HIGH (either side may be left out), DNSBL=N -> (low, high)."""
    m = SCORE_RANGE.match(tok[6:])
    low, dots, high = m.groups() if m else (None, None, None)
    if not m or (low is None and high is None) or (dots is None and high is not None):
        raise Bad("bad DNSBL token %r: DNSBL=N, DNSBL=LOW..HIGH, DNSBL=LOW.. or "
                  "DNSBL=..HIGH" % tok)
    low = int(low) if low is not None else -float("inf")
    high = (int(high) if high is not None else float("inf")) if dots else low
    if low > high:
        raise Bad("DNSBL token %r: %s is above %s" % (tok, low, high))
    return low, high


def compile_host(tok, warnings):
    """A host pattern of a source list -> f(client) -> bool."""
    if tok in ("TRUSTED", "UNTRUSTED"):
        raise Bad("%s is not supported (Juniper firewalls only)" % tok)
    if tok.startswith("DNSBL="):
        low, high = score_range(tok)
        return lambda c: low <= c.score <= high
    if tok == "ALL":
        return lambda c: True
    if tok == "KNOWN":
        return lambda c: c.known_name() is not None
    if tok == "UNKNOWN":
        return lambda c: c.known_name() is None
    if tok.startswith("NS="):
        fn = on_name(ns_pattern(tok[3:], warnings))

        def ns(c):
            name = c.known_name()
            if name is None and c.ip is not None:
                name = dnslookup.reverse_name(c.ip)
            return fn(name, c.lookup)
        return ns
    sfn = compile_string(tok, warnings)
    if tok[:1] == "/" and tok[-1:] == "/":
        return lambda c: sfn(c.known_name())
    ipfn = compile_ip(tok, warnings)
    if tok.startswith(("[", "RBL.")) or (IPV4_CHARS.match(tok.split("/")[0])):
        return ipfn                       # an address: no name is like it
    if not IP_GLOB_CHARS.match(tok):
        return lambda c: sfn(c.host or c.known_name())  # no address is like it
    return lambda c: ipfn(c) or sfn(c.host or c.known_name())


def compile_source(tok, warnings):
    """A source token: host pattern or user@host (ident)."""
    whole_regex = len(tok) >= 2 and tok[0] == "/" and tok[-1] == "/"
    if "@" not in tok or whole_regex:
        return compile_host(tok, warnings)
    user, _, host = tok.rpartition("@")
    hostfn = compile_host(host, warnings)
    if user == "KNOWN":
        return lambda c: c.get_ident() is not None and hostfn(c)
    ufn = compile_string(user, warnings)
    if user == "ALL":
        return lambda c: (c.get_ident(), True)[1] and hostfn(c)
    return lambda c: ufn(c.get_ident()) and hostfn(c)


def compile_address(tok, warnings):
    """A from/to token -> f(address without brackets, client) -> bool.
    An internationalized domain is matched in its A-label form, as the
    address is (idn.canonical): exämple.org and xn--exmple-cua.org are one."""
    if len(tok) >= 2 and tok[0] == "/" and tok[-1] == "/":
        return compile_string(tok, warnings)
    if not tok.isascii():
        label = idn.unconvertible(tok)
        if label is not None:
            warnings.append("%r: the label %r stays UTF-8 (a wildcard, or not IDNA 2008): "
                            "it matches only that spelling" % (tok, label))
        tok = idn.canonical(tok)
    if "@" not in tok:
        if tok.startswith("NS="):
            ns = on_name(ns_pattern(tok[3:], warnings))
            return lambda a, c: ns(a.rpartition("@")[2], c.lookup)
        return compile_string(tok, warnings)
    left, _, right = tok.rpartition("@")
    if right.startswith("NS="):
        ns = on_name(ns_pattern(right[3:], warnings))
        rfn = lambda r, c: ns(r, c.lookup)      # noqa: E731
    else:
        sfn = compile_string(right, warnings)
        rfn = lambda r, c: sfn(r)               # noqa: E731
    if left == "USER":
        def user(a, c):
            local, at, domain = a.rpartition("@")
            ident = c.ident
            return (bool(at) and ident is not None and "*" not in ident
                    and local == ident and rfn(domain, c))
        return user
    lfn = compile_string(left, warnings)

    def both(a, c):
        local, at, domain = a.rpartition("@")
        return bool(at) and lfn(local) and rfn(domain, c)
    return both


class TokenList:
    """A list with EXCEPT (spec 4.5): "A EXCEPT B EXCEPT C" matches what A
    matches unless (B matches unless C matches).  The groups are kept in a
    flat list and matched in a loop, so a long chain cannot recurse."""

    def __init__(self, text, compile_token, warnings):
        tokens = [t for t in TOKEN_SPLIT.split(text.strip()) if t]
        groups, group = [], []
        for t in tokens:
            if t.upper() != "EXCEPT":
                group.append(t)
                continue
            if t != "EXCEPT" and "write EXCEPT in upper case" not in warnings:
                warnings.append("write EXCEPT in upper case")
            if not group:
                raise Bad(("list %r starts with EXCEPT: it can never match" if not groups
                           else "EXCEPT EXCEPT in %r") % text)
            groups.append(group)
            group = []
        if not group:
            raise Bad("EXCEPT with nothing after it in %r" % text)
        groups.append(group)
        self.groups = [[compile_token(t, warnings) for t in g] for g in groups]
        if len(self.groups) == 1 and len(self.groups[0]) == 1:
            self.match = self.groups[0][0]      # the common case, made cheap

    def match(self, *args):
        negated = False
        for group in self.groups:
            if not any(t(*args) for t in group):
                return negated
            negated = not negated
        return negated
