"""DNS lists scored before the greeting (issue 25), postscreen-style.

The DNS fixture serves the lists; clients connect from several 127.x
addresses with known listings, in both modes; behind a PROXY header the
proxied address is the one asked about."""

import ipaddress
import os
import re
import socket
import subprocess
import time

import dns.message
import dns.rcode
import dns.reversename
import dns.rrset
import pytest

from harness import PYTHON, TEST_CONSTANTS, make_jail

SITES = "bl.test=127.0.0.[2..11]*3 spam.test*2 wl.test=127.0.[0..255].[1..3]*-2"
ALLOW = "allow:ALL:ALL:ALL\n"


def listed(server, ip, zone, *answers):
    """List ip in zone with these answers; the name asked."""
    a = ipaddress.ip_address(ip)
    rev = dns.reversename.from_address(str(a)).to_text(omit_final_dot=True)
    rev = rev.rsplit(".in-addr.arpa" if a.version == 4 else ".ip6.arpa", 1)[0]
    server.add(rev + "." + zone, "A", *answers)
    return rev + "." + zone + "."


@pytest.fixture
def lists(dnsz):
    """The test lists: 127.0.0.2 on bl and spam (5), 127.0.0.3 on bl (3),
    127.0.0.4 on all three (3 + 2 - 2 = 3), 127.0.0.5 on wl only (-2)."""
    listed(dnsz, "127.0.0.2", "bl.test", "127.0.0.2")
    listed(dnsz, "127.0.0.2", "spam.test", "127.0.0.2")
    listed(dnsz, "127.0.0.3", "bl.test", "127.0.0.4")
    for z, a in (("bl.test", "127.0.0.10"), ("spam.test", "127.0.0.3"), ("wl.test", "127.0.9.2")):
        listed(dnsz, "127.0.0.4", z, a)
    listed(dnsz, "127.0.0.5", "wl.test", "127.0.10.3")
    return dnsz


@pytest.fixture(params=["inetd", "daemon"])
def gate(request, smtpd, daemon_):
    """gate(rules, *flags, **constants) -> a server with .connect(source)."""
    def start(rules=ALLOW, *flags, **constants):
        constants.setdefault("SMTPD_DNSBL_SITES", SITES)
        if request.param == "inetd":
            return smtpd(rules, "-H", *flags, **constants)
        return daemon_(rules, *flags, **constants).wait_ready()
    start.mode = request.param
    return start


def greeting(srv, source):
    c = srv.connect(source)
    try:
        code, text = c.reply()
    except EOFError:
        raise AssertionError("no greeting for %s: %s" % (source, srv.log())) from None
    return c, code, " ".join(text)


def log_of(srv):
    time.sleep(0.2)
    return srv.log()


def test_weights_add_up_and_the_threshold_refuses(gate, lists):
    srv = gate(SMTPD_DNSBL_THRESHOLD=4)
    c, code, text = greeting(srv, "127.0.0.2")           # 3 + 2
    assert code == 554 and text.startswith("5.7.1 ") and "[127.0.0.2]" in text
    assert "bl.test" not in text and "spam" not in text  # the lists are not named
    assert c.closed()
    for source in ("127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"):    # 3, 3, -2, 0
        c, code, _ = greeting(srv, source)
        assert code == 220, source
        assert c.cmd("HELO x")[0] == 250
        c.cmd("QUIT")
    log = log_of(srv)
    refusal = [l for l in log.splitlines() if "dnsbl: refused" in l]
    assert len(refusal) == 1
    assert "score 5 (threshold 4)" in refusal[0]
    assert "bl.test 127.0.0.2 *3" in refusal[0] and "spam.test 127.0.0.2 *2" in refusal[0]
    assert re.search(r"\(127\.0\.0\.4\) scores 3: bl\.test 127\.0\.0\.10 \*3, spam\.test "
                     r"127\.0\.0\.3 \*2, wl\.test 127\.0\.9\.2 \*-2", log), log
    assert "(127.0.0.5) scores -2" in log


def test_the_filter_decides_what_counts(gate, dnsz):
    listed(dnsz, "127.0.0.7", "bl.test", "127.0.0.12")    # outside [2..11]
    listed(dnsz, "127.0.0.8", "bl.test", "127.0.0.12", "127.0.0.11")
    srv = gate(SMTPD_DNSBL_THRESHOLD=3)
    assert greeting(srv, "127.0.0.7")[1] == 220
    assert greeting(srv, "127.0.0.8")[1] == 554


def test_an_error_answer_never_counts(gate, dnsz):
    """A list that answers 127.255.255.254 for everything (Spamhaus to a
    public resolver), one that answers outside 127/8, and a filter that would
    take error codes too: no client is refused for them."""
    dnsz.add("*.broken.test", "A", "127.255.255.254")
    dnsz.add("*.outside.test", "A", "10.0.0.2")
    dnsz.add("*.mixed.test", "A", "127.0.0.2", "127.255.255.252")
    srv = gate(SMTPD_DNSBL_SITES="broken.test*10 outside.test*10 mixed.test*10 "
                                 "broken.test=127.[0..255].[0..255].[0..255]*10")
    for source in ("127.0.0.2", "127.0.0.9", "127.1.2.3"):
        c, code, _ = greeting(srv, source)
        assert code == 220, source
        c.cmd("QUIT")
    log = log_of(srv)
    assert "dnsbl: broken.test answers 127.255.255.254" in log
    assert "dnsbl: outside.test answers 10.0.0.2" in log
    assert "dnsbl: mixed.test answers 127.255.255.252" in log
    # logged at most once a minute per list and process
    pids = re.findall(r"smtpd\[(\d+)\]: (?:worker: |screen: )?dnsbl: broken\.test answers", log)
    assert len(pids) == len(set(pids)) >= 1, log


def test_servfail_truncation_a_missing_zone_a_huge_answer_and_silence(gate, dnsz):
    dnsz.fail("*.servfail.test")
    dnsz.fail("*.trunc.test", "TRUNCATE")
    dnsz.fail("*.slow.test", "TIMEOUT")
    dnsz.apex("test")                                  # no "gone.test" zone below it
    dnsz.add("*.huge.test", "A", *["127.0.%d.%d" % (i // 200, i % 200 + 2) for i in range(300)])
    srv = gate(SMTPD_DNSBL_SITES="servfail.test trunc.test slow.test gone.test huge.test*2",
               SMTPD_DNSBL_THRESHOLD=3, SMTPD_DNSBL_TIMEOUT=2)
    t0 = time.monotonic()
    c, code, _ = greeting(srv, "127.0.0.2")
    took = time.monotonic() - t0
    assert code == 220 and 1.5 < took < 4.5, took      # the silent list was waited for, no more
    assert c.cmd("HELO x")[0] == 250
    c.cmd("QUIT")
    log = log_of(srv)
    assert "dnsbl: servfail.test about 127.0.0.2: SERVFAIL; counted 0" in log
    assert "dnsbl: trunc.test about 127.0.0.2: truncated answer; counted 0" in log
    assert "dnsbl: slow.test about 127.0.0.2: no answer within 2.0 s; counted 0" in log
    assert "dnsbl: gone.test about 127.0.0.2: the zone gone.test does not exist" in log
    assert re.search(r"scores 2: huge\.test 127\.0\.\d+\.\d+ \*2", log), log


def test_a_slow_list_never_holds_the_session_past_its_deadline(smtpd, dnsz):
    dnsz.fail("*.slow.test", "TIMEOUT")
    srv = smtpd(ALLOW, "-H", SMTPD_DNSBL_SITES="slow.test", SMTPD_DNSBL_TIMEOUT=30,
                SESSION_TIMEOUT=2)
    t0 = time.monotonic()
    c = srv.connect("127.0.0.2")
    try:
        c.reply()
    except EOFError:
        pass
    assert time.monotonic() - t0 < 6
    assert srv.last_status() in (0, 71)


def test_an_allow_listed_client_skips_the_pause(gate, lists):
    srv = gate(SMTPD_GREET_PAUSE=3000, SMTPD_DNSBL_ALLOWLIST_THRESHOLD=-1,
               SMTPD_ERROR_SLEEP=2, SMTPD_SOFT_ERRORS=0)
    t0 = time.monotonic()
    c, code, _ = greeting(srv, "127.0.0.5")             # wl only: -2
    assert code == 220 and time.monotonic() - t0 < 1.5
    t1 = time.monotonic()
    assert c.cmd("FOO")[0] == 500                       # no error delay either
    assert time.monotonic() - t1 < 1.0
    c.cmd("QUIT")
    t0 = time.monotonic()
    c, code, _ = greeting(srv, "127.0.0.6")             # unlisted: 0, waits
    assert code == 220 and time.monotonic() - t0 >= 2.9
    c.cmd("QUIT")
    assert "(127.0.0.5) scores -2: wl.test 127.0.10.3 *-2 (allow-listed)" in log_of(srv)


def test_allow_listed_clients_skip_the_rate_limit_once_scored(daemon_, lists):
    d = daemon_(ALLOW, SMTPD_DNSBL_SITES=SITES, SMTPD_DNSBL_ALLOWLIST_THRESHOLD=-1,
                SMTPD_MAX_RATE=2, SMTPD_DNSBL_THRESHOLD=100).wait_ready()
    for _ in range(6):
        c, code, _ = greeting(d, "127.0.0.5")
        assert code == 220
        c.cmd("QUIT")
    codes = []
    for _ in range(4):
        c, code, _ = greeting(d, "127.0.0.6")
        codes.append(code)
        c.close()
    assert codes[:2] == [220, 220] and codes[2:] == [421, 421]


def test_the_cache_answers_the_next_connection_without_a_query(daemon_, lists):
    d = daemon_(ALLOW, SMTPD_DNSBL_SITES=SITES, SMTPD_DNSBL_THRESHOLD=4,
                SMTPD_MAXCHILDREN=4, SMTPD_PREFORK=4).wait_ready()
    asked = lambda: [q for q in lists.queries if q[0].startswith("2.0.0.127.")]
    c, code, _ = greeting(d, "127.0.0.2")
    assert code == 554
    assert sorted(q[0] for q in asked()) == ["2.0.0.127.bl.test.", "2.0.0.127.spam.test.",
                                             "2.0.0.127.wl.test."]
    for _ in range(6):                                  # whichever worker takes it
        c, code, _ = greeting(d, "127.0.0.2")
        assert code == 554
    assert len(asked()) == 3
    assert "score 5 (threshold 4): cached" in d.log()
    c, code, _ = greeting(d, "127.0.0.6")
    assert code == 220 and len([q for q in lists.queries if q[0].startswith("6.0.0.127.")]) == 3
    c.cmd("QUIT")
    for _ in range(3):
        c, code, _ = greeting(d, "127.0.0.6")
        c.cmd("QUIT")
    assert len([q for q in lists.queries if q[0].startswith("6.0.0.127.")]) == 3


def test_a_list_that_did_not_answer_is_not_cached_for_long(daemon_, dnsz):
    dnsz.fail("*.slow.test", "TIMEOUT")
    d = daemon_(ALLOW, SMTPD_DNSBL_SITES="slow.test", SMTPD_DNSBL_TIMEOUT=1).wait_ready()
    for _ in range(2):
        c, code, _ = greeting(d, "127.0.0.2")
        assert code == 220
        c.cmd("QUIT")
    # the second connection came within 60 s: cached (0), not asked again
    assert len([q for q in dnsz.queries if q[0] == "2.0.0.127.slow.test."]) == 2  # sent + resent


def test_an_error_answer_is_cached_no_longer_than_silence():
    """Issue 34, item 8: a list that answers its error code (it refused our
    resolver) scores 0, as a silent one does, and is kept no longer than
    one: UNANSWERED_TTL, not SMTPD_DNSBL_TTL."""
    import buildconf
    from smtpgate.gate import dnsbl

    class Cache:
        def __init__(self):
            self.kept = []

        def get(self, ip, now=None):
            return None

        def put(self, ip, score, ttl, now=None):
            self.kept.append((score, ttl))
    cache = Cache()
    rep = dnsbl.Reputation(dnsbl.parse_sites("bl.test wl.test*-2"), cache)
    for answers in ({"bl.test": ["127.255.255.254"], "wl.test": []},
                    {"bl.test": [], "wl.test": ["192.0.2.99"]},
                    {"bl.test": ["127.0.0.2", "127.255.255.252"], "wl.test": []},
                    {"bl.test": [], "wl.test": []}):
        s = dnsbl.Scoring(rep.sites, ipaddress.ip_address("192.0.2.1"), None, 5)
        s.answers, s.pending = dict(answers), {}
        rep.finish(s)
    ttl = min(buildconf.SMTPD_DNSBL_TTL, dnsbl.UNANSWERED_TTL)
    assert cache.kept == [(0, ttl), (0, ttl), (0, ttl), (0, buildconf.SMTPD_DNSBL_TTL)]


def test_inetd_sessions_ask_every_time(smtpd, lists):
    srv = smtpd(ALLOW, "-H", SMTPD_DNSBL_SITES="bl.test")
    for _ in range(2):
        assert greeting(srv, "127.0.0.6")[1] == 220
    assert len([q for q in lists.queries if q[0] == "6.0.0.127.bl.test."]) == 2


def proxy_v1(src, dst="127.0.0.1", sport=40000, dport=25):
    fam = "TCP6" if ":" in src else "TCP4"
    return ("PROXY %s %s %s %d %d\r\n" % (fam, src, dst, sport, dport)).encode()


def test_behind_a_proxy_the_proxied_client_is_scored(daemon_, dnsz):
    listed(dnsz, "192.0.2.7", "bl.test", "127.0.0.2")
    name6 = listed(dnsz, "2001:db8::1:7", "bl.test", "127.0.0.2")
    assert name6 == "7.0.0.0.1.0.0.0" + ".0" * 16 + ".8.b.d.0.1.0.0.2.bl.test."
    d = daemon_(ALLOW, "-X", "127.0.0.0/8", SMTPD_DNSBL_SITES="bl.test").wait_ready()
    for src, want in (("192.0.2.7", 554), ("192.0.2.8", 220), ("2001:db8::1:7", 554)):
        c = d.connect("127.0.0.2")
        c.send(proxy_v1(src, "::1" if ":" in src else "127.0.0.1"))
        code, text = c.reply()
        assert code == want, (src, text)
        c.close()
    asked = [q[0] for q in dnsz.queries]
    assert "7.2.0.192.bl.test." in asked and name6 in asked
    assert not any(q.startswith("2.0.0.127.") for q in asked)     # never the proxy


def test_exempt_networks_and_health_checks_are_not_scored(daemon_, lists):
    d = daemon_(ALLOW, SMTPD_DNSBL_SITES=SITES, SMTPD_DNSBL_THRESHOLD=4,
                SMTPD_ADMISSION_EXEMPT="127.0.0.2/32").wait_ready()
    c, code, _ = greeting(d, "127.0.0.2")
    assert code == 220
    c.cmd("QUIT")
    assert not any(q[0].startswith("2.0.0.127.") for q in lists.queries)


RULES_BY_SCORE = ("noto:DNSBL=1..3:ALL:ALL EXCEPT *@my.domain:554 5.7.1 Relaying refused\n"
                  "deny:DNSBL=..-1:ALL:ALL:550 5.7.1 odd\n"
                  "allow:ALL:ALL:ALL\n")


def test_rules_see_the_score(gate, lists):
    srv = gate(RULES_BY_SCORE, SMTPD_DNSBL_THRESHOLD=5)
    for source, local, other in (("127.0.0.3", 250, 554), ("127.0.0.6", 250, 250),
                                 ("127.0.0.4", 250, 554)):
        c, code, _ = greeting(srv, source)
        assert code == 220
        c.cmd("HELO x")
        c.cmd("MAIL FROM:<a@example.org>")
        assert c.cmd("RCPT TO:<bob@my.domain>")[0] == local, source
        assert c.cmd("RCPT TO:<bob@elsewhere.example>")[0] == other, source
        c.cmd("QUIT")
    c, code, _ = greeting(srv, "127.0.0.5")             # -2: deny
    c.cmd("HELO x")
    c.cmd("MAIL FROM:<a@example.org>")
    assert c.cmd("RCPT TO:<bob@my.domain>")[0] == 550


def checkrules(tree, rules, *args, env):
    jail = make_jail(rules)
    path = os.path.join(jail, "etc", "smtpd_check_rules")
    return subprocess.run([PYTHON, os.path.join(tree, "checkrules.py"), "-f", path] + list(args),
                          capture_output=True, text=True, env=env)


def test_checkrules_shows_the_score(tree_factory, lists):
    tree = tree_factory(**dict(TEST_CONSTANTS, SMTPD_DNSBL_SITES=SITES, SMTPD_DNSBL_THRESHOLD=5,
                               SMTPD_DNSBL_ALLOWLIST_THRESHOLD=-1))
    env = dict(os.environ, SMTPD_NAMESERVER=lists.spec)
    p = checkrules(tree, RULES_BY_SCORE, "-a", "127.0.0.3", "-n", "UNKNOWN", "a@example.org",
                   "bob@elsewhere.example", env=env)
    assert p.returncode == 1, p
    assert p.stdout.splitlines() == ["noto 554 5.7.1 Relaying refused",
                                     "dnsbl score 3: bl.test 127.0.0.4 *3"]
    p = checkrules(tree, RULES_BY_SCORE, "-a", "127.0.0.2", "-n", "UNKNOWN", "a@example.org",
                   "bob@my.domain", env=env)
    assert p.returncode == 3
    assert p.stdout.splitlines()[0].startswith("refused 554 5.7.1 ")
    assert "dnsbl score 5: bl.test 127.0.0.2 *3, spam.test 127.0.0.2 *2" in p.stdout
    p = checkrules(tree, RULES_BY_SCORE, "-a", "127.0.0.5", "-n", "UNKNOWN", "a@example.org",
                   "bob@my.domain", env=env)
    assert p.stdout.splitlines() == ["deny 550 5.7.1 odd",
                                     "dnsbl score -2: wl.test 127.0.10.3 *-2 (allow-listed)"]
    p = checkrules(tree, "allow:DNSBL=3..1:ALL:ALL\n", "-t", env=env)
    assert p.returncode == 78 and "DNSBL token 'DNSBL=3..1': 3 is above 1" in p.stdout


def test_checkrules_names_the_lists_that_could_not_say(tree_factory, dnsz):
    """Issue 35, item 6: an error code or an error is not "no listing"."""
    dnsz.add("*.broken.test", "A", "127.255.255.254")
    dnsz.fail("*.down.test", "SERVFAIL")
    listed(dnsz, "127.0.0.3", "bl.test", "127.0.0.4")
    tree = tree_factory(**dict(TEST_CONSTANTS, SMTPD_DNSBL_SITES="bl.test broken.test "
                               "down.test*2 clean.test", SMTPD_DNSBL_THRESHOLD=5))
    env = dict(os.environ, SMTPD_NAMESERVER=dnsz.spec)
    p = checkrules(tree, ALLOW, "-v", "-a", "127.0.0.3", "-n", "UNKNOWN", "a@example.org",
                   "bob@my.domain", env=env)
    lines = p.stdout.splitlines()
    assert lines[1] == ("dnsbl score 1: bl.test 127.0.0.4 *1; broken.test 127.255.255.254, "
                        "the list's error code: counted 0; down.test: SERVFAIL"), lines
    assert lines[2:6] == ["dnsbl bl.test: 127.0.0.4: listed, *1",
                          "dnsbl broken.test: 127.255.255.254, the list's error code: counted 0",
                          "dnsbl down.test*2: SERVFAIL", "dnsbl clean.test: not listed"]
    env = dict(os.environ, SMTPD_NAMESERVER="")
    env.pop("SMTPD_NAMESERVER")
    env["SMTPD_RESOLV_CONF"] = "/nonexistent-resolv.conf"
    p = checkrules(tree, ALLOW, "-a", "127.0.0.3", "-n", "UNKNOWN", "a@example.org",
                   "bob@my.domain", env=env)
    assert "dnsbl score 0: no listing; bl.test: no nameserver configured" in p.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="a DNS server on port 53 needs root")
def test_the_lists_ask_the_servers_of_resolv_conf(daemon_, monkeypatch, tmp_path,
                                                 tree_factory):
    """Issue 35, item 1: without SMTPD_NAMESERVER the lists use resolv.conf's
    servers, exactly as the PTR lookups do (resolv.conf has no ports: the
    server is on 53, at an address of its own)."""
    from fixtures import DNSServer
    try:
        server = DNSServer("127.53.0.1", 53)
    except OSError as e:
        pytest.skip("cannot listen on 127.53.0.1:53: %s" % e)
    try:
        listed(server, "127.0.0.2", "bl.test", "127.0.0.2")
        conf = tmp_path / "resolv.conf"
        conf.write_text("nameserver 127.53.0.1\n")
        monkeypatch.delenv("SMTPD_NAMESERVER", raising=False)
        monkeypatch.setenv("SMTPD_RESOLV_CONF", str(conf))
        d = daemon_(ALLOW, SMTPD_DNSBL_SITES="bl.test").wait_ready()
        c, code, _ = greeting(d, "127.0.0.2")
        assert code == 554, d.log()
        c, code, _ = greeting(d, "127.0.0.6")
        assert code == 220
        c.cmd("QUIT")
        assert ("2.0.0.127.bl.test.", "A") in server.queries
        assert "no nameserver configured" not in d.log()
        tree = tree_factory(**dict(TEST_CONSTANTS, SMTPD_DNSBL_SITES="bl.test"))
        p = checkrules(tree, ALLOW, "-a", "127.0.0.2", "a@example.org", "bob@my.domain",
                       env=dict(os.environ))
        assert "dnsbl score 1: bl.test 127.0.0.2 *1" in p.stdout, p.stdout
        assert ("2.0.0.127.in-addr.arpa.", "PTR") in server.queries     # the same server
    finally:
        server.sock.close()


@pytest.mark.parametrize("sites,why", [
    ("zen=127.0.0.2", "'zen' is not a DNS zone"),
    ("bl.test=127.0.0.[3..2]", "octet '[3..2]'"),
    ("bl.test*x", "is not zone[=filter][*weight]"),
    ("bl.test=127.0.0", "not four octets"),
])
def test_bad_sites_stop_smtpd(daemon_, sites, why):
    d = daemon_(ALLOW, SMTPD_DNSBL_SITES=sites)
    assert d.proc.wait(20) == 78
    assert why in d.log()


def test_a_client_that_talks_during_the_lookups_is_an_early_talker(gate, dnsz):
    dnsz.fail("*.slow.test", "TIMEOUT")
    srv = gate(SMTPD_DNSBL_SITES="slow.test", SMTPD_DNSBL_TIMEOUT=3, SMTPD_GREET_PAUSE=1000)
    c = srv.connect("127.0.0.2")
    c.send("EHLO spammer\r\n")
    assert c.reply()[0] == 554
    assert "pregreet" in log_of(srv)


class Resolver:
    """A resolver's server list (plain DNS, as make_resolver's): the sockets'."""

    def __init__(self, *socks):
        import dns.nameserver
        self.nameservers = [dns.nameserver.Do53Nameserver(*s.getsockname()) for s in socks]


def test_forged_garbage_and_stray_answers_are_ignored():
    """In-process: a "listed" answer from another port, garbage and a wrong
    id from the server are ignored; the server's real answer decides."""
    from smtpgate.gate import dnsbl
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        srv.bind(("127.0.0.1", 0))
        other.bind(("127.0.0.1", 0))
        s = dnsbl.Scoring(dnsbl.parse_sites("bl.test"), ipaddress.ip_address("127.0.0.2"),
                          Resolver(srv), 3)
        data, peer = srv.recvfrom(512)
        q = dns.message.from_wire(data)
        assert q.question[0].name.to_text() == "2.0.0.127.bl.test."

        def answer(*addresses, rcode=dns.rcode.NOERROR, qid=None):
            r = dns.message.make_response(q)
            r.set_rcode(rcode)
            if addresses:
                r.answer.append(dns.rrset.from_text_list(q.question[0].name, 60, "IN", "A",
                                                         list(addresses)))
            if qid is not None:
                r.id = qid
            return r.to_wire()
        other.sendto(answer("127.0.0.2"), peer)                 # forged: another port
        srv.sendto(b"\xff" * 7, peer)                           # garbage
        srv.sendto(answer("127.0.0.2", qid=q.id ^ 1), peer)     # a stray id
        time.sleep(0.2)
        s.receive()
        assert not s.done
        srv.sendto(answer(rcode=dns.rcode.NXDOMAIN), peer)
        assert s.wait() and s.result() == 0


def test_a_lost_question_is_asked_again():
    from smtpgate.gate import dnsbl
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv:
        srv.bind(("127.0.0.1", 0))
        s = dnsbl.Scoring(dnsbl.parse_sites("bl.test"), ipaddress.ip_address("127.0.0.2"),
                          Resolver(srv), 3)
        srv.recvfrom(512)                                       # dropped
        t0 = time.monotonic()
        s.wait(1.5)
        srv.settimeout(0.1)
        data, peer = srv.recvfrom(512)                          # asked again after ~1 s
        assert 0.8 < time.monotonic() - t0 < 1.6
        r = dns.message.make_response(dns.message.from_wire(data))
        r.answer.append(dns.rrset.from_text_list(r.question[0].name, 60, "IN", "A",
                                                 ["127.0.0.2"]))
        srv.sendto(r.to_wire(), peer)
        assert s.wait() and s.result() == 1


def test_the_score_cache_is_bounded_and_expires():
    from smtpgate.gate import dnsbl
    cache = dnsbl.ScoreCache(64)
    size = os.fstat(cache.fd).st_size
    for i in range(5000):
        cache.put(ipaddress.ip_address("10.%d.%d.1" % (i // 256, i % 256)), i % 7 - 3, 60)
    assert os.fstat(cache.fd).st_size == size
    assert cache.get(ipaddress.ip_address("10.19.135.1")) == 4999 % 7 - 3     # the newest
    kept = sum(cache.get(ipaddress.ip_address("10.%d.%d.1" % (i // 256, i % 256))) is not None
               for i in range(5000))
    assert 32 <= kept <= 64
    six = ipaddress.ip_address("2001:db8::5")
    cache.put(six, -7, 0.1)
    assert cache.get(six) == -7
    time.sleep(0.3)
    assert cache.get(six) is None
