"""dnsbl - a client's reputation: DNS lists scored as postscreen scores them

DESCRIPTION
    SMTPD_DNSBL_SITES names the lists, postscreen's postscreen_dnsbl_sites:
    zone[=filter][*weight], space-separated.  filter is an address pattern,
    each octet a number or [a..b;c;...] (127.0.0.[2..11]); weight an integer,
    negative for allow lists (1 if none).  A list counts its weight once when
    one of its answers is a listing that passes its filter; the score is the
    sum.  Without a filter, any answer in 127.0.0.0/8 outside
    127.255.255.0/24 is a listing.  An answer in 127.255.255.0/24 or outside
    127/8 is the list's error code and never counts, filter or not.
    Scoring(...) asks every list at once when the connection is accepted
    (one UDP socket, the resolver's servers, one retransmission), and the
    session collects the answers while the greeting pause runs; a list that
    has not answered within SMTPD_DNSBL_TIMEOUT (or the session's deadline)
    counts 0.  NXDOMAIN and "no data" are "not listed"; SERVFAIL, any other
    error, a truncated or unparsable answer, a list whose zone does not exist
    (NXDOMAIN with the SOA of a zone above it) count 0 and are logged, each
    kind at most once a minute per process and list.
CACHE
    ScoreCache, in memory the -D master maps before it forks: a score per
    client address for SMTPD_DNSBL_TTL seconds (60 at most when a list did
    not answer or answered its error code), SMTPD_DNSBL_CACHE addresses, a
    shm.Table as admission's RateTable.
    inetd sessions score without a cache.
"""

import collections
import re
import select
import socket
import struct
import time

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

import buildconf
from smtpgate import counters, log, shm
from smtpgate.deadline import NONE, of as deadline_of
from smtpgate.gate import admission
from smtpgate.net import normalize_ip
from smtpgate.rules import dnslookup

ZONE = re.compile(r"^(?=.{1,250}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)+"
                  r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
SITE = re.compile(r"^([^=*]+)(?:=([^*]+))?(?:\*(-?\d{1,6}))?$")
FILTER = re.compile(r"^" + r"\.".join([r"(\d{1,3}|\[[\d.;]*\])"] * 4) + "$")
OCTET = re.compile(r"^(\d{1,3})(?:\.\.(\d{1,3}))?$")
ANSWERS_MAX = 64            # addresses of one answer looked at
DATAGRAM_MAX = 65535
UNANSWERED_TTL = 60         # seconds a score some list did not give is kept
LOG_EVERY = 60              # seconds between two log lines of a kind for a list


class Site(collections.namedtuple("Site", "zone filter weight text")):
    """One list: its zone, filter (four sets of (low, high), or None) and weight."""

    def counts(self, address):
        """Does this answer of the list count for its weight?"""
        if not dnslookup.is_listing(address):
            return False                    # an error code never counts
        if self.filter is None:
            return True
        octets = [int(x) for x in address.split(".")]
        return all(any(lo <= o <= hi for lo, hi in ranges)
                   for o, ranges in zip(octets, self.filter))


def parse_filter(text):
    """127.0.0.[2..11] -> four lists of (low, high); ValueError."""
    m = FILTER.match(text)
    if not m:
        raise ValueError("filter %r: not four octets, each n or [a..b;c]" % text)
    parts = m.groups()
    out = []
    for p in parts:
        inner = p[1:-1] if p.startswith("[") and p.endswith("]") else p
        ranges = []
        for item in inner.split(";") if inner != p else [p]:
            m = OCTET.match(item)
            if not m:
                raise ValueError("filter %r: octet %r is not n, [a..b] or [a;b]" % (text, p))
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if not lo <= hi <= 255:
                raise ValueError("filter %r: octet %r is not within 0..255" % (text, p))
            ranges.append((lo, hi))
        out.append(tuple(ranges))
    return tuple(out)


def parse_sites(text):
    """SMTPD_DNSBL_SITES -> a tuple of Sites; ValueError naming the entry."""
    sites = []
    for tok in text.split():
        m = SITE.match(tok)
        if not m:
            raise ValueError("SMTPD_DNSBL_SITES: %r is not zone[=filter][*weight]" % tok)
        zone, filt, weight = m.group(1).rstrip(".").lower(), m.group(2), m.group(3)
        if not ZONE.match(zone):
            raise ValueError("SMTPD_DNSBL_SITES: %r: %r is not a DNS zone" % (tok, zone))
        try:
            f = parse_filter(filt) if filt is not None else None
        except ValueError as e:
            raise ValueError("SMTPD_DNSBL_SITES: %r: %s" % (tok, e)) from None
        sites.append(Site(zone, f, int(weight) if weight is not None else 1, tok))
    return tuple(sites)


_logged = {}


def log_once(zone, kind, fmt, *args):
    """Log a list's trouble of a kind at most once a minute in this process."""
    now = time.monotonic()
    key = (zone, kind)
    if now - _logged.get(key, -LOG_EVERY) >= LOG_EVERY:
        _logged[key] = now
        log.notice(fmt, *args)


class Scoring:
    """The scoring of one client address, its questions sent at once.

    fileno() is readable when answers wait; receive() takes them; wait()
    takes them until all are in or the time is up; result() ends it (the
    lists still silent count 0) and gives the score.  Or made from a cached
    score (cached=True): nothing to ask."""

    def __init__(self, sites, ip, resolver, timeout, deadline=NONE, cached=None):
        self.sites, self.ip = sites, ip
        self.start = time.monotonic()
        self.until = deadline_of(deadline).earliest(timeout)
        self.answers = {}           # zone -> [addresses] or an error text
        self.pending = {}           # (query id, qname) -> zone
        self.sock, self.score, self.cached = None, cached, cached is not None
        self.servers = dnslookup.servers(resolver)
        self.resent = False
        if self.cached:
            return
        if not self.servers:
            for s in sites:
                self.answers[s.zone] = "no nameserver configured"
            return
        family = socket.AF_INET6 if ":" in self.servers[0][0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                  | socket.SOCK_CLOEXEC)
        self.queries = {}
        for zone in dict.fromkeys(s.zone for s in sites):
            qname = dnslookup.rbl_name(ip, zone)
            q = dns.message.make_query(qname, dns.rdatatype.A)
            q.flags |= dns.flags.RD
            self.queries[zone] = q
            self.pending[(q.id, q.question[0].name)] = zone
            self.send(q, self.servers[0])

    def send(self, q, server):
        try:
            self.sock.sendto(q.to_wire(), server)
        except OSError as e:
            log_once(q.question[0].name.to_text(), "send", "dnsbl: asking %s about %s: %s",
                     server[0], q.question[0].name, e.strerror)

    def fileno(self):
        return self.sock.fileno() if self.sock is not None else -1

    @property
    def done(self):
        return self.score is not None or not self.pending

    def waiting(self):
        """Are answers still due (some list silent, its time not up)?"""
        return not self.done and time.monotonic() < self.until

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def receive(self):
        """Take every answer waiting on the socket."""
        while self.pending:
            try:
                data, peer = self.sock.recvfrom(DATAGRAM_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return      # an ICMP error: the retransmission or the timeout decides
            if (normalize_ip(peer[0]), peer[1]) not in \
                    [(normalize_ip(a), p) for a, p in self.servers]:
                continue
            try:
                r = dns.message.from_wire(data, ignore_trailing=True, one_rr_per_rrset=False)
            except dns.message.Truncated:
                self.take_truncated(data)
                continue
            except (dns.exception.DNSException, ValueError, struct.error):
                continue    # not an answer of ours that we can read
            if not r.question:
                continue
            zone = self.pending.pop((r.id, r.question[0].name), None)
            if zone is not None:
                self.answers[zone] = self.read(zone, r)

    def take_truncated(self, data):
        """A truncated answer (TC): the list's error, counted 0."""
        if len(data) < 2:
            return
        qid = struct.unpack("!H", data[:2])[0]
        for key in [k for k in self.pending if k[0] == qid]:
            zone = self.pending.pop(key)
            self.answers[zone] = "truncated answer"

    def read(self, zone, r):
        """One list's answer: its addresses, or an error text."""
        rcode = r.rcode()
        if r.flags & dns.flags.TC:
            return "truncated answer"
        if rcode == dns.rcode.NXDOMAIN:
            for rrset in r.authority:
                if rrset.rdtype == dns.rdatatype.SOA:
                    apex = rrset.name.to_text(omit_final_dot=True).lower()
                    if apex != zone and not apex.endswith("." + zone):
                        return "the zone %s does not exist (NXDOMAIN from %s)" % (
                            zone, apex or ".")
            return []
        if rcode != dns.rcode.NOERROR:
            return dns.rcode.to_text(rcode)
        out = []
        for rrset in r.answer:
            if rrset.rdtype == dns.rdatatype.A:
                out.extend(rd.address for rd in list(rrset)[:ANSWERS_MAX])
        return out[:ANSWERS_MAX]

    def wait(self, seconds=None):
        """Take answers until all are in, or seconds (default: until the
        lists' time is up); True when done."""
        end = self.until if seconds is None else min(self.until, time.monotonic() + seconds)
        p = select.poll()
        if self.sock is not None:
            p.register(self.sock, select.POLLIN)
        while not self.done:
            now = time.monotonic()
            if now >= end:
                break
            self.maybe_resend(now)
            if p.poll(max(1, int((min(end, self.resend_at()) - now) * 1000) + 1)):
                self.receive()
        return self.done

    def resend_at(self):
        return self.until if self.resent else self.start + min(1.0, (self.until - self.start) / 2)

    def maybe_resend(self, now):
        """Ask once more, the next server if there is one, what is unanswered."""
        if self.resent or now < self.resend_at():
            return
        self.resent = True
        server = self.servers[1 % len(self.servers)]
        for zone in set(self.pending.values()):
            self.send(self.queries[zone], server)

    def result(self):
        """The score: the lists that have not answered count 0 (and are logged)."""
        if self.score is not None:
            return self.score
        if self.sock is not None:
            self.receive()
        for zone in set(self.pending.values()):
            self.answers[zone] = "no answer within %.1f s" % (self.until - self.start)
        self.pending = {}
        self.close()
        score = 0
        for s in self.sites:
            a = self.answers.get(s.zone)
            said = "clean"
            if isinstance(a, list):
                wrong = [x for x in a if not dnslookup.is_listing(x)]
                if wrong:
                    said = "error"
                    log_once(s.zone, "code", "dnsbl: %s answers %s for %s: an error code of "
                             "the list, counted 0", s.zone, wrong[0], self.ip)
                elif any(s.counts(x) for x in a):
                    said = "listed"
                    score += s.weight
            elif a is not None:
                said = "timeout" if a.startswith("no answer within") else "error"
                log_once(s.zone, a.split()[0], "dnsbl: %s about %s: %s; counted 0",
                         s.zone, self.ip, a)
            counters.count(("smtpd_dnsbl_lookups", s.zone, said))
        self.score = score
        return score

    @property
    def complete(self):
        """Did every list answer, and none with its error code (the score
        may be kept long)?  A list that refused us (127.255.255.x, an
        answer outside 127/8) is as good as silent: kept UNANSWERED_TTL."""
        return self.cached or all(
            isinstance(a, list) and all(dnslookup.is_listing(x) for x in a)
            for a in (self.answers.get(s.zone) for s in self.sites))

    def detail(self, trouble=False):
        """For the log: each list that counted, its answer and weight (and
        with trouble, for checkrules, each list that could not say and why:
        smtpd logs that on its own line, once a minute)."""
        if self.cached:
            return "cached"
        out, problems = [], []
        for s in self.sites:
            a = self.answers.get(s.zone)
            if isinstance(a, list):
                hits = [x for x in a if s.counts(x)]
                if hits and not [x for x in a if not dnslookup.is_listing(x)]:
                    out.append("%s %s *%d" % (s.zone, hits[0], s.weight))
                elif trouble and any(not dnslookup.is_listing(x) for x in a):
                    problems.append("%s %s" % (s.zone, self.said(s)))
            elif trouble and a is not None:
                problems.append("%s: %s" % (s.zone, a))
        return (", ".join(out) or "no listing") + "".join("; " + t for t in problems)

    def said(self, site):
        """What one list answered, in words (checkrules -v)."""
        a = self.answers.get(site.zone)
        if self.cached:
            return "a cached score"
        if a is None:
            return "not asked"
        if not isinstance(a, list):
            return a
        if not a:
            return "not listed"
        wrong = [x for x in a if not dnslookup.is_listing(x)]
        if wrong:
            return "%s, the list's error code: counted 0" % wrong[0]
        hits = [x for x in a if site.counts(x)]
        if hits:
            return "%s: listed, *%d" % (hits[0], site.weight)
        return "%s: a listing its filter does not count" % a[0]


class ScoreCache(shm.Table):
    """Scores by client address, shared by the -D workers: an entry's word
    (shm.Table) is the score + 2**31, until it expires."""

    SCORE = shm.Table.VALUE

    def __init__(self, entries):
        super().__init__("smtpd-dnsbl", entries, 4)

    def get(self, ip, now=None):
        """The cached score of ip, or None."""
        with self:
            at = self.find(address_key(ip), self.now())
            return None if at is None else self.w[at + self.SCORE] - (1 << 31)

    def put(self, ip, score, ttl, now=None):
        """Keep ip's score for ttl seconds (now: the caller's clock, unused:
        the table keeps its own)."""
        score = max(-(1 << 31), min(score, (1 << 31) - 1))
        with self:
            now = self.now()
            at = self.take(address_key(ip), now)
            self.w[at + self.EXPIRES] = now + max(1, int(ttl * 10))
            self.w[at + self.SCORE] = score + (1 << 31)


def address_key(ip):
    """16 bytes naming one client address (IPv4 as ::ffff:a.b.c.d)."""
    if ip.version == 4:
        return admission.MAPPED + ip.packed
    return ip.packed


class Reputation:
    """What a gate knows of DNS lists: its sites, thresholds and cache."""

    def __init__(self, sites, cache=None):
        self.sites, self.cache = sites, cache
        self.threshold = buildconf.SMTPD_DNSBL_THRESHOLD
        self.allow = buildconf.SMTPD_DNSBL_ALLOWLIST_THRESHOLD

    @classmethod
    def of(cls, sites, daemon, redis=None):
        """The gate's Reputation, None without sites: with a ScoreCache in
        -D mode (made now, before the master forks), and over Redis
        (store.py) when several gates share one."""
        if not sites:
            return None
        cache = None
        if buildconf.SMTPD_DNSBL_TTL > 0:
            cache = ScoreCache(buildconf.SMTPD_DNSBL_CACHE) if daemon else None
            if redis is not None:
                from smtpgate import store      # noqa: only with a shared store
                cache = store.Layered(cache, redis, b"dnsbl:", lambda ip: ip.packed.hex().encode(),
                                      lambda score: buildconf.SMTPD_DNSBL_TTL)
        return cls(sites, cache)

    def allowlisted(self, score):
        """Does score exempt the client (a negative allow-list threshold reached)?"""
        return self.allow < 0 and score is not None and score <= self.allow

    def cached(self, ip):
        return self.cache.get(ip, time.time()) if self.cache is not None else None

    def start(self, ip, resolver, deadline):
        """The Scoring of a new connection from ip (cached, or asked now)."""
        score = self.cached(ip)
        if score is not None:
            return Scoring(self.sites, ip, resolver, 0, cached=score)
        return Scoring(self.sites, ip, resolver, buildconf.SMTPD_DNSBL_TIMEOUT, deadline)

    def finish(self, scoring):
        """The score of a Scoring (waiting for what is due), cached when it
        was asked."""
        if scoring.score is not None:
            return scoring.score
        scoring.wait()
        score = scoring.result()
        if self.cache is not None and not scoring.cached:
            ttl = buildconf.SMTPD_DNSBL_TTL if scoring.complete else \
                min(buildconf.SMTPD_DNSBL_TTL, UNANSWERED_TTL)
            if ttl > 0:
                self.cache.put(scoring.ip, score, ttl=ttl, now=time.time())
        return score

