"""smtpd.py in inetd mode over real TCP on loopback (issue 4).

Spec Appendix A vectors are named P1..P28; rows marked CHANGED follow
design.md where it deliberately differs from the original."""

import os
import re
import smtplib
import socket
import stat
import time

import pytest

from harness import ROOT, spool_files

GREETING = (220, ["mx.my.domain Sendmail 4.1/SMI-4.1 ready."])
F, T = "<alice@example.org>", "<bob@my.domain>"


def start(smtpd, rules="allow:ALL:ALL:ALL\n", *flags, **kw):
    srv = smtpd(rules, *flags, **kw)
    c = srv.connect()
    assert c.reply() == GREETING
    return srv, c


def helo(c, name="mailhost"):
    assert c.cmd("HELO " + name)[0] == 250


def envelope(c, f=F, *rcpts):
    assert c.cmd("MAIL FROM:" + f)[0] == 250
    for r in rcpts or (T,):
        assert c.cmd("RCPT TO:" + r)[0] == 250


def read(srv, name):
    return open(os.path.join(srv.jail, name), "rb").read()


# ------------------------------------------------------------ Appendix A ----

def test_p1_p3_p25_greeting_helo_quit(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    assert c.cmd("HELO mailhost") == (250, ["mx.my.domain pleased to meet you, mailhost"])
    assert c.cmd("QUIT") == (221, ["Closing connection"])
    assert c.closed()
    assert srv.last_status() == 0


def test_p2_ehlo_is_answered_changed(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", "-s", "1000000")
    assert c.cmd("EHLO x") == (250, ["mx.my.domain pleased to meet you, x",
                                     "PIPELINING", "8BITMIME", "SIZE 1000000",
                                     "ENHANCEDSTATUSCODES", "DSN", "SMTPUTF8", "CHUNKING"])


def test_p4_helo_without_argument(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    assert c.cmd("HELO") == (250, ["mx.my.domain pleased to meet you, "])


def test_p5_p8_p9_p12_out_of_sequence_is_503_changed(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    assert c.cmd("MAIL FROM:<a@b>") == (503, ["Bad sequence of commands"])
    helo(c)
    assert c.cmd("RCPT TO:<bob@my.domain>")[0] == 503
    assert c.cmd("DATA")[0] == 503
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("MAIL FROM:<x@y>")[0] == 503
    assert c.cmd("DATA")[0] == 503
    assert c.cmd("RCPT TO:<bob@my.domain>")[0] == 250
    assert c.cmd("DATA")[0] == 354


def test_p6_p7_mail_parameters_and_blanks(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    helo(c)
    assert c.cmd("MAIL FROM:<alice@example.org> SIZE=100")[0] == 501
    assert c.cmd("mail from: <alice@example.org>  ") == \
        (250, ["sender is <alice@example.org>, sender OK"])


def test_mail_parameters_after_ehlo(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", "-s", "1000")
    assert c.cmd("EHLO x")[0] == 250
    assert c.cmd("MAIL FROM:<a@b.example> SIZE=1001")[0] == 552
    assert c.cmd("MAIL FROM:<a@b.example> SIZE=999 BODY=8BITMIME")[0] == 250
    assert c.cmd("RSET")[0] == 250
    assert c.cmd("MAIL FROM:<a@b.example> AUTH=<>")[0] == 555
    assert c.cmd("MAIL FROM:<a@b.example> BODY=BINARYMIME")[0] == 555


def test_p10_p11_rcpt_syntax(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    helo(c)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO <bob@my.domain>")[0] == 501
    assert c.cmd("RCPT TO:<bob@my.domain>") == (250, ["recipient <bob@my.domain>, recipient OK"])
    assert c.cmd("RCPT TO:")[0] == 501
    assert c.cmd("RCPT TO:<>")[0] == 553


def test_p13_second_helo_resets_the_transaction(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    helo(c)
    envelope(c)
    assert c.cmd("HELO again")[0] == 503
    assert c.cmd("DATA")[0] == 503
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250


def test_p14_to_p16_other_verbs_changed(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    assert c.cmd("VRFY bob") == (252, ["Can not VRFY user"])
    assert c.cmd("EXPN list")[0] == 502
    assert c.cmd("HELP")[0] == 214
    assert c.cmd("NOOP") == (250, ["OK"])
    for verb in ("NOOPX", "RSETTING", "WIZ", "DEBUG", "HI", "TURN", "STARTTLS"):
        assert c.cmd(verb) == (500, ["Syntax Error, command unrecognized"]), verb


def test_p17_full_transaction_spool_is_byte_exact(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    helo(c)
    envelope(c)
    assert c.cmd("DATA") == (354, ["OK End with <CRLF>.<CRLF>"])
    c.send("Subject: t\r\n\r\n..dot\r\n.\r\n")
    assert c.reply() == (250, ["Message accepted for delivery"])
    (name,) = spool_files(srv.jail)
    data = read(srv, name)
    m = re.match(rb"FROM <alice@example.org>\nRCPT <bob@my.domain>\nBODY\n"
                 rb"Received: from mailhost \(unknown \[127.0.0.1\]\)\n"
                 rb"\tby mx.my.domain \(smtpd\) with SMTP id (smtpd\w{6});\n"
                 rb"\t(\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4})\n"
                 rb"Subject: t\n\n.dot\n\Z", data)
    assert m and m.group(1).decode() == name
    assert stat.S_IMODE(os.stat(os.path.join(srv.jail, name)).st_mode) == 0o750


def test_p18_bare_lf_end_of_data_is_not_the_end_changed(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    helo(c)
    envelope(c)
    assert c.cmd("DATA")[0] == 354
    c.send("x\n.\n")
    c.send("more\r\n.\r\n")
    assert c.reply()[0] == 550
    assert spool_files(srv.jail) == []
    assert c.cmd("NOOP")[0] == 250


@pytest.mark.parametrize("body,what,line", [
    ("Subject: lf\nfrom curl\n", "bare LF", 1),
    ("Subject: ok\r\n\r\nfine\r\nbad\rline\r\n", "bare CR", 4),
    ("Subject: ok\r\n\r\nnul\0here\r\n", "NUL", 3)])
def test_a_bare_line_end_is_named_with_its_line(smtpd, body, what, line):
    """Issue 35, item 8: the refusal stays (smuggling), but says what to
    fix, where, with an enhanced code; the log says it too."""
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    helo(c)
    envelope(c)
    assert c.cmd("DATA")[0] == 354
    c.send(body + (".\r\n" if body.endswith("\r\n") else "\r\n.\r\n"))   # as curl ends
    assert c.reply() == (550, ["5.5.2 Message refused: %s in line %d; every line must end "
                               "with CR LF, and no NUL (RFC 5321 2.3.8)" % (what, line)])
    assert spool_files(srv.jail) == []
    assert c.cmd("QUIT")[0] == 221
    assert "refused: %s in line %d" % (what, line) in srv.log()


def test_p19_oversize_message_drained_before_552_changed(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", "-s", "10")
    helo(c)
    envelope(c)
    assert c.cmd("DATA")[0] == 354
    c.send("0123456789\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\n.\r\n")
    assert c.reply() == (552, ["Requested mail action aborted: exceeded storage allocation"])
    assert c.cmd("RCPT TO:<v@y>")[0] == 503          # no injected MAIL
    assert spool_files(srv.jail) == []
    envelope(c)
    assert c.cmd("DATA")[0] == 354
    c.send("0123456789.r\r\n.\r\n")                  # 13 bytes stored
    assert c.reply()[0] == 552
    envelope(c)
    assert c.cmd("DATA")[0] == 354
    c.send("12345678\r\n.\r\n")                      # 9 bytes: fits
    assert c.reply()[0] == 250


def test_p20_option_like_recipient_refused_changed(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    helo(c)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:-oQ/tmp")[0] == 553
    assert c.cmd("RCPT TO:<-oQ/tmp@x>")[0] == 553


def test_p20_paranoid_closes_on_a_refused_address(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", "-P")
    helo(c)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:-oQ/tmp")[0] == 421
    assert c.closed()
    assert srv.last_status() == 76


def test_p21_p22_headers_stored_8bit_clean_changed(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    helo(c)
    envelope(c)
    assert c.cmd("DATA")[0] == 354
    long = "X-Long: " + "y" * 292
    c.send(b"X-Bin: \x01z\xe9\r\n" + long.encode() + b"\r\n\r\nbody\r\n.\r\n")
    assert c.reply()[0] == 250
    (name,) = spool_files(srv.jail)
    assert read(srv, name).endswith(b"X-Bin: \x01z\xe9\n" + long.encode() + b"\n\nbody\n")


def test_p21_paranoid_refuses_unprintable_header(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", "-P")
    helo(c)
    envelope(c)
    assert c.cmd("DATA")[0] == 354
    c.send(b"X-Bin: \x01z\r\n\r\nbody\r\n.\r\n")
    assert c.reply()[0] == 421
    assert srv.last_status() == 76
    assert spool_files(srv.jail) == []


def test_p23_idle_client_gets_421(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", READ_TIMEOUT=1)
    t0 = time.time()
    assert c.reply() == (421, ["Service not available, closing transmission channel"])
    assert 0.9 < time.time() - t0 < 5
    assert srv.last_status() == 71
    assert "read timeout (1 seconds)" in srv.log()


def test_session_timeout_bounds_a_slow_client(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", READ_TIMEOUT=2, SESSION_TIMEOUT=3)
    t0 = time.time()
    code = None
    while time.time() - t0 < 10:
        c.send("NOOP\r\n")
        code = c.code()
        if code == 421:
            break
        time.sleep(0.5)
    assert code == 421 and time.time() - t0 < 5
    assert srv.last_status() == 71


def test_p24_client_vanishes_mid_data_leaves_nothing(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    helo(c)
    envelope(c)
    assert c.cmd("DATA")[0] == 354
    c.send("Subject: half\r\n")
    c.close()
    assert srv.last_status() == 71
    assert os.listdir(srv.jail) == ["etc"]


def test_p26_listen_address_refusal_and_loopback_fixed(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", "-l", "127.0.0.1")
    assert c.cmd("QUIT")[0] == 221
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H", "-l", "127.0.0.2")
    c = srv.connect()
    assert c.reply() == (521, ["mx.my.domain Doesn't talk SMTP, Sorry"])
    assert srv.last_status() == 0


def test_p27_overlong_command_gets_500_changed(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    assert c.cmd("HELO " + "a" * 1300) == (500, ["Line too long"])
    helo(c)


@pytest.mark.parametrize("length,code", [(511, 250), (512, 250), (513, 500)])
def test_command_line_limit_512_octets(smtpd, length, code):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    line = "NOOP " + "x" * (length - 7)
    assert len(line) + 2 == length
    assert c.cmd(line)[0] == code
    assert c.cmd("NOOP")[0] == 250


def test_p28_deny_replies_then_421_and_closes(smtpd):
    srv, c = start(smtpd, "deny:ALL:ALL:ALL\n", "-H")
    helo(c)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<bob@my.domain>") == (550, [
        "Mail from <alice@example.org> to <bob@my.domain> prohibited from your "
        "location (UNKNOWN@UNKNOWN ip=127.0.0.1)"])
    assert c.reply() == (421, ["Service not available, closing transmission channel"])
    assert c.closed()
    assert srv.last_status() == 76
    assert spool_files(srv.jail) == []


# --------------------------------------------------------------- framing ----

@pytest.mark.parametrize("bad", [b"NOOP\nNOOP\r\n", b"NO\rOP\r\n", b"NOOP\x00\r\n"])
def test_bare_lf_cr_nul_in_command_is_500_and_dropped(smtpd, bad):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    c.send(bad)
    assert c.reply() == (500, ["Bare CR or LF or NUL in command"])
    assert c.cmd("HELP")[0] == 214       # the next reply is HELP's: one line refused


def test_ten_errors_close_the_session(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    for _ in range(9):
        assert c.cmd("BOGUS")[0] == 500
    assert c.cmd("BOGUS")[0] == 500
    assert c.reply()[0] == 421
    assert c.closed()
    assert srv.last_status() == 76


def test_whole_transaction_in_two_writes(smtpd):
    """As much as RFC 2920 lets a client pipeline: the envelope up to DATA,
    then the text with QUIT behind it (test_pipelining.py has the rest)."""
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    assert c.cmd("EHLO x")[0] == 250
    c.send("MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
           "RCPT TO:<e@f.example>\r\nDATA\r\n")
    assert [c.code() for _ in range(4)] == [250, 250, 250, 354]
    c.send("Subject: p\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    assert [c.code() for _ in range(2)] == [250, 221]
    (name,) = spool_files(srv.jail)
    assert read(srv, name).startswith(b"FROM <a@b.example>\nRCPT <c@d.example>\n"
                                      b"RCPT <e@f.example>\nBODY\n")
    assert srv.last_status() == 0


SMUGGLE = ("MAIL FROM:<spoof@x.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\n"
           "Subject: smuggled\r\n\r\nevil\r\n.\r\n")


@pytest.mark.parametrize("ending", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n",
                                    b"\r\n.\r\r\n"])
def test_smuggling_attempt_is_refused_and_nothing_spooled(smtpd, ending):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    helo(c)
    envelope(c)
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: carrier\r\n\r\nbody" + ending + SMUGGLE.encode())
    assert c.reply()[0] == 550
    assert spool_files(srv.jail) == []
    assert c.cmd("RCPT TO:<victim@y.example>")[0] == 503
    assert c.cmd("QUIT")[0] == 221


# ------------------------------------------------------------- addresses ----

@pytest.mark.parametrize("local_len,code", [(64, 250), (65, 553)])
def test_local_part_limit(smtpd, local_len, code):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    helo(c)
    envelope(c)
    assert c.cmd("RCPT TO:<%s@my.domain>" % ("l" * local_len))[0] == code


@pytest.mark.parametrize("path_len,code", [(256, 250), (257, 553)])
def test_path_limit(smtpd, path_len, code):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    helo(c)
    envelope(c)
    domain = "d" * 63 + "." + "e" * 63 + "." + "f" * 63 + "."    # labels <= 63
    domain += "g" * (path_len - 2 - 3 - len(domain))
    path = "<ab@%s>" % domain
    assert len(path) == path_len
    assert c.cmd("RCPT TO:" + path)[0] == code


@pytest.mark.parametrize("addr,code", [
    ("<a@b.example>,xmy.domain", 501), ("<a,b@c.example>", 553),
    ('<"a,b"@c.example>', 250), ('<"john doe"@my.domain>', 250),
    ("<@relay.example:bob@my.domain>", 250), ("<a@b", 501), ('<"a@b>', 501),
    ("bob@my.domain", 250), ("<a@b.example> NOTIFY=NEVER", 555),
    ("<a\x01b@c.example>", 501), ("<a\xe9@c.example>", 553), ("<-x@c.example>", 553),
])
def test_address_parser(smtpd, addr, code):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    helo(c)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:" + addr)[0] == code


def test_source_route_is_dropped(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    helo(c)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<@relay.example:bob@my.domain>") == \
        (250, ["recipient <bob@my.domain>, recipient OK"])


def test_max_rcpt_plus_one_gets_452(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", MAX_RCPT=3)
    helo(c)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    for i in range(3):
        assert c.cmd("RCPT TO:<r%d@my.domain>" % i)[0] == 250
    assert c.cmd("RCPT TO:<r9@my.domain>")[0] == 452


def test_nul_in_body_is_refused(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    helo(c)
    envelope(c)
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: x\r\n\r\na\x00b\r\n.\r\n")
    assert c.reply()[0] == 550
    assert spool_files(srv.jail) == []


def test_large_message_with_long_lines_round_trips(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    helo(c)
    envelope(c)
    assert c.cmd("DATA")[0] == 354
    body = b"".join(b".line %d " % i + b"z" * (i % 300) + b"\r\n" for i in range(5000))
    body += b"x" * 200000 + b"\r\n"
    c.send(body + b".\r\n")
    assert c.reply()[0] == 250
    (name,) = spool_files(srv.jail)
    stored = read(srv, name).split(b"\n", 6)[6]
    expect = body.replace(b"\r\n", b"\n").replace(b"\n.", b"\n")[1:]
    assert stored == expect


# ----------------------------------------------------------------- rules ----

def test_rules_noto_continues_and_known_by_fcrdns(smtpd, dnsz):
    dnsz.add("1.0.0.127.in-addr.arpa", "PTR", "me.example.")
    dnsz.add("me.example", "A", "127.0.0.1")
    dnsz.add("20.0.0.127.in-addr.arpa", "PTR", "liar.example.")
    dnsz.add("liar.example", "A", "192.0.2.1")
    rules = "noto:UNKNOWN:ALL:ALL:550 unknown %H %I\nallow:KNOWN:ALL:ALL\n"
    srv, c = start(smtpd, rules)
    helo(c, "me.example")
    envelope(c)
    assert c.cmd("QUIT")[0] == 221
    c = srv.connect("127.0.0.20")
    assert c.reply() == GREETING
    helo(c)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<bob@my.domain>") == (550, ["unknown UNKNOWN 127.0.0.20"])
    assert c.cmd("RCPT TO:<carol@my.domain>")[0] == 550
    assert c.cmd("DATA")[0] == 503
    assert c.cmd("QUIT")[0] == 221
    assert "does not resolve back" in srv.log()


def test_received_header_has_confirmed_name(smtpd, dnsz):
    dnsz.add("1.0.0.127.in-addr.arpa", "PTR", "me.example.")
    dnsz.add("me.example", "A", "127.0.0.1")
    srv, c = start(smtpd)
    helo(c, "claimed.example")
    envelope(c)
    assert c.cmd("DATA")[0] == 354
    c.send("x\r\n.\r\n")
    assert c.reply()[0] == 250
    (name,) = spool_files(srv.jail)
    assert b"Received: from claimed.example (me.example [127.0.0.1])\n" in read(srv, name)


def test_noto_delay_is_slept(smtpd):
    rules = "noto_delay:ALL:ALL:*@spam.example:551 no\nallow:ALL:ALL:ALL\n"
    srv, c = start(smtpd, rules, "-H", NOTO_DELAY=2)
    helo(c)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    t0 = time.time()
    assert c.cmd("RCPT TO:<a@spam.example>") == (551, ["no"])
    assert 1.9 < time.time() - t0 < 5
    assert c.cmd("RCPT TO:<bob@my.domain>")[0] == 250


def test_broken_rules_file_gives_451(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\nthis is broken\n", "-H")
    helo(c)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    code, text = c.cmd("RCPT TO:<bob@my.domain>")
    assert code == 451
    assert "etc/smtpd_check_rules:2: bad field count" in srv.log() or \
        "/etc/smtpd_check_rules:2: bad field count" in srv.log()


def test_lookup_failure_gives_451(smtpd, dnsz):
    dnsz.fail("1.0.0.127.in-addr.arpa", "SERVFAIL")
    srv, c = start(smtpd, "deny:UNKNOWN:ALL:ALL\nallow:ALL:ALL:ALL\n")
    helo(c)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<bob@my.domain>")[0] == 451
    assert c.cmd("QUIT")[0] == 221


def test_dash_H_skips_dns(smtpd, dnsz):
    srv, c = start(smtpd, "allow:KNOWN:ALL:ALL\nallow:127.0.0.0/8:ALL:ALL\n", "-H")
    helo(c)
    envelope(c)
    assert dnsz.queries == []


def test_ident_user_in_rules(smtpd, ident_server):
    ident_server("127.0.0.30", "JOE")
    rules = ("allow:joe@ALL:USER@example.org:ALL\n"
             "noto:ALL:ALL:ALL:550 %U not allowed\n")
    srv = smtpd(rules, "-H")
    c = srv.connect("127.0.0.30")
    assert c.reply() == GREETING
    helo(c)
    assert c.cmd("MAIL FROM:<joe@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<bob@my.domain>")[0] == 250
    c2 = srv.connect("127.0.0.31")
    assert c2.reply() == GREETING
    helo(c2)
    assert c2.cmd("MAIL FROM:<joe@example.org>")[0] == 250
    assert c2.cmd("RCPT TO:<bob@my.domain>") == (550, ["UNKNOWN not allowed"])


def test_smtplib_sends_to_several_recipients(smtpd):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H")
    with smtplib.SMTP(srv.addr, srv.port, timeout=30) as s:
        refused = s.sendmail("alice@example.org", ["bob@my.domain", "carol@my.domain"],
                             b"Subject: hello\r\n\r\nHi.\r\n.leading dot\r\n")
        assert refused == {}
    (name,) = spool_files(srv.jail)
    data = read(srv, name)
    assert data.startswith(b"FROM <alice@example.org>\nRCPT <bob@my.domain>\n"
                           b"RCPT <carol@my.domain>\nBODY\nReceived: from ")
    assert data.endswith(b"Subject: hello\n\nHi.\n.leading dot\n")


def test_several_messages_per_session(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    helo(c)
    for i in range(3):
        envelope(c)
        assert c.cmd("DATA")[0] == 354
        c.send("Subject: %d\r\n\r\n.\r\n" % i)
        assert c.reply()[0] == 250
    assert len(spool_files(srv.jail)) == 3


def test_quiet_mode_logs_one_summary_line(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", "-q")
    helo(c)
    envelope(c)
    assert c.cmd("DATA")[0] == 354
    c.send("x\r\n.\r\n")
    assert c.reply()[0] == 250
    assert c.cmd("QUIT")[0] == 221
    lines = [l for l in srv.log().splitlines() if "relay=" in l]
    assert len(lines) == 1
    assert re.search(r'relay=UNKNOWN/127.0.0.1 as "mailhost" from=<alice@example.org> '
                     r'to=<bob@my.domain> bytes=2 id=smtpd\w{6} message-id=-$', lines[0])


# --------------------------------------------------------------- options ----

@pytest.mark.parametrize("args,status", [
    (["-c", "relative"], 64), (["-d", "spool"], 64), (["-s", "-1"], 64),
    (["-s", "x"], 64), (["-x"], 64), (["-l", "999.1.1.1"], 64), (["-p", "70000"], 64),
])
def test_bad_options_exit_64(tree_factory, args, status):
    import subprocess
    from harness import PYTHON
    tree = tree_factory()
    p = subprocess.run([PYTHON, os.path.join(tree, "smtpd.py")] + args,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    assert p.returncode == status
    assert b"usage: smtpd.py" in p.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.parametrize("args", [["-u", "root"], ["-u", "0"], ["-g", "0"], ["-g", "root"]])
def test_root_identity_refused_78(tree_factory, args):
    import subprocess
    from harness import PYTHON
    tree = tree_factory()
    p = subprocess.run([PYTHON, os.path.join(tree, "smtpd.py"), "-u", "nobody",
                        "-g", "nogroup"] + args, stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=30)
    assert p.returncode == 78, p.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_non_root_start_runs_without_jail_under_c(tmp_path_factory, dnsz):
    """As a normal user: no chroot, paths under -c, one warning."""
    import subprocess
    from harness import Inetd, make_jail, nobody_tree, TEST_CONSTANTS
    tree, env, as_nobody = nobody_tree(**TEST_CONSTANTS)
    probed = subprocess.run(as_nobody + ["-c", "import dns.resolver, daemon"], env=env,
                            capture_output=True)
    assert probed.returncode == 0, probed.stderr
    jail = make_jail()
    srv = Inetd(as_nobody + [os.path.join(tree, "smtpd.py"), "-c", jail, "-H",
                             "-m", "mx.my.domain"], env=env)
    try:
        c = srv.connect()
        assert c.reply() == GREETING
        helo(c)
        envelope(c)
        assert c.cmd("DATA")[0] == 354
        c.send("x\r\n.\r\n")
        assert c.reply()[0] == 250
        assert c.cmd("QUIT")[0] == 221
        assert len(spool_files(jail)) == 1
        log = srv.log()
        assert log.count("not started as root") == 1
    finally:
        srv.close()


def test_session_timeout_holds_for_a_client_that_never_pauses(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", READ_TIMEOUT=5, SESSION_TIMEOUT=2)
    helo(c)
    envelope(c)
    assert c.cmd("DATA")[0] == 354
    t0 = time.time()
    try:
        while time.time() - t0 < 10:
            c.send(b"x" * 8192 + b"\r\n")
    except OSError:
        pass
    assert time.time() - t0 < 5
    assert srv.last_status() == 71
    assert os.listdir(srv.jail) == ["etc"]


def test_documented_differences_from_the_original(smtpd):
    """Issue 13, item 7: each difference smtpd.8 COMPATIBILITY lists holds."""
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    for line in ("HELOfoo", "MAILFROM:<a@b.example>", "NOOPX", "WIZ", "DEBUG"):
        assert c.cmd(line)[0] == 500, line
    helo(c)
    assert c.cmd("MAIL FROM:")[0] == 501
    envelope(c)
    assert c.cmd("DATA")[0] == 354
    c.send("Subject: cut\r\n")
    c.sock.shutdown(socket.SHUT_WR)             # EOF during DATA
    assert c.reply()[0] == 421
    assert c.closed()
    man = open(os.path.join(ROOT, "man", "smtpd.8")).read()
    compat = man.split(".Sh COMPATIBILITY", 1)[1].split(".Sh ", 1)[0]
    for words in ("HELOfoo", "MAILFROM:", "NOOPX", "WIZ", "DEBUG", "during DATA gets only 421",
                  "MAIL FROM:\ngets 501"):
        assert words in compat, words


def test_inetd_session_on_a_unix_socket(tree_factory, tmp_path):
    """A super-server may hand over a Unix socket: no address, no crash."""
    import subprocess
    from harness import make_jail, smtpd_argv, TEST_CONSTANTS
    jail = make_jail()
    ours, theirs = socket.socketpair()
    p = subprocess.Popen(smtpd_argv(tree_factory(**TEST_CONSTANTS), jail, "-H"),
                         stdin=theirs, stdout=theirs, stderr=subprocess.DEVNULL)
    theirs.close()
    ours.settimeout(30)
    assert ours.recv(100).startswith(b"220 ")
    replies = b""
    for line in (b"HELO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<c@my.domain>", b"DATA",
                 b"hi\r\n.", b"QUIT"):
        ours.sendall(line + b"\r\n")          # and wait for its reply
        data = b""
        while not re.search(rb"(^|\n)\d{3} [^\n]*\r\n\Z", data):
            chunk = ours.recv(4096)
            assert chunk, replies + data
            data += chunk
        replies += data
    data = replies
    assert b"250 Message accepted for delivery" in data
    assert p.wait(30) == 0
    assert len(spool_files(jail)) == 1


# -- the default size limit (issue 22, item 1) --

def test_a_size_limit_by_default_postfixs(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    assert "SIZE 10240000" in c.cmd("EHLO x")[1]
    assert c.cmd("MAIL FROM:<a@b.example> SIZE=10240001")[0] == 552
    assert c.cmd("MAIL FROM:<a@b.example> SIZE=10240000")[0] == 250
    assert c.cmd("RCPT TO:<c@d.example>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    line = b"x" * 998 + b"\r\n"
    c.send(b"Subject: big\r\n\r\n" + line * (10240000 // 999 + 1) + b".\r\n")  # 999 stored
    assert c.code() == 552
    assert spool_files(srv.jail) == []


def test_s_overrides_the_limit_and_0_lifts_it(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", "-s", "0")
    assert "SIZE" in c.cmd("EHLO x")[1]
    assert c.cmd("MAIL FROM:<a@b.example> SIZE=99999999999")[0] == 250
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", "-s", "500")
    assert "SIZE 500" in c.cmd("EHLO x")[1]
