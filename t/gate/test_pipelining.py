"""Unauthorized pipelining (issue 21, item 3; RFC 2920 3.1, Postfix's
smtpd_forbid_unauth_pipelining): text before our 354, commands pipelined
where PIPELINING was never offered and a whole session sent before the
greeting get "554 5.5.0", one log line, and the connection is closed with
nothing spooled.  Pipelining as RFC 2920 allows it still works, and
SMTPD_FORBID_UNAUTH_PIPELINING=0 brings back the original's leniency."""

import os
import time

from harness import spool_files

SYNC = (554, ["5.5.0 Error: SMTP protocol synchronization"])
ENVELOPE = "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@my.domain>\r\n"
TEXT = "Subject: pipelined\r\n\r\nhello\r\n.\r\n"


def refused(c):
    """The next reply is the 554, and then the connection ends."""
    assert c.reply() == SYNC
    assert c.closed()


def one_log_line(srv, after):
    log = srv.log()
    assert log.count("improper command pipelining after %s from" % after) == 1, log


def test_text_in_the_same_packet_as_data(smtpd):
    srv = smtpd()
    c = srv.connect()
    assert c.code() == 220
    assert c.cmd("EHLO client.example")[0] == 250
    c.send(ENVELOPE + "DATA\r\n" + TEXT + "QUIT\r\n")
    assert [c.code(), c.code()] == [250, 250]
    refused(c)
    one_log_line(srv, "DATA")
    assert "Subject:\\x20pipelined" in srv.log()    # what it sent, escaped, for the log
    assert spool_files(srv.jail) == []


def test_text_sent_later_but_before_354(smtpd):
    """The client does not wait: its text arrives while we are still busy
    with an earlier command of the group (a noto_delay of 1 s)."""
    srv = smtpd("noto_delay:ALL:ALL:slow@my.domain\nallow:ALL:ALL:ALL\n")
    c = srv.connect()
    assert c.code() == 220
    assert c.cmd("EHLO client.example")[0] == 250
    c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<slow@my.domain>\r\n"
           "RCPT TO:<b@my.domain>\r\nDATA\r\n")
    time.sleep(0.3)
    c.send(TEXT)
    assert [c.code(), c.code(), c.code()] == [250, 550, 250]
    refused(c)
    assert spool_files(srv.jail) == []


def test_commands_pipelined_after_helo(smtpd):
    srv = smtpd()
    c = srv.connect()
    assert c.code() == 220
    c.send("HELO client.example\r\n" + ENVELOPE)
    refused(c)
    one_log_line(srv, "HELO")


def test_commands_pipelined_without_any_hello(smtpd):
    srv = smtpd()
    c = srv.connect()
    assert c.code() == 220
    c.send("NOOP\r\nNOOP\r\n")
    refused(c)


def test_ehlo_must_end_its_group(smtpd):
    srv = smtpd()
    c = srv.connect()
    assert c.code() == 220
    c.send("EHLO client.example\r\n" + ENVELOPE)
    refused(c)
    one_log_line(srv, "EHLO")


WHOLE = "EHLO client.example\r\n" + ENVELOPE + "DATA\r\n" + TEXT + "QUIT\r\n"


def test_a_whole_session_before_the_greeting_inetd(smtpd):
    srv = smtpd()
    c = srv.connect()
    c.send(WHOLE)
    code, _ = c.reply()
    if code == 220:         # inetd mode greets before it loads the rest
        code, _ = c.reply()
    assert code == 554
    assert c.closed()
    assert spool_files(srv.jail) == []


def test_a_whole_session_before_the_greeting_daemon(daemon_):
    d = daemon_(SMTPD_GREET_PAUSE=0).wait_ready()
    for _ in range(5):
        c = d.connect()
        c.send(WHOLE)
        code, _ = c.reply()
        if code == 220:     # it greeted before the bytes arrived: EHLO catches them
            code, _ = c.reply()
        assert code == 554
        assert c.closed()
    assert "improper command pipelining after " in d.log()
    assert spool_files(d.jail) == []


def test_pipelining_as_rfc_2920_allows_it(smtpd):
    """MAIL, RCPT, RSET in a group ending with DATA; the text after 354;
    QUIT behind the final dot, or a new transaction behind it."""
    srv = smtpd()
    c = srv.connect()
    assert c.code() == 220
    assert c.cmd("EHLO client.example")[0] == 250
    c.send(ENVELOPE + "RSET\r\n" + ENVELOPE + "RCPT TO:<c@my.domain>\r\nDATA\r\n")
    assert [c.code() for _ in range(6)] == [250, 250, 250, 250, 250, 250]
    assert c.code() == 354
    c.send(TEXT + ENVELOPE + "DATA\r\n")
    assert [c.code() for _ in range(4)] == [250, 250, 250, 354]
    c.send(TEXT + "QUIT\r\n")
    assert [c.code(), c.code()] == [250, 221]
    assert len(spool_files(srv.jail)) == 2
    assert "improper command pipelining" not in srv.log()


def test_pipelining_inside_tls_is_held_to_the_same_rule(smtpd, tmp_path):
    import ssl
    import subprocess
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=mx",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    os.chmod(key, 0o644)
    os.chmod(str(tmp_path), 0o755)
    srv = smtpd("allow:ALL:ALL:ALL\n", "-C", cert, "-K", key)
    c = srv.connect()
    assert c.code() == 220
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("STARTTLS")[0] == 220
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    c.sock = ctx.wrap_socket(c.sock)
    assert c.cmd("EHLO client.example")[0] == 250
    c.send(ENVELOPE + "DATA\r\n" + TEXT)
    assert [c.code(), c.code()] == [250, 250]
    assert c.reply() == SYNC
    assert spool_files(srv.jail) == []


def test_off_the_original_reads_it_all(smtpd):
    srv = smtpd("allow:ALL:ALL:ALL\n", SMTPD_FORBID_UNAUTH_PIPELINING=0)
    c = srv.connect()
    assert c.code() == 220
    c.send("HELO client.example\r\n" + ENVELOPE + "DATA\r\n" + TEXT + "QUIT\r\n")
    assert [c.code() for _ in range(6)] == [250, 250, 250, 354, 250, 221]
    assert len(spool_files(srv.jail)) == 1


def test_text_sent_while_a_filter_answers_data(smtpd):
    """Issue 34, item 7: the check is made again right before the 354, so a
    client that did not wait -- its text arrives while a filter takes its
    time over DATA -- is refused, not spooled."""
    from fakemilter import FakeMilter, pkt

    def slow(conn, payload):
        time.sleep(0.6)
        return [pkt(b"c")]
    f = FakeMilter({b"T": slow})
    try:
        srv = smtpd("allow:ALL:ALL:ALL\n", "-f", f.spec)
        c = srv.connect()
        assert c.code() == 220
        assert c.cmd("EHLO client.example")[0] == 250
        c.send(ENVELOPE)
        assert [c.code(), c.code()] == [250, 250]
        c.send("DATA\r\n")
        time.sleep(0.2)                 # the filter is still thinking
        c.send(TEXT)
        refused(c)
        one_log_line(srv, "DATA")
        assert spool_files(srv.jail) == []
    finally:
        f.close()


class RecordClient:
    """A TLS client over memory BIOs: which records go out in which
    segment is the test's to choose."""

    def __init__(self, sock):
        import ssl
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        self.ssl = ssl
        self.sock, self.inc, self.out = sock, ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.inc, self.out)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.out.read())
                self.inc.write(self.sock.recv(65536))
        self.sock.sendall(self.out.read())
        self.buf = b""

    def records(self, text):
        """The TLS records of text, not sent."""
        self.tls.write(text.encode())
        return self.out.read()

    def reply(self):
        while b"\r\n" not in self.buf:
            try:
                self.buf += self.tls.read(65536)
            except self.ssl.SSLWantReadError:
                data = self.sock.recv(65536)
                if not data:
                    return None
                self.inc.write(data)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode()


def test_a_record_in_the_segment_of_data_inside_tls(smtpd, tmp_path):
    """Issue 34, item 7: inside TLS the check counts the octets still
    encrypted: the first octets of the record after DATA's, in DATA's
    segment, are text sent before our 354."""
    import subprocess
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=mx",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    os.chmod(key, 0o644)
    os.chmod(str(tmp_path), 0o755)
    srv = smtpd("allow:ALL:ALL:ALL\n", "-C", cert, "-K", key)
    c = srv.connect()
    assert c.code() == 220
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("STARTTLS")[0] == 220
    t = RecordClient(c.sock)
    c.sock.sendall(t.records("EHLO client.example\r\n"))
    while not t.reply().startswith("250 "):
        pass
    c.sock.sendall(t.records(ENVELOPE))
    assert [t.reply()[:3], t.reply()[:3]] == ["250", "250"]
    data, text = t.records("DATA\r\n"), t.records(TEXT)
    c.sock.sendall(data + text[:3])
    time.sleep(0.2)
    c.sock.sendall(text[3:])
    assert t.reply() == "554 5.5.0 Error: SMTP protocol synchronization"
    assert spool_files(srv.jail) == []
