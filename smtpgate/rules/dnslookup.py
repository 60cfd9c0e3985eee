"""dnslookup - every DNS question of smtpd and checkrules (dnspython)

DESCRIPTION
    make_resolver() builds the one resolver object a process uses; build it
    before chroot: it keeps working in the jail without any files there.
    A Lookup wraps it for one SMTP session and caches every answer.

    Lookups answer "found" or "not found" (NXDOMAIN, no data).  Anything
    else -- timeout, SERVFAIL, no nameserver, a DNS list's error code --
    raises TempFail, which the rules engine turns into a 451: never a silent
    allow, never a listing that is not one.

ENVIRONMENT
    SMTPD_NAMESERVER    nameservers to ask instead of those of resolv.conf,
                        comma-separated, each ADDRESS or ADDRESS@PORT
                        (e.g. 127.0.0.1@5353, ::1@53)
    SMTPD_RESOLV_CONF   resolv.conf to read instead of /etc/resolv.conf
"""

import ipaddress
import os
import re

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.reversename

import buildconf
from smtpgate.deadline import NONE, of as deadline_of

HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?$")
NSLIMIT, NSIPLIMIT = 100, 500


class TempFail(Exception):
    """A lookup could not be answered now; str() says which."""


def make_resolver(timeout=None):
    """The process's resolver; all imports and parsing happen now."""
    # dnspython imports an rdata class the first time an answer holds one;
    # inside the jail that import would fail, so load them all now.
    for t in dns.rdatatype.RdataType:
        dns.rdata.get_rdata_class(dns.rdataclass.IN, t)
    conf = os.environ.get("SMTPD_RESOLV_CONF")
    servers = os.environ.get("SMTPD_NAMESERVER")
    r = dns.resolver.Resolver(configure=False)
    if servers:
        r.nameservers = []
        for spec in servers.split(","):
            addr, _, port = spec.strip().partition("@")
            r.nameservers.append(dns.nameserver.Do53Nameserver(
                addr, int(port or 53)))
    else:
        try:
            r.read_resolv_conf(conf or "/etc/resolv.conf")
        except (OSError, dns.resolver.NoResolverConfiguration):
            r.nameservers = []
    r.lifetime = timeout or buildconf.DNS_TIMEOUT
    r.timeout = min(r.lifetime, 3.0)
    r.cache = None
    return r


def servers(resolver):
    """(address, port) of each plain DNS server resolver asks, in its order
    -- from resolv.conf (addresses, the resolver's port) or SMTPD_NAMESERVER
    -- for the DNS lists' own stub (dnsbl.py), which must ask exactly the
    servers the other lookups ask."""
    out = []
    for ns in getattr(resolver, "nameservers", None) or ():
        if isinstance(ns, str):
            out.append((ns, resolver.nameserver_ports.get(ns, resolver.port)))
        elif isinstance(ns, dns.nameserver.Do53Nameserver):
            out.append((ns.address, ns.port))
    return out


def rbl_name(ip, zone):
    """The name a DNS list is asked about ip: reversed octets (IPv4) or
    nibbles (IPv6), then the zone."""
    rev = dns.reversename.from_address(str(ip)).to_text(omit_final_dot=True)
    rev = rev.rsplit(".in-addr.arpa" if ip.version == 4 else ".ip6.arpa", 1)[0]
    return rev + "." + zone.strip(".") + "."


LISTING = ipaddress.ip_network("127.0.0.0/8")
LIST_ERRORS = ipaddress.ip_network("127.255.255.0/24")


def is_listing(address):
    """Is this answer of a DNS list a listing (not one of its error codes)?"""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.version == 4 and ip in LISTING and ip not in LIST_ERRORS


def reverse_name(ip):
    """The in-addr.arpa or ip6.arpa name of ip, without the final dot."""
    return dns.reversename.from_address(str(ip)).to_text(omit_final_dot=True)


class Lookup:
    """One session's DNS questions, each asked at most once, none past the
    session's deadline (a deadline.Deadline)."""

    def __init__(self, resolver, deadline=NONE):
        self.resolver = resolver
        self.deadline = deadline_of(deadline)
        self.memo = {}
        self.ptr = None             # the client's PTR name, once asked

    def time_left(self, limit):
        """limit, or less if the deadline is nearer; TempFail once past it."""
        return self.deadline.within(limit, TempFail)

    def query(self, name, rdtype):
        """Rdata list for name/rdtype; [] when none exists; TempFail else."""
        key = (name.lower(), rdtype)
        if key not in self.memo:
            self.memo[key] = self._query(name, rdtype)
        return self.memo[key]

    def _query(self, name, rdtype):
        if self.resolver is None or not self.resolver.nameservers:
            raise TempFail("no nameserver configured for %s/%s" % (name, rdtype))
        lifetime = self.time_left(self.resolver.lifetime)
        try:
            qname = dns.name.from_text(name)
            ans = self.resolver.resolve(qname, rdtype, search=False,
                                        raise_on_no_answer=False, lifetime=lifetime)
        except (dns.resolver.NXDOMAIN, dns.name.EmptyLabel,
                dns.name.LabelTooLong, dns.name.NameTooLong):
            return []
        except dns.exception.Timeout:
            raise TempFail("DNS %s/%s: timed out" % (name, rdtype)) from None
        except dns.exception.DNSException as e:
            raise TempFail("DNS %s/%s: %s" % (name, rdtype, e)) from None
        out = list(ans.rrset or ())
        if ans.response is not None and rdtype in ("NS", "MX"):
            for rrset in ans.response.authority:
                if rrset.rdtype == dns.rdatatype.from_text(rdtype):
                    out.extend(rrset)
        return out

    def addresses(self, name):
        """A and AAAA addresses of name, as ipaddress objects."""
        return [ipaddress.ip_address(r.address)
                for t in ("A", "AAAA") for r in self.query(name, t)]

    def confirmed_name(self, ip):
        """FCrDNS: (name or None, why-not) for the client address ip."""
        rev = dns.reversename.from_address(str(ip)).to_text()
        names = [r.target.to_text(omit_final_dot=True) for r in self.query(rev, "PTR")]
        if not names:
            return None, "no reverse mapping for %s" % ip
        if HOSTNAME.match(names[0]):
            self.ptr = names[0]         # confirmed or not: milter's {client_ptr}
        for name in names[:10]:
            if not HOSTNAME.match(name):
                return None, "suspicious characters in PTR %r of %s" % (name, ip)
            if ip in self.addresses(name + "."):
                return name, None
        return None, "PTR %s of %s does not resolve back" % (names[0], ip)

    def rbl_listed(self, ip, zone):
        """True if the DNS blacklist zone (with its leading dot) lists ip.
        Only an answer in 127.0.0.0/8 outside 127.255.255.0/24 is a listing;
        any other (Spamhaus's 127.255.255.252-255 for a refused resolver, an
        address outside 127/8) is an error of the list: TempFail, never
        "listed"."""
        name = rbl_name(ip, zone)
        answers = [r.address for r in self.query(name, "A")]
        wrong = [a for a in answers if not is_listing(a)]
        if wrong:
            raise TempFail("DNS %s/A: %s is an error code of the list, not a listing"
                           % (name, wrong[0]))
        return bool(answers)

    def nameservers(self, name):
        """NS and MX targets of name, dropping labels while none are found.

        Returns (names, addresses, cropped): cropped is True when they were
        found only after dropping labels (spec 4.8)."""
        key = ("ns", name.lower())
        if key not in self.memo:
            self.memo[key] = self._nameservers(name)
        return self.memo[key]

    def _nameservers(self, name):
        labels = name.rstrip(".").split(".")
        cropped = False
        while labels:
            n = ".".join(labels) + "."
            found = []
            for r in self.query(n, "NS") + self.query(n, "MX"):
                t = (r.target if hasattr(r, "target") else r.exchange)
                t = t.to_text(omit_final_dot=True).lower()
                if t not in found and HOSTNAME.match(t):
                    found.append(t)
            if found:
                found = found[:NSLIMIT]
                addrs = []
                for t in found:
                    addrs.extend(self.addresses(t + "."))
                return found, addrs[:NSIPLIMIT], cropped
            if len(labels) <= 2 and not name.endswith(".arpa"):
                break   # never query a top-level domain alone
            labels = labels[1:]
            cropped = True
        return [], [], cropped
