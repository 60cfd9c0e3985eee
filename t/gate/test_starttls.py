"""STARTTLS (issue 14): real clients (smtplib, openssl s_client, swaks) in
inetd and -D mode, the protocol rules of RFC 3207, hostile handshakes, the
key kept out of the jail, and reload."""

import os
import re
import shutil
import signal
import smtplib
import ssl
import subprocess

import pytest

import certs
import postfix
from harness import (make_jail, needs_root, NOBODY, spool_files, SmtpdDaemon,
                     status_field, TEST_CONSTANTS, wait_for)

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")
MSG = b"Subject: over TLS\r\n\r\nSecret.\r\n"


@pytest.fixture(scope="module")
def pair():
    return certs.make_pair(serial=1001)


def client_context(minimum=None, maximum=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if minimum:
        ctx.minimum_version = minimum
    if maximum:
        ctx.maximum_version = maximum
    return ctx


def tls_flags(pair):
    return ("-C", pair[0], "-K", pair[1])


def starttls(c):
    """EHLO, STARTTLS, handshake: c then speaks TLS."""
    assert c.reply()[0] == 220
    code, lines = c.cmd("EHLO client.example")
    assert code == 250 and "STARTTLS" in lines
    assert c.cmd("STARTTLS") == (220, ["2.0.0 Ready to start TLS"])
    c.sock = client_context().wrap_socket(c.sock)
    return c


def spooled(jail):
    (name,) = spool_files(jail)
    return open(os.path.join(jail, name), "rb").read()


def check_tls_message(data):
    assert re.search(rb"\n\t\(version=TLSv1\.[23] cipher=[A-Z0-9_-]+\)\n"
                     rb"\tby mx\.my\.domain \(smtpd\) with ESMTPS id smtpd", data), data[:400]
    assert b"\nSubject: over TLS\n\nSecret.\n" in data


# -- real clients, both modes --

def smtplib_send(port):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.starttls(context=client_context())
        s.sendmail("alice@example.org", ["bob@my.domain"], MSG)


def openssl_send(port):
    """s_client sends each line as it reads it: wait for each reply, as
    RFC 2920 asks of a client (the text goes in one piece after the 354)."""
    p = subprocess.Popen(["openssl", "s_client", "-starttls", "smtp", "-crlf", "-quiet",
                          "-connect", "127.0.0.1:%d" % port], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen = []
    try:
        for line in (b"EHLO client.example", b"MAIL FROM:<alice@example.org>",
                     b"RCPT TO:<bob@my.domain>", b"DATA",
                     b"Subject: over TLS\n\nSecret.\n.", b"QUIT"):
            p.stdin.write(line + b"\n")
            p.stdin.flush()
            while True:
                reply = p.stdout.readline()
                seen.append(reply)
                if not reply or re.match(rb"^\d{3} ", reply):
                    break
    finally:
        p.stdin.close()
        p.wait(60)
    assert b"250 2.0.0 Message accepted for delivery\r\n" in seen, seen


def swaks_send(port):
    p = subprocess.run(["swaks", "--tls", "--server", "127.0.0.1:%d" % port,
                        "--from", "alice@example.org", "--to", "bob@my.domain",
                        "--data", "Subject: over TLS\n\nSecret.\n"],
                       capture_output=True, text=True, timeout=60)
    assert "<~  250 2.0.0 Message accepted for delivery" in p.stdout, p.stdout + p.stderr
    assert "=== TLS started with cipher" in p.stdout


CLIENTS = {"smtplib": smtplib_send, "openssl": openssl_send, "swaks": swaks_send}


@pytest.mark.parametrize("client", list(CLIENTS))
def test_real_client_in_inetd_mode(smtpd, pair, client):
    if client == "swaks" and not shutil.which("swaks"):
        pytest.skip("needs swaks")
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H", *tls_flags(pair))
    CLIENTS[client](srv.port)
    check_tls_message(spooled(srv.jail))
    assert re.search(r"STARTTLS with UNKNOWN\(127\.0\.0\.1\): TLSv1\.[23] with cipher \S+",
                     srv.log())


@pytest.mark.parametrize("client", list(CLIENTS))
def test_real_client_in_daemon_mode(daemon_, pair, client):
    if client == "swaks" and not shutil.which("swaks"):
        pytest.skip("needs swaks")
    d = daemon_("allow:ALL:ALL:ALL\n", *tls_flags(pair)).wait_ready()
    CLIENTS[client](d.port)
    assert wait_for(lambda: spool_files(d.jail))
    check_tls_message(spooled(d.jail))
    assert "STARTTLS with UNKNOWN(127.0.0.1): TLSv1." in d.log()


def test_quiet_summary_names_the_tls_version(daemon_, pair):
    d = daemon_("allow:ALL:ALL:ALL\n", "-q", *tls_flags(pair)).wait_ready()
    smtplib_send(d.port)
    assert wait_for(lambda: re.search(r"relay=UNKNOWN/127\.0\.0\.1 .*tls=TLSv1\.[23] "
                                      r"from=<alice@example\.org>", d.log()))


# -- the protocol --

def test_protocol_rules(smtpd, pair):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H", *tls_flags(pair))
    c = srv.connect()
    c.reply()
    assert c.cmd("STARTTLS")[0] == 503                  # before EHLO
    c.cmd("EHLO x")
    assert c.cmd("STARTTLS now")[0] == 501              # an argument
    c.cmd("MAIL FROM:<a@b.example>")
    assert c.cmd("STARTTLS") == (220, ["2.0.0 Ready to start TLS"])
    c.sock = client_context().wrap_socket(c.sock)
    assert c.cmd("MAIL FROM:<a@b.example>")[0] == 503   # HELO state was reset
    code, lines = c.cmd("EHLO x")
    assert code == 250 and "STARTTLS" not in lines
    assert c.cmd("RCPT TO:<b@my.domain>")[0] == 503     # the envelope too
    assert c.cmd("STARTTLS")[0] == 503                  # a second time
    assert c.cmd("QUIT")[0] == 221


def test_without_a_certificate_starttls_is_not_offered(smtpd):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H")
    c = srv.connect()
    c.reply()
    assert "STARTTLS" not in c.cmd("EHLO x")[1]
    assert c.cmd("STARTTLS")[0] == 500


def test_pipelined_commands_behind_starttls_are_never_executed(smtpd, pair):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H", *tls_flags(pair))
    c = srv.connect()
    c.reply()
    c.cmd("EHLO x")
    c.send(b"STARTTLS\r\nHELP\r\nMAIL FROM:<injected@evil.example>\r\n")
    assert c.reply() == (220, ["2.0.0 Ready to start TLS"])
    c.sock = client_context().wrap_socket(c.sock)
    # Had the injected HELP run inside TLS, its 214 would come first.
    assert c.cmd("NOOP") == (250, ["OK"])
    c.cmd("EHLO x")
    assert c.cmd("RCPT TO:<b@my.domain>")[0] == 503
    c.cmd("QUIT")
    assert "discarded 41 octets that UNKNOWN(127.0.0.1) sent after STARTTLS" in srv.log()


def test_line_discipline_is_the_same_inside_tls(smtpd, pair):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H", *tls_flags(pair))
    c = starttls(srv.connect())
    c.cmd("EHLO x")
    c.send(b"RCPT TO:<a@my.domain>\nRCPT TO:<b@my.domain>\r\n")
    assert c.reply()[0] == 500
    assert c.cmd("NOOP " + "x" * 600)[0] == 500
    c.cmd("MAIL FROM:<a@b.example>")
    c.cmd("RCPT TO:<b@my.domain>")
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: x\r\n\r\nhidden\n.\nMAIL FROM:<x@y>\r\n.\r\n")
    assert c.reply()[0] == 550
    assert spool_files(srv.jail) == []


# -- hostile handshakes: closed cleanly, the worker goes on --

def hostile(d, how):
    c = d.connect()
    c.reply()
    c.cmd("EHLO x")
    assert c.cmd("STARTTLS")[0] == 220
    if how == "garbage":
        c.send(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(200))
    elif how == "tls1.0":
        ctx = client_context(ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            ctx.wrap_socket(c.sock)     # (closes the socket when it fails)
        return
    # "silent": never starts the handshake
    assert c.closed(timeout=20)


@pytest.mark.parametrize("how", ["garbage", "silent", "tls1.0"])
def test_failed_handshake_closes_and_the_worker_serves_on(daemon_, pair, how):
    d = daemon_("allow:ALL:ALL:ALL\n", "-M", "1", *tls_flags(pair),
                SMTPD_PREFORK=1, READ_TIMEOUT=2).wait_ready()
    assert wait_for(lambda: len(d.workers()) == 1)     # forked just after the master is ready
    workers = d.workers()
    hostile(d, how)
    assert wait_for(lambda: "TLS handshake with UNKNOWN(127.0.0.1) failed: " in d.log())
    line = [l for l in d.log().splitlines() if "TLS handshake with" in l]
    assert len(line) == 1
    if how == "silent":
        assert "read timeout" in line[0]
    smtplib_send(d.port)
    assert d.workers() == workers       # the same worker, still serving
    assert len(spool_files(d.jail)) == 1


# -- the key stays out of the jail --

@needs_root
def test_key_is_outside_the_jail_and_tls_runs_jailed_unprivileged(daemon_, pair):
    import pwd
    d = daemon_("allow:ALL:ALL:ALL\n", "-M", "1", *tls_flags(pair), SMTPD_PREFORK=1).wait_ready()
    c = starttls(d.connect())
    c.cmd("EHLO x")
    (worker,) = d.workers()
    assert os.readlink("/proc/%d/root" % worker) == d.jail
    uid = str(pwd.getpwnam(NOBODY).pw_uid)
    assert status_field(worker, "Uid") == [uid] * 4
    assert not os.path.exists(os.path.join(d.jail, pair[1].lstrip("/")))
    assert os.stat(pair[1]).st_mode & 0o077 == 0 and os.stat(pair[1]).st_uid == 0
    # The worker, as nobody, could not open the key even by its real path.
    r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                        "cat", pair[1]], capture_output=True)
    assert r.returncode != 0
    assert c.cmd("QUIT")[0] == 221


# -- configuration errors and reload --

def test_explicit_pair_that_cannot_load_exits_78(tree_factory, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    d = SmtpdDaemon(tree_factory(**TEST_CONSTANTS), make_jail(), "-C", str(bad),
                    "-K", str(bad))
    assert d.proc.wait(20) == 78
    assert "cannot load the TLS certificate" in d.log()


@pytest.mark.parametrize("explicit", [True, False])
def test_a_missing_key_is_named_as_the_key(tree_factory, tmp_path, explicit):
    cert, _ = certs.make_pair(serial=3001)
    key = str(tmp_path / "nosuch-key.pem")
    if explicit:
        d = SmtpdDaemon(tree_factory(**TEST_CONSTANTS), make_jail(), "-C", cert, "-K", key)
    else:
        tree = tree_factory(**dict(TEST_CONSTANTS, TLS_CERT=cert, TLS_KEY=key))
        d = SmtpdDaemon(tree, make_jail())
    assert d.proc.wait(20) == 78
    assert "cannot load the TLS certificate and key: %s: No such file or directory" % key \
        in d.log()
    assert "%s: No such" % cert not in d.log()


def test_default_pair_missing_means_plaintext_and_one_notice(tree_factory):
    tree = tree_factory(**dict(TEST_CONSTANTS, TLS_CERT="/nonexistent/c.pem",
                               TLS_KEY="/nonexistent/k.pem"))
    d = SmtpdDaemon(tree, make_jail()).wait_ready()
    c = d.connect()
    c.reply()
    assert "STARTTLS" not in c.cmd("EHLO x")[1]
    c.cmd("QUIT")
    assert d.log().count("STARTTLS is not offered") == 1
    assert d.stop() == 0


def peer_serial(c):
    return certs.serial_of(c.sock.getpeercert(binary_form=True))


def test_sighup_reloads_new_sessions_get_the_new_certificate(daemon_):
    cert, key = certs.make_pair(serial=2001)
    d = daemon_("allow:ALL:ALL:ALL\n", "-C", cert, "-K", key).wait_ready()
    old = starttls(d.connect())
    assert peer_serial(old) == 2001
    old.cmd("EHLO x")
    old.cmd("MAIL FROM:<a@b.example>")
    new_cert, new_key = certs.make_pair(serial=2002)
    shutil.copy(new_cert, cert)
    shutil.copy(new_key, key)
    os.kill(d.master_pid(), signal.SIGHUP)
    assert wait_for(lambda: "SIGHUP: certificate and key re-read" in d.log())
    new = starttls(d.connect())
    assert peer_serial(new) == 2002
    new.cmd("QUIT")
    # The session open across the reload completes, on its old certificate.
    assert old.cmd("RCPT TO:<b@my.domain>")[0] == 250
    assert old.cmd("DATA")[0] == 354
    old.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    assert old.reply()[0] == 250
    assert peer_serial(old) == 2001
    old.cmd("QUIT")


def test_a_changed_certificate_file_is_picked_up_without_a_signal(daemon_):
    cert, key = certs.make_pair(serial=3001)
    d = daemon_("allow:ALL:ALL:ALL\n", "-C", cert, "-K", key).wait_ready()
    new_cert, new_key = certs.make_pair(serial=3002)
    shutil.copy(new_key, key)
    shutil.copy(new_cert, cert)
    assert wait_for(lambda: "certificate or key changed: certificate and key re-read"
                    in d.log())

    def serial_now():
        c = starttls(d.connect())
        s = peer_serial(c)
        c.cmd("QUIT")
        return s == 3002
    assert wait_for(serial_now)


def test_a_broken_certificate_at_reload_keeps_the_old_one(daemon_):
    cert, key = certs.make_pair(serial=4001)
    d = daemon_("allow:ALL:ALL:ALL\n", "-C", cert, "-K", key).wait_ready()
    with open(cert, "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    os.kill(d.master_pid(), signal.SIGHUP)
    assert wait_for(lambda: "keeping the old certificate" in d.log())
    c = starttls(d.connect())
    assert peer_serial(c) == 4001
    c.cmd("QUIT")


def test_a_client_that_resumes_a_session_is_served(daemon_, pair):
    d = daemon_("allow:ALL:ALL:ALL\n", *tls_flags(pair)).wait_ready()
    ctx = client_context(maximum=ssl.TLSVersion.TLSv1_2)
    sessions = []
    for _ in range(2):
        c = d.connect()
        c.reply()
        c.cmd("EHLO x")
        c.cmd("STARTTLS")
        c.sock = ctx.wrap_socket(c.sock, session=sessions[-1] if sessions else None)
        sessions.append(c.sock.session)
        reused = c.sock.session_reused
        assert c.cmd("EHLO x")[0] == 250
        c.cmd("QUIT")
    assert reused


@pytest.mark.skipif(not postfix.available(), reason="needs root and Debian's postfix")
def test_a_real_postfix_delivers_to_us_over_tls(daemon_, pair):
    d = daemon_("allow:ALL:ALL:ALL\n", *tls_flags(pair)).wait_ready()
    main = {"relayhost": "[127.0.0.1]:%d" % d.port, "smtp_tls_security_level": "encrypt",
            "smtp_tls_loglevel": "1", "smtp_dns_support_level": "disabled",
            "mydestination": "localhost"}
    with postfix.instance(main=main) as mta:
        p = subprocess.run(mta.sendmail() + ["-oi", "-f", "alice@localhost", "bob@my.domain"],
                           input=b"Subject: over TLS\n\nSecret.\n", capture_output=True,
                           env=dict(os.environ, MAIL_CONFIG=mta.etc), timeout=60)
        assert p.returncode == 0, p.stderr
        assert wait_for(lambda: spool_files(d.jail), 60), mta.log()
        assert wait_for(lambda: "status=sent" in mta.log()), mta.log()
        log = mta.log()
    assert re.search(r"TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:%d: "
                     r"TLSv1\.[23] with cipher" % d.port, log), log
    data = spooled(d.jail)
    assert re.search(rb"Received: from localhost \(unknown \[127\.0\.0\.1\]\)\n"
                     rb"\t\(version=TLSv1\.[23] cipher=[A-Z0-9_-]+\)\n"
                     rb"\tby mx\.my\.domain \(smtpd\) with ESMTPS id smtpd", data), data
    assert b"Subject: over TLS\n" in data and data.endswith(b"\n\nSecret.\n")
