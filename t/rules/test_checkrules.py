"""checkrules.py: DNS, ident, IPv6, validation, reload, CLI (issue 3)."""

import os
import subprocess
import time

import pytest
from hypothesis import given, settings, strategies as st

from smtpgate.rules import ruleset as engine
from smtpgate.net import normalize_ip
from smtpgate.rules import dnslookup, ident
from smtpgate.rules.ruleset import Client
from harness import IDENT_PORT, PYTHON, ROOT, wait_for

F, T = "<alice@example.org>", "<bob@my.domain>"


def session(text, ip, name=None, resolve=True):
    """A Client as smtpd builds it: FCrDNS through the DNS fixture."""
    rules, _ = engine.parse(text)
    lk = dnslookup.Lookup(dnslookup.make_resolver(timeout=1.0))
    err = None
    if resolve:
        try:
            name, _ = lk.confirmed_name(normalize_ip(ip))
        except dnslookup.TempFail as e:
            err = str(e)
    return rules, Client(ip, name, lk, name_error=err)


def verdict(text, ip, f=F, t=T, **kw):
    return evaluated(text, ip, f, t, **kw)[:2]


def evaluated(text, ip, f=F, t=T, **kw):
    rules, c = session(text, ip, **kw)
    v = engine.evaluate(rules, c, f, t)
    return v.action, v.reply, v.detail


KNOWN_RULES = "noto:UNKNOWN:ALL:ALL:550 who are you %H\nallow:KNOWN:ALL:ALL\n"


def test_fcrdns_confirmed_name_is_known(dnsz):
    dnsz.add("10.2.0.192.in-addr.arpa", "PTR", "mail.example.org.")
    dnsz.add("mail.example.org", "A", "192.0.2.10")
    assert verdict(KNOWN_RULES, "192.0.2.10") == ("allow", None)
    rules, c = session(KNOWN_RULES, "192.0.2.10")
    assert c.name == "mail.example.org"


def test_ex16_unconfirmed_ptr_counts_as_unknown(dnsz):
    # CHANGED: the original trusted the PTR alone (a relay, spec 4.10 ex. 16).
    dnsz.add("66.100.51.198.in-addr.arpa", "PTR", "relay.my.domain.")
    dnsz.add("relay.my.domain", "A", "192.0.2.99")
    text = "allow:*.my.domain:ALL:ALL\nnoto:ALL:ALL:ALL:550 no %H\n"
    assert verdict(text, "198.51.100.66") == ("noto", "550 no UNKNOWN")


def test_no_ptr_is_unknown(dnsz):
    assert verdict(KNOWN_RULES, "203.0.113.5") == ("noto", "550 who are you UNKNOWN")


def test_ptr_lookup_failure_is_tempfail_for_name_rules_only(dnsz):
    dnsz.fail("5.113.0.203.in-addr.arpa", "SERVFAIL")
    action, reply = verdict(KNOWN_RULES, "203.0.113.5")
    assert action == "tempfail" and reply.startswith("451 ")
    # A rule that needs no name still decides.
    assert verdict("allow:203.0.113.0/24:ALL:ALL\n" + KNOWN_RULES,
                   "203.0.113.5") == ("allow", None)


def test_dns_timeout_is_tempfail_never_allow(dnsz):
    dnsz.fail("5.113.0.203.in-addr.arpa", "TIMEOUT")
    t0 = time.monotonic()
    action, reply, detail = evaluated("deny:UNKNOWN:ALL:ALL\nallow:ALL:ALL:ALL\n", "203.0.113.5")
    assert action == "tempfail" and "timed out" in detail
    assert reply == engine.TEMPFAIL_REPLY       # nothing internal reaches the client
    assert time.monotonic() - t0 < 5


def test_ex38_rbl_ipv4(dnsz):
    dnsz.add("10.2.0.192.rbl.example", "A", "127.0.0.2")
    text = "noto:RBL.rbl.example:ALL:ALL:554 %I is listed\nallow:ALL:ALL:ALL\n"
    assert verdict(text, "192.0.2.10", resolve=False) == ("noto", "554 192.0.2.10 is listed")
    assert verdict(text, "192.0.2.11", resolve=False) == ("allow", None)
    assert ("10.2.0.192.rbl.example.", "A") in dnsz.queries


def test_rbl_ipv6_uses_nibbles(dnsz):
    nib = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
    dnsz.add(nib + ".rbl.example", "A", "127.0.0.2")
    text = "noto:RBL.rbl.example:ALL:ALL:554 listed\nallow:ALL:ALL:ALL\n"
    assert verdict(text, "2001:db8::1", resolve=False) == ("noto", "554 listed")


def test_rbl_servfail_is_tempfail(dnsz):
    dnsz.fail("10.2.0.192.rbl.example", "SERVFAIL")
    text = "noto:RBL.rbl.example:ALL:ALL\nallow:ALL:ALL:ALL\n"
    assert verdict(text, "192.0.2.10", resolve=False)[0] == "tempfail"


@pytest.mark.parametrize("answer", ["127.255.255.254", "127.255.255.252", "127.255.255.255",
                                    "10.0.0.2", "192.0.2.1"])
def test_rbl_error_answers_are_lookup_failures_never_listings(dnsz, answer):
    """Spamhaus answers 127.255.255.x to refused resolvers: peers that
    counted those rejected all mail.  Only 127/8 outside 127.255.255/24
    lists; anything else is handled as a DNS failure (451), and logged."""
    dnsz.add("10.2.0.192.rbl.example", "A", answer)
    text = "deny:RBL.rbl.example:ALL:ALL:554 listed\nallow:ALL:ALL:ALL\n"
    action, reply, detail = evaluated(text, "192.0.2.10")
    assert action == "tempfail" and reply == engine.TEMPFAIL_REPLY
    assert answer in detail and "error code" in detail


def test_rbl_listing_with_a_code_still_lists(dnsz):
    dnsz.add("10.2.0.192.rbl.example", "A", "127.0.0.4", "127.0.0.10")
    text = "deny:RBL.rbl.example:ALL:ALL:554 listed\nallow:ALL:ALL:ALL\n"
    assert verdict(text, "192.0.2.10", resolve=False) == ("deny", "554 listed")


def test_ex39_ns_unknown_sender_domain(dnsz):
    dnsz.add("example.org", "NS", "ns.example.org.")
    dnsz.add("example.org", "MX", "10 mx.example.org.")
    dnsz.add("ns.example.org", "A", "192.0.2.53")
    text = "noto:ALL:NS=UNKNOWN:ALL:550 bad sender domain %F\nallow:ALL:ALL:ALL\n"
    assert verdict(text, "192.0.2.10", "<x@nosuch.invalid>", resolve=False) == \
        ("noto", "550 bad sender domain <x@nosuch.invalid>")
    assert verdict(text, "192.0.2.10", "<x@example.org>", resolve=False) == ("allow", None)
    # host.example.org has no NS/MX: found after dropping a label, and it
    # does not resolve itself -> UNKNOWN in the original's sense.
    assert verdict(text, "192.0.2.10", "<x@host.example.org>", resolve=False)[0] == "noto"
    dnsz.add("host.example.org", "A", "192.0.2.77")
    assert verdict(text, "192.0.2.10", "<x@host.example.org>", resolve=False)[0] == "allow"
    assert verdict(text, "192.0.2.10", "<>", resolve=False) == ("allow", None)


def test_ns_pattern_matches_names_and_addresses(dnsz):
    dnsz.add("spam.example", "MX", "10 mx.bulk.example.")
    dnsz.add("mx.bulk.example", "A", "198.51.100.25")
    by_name = "noto:ALL:ALL:NS=*.bulk.example:551 bulk\nallow:ALL:ALL:ALL\n"
    by_net = "noto:ALL:ALL:*@NS=198.51.100.0/24:551 bulk\nallow:ALL:ALL:ALL\n"
    for text in (by_name, by_net):
        assert verdict(text, "192.0.2.10", F, "<a@spam.example>",
                       resolve=False) == ("noto", "551 bulk")
        assert verdict(text, "192.0.2.10", F, "<a@ham.example>",
                       resolve=False) == ("allow", None)


def test_ns_source_uses_reverse_zone_when_name_unknown(dnsz):
    dnsz.add("113.0.203.in-addr.arpa", "NS", "ns.badhost.example.")
    text = "noto:NS=*.badhost.example:ALL:ALL:550 bad\nallow:ALL:ALL:ALL\n"
    assert verdict(text, "203.0.113.5") == ("noto", "550 bad")


def test_ident_over_rfc1413(ident_server):
    srv = ident_server("127.0.0.61", "JOE")
    import socket
    listener = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(listener.getsockname(), source_address=("127.0.0.61", 0))
    conn, peer = listener.accept()
    local = conn.getsockname()
    user = ident.query(local, peer, port=IDENT_PORT, timeout=2)
    assert user == "JOE"
    assert srv.queries == ["%d , %d\r\n" % (peer[1], local[1])]
    for s in (cli, conn, listener):
        s.close()


@pytest.mark.parametrize("reply,user", [
    ("4000 , 25 : USERID : UNIX :joe\r\n", "joe"),
    ("4000,25:USERID:UNIX:joe extra\n", "joe"),
    ("4000 , 26 : USERID : UNIX :joe\r\n", None),
    ("4000 , 25 : ERROR : NO-USER\r\n", None),
    ("garbage\r\n", None),
    ("4000 , 25 : USERID : UNIX :" + "x" * 100 + "\r\n", "x" * 80),
])
def test_ident_reply_parsing(reply, user):
    assert ident.parse_reply(reply.encode(), 4000, 25) == user


def test_ipv6_tokens_and_mapped_clients():
    text = ("allow:[2001:db8::]/32:ALL:ALL\nallow:[2001:db9::1]:ALL:ALL\n"
            "allow:192.0.2.0/24:ALL:ALL\nnoto:ALL:ALL:ALL:550 no\n")
    rules, _ = engine.parse(text)

    def v(ip):
        return engine.evaluate(rules, Client(ip), F, T).action
    assert v("2001:db8:ffff::1") == "allow"
    assert v("2001:db9::1") == "allow"
    assert v("2001:db9::2") == "noto"
    assert v("::ffff:192.0.2.7") == "allow"
    assert v("192.0.3.1") == "noto"


def test_except_three_deep():
    # A EXCEPT B EXCEPT C EXCEPT D = A and not (B and not (C and not D))
    text = ("deny:192.0.2.0/24 EXCEPT 192.0.2.0/25 EXCEPT 192.0.2.0/26 "
            "EXCEPT 192.0.2.1:ALL:ALL\nallow:ALL:ALL:ALL\n")
    rules, _ = engine.parse(text)
    got = {ip: engine.evaluate(rules, Client(ip), F, T).action
           for ip in ("192.0.2.200", "192.0.2.100", "192.0.2.30", "192.0.2.1")}
    assert got == {"192.0.2.200": "deny", "192.0.2.100": "allow",
                   "192.0.2.30": "deny", "192.0.2.1": "allow"}


@pytest.mark.parametrize("line,message", [
    ("allow:ALL:ALL", "bad field count: 3 fields"),
    ("deny::ALL:ALL", "empty field 2"),
    ("allow:ALL:ALL: ", "empty field 4"),
    ("allow:ALL:ALL:ALL:550 x:junk", "junk after the message field"),
    ("permit:ALL:ALL:ALL", "unknown action 'permit'"),
    ("ALLOW:ALL:ALL:ALL", "unknown action 'ALLOW'"),
    ("allow:ALL:/(/:ALL", "bad regex /(/"),
    ("allow:10/8:ALL:ALL", "bad IPv4 address or prefix '10/8'"),
    ("allow:10.1.2:ALL:ALL", "bad IPv4 address or prefix '10.1.2'"),
    ("allow:10.0.0.0/33:ALL:ALL", "bad IPv4 address or prefix"),
    ("allow:300.0.0.1:ALL:ALL", "bad IPv4 address or prefix"),
    ("allow:10.0.0.0/x:ALL:ALL", "bad IPv4 address or prefix"),
    ("allow:[2001:db8::]/129:ALL:ALL", "bad IPv6 address or prefix"),
    ("allow:[2001:zz8::]:ALL:ALL", "an IPv6 token is [address]"),
    ("allow:[2001:db8::1:ALL:ALL", "an IPv6 token is [address]"),
    ("noto:ALL:ALL:ALL:250 fine", "must start with a 4xx or 5xx code"),
    ("noto:ALL:ALL:ALL:55 short", "must start with a 4xx or 5xx code"),
    ("noto:ALL:ALL:ALL:550no space", "must start with a 4xx or 5xx code"),
    ("noto:ALL:ALL:ALL:550 %x", "unknown escape '%x'"),
    ("allow:TRUSTED:ALL:ALL", "TRUSTED is not supported"),
    ("allow:UNTRUSTED:ALL:ALL", "UNTRUSTED is not supported"),
    ("allow:EXCEPT 10.0.0.1:ALL:ALL", "starts with EXCEPT"),
    ("allow:ALL EXCEPT:ALL:ALL", "EXCEPT with nothing after it"),
    ("allow:RBL.:ALL:ALL", "RBL token 'RBL.' has no zone"),
    ("allow:ALL:ALL:ALL\0", "NUL byte"),
])
def test_validation_error_messages(line, message):
    with pytest.raises(engine.RuleError) as e:
        engine.parse("# first\n" + line + "\n", "/etc/rules")
    (problem,) = e.value.problems
    assert problem.startswith("/etc/rules:2: ")
    assert message in problem


def test_every_problem_is_reported_not_just_the_first():
    with pytest.raises(engine.RuleError) as e:
        engine.parse("bogus\nallow:ALL:ALL:ALL\nnoto:10/8:ALL:ALL\n")
    assert [p.split(":")[1] for p in e.value.problems] == ["1", "3"]


def test_tolerated_forms():
    rules, _ = engine.parse("  \t \r\n#c\r\nallow:ALL:ALL:ALL\r\n   # indented comment\n"
                                "noto:ALL:ALL:*@x:550 y")
    assert len(rules) == 2 and rules[1].template == "550 y"


def test_reply_is_capped_at_510_bytes_plus_crlf():
    rules, _ = engine.parse("noto:ALL:ALL:ALL:550 %T%T%T\n")
    long_rcpt = "<" + "a" * 250 + "@x>"
    v = engine.evaluate(rules, Client("192.0.2.1"), F, long_rcpt)
    assert len(v.reply) == 510     # 512 octets with CR LF (RFC 5321)


def test_rules_file_reload_on_change_and_451_when_broken(tmp_path):
    path = tmp_path / "rules"
    path.write_text("allow:ALL:ALL:ALL\n")
    rf = engine.RulesFile(str(path))
    assert rf.get()[0].action == "allow"
    path.write_text("deny:ALL:ALL:ALL\n")
    assert rf.get()[0].action == "deny"
    path.write_text("deny:ALL:ALL:ALL\nbroken\n")
    with pytest.raises(engine.RuleError) as e:
        rf.get()
    assert str(e.value).startswith(str(path) + ":2: bad field count")
    with pytest.raises(engine.RuleError):      # still broken: never the old rules
        rf.get()
    path.write_text("noto:ALL:ALL:ALL\n")
    assert rf.get()[0].action == "noto"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parsing_arbitrary_bytes_raises_only_rule_error(data):
    try:
        rules, warnings = engine.parse(data)
    except engine.RuleError as e:
        assert e.problems and all(p.startswith("rules:") for p in e.problems)
        return
    for r in rules:
        assert r.action in engine.ACTIONS


TOKENS = st.sampled_from(["ALL", "KNOWN", "UNKNOWN", "*.example.org", "192.0.2.0/24",
                          "/^a/", "*@*", "EXCEPT", "a*@my.domain", "[2001:db8::]/32",
                          "192.0.2.*", "bob@*"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["allow", "noto", "deny", "debug"]),
                          st.lists(TOKENS, min_size=1, max_size=3),
                          st.lists(TOKENS, min_size=1, max_size=3)), min_size=1, max_size=5),
       st.sampled_from(["192.0.2.10", "2001:db8::5", "10.0.0.1"]),
       st.sampled_from(["<bob@my.domain>", "<a@x.example.org>", "<>"]))
def test_matching_is_deterministic(lines, ip, rcpt):
    text = "".join("%s:%s:ALL:%s\n" % (a, " ".join(s), " ".join(t)) for a, s, t in lines)
    try:
        rules, _ = engine.parse(text)
    except engine.RuleError:
        return
    c1 = Client(ip, "mail.example.org")
    c2 = Client(ip, "mail.example.org")
    v1 = engine.evaluate(rules, c1, F, rcpt)
    v2 = engine.evaluate(rules, c2, F, rcpt)
    assert (v1.action, v1.reply, v1.rule) == (v2.action, v2.reply, v2.rule)


# ----------------------------------------------------------------- CLI ----

def cli(*args, env=None):
    p = subprocess.run([PYTHON, os.path.join(ROOT, "checkrules.py")] + list(args),
                       capture_output=True, text=True, env=env, timeout=30)
    return p.returncode, p.stdout.splitlines(), p.stderr


@pytest.fixture
def rulefile(tmp_path):
    p = tmp_path / "smtpd_check_rules"
    p.write_text("# site rules\n"
                 "allow:192.0.2.0/24:ALL:ALL\n"
                 "deny:UNKNOWN:ALL:*@secret.example:550 go away %I\n"
                 "noto:ALL:ALL:ALL:551 no relay to %T\n")
    return str(p)


def test_cli_allow_noto_deny_and_exit_codes(rulefile):
    assert cli("-v", "-f", rulefile, "-a", "192.0.2.10", "-n", "a.example", F, T) == \
        (0, ["allow", rulefile + ":2: allow:192.0.2.0/24:ALL:ALL"], "")
    assert cli("-f", rulefile, "-a", "203.0.113.5", "-n", "UNKNOWN", F, "<x@secret.example>") == \
        (2, ["deny 550 go away 203.0.113.5"], "")
    assert cli("-v", "-f", rulefile, "-a", "203.0.113.5", "-n", "b.example", F, "bob@x") == \
        (1, ["noto 551 no relay to bob@x",
             rulefile + ":4: noto:ALL:ALL:ALL:551 no relay to %T"], "")


def test_cli_default_when_nothing_matches(tmp_path):
    p = tmp_path / "r"
    p.write_text("deny:10.0.0.0/8:ALL:ALL\n")
    assert cli("-v", "-f", str(p), "-n", "UNKNOWN", "<>", T) == (0, ["allow", "default"], "")


def test_cli_name_from_dns_without_n(rulefile, dnsz):
    env = dict(os.environ, SMTPD_NAMESERVER=dnsz.spec)
    dnsz.add("5.113.0.203.in-addr.arpa", "PTR", "known.example.")
    dnsz.add("known.example", "A", "203.0.113.5")
    code, out, _ = cli("-f", rulefile, "-a", "203.0.113.5", F, "<x@secret.example>", env=env)
    assert (code, out) == (1, ["noto 551 no relay to <x@secret.example>"])
    dnsz.fail("5.113.0.203.in-addr.arpa", "SERVFAIL")
    code, out, _ = cli("-f", rulefile, "-a", "203.0.113.5", F, "<x@secret.example>", env=env)
    assert code == 75 and out[0].startswith("tempfail 451 ")


def test_cli_t_validates(rulefile, tmp_path):
    assert cli("-t", "-f", rulefile) == (0, ["%s: 3 rules, no errors" % rulefile], "")
    bad = tmp_path / "bad"
    bad.write_text("allow:*my.domain:ALL:ALL\nallow:10/8:ALL:ALL\nnope\n")
    code, out, _ = cli("-t", "-f", str(bad))
    assert code == 78
    assert out[0].startswith(str(bad) + ":1: warning: '*my.domain'")
    assert out[1].startswith(str(bad) + ":2: bad IPv4")
    assert out[2].startswith(str(bad) + ":3: bad field count")
    ok = tmp_path / "warn"
    ok.write_text("allow:*my.domain:ALL:ALL\n")
    code, out, _ = cli("-t", "-f", str(ok))
    assert code == 0 and out == [str(ok) + ":1: warning: '*my.domain' has no dot "
                                 "boundary: it also matches xmy.domain",
                                 str(ok) + ": 1 rule, no errors, 1 warning"]


def test_cli_prints_the_action_as_written(tmp_path):
    p = tmp_path / "r"
    p.write_text("noto_delay:ALL:ALL:slow@x:551 wait\ndeny_delay:ALL:ALL:bad@x:550 no\n")
    assert cli("-f", str(p), "-n", "UNKNOWN", F, "<slow@x>")[:2] == \
        (1, ["noto_delay 551 wait"])
    assert cli("-f", str(p), "-n", "UNKNOWN", F, "<bad@x>")[:2] == (2, ["deny_delay 550 no"])


def test_cli_usage_and_bad_file(rulefile, tmp_path):
    assert cli("-f", rulefile, F)[0] == 64
    assert cli("-x")[0] == 64
    assert cli("-f", rulefile, "-a", "not-an-ip", F, T)[0] == 64
    assert cli("-f", str(tmp_path / "missing"), F, T)[0] == 78


# -- the tester says what smtpd would do (issue 13, item 5) --

@pytest.mark.parametrize("sender,rcpt,reply,which", [
    ("<a@example.org>", "<-oQ@localhost>", "553 Address may not start with '-'", "RCPT TO"),
    ("<a@example.org>", "<a,b@localhost>", "553 Unquoted ',' in address not allowed", "RCPT TO"),
    ("<-f@example.org>", "<bob@localhost>", "553 Address may not start with '-'", "MAIL FROM"),
    ("<a@example.org>", "<>", "553 Null address not allowed here", "RCPT TO"),
    ("<a@example.org>", "<bob@localhost> NOTIFY=NEVER", "555 ", "RCPT TO"),
])
def test_tester_reports_what_smtpd_refuses_before_the_rules(tmp_path, sender, rcpt, reply, which):
    rules = tmp_path / "rules"
    rules.write_text("allow:ALL:ALL:ALL\n")
    status, out, err = cli("-v", "-f", str(rules), "-n", "UNKNOWN", sender, rcpt)
    assert status == 3 and out[0].startswith("refused " + reply), (out, err)
    assert out[1] == "smtpd refuses this %s address before any rule" % which


def test_tester_sees_the_address_as_smtpd_stores_it(tmp_path):
    rules = tmp_path / "rules"
    rules.write_text("noto:ALL:ALL:bob@my.domain:550 no bob\nallow:ALL:ALL:ALL\n")
    status, out, _ = cli("-f", str(rules), "-n", "UNKNOWN", "<a@b.example>",
                         "<@relay.example:bob@my.domain>")
    assert (status, out) == (1, ["noto 550 no bob"])


def test_tester_takes_utf8_addresses_and_both_forms_of_a_domain(tmp_path):
    """As smtpd with SMTPUTF8 (issue 38): a UTF-8 address is tested as a
    client that said SMTPUTF8 sends it; exämple.org is xn--exmple-cua.org."""
    rules = tmp_path / "rules"
    rules.write_text("noto:ALL:ALL:*@exämple.org:550 umlaut\nallow:ALL:ALL:ALL\n")
    for rcpt in ("<jörg@exämple.org>", "<jorg@xn--exmple-cua.org>", "<jörg@EXÄMPLE.org>"):
        status, out, err = cli("-f", str(rules), "-n", "UNKNOWN", "<a@b.example>", rcpt)
        assert (status, out) == (1, ["noto 550 umlaut"]), (rcpt, out, err)
    status, out, _ = cli("-f", str(rules), "-n", "UNKNOWN", "<a@b.example>", "<jörg@my.domain>")
    assert (status, out) == (0, ["allow"])
    status, out, _ = cli("-v", "-f", str(rules), "-n", "UNKNOWN", "<a@b.example>",
                         "<a@ex..ämple.org>")
    assert status == 3 and out[0].startswith("refused 501 Bad domain")


def test_tester_prints_every_error_and_every_warning(tmp_path):
    rules = tmp_path / "rules"
    rules.write_text("allow:ALL:ALL:*my.domain\nallow:10/8:ALL:ALL\nallow:all:ALL:ALL\n"
                     "deny::ALL:ALL\n")
    for args in (["-t"], ["<a@b.example>", "<c@d.example>"]):
        status, out, _ = cli("-f", str(rules), *args)
        assert status == 78
        assert [line.split(": ", 1)[0] for line in out] == [
            "%s:%d" % (rules, n) for n in (1, 2, 3, 4)], out
        assert "warning: '*my.domain' has no dot boundary" in out[0]
        assert "bad IPv4 address" in out[1] and "warning: lower-case 'all'" in out[2]


# (issue 21, item 4) - DNS lists: an error code is never a listing --

def test_an_rbl_error_answer_gets_451_not_the_deny(smtpd, dnsz):
    dnsz.add("1.0.0.127.rbl.example", "A", "127.255.255.254")
    srv = smtpd("deny:RBL.rbl.example:ALL:ALL:554 listed\nallow:ALL:ALL:ALL\n", "-H")
    c = srv.connect()
    assert c.code() == 220
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    code, text = c.cmd("RCPT TO:<b@my.domain>")
    assert code == 451 and "listed" not in text[0]
    assert c.cmd("QUIT")[0] == 221
    assert wait_for(lambda: "127.255.255.254 is an error code of the list" in srv.log())




# -- what root prints or reads of the jail's rules file --

def checkrules(tree, *args):
    import subprocess
    from harness import PYTHON
    import os
    p = subprocess.run([PYTHON, os.path.join(tree, "checkrules.py")] + list(args),
                       capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "SMTPD_NAMESERVER": "127.0.0.1@9"})
    return p.returncode, p.stdout, p.stderr


def test_rule_errors_reach_the_terminal_with_controls_visible(tree_factory, tmp_path):
    path = tmp_path / "rules"
    path.write_bytes(b"noto:/(\x1b]0;pwned\x07/:ALL:ALL\n"
                     b"noto:ALL:ALL:ALL:550 ok\x1b[2J\n")
    status, out, _ = checkrules(tree_factory(), "-t", "-f", str(path))
    assert status == 78
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;pwned\\x07" in out
    assert "control character in reply" in out      # a reply may carry none


def test_a_reply_template_with_a_line_break_is_refused():
    from smtpgate.rules import ruleset as cr
    import pytest
    with pytest.raises(cr.RuleError):
        cr.parse("noto:ALL:ALL:ALL:550 x\r250 forged\n")


def test_as_root_checkrules_reads_the_jails_rules_as_the_jails_owner(tree_factory, tmp_path):
    import os
    import pytest
    from harness import is_root, make_jail
    if not is_root:
        pytest.skip("needs root")
    jail = make_jail()
    secret = tmp_path / "secret"                    # root's alone
    secret.write_text("root:$6$hash:19000:0:99999:7:::\n")
    os.chmod(str(secret), 0o600)
    rules = os.path.join(jail, "etc", "smtpd_check_rules")
    os.unlink(rules)
    os.symlink(str(secret), rules)                  # what a compromised worker can do
    tree = tree_factory(SPOOLDIR=jail)
    status, out, err = checkrules(tree, "-t")
    assert status == 78 and "Permission denied" in out
    assert "root" not in out.replace(jail, "").replace(tree, "")
    status, out, _ = checkrules(tree, "-t", "-f", str(secret))   # a root file elsewhere
    assert status == 78 and "unknown action 'root'" in out
