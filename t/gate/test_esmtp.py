"""Modern ESMTP (issue 38): enhanced status codes (RFC 2034, RFC 3463)
and CHUNKING (RFC 3030).

After EHLO every reply of class 2, 4 and 5 but the greeting and EHLO's
own carries an enhanced status code with the right detail; after HELO the
original's replies go out octet for octet (the fidelity replay speaks
HELO); SMTPD_ENHANCED_STATUS_CODES = 0 offers none.  In -D mode the front
stage's answers and the worker's carry them alike.  BDAT chunks are the
message as sent, with the same size limit and the same commit."""

import os
import re
import shutil
import subprocess

import pytest

import postfix
from harness import spool_files, wait_for

F = "<alice@example.org>"
ESC = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")


def start(smtpd, rules="allow:ALL:ALL:ALL\n", *flags, **kw):
    srv = smtpd(rules, *flags, **kw)
    c = srv.connect()
    code, text = c.reply()
    assert code == 220 and not ESC.match(text[0])      # never the greeting
    return srv, c


def test_ehlo_offers_enhancedstatuscodes_and_every_reply_carries_one(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    code, lines = c.cmd("EHLO client.example")
    assert code == 250 and "ENHANCEDSTATUSCODES" in lines
    assert not any(ESC.match(l) for l in lines)          # nor EHLO's own reply
    assert c.cmd("NOOP") == (250, ["2.0.0 OK"])
    assert c.cmd("RSET") == (250, ["2.0.0 OK"])
    assert c.cmd("MAIL FROM:" + F) == (250, ["2.1.0 sender is %s, sender OK" % F])
    assert c.cmd("RCPT TO:<bob@my.domain>") == \
        (250, ["2.1.5 recipient <bob@my.domain>, recipient OK"])
    code, text = c.cmd("DATA")
    assert code == 354 and not ESC.match(text[0])        # 3xx: none
    c.send("Subject: x\r\n\r\nhi\r\n.\r\n")
    assert c.reply() == (250, ["2.0.0 Message accepted for delivery"])
    assert c.cmd("XYZZY") == (500, ["5.5.2 Syntax Error, command unrecognized"])
    assert c.cmd("DATA") == (503, ["5.5.1 Bad sequence of commands"])
    assert c.cmd("MAIL FROM:<a@@b>")[1][0].startswith("5.1.7 ")
    assert c.cmd("MAIL FROM:" + F)[0] == 250
    assert c.cmd("RCPT TO:<b@@c>")[1][0].startswith("5.1.3 ")
    assert c.cmd("MAIL FROM:" + F)[1] == ["5.5.1 Bad sequence of commands"]
    assert c.cmd("VRFY bob")[1][0].startswith("2.5.0 ")
    code, lines = c.cmd("HELP")
    assert code == 214 and all(ESC.match(l) for l in lines)
    assert c.cmd("QUIT") == (221, ["2.0.0 Closing connection"])


def test_after_helo_the_original_replies_go_out_unchanged(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    assert c.cmd("HELO client.example")[0] == 250
    assert c.cmd("NOOP") == (250, ["OK"])
    assert c.cmd("MAIL FROM:" + F) == (250, ["sender is %s, sender OK" % F])
    assert c.cmd("RCPT TO:<bob@my.domain>") == (250, ["recipient <bob@my.domain>, recipient OK"])
    assert c.cmd("XYZZY") == (500, ["Syntax Error, command unrecognized"])
    assert c.cmd("QUIT") == (221, ["Closing connection"])


def test_switched_off_nothing_is_offered_or_added(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", SMTPD_ENHANCED_STATUS_CODES=0)
    code, lines = c.cmd("EHLO client.example")
    assert "ENHANCEDSTATUSCODES" not in lines
    assert c.cmd("NOOP") == (250, ["OK"])
    assert c.cmd("MAIL FROM:" + F) == (250, ["sender is %s, sender OK" % F])


def test_rule_replies_get_the_policy_code_unless_they_carry_their_own(smtpd):
    rules = ("noto:ALL:ALL:*@own.example:550 5.1.1 no such user here\n"
             "noto:ALL:ALL:*@temp.example:450 try later\n"
             "noto:ALL:ALL:*@plain.example\n"
             "allow:ALL:ALL:ALL\n")
    srv, c = start(smtpd, rules, "-H")
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:" + F)[0] == 250
    assert c.cmd("RCPT TO:<x@own.example>") == (550, ["5.1.1 no such user here"])
    assert c.cmd("RCPT TO:<x@temp.example>") == (450, ["4.7.1 try later"])
    code, text = c.cmd("RCPT TO:<x@plain.example>")
    assert code == 550 and text[0].startswith("5.7.1 ")
    # after HELO the same rules answer as the original did
    srv, c = start(smtpd, rules, "-H")
    c.cmd("HELO client.example")
    c.cmd("MAIL FROM:" + F)
    assert c.cmd("RCPT TO:<x@temp.example>") == (450, ["try later"])
    assert c.cmd("RCPT TO:<x@own.example>") == (550, ["5.1.1 no such user here"])


def test_too_big_is_5_3_4(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", "-s", "100")
    c.cmd("EHLO client.example")
    code, text = c.cmd("MAIL FROM:%s SIZE=1000" % F)
    assert code == 552 and text[0].startswith("5.3.4 ")


def test_the_front_stage_and_the_worker_carry_them_too(daemon_):
    d = daemon_("allow:ALL:ALL:ALL\n").wait_ready()
    c = d.connect("127.0.0.9")
    assert c.code() == 220
    code, lines = c.cmd("EHLO client.example")
    assert "ENHANCEDSTATUSCODES" in lines
    assert c.cmd("NOOP") == (250, ["2.0.0 OK"])                 # the front stage's
    assert c.cmd("MAIL FROM:" + F) == (250, ["2.1.0 sender is %s, sender OK" % F])  # a worker's
    assert c.cmd("QUIT") == (221, ["2.0.0 Closing connection"])
    c = d.connect("127.0.0.9")
    assert c.code() == 220
    c.cmd("HELO client.example")
    assert c.cmd("NOOP") == (250, ["OK"])
    assert c.cmd("MAIL FROM:" + F) == (250, ["sender is %s, sender OK" % F])
    assert wait_for(lambda: "HELO" in d.log())


# ------------------------------------------------------------ CHUNKING ----

def body_of(jail):
    """The one spooled message's text after our Received header."""
    (name,) = spool_files(jail)
    data = open(os.path.join(jail, name), "rb").read()
    m = re.match(rb"(?s).*?BODY\nReceived: .*?\n(?=\S)", data)
    assert m, data[:300]
    return data[m.end():]


def chunked(smtpd, *flags, **kw):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", *flags, **kw)
    code, lines = c.cmd("EHLO client.example")
    assert code == 250 and "CHUNKING" in lines
    assert c.cmd("MAIL FROM:" + F)[0] == 250
    assert c.cmd("RCPT TO:<bob@my.domain>")[0] == 250
    return srv, c


def bdat(c, data, last=False):
    c.send(b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data)
    return c.reply()


def test_bdat_chunks_make_the_message_as_sent(smtpd):
    """No dot-stuffing, no terminator: a line "." and ".." are data; CRLF
    is stored as LF (also split across two chunks), a bare LF is data."""
    srv, c = chunked(smtpd)
    assert bdat(c, b"Subject: chunks\r\n\r\n.\r\n..two\r") == (250, ["2.0.0 28 octets received"])
    assert bdat(c, b"\nbare\nLF\r\n") == (250, ["2.0.0 10 octets received"])
    assert bdat(c, b"", last=True) == (250, ["2.0.0 Message accepted for delivery"])
    assert body_of(srv.jail) == b"Subject: chunks\n\n.\n..two\nbare\nLF\n"
    assert c.cmd("QUIT")[0] == 221


def test_bdat_pipelined_in_one_write(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    c.cmd("EHLO client.example")
    msg = b"Subject: p\r\n\r\nhello\r\n"
    c.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@my.domain>\r\n"
           b"BDAT %d LAST\r\n" % len(msg) + msg + b"QUIT\r\n")
    assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 221]
    assert body_of(srv.jail) == b"Subject: p\n\nhello\n"


def test_bdat_out_of_place_is_refused_and_its_octets_read(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    c.cmd("EHLO client.example")
    assert bdat(c, b"NOOP\r\nNOOP\r\n") == (503, ["5.5.1 Bad sequence of commands"])
    assert c.cmd("NOOP") == (250, ["2.0.0 OK"])          # the chunk was not commands
    assert c.cmd("BDAT ten") == (501, ["5.5.4 Syntax Error in parameters or arguments"])
    assert c.cmd("BDAT 1 LAST more")[0] == 501
    assert c.cmd("MAIL FROM:" + F)[0] == 250
    assert c.cmd("RCPT TO:<bob@my.domain>")[0] == 250
    assert bdat(c, b"Subject: x\r\n")[0] == 250
    assert c.cmd("DATA") == (503, ["5.5.1 Bad sequence of commands"])   # no mixing
    assert bdat(c, b"\r\nbody\r\n", last=True)[0] == 250
    assert c.cmd("RSET")[0] == 250
    assert spool_files(srv.jail) != []


def test_bdat_after_helo_or_switched_off_is_an_unknown_command(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    c.cmd("HELO client.example")
    assert c.cmd("BDAT 0 LAST") == (500, ["Syntax Error, command unrecognized"])
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", SMTPD_CHUNKING=0)
    assert "CHUNKING" not in c.cmd("EHLO client.example")[1]
    assert c.cmd("BDAT 0 LAST")[0] == 500


def test_bdat_over_the_size_limit_is_552_and_nothing_spooled(smtpd):
    srv, c = chunked(smtpd, "-s", "100")
    assert bdat(c, b"x" * 80 + b"\r\n")[0] == 250
    code, text = bdat(c, b"y" * 80 + b"\r\n")
    assert code == 552 and text[0].startswith("5.3.4 ")
    assert bdat(c, b"z\r\n", last=True)[0] == 503       # the transaction is over
    assert c.cmd("NOOP")[0] == 250
    assert spool_files(srv.jail) == []


def test_bdat_that_announces_more_than_it_sends_times_out(smtpd):
    srv, c = chunked(smtpd, SMTPD_DATA_TIMEOUT=2)
    c.send(b"BDAT 1000 LAST\r\nonly this")
    code, text = c.reply()
    assert code == 421
    assert c.closed()
    assert spool_files(srv.jail) == []


def test_bdat_pipelined_behind_mail_through_the_front_stage(daemon_):
    """The front stage reads the pipelined MAIL, RCPT, BDAT and part of the
    chunk, and passes them on unread: the worker's message is whole."""
    d = daemon_("allow:ALL:ALL:ALL\n").wait_ready()
    c = d.connect("127.0.0.9")
    assert c.code() == 220
    assert "CHUNKING" in c.cmd("EHLO client.example")[1]
    msg = b"Subject: p\r\n\r\n" + b"x" * 78 + b"\r\n" + (b"y" * 78 + b"\r\n") * 80
    c.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@my.domain>\r\n"
           b"BDAT %d LAST\r\n" % len(msg) + msg)
    assert [c.reply()[0] for _ in range(3)] == [250, 250, 250]
    assert body_of(d.jail) == msg.replace(b"\r\n", b"\n")


# ----------------------------------------------------------------- DSN ----

def envelope_of(jail):
    (name,) = spool_files(jail)
    return open(os.path.join(jail, name), "rb").read().split(b"BODY\n", 1)[0]


def test_dsn_parameters_are_checked_and_kept_in_the_spool(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    assert "DSN" in c.cmd("EHLO client.example")[1]
    assert c.cmd("MAIL FROM:%s RET=HDRS ENVID=QQ+2B1" % F)[0] == 250
    assert c.cmd("RCPT TO:<a@my.domain> NOTIFY=success,failure ORCPT=rfc822;a@my.domain")[0] \
        == 250
    assert c.cmd("RCPT TO:<b@my.domain>")[0] == 250
    assert c.cmd("RCPT TO:<c@my.domain> NOTIFY=NEVER")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send("Subject: x\r\n\r\nhi\r\n.\r\n")
    assert c.reply()[0] == 250
    assert envelope_of(srv.jail) == (
        b"FROM <alice@example.org>\nSENT ;DSN RET=HDRS ENVID=QQ+2B1\n"
        b"SENT ;DSN NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@my.domain\nRCPT <a@my.domain>\n"
        b"RCPT <b@my.domain>\nSENT ;DSN NOTIFY=NEVER\nRCPT <c@my.domain>\n")


def test_bad_dsn_parameters_get_501_5_5_4(smtpd):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H")
    for params in ("RET=ALL", "RET=FULL RET=HDRS", "ENVID=a=b", "ENVID=" + "x" * 101,
                   "ENVID=a+zz"):
        c = srv.connect()
        c.reply()
        c.cmd("EHLO client.example")
        code, text = c.cmd("MAIL FROM:%s %s" % (F, params))
        assert code == 501 and text[0].startswith("5.5.4 "), params
    for params in ("NOTIFY=NEVER,SUCCESS", "NOTIFY=DELAY,DELAY", "NOTIFY=", "NOTIFY=SOMETIMES",
                   "ORCPT=a@my.domain", "ORCPT=rfc822;", "ORCPT=rfc822;a=b",
                   "NOTIFY=NEVER NOTIFY=NEVER", "ORCPT=rfc822;" + "x" * 400):
        c = srv.connect()
        c.reply()
        c.cmd("EHLO client.example")
        assert c.cmd("MAIL FROM:" + F)[0] == 250
        code, text = c.cmd("RCPT TO:<a@my.domain> %s" % params)
        assert code == 501 and text[0].startswith("5.5.4 "), params
    assert c.cmd("RCPT TO:<a@my.domain> FOO=BAR")[0] == 555


def test_dsn_switched_off_its_parameters_are_unknown(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", SMTPD_DSN=0)
    assert "DSN" not in c.cmd("EHLO client.example")[1]
    assert c.cmd("MAIL FROM:%s RET=HDRS" % F)[0] == 555
    assert c.cmd("MAIL FROM:" + F)[0] == 250
    assert c.cmd("RCPT TO:<a@my.domain> NOTIFY=NEVER")[0] == 555


# ------------------------------------------------------------- SMTPUTF8 ----

def u(text):
    """Text as the octets of its UTF-8, in the str the client helper sends."""
    return text.encode("utf-8").decode("latin-1")


def test_smtputf8_lets_addresses_be_utf8_and_marks_the_spool(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    assert "SMTPUTF8" in c.cmd("EHLO client.example")[1]
    assert c.cmd(u("MAIL FROM:<jörg@exämple.org> SMTPUTF8"))[0] == 250
    assert c.cmd(u("RCPT TO:<bøb@my.domain>"))[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(u("Subject: grüße\r\n\r\nhi\r\n.\r\n"))
    assert c.reply()[0] == 250
    assert envelope_of(srv.jail) == ("FROM <jörg@exämple.org>\nSENT ;SMTPUTF8\n"
                                     "RCPT <bøb@my.domain>\n").encode("utf-8")


def test_a_utf8_address_without_smtputf8_is_553_5_6_7(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    c.cmd("EHLO client.example")
    code, text = c.cmd(u("MAIL FROM:<jörg@example.org>"))
    assert code == 553 and text[0].startswith("5.6.7 ")
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    code, text = c.cmd(u("RCPT TO:<bøb@my.domain>"))
    assert code == 553 and text[0].startswith("5.6.7 ")
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    c.cmd("HELO client.example")                     # SMTPUTF8 needs EHLO
    assert c.cmd(u("MAIL FROM:<jörg@example.org> SMTPUTF8"))[0] == 553


def test_bad_utf8_or_a_bad_idn_domain_is_refused(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H")
    c.cmd("EHLO client.example")
    code, text = c.cmd("MAIL FROM:<j\xf6rg@example.org> SMTPUTF8")     # latin-1, not UTF-8
    assert code == 553 and text[0].startswith("5.6.7 ")
    assert c.cmd(u("MAIL FROM:<a@ex\u00e4mple..org> SMTPUTF8"))[0] == 501
    assert c.cmd(u("MAIL FROM:<a@\u2615\u0301x.org> SMTPUTF8"))[0] == 501   # not IDNA 2008
    assert c.cmd(u("MAIL FROM:<a\u0085b@example.org> SMTPUTF8"))[0] == 553  # a C1 control
    assert c.cmd(u('MAIL FROM:<"x SMTPUTF8 y"@exämple.org>'))[0] == 553     # not a parameter


def test_rules_match_a_domain_in_both_forms(smtpd):
    rules = ("noto:ALL:ALL:*@exämple.org:550 umlaut\n"        # (written as UTF-8)
             "noto:ALL:ALL:*@xn--bcher-kva.example:550 buecher\n"
             "noto:ALL:ALL:jörg@*:550 joerg\n"
             "allow:ALL:ALL:ALL\n")
    srv, c = start(smtpd, rules, "-H")
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@example.org> SMTPUTF8")[0] == 250
    assert c.cmd("RCPT TO:<x@xn--exmple-cua.org>") == (550, ["5.7.1 umlaut"])
    assert c.cmd(u("RCPT TO:<x@EXÄMPLE.org>")) == (550, ["5.7.1 umlaut"])
    assert c.cmd(u("RCPT TO:<x@bücher.example>")) == (550, ["5.7.1 buecher"])
    assert c.cmd(u("RCPT TO:<jörg@my.domain>")) == (550, ["5.7.1 joerg"])
    assert c.cmd(u("RCPT TO:<JÖRG@my.domain>")) == (550, ["5.7.1 joerg"])    # Unicode's case
    assert c.cmd(u("RCPT TO:<jorg@my.domain>"))[0] == 250


def test_smtputf8_switched_off(smtpd):
    srv, c = start(smtpd, "allow:ALL:ALL:ALL\n", "-H", SMTPD_SMTPUTF8=0)
    assert "SMTPUTF8" not in c.cmd("EHLO client.example")[1]
    assert c.cmd("MAIL FROM:<a@example.org> SMTPUTF8")[0] == 555
    assert c.cmd(u("MAIL FROM:<jörg@example.org> SMTPUTF8"))[0] == 553


# ---------------------------------------------- a real client: Postfix ----

@pytest.mark.skipif(not postfix.available(), reason="needs root and Debian's postfix")
def test_postfix_as_the_sender_uses_smtputf8_dsn_and_enhanced_codes(daemon_):
    """Postfix's smtp client (smtputf8_enable = yes) relays a message with
    a UTF-8 sender and DSN wishes to us: it says SMTPUTF8, RET, ENVID,
    NOTIFY and ORCPT, and our spool keeps them all."""
    d = daemon_("allow:ALL:ALL:ALL\n").wait_ready()
    main = {"relayhost": "[127.0.0.1]:%d" % d.port, "smtp_dns_support_level": "disabled",
            "mydestination": "localhost", "smtputf8_enable": "yes"}
    with postfix.instance(main=main) as mta:
        p = subprocess.run(mta.sendmail() + ["-oi", "-N", "success,failure", "-R", "hdrs",
                                             "-V", "env-7", "-f", "jörg@exämple.org",
                                             "bob@my.domain"],
                           input="Subject: grüße\n\nhallo\n".encode(), capture_output=True,
                           env=dict(os.environ, MAIL_CONFIG=mta.etc), timeout=60)
        assert p.returncode == 0, p.stderr
        assert wait_for(lambda: spool_files(d.jail), 60), mta.log()
        assert wait_for(lambda: "status=sent" in mta.log()), mta.log()
        log = mta.log()
    assert re.search(r"dsn=2\.[0-9]\.[0-9]", log)
    env = envelope_of(d.jail).decode("utf-8")
    assert env.startswith("FROM <jörg@exämple.org>\nSENT ;SMTPUTF8\nSENT ;DSN RET=HDRS ENVID=env-7\n")
    assert "SENT ;DSN NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@my.domain\nRCPT <bob@my.domain>\n" \
        in env, env


@pytest.mark.skipif(not shutil.which("swaks"), reason="needs swaks")
def test_swaks_pipelining_sees_the_codes_and_is_accepted(smtpd):
    """A real client pipelining after EHLO (swaks --pipeline): one group,
    every reply with its enhanced code, the message accepted."""
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H")
    p = subprocess.run(["swaks", "--pipeline", "--server", "%s:%d" % (srv.addr, srv.port),
                        "--from", "alice@example.org", "--to", "bob@my.domain",
                        "--helo", "client.example", "--timeout", "20"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "<-  250 2.1.0 sender is <alice@example.org>, sender OK" in p.stdout, p.stdout
    assert re.search(r"<-  250 2\.1\.5 recipient <bob@my\.domain>, recipient OK", p.stdout)
    assert re.search(r"<-  250 2\.0\.0 Message accepted for delivery", p.stdout)
    assert len(spool_files(srv.jail)) == 1
