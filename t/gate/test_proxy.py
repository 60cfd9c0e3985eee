"""The PROXY protocol (issue 17): the parser at every field boundary, what
a trusted and an untrusted client may send, and what the proxied address
drives (rules, -q summary, Received, the per-address count, ident)."""

import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from smtpgate.gate import proxy
from harness import Client, spool_files, wait_for

SIG = proxy.SIGNATURE


def v2(command=1, family=1, proto=1, body=None, length=None, version=2):
    if body is None:
        body = (bytes([192, 0, 2, 7, 198, 51, 100, 25]) + struct.pack(">HH", 40000, 25)
                if family == 1 else bytes(range(32)) + struct.pack(">HH", 40000, 25))
    n = len(body) if length is None else length
    return SIG + bytes([version << 4 | command, family << 4 | proto]) + struct.pack(">H", n) + body


# -- the parser --

@pytest.mark.parametrize("line,want", [
    (b"PROXY TCP4 192.0.2.7 198.51.100.25 40000 25\r\n",
     (("192.0.2.7", 40000), ("198.51.100.25", 25))),
    (b"PROXY TCP6 2001:db8::7 2001:db8::25 0 65535\r\n",
     (("2001:db8::7", 0), ("2001:db8::25", 65535))),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None),
])
def test_v1_accepts(line, want):
    assert proxy.parse_v1(line) == want


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.7 198.51.100.25 40000 25\n",           # bare LF
    b"PROXY TCP4 192.0.2.7 198.51.100.25 40000 25\r\r\n",
    b"PROXY TCP4 192.0.2.7  198.51.100.25 40000 25\r\n",         # two spaces
    b"PROXY TCP4 192.0.2.7 198.51.100.25 40000\r\n",             # a field short
    b"PROXY TCP4 192.0.2.7 198.51.100.25 40000 25 1\r\n",
    b"PROXY TCP4 2001:db8::7 198.51.100.25 40000 25\r\n",        # family mismatch
    b"PROXY TCP6 192.0.2.7 2001:db8::25 40000 25\r\n",
    b"PROXY TCP4 192.0.2.256 198.51.100.25 40000 25\r\n",
    b"PROXY TCP4 192.0.2.07 198.51.100.25 40000 25\r\n",         # leading zero
    b"PROXY TCP4 192.0.2.7 198.51.100.25 65536 25\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.25 040000 25\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.25 -1 25\r\n",
    b"PROXY UDP4 192.0.2.7 198.51.100.25 40000 25\r\n",
    b"proxy TCP4 192.0.2.7 198.51.100.25 40000 25\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.25 40000 25\xff\r\n",
    b"PROXY " + b"x" * 101 + b"\r\n",                             # 109 octets
])
def test_v1_refuses(line):
    with pytest.raises(proxy.ProxyError):
        proxy.parse_v1(line)


def test_v1_length_boundary():
    line = b"PROXY UNKNOWN " + b"x" * (107 - 16) + b"\r\n"
    assert len(line) == 107 and proxy.parse_v1(line) is None
    with pytest.raises(proxy.ProxyError):
        proxy.parse_v1(b"PROXY UNKNOWN " + b"x" * (108 - 16) + b"\r\n")


def test_v2_accepts():
    assert proxy.parse_v2(v2()) == (("192.0.2.7", 40000), ("198.51.100.25", 25))
    six = proxy.parse_v2(v2(family=2))
    assert six == (("1:203:405:607:809:a0b:c0d:e0f", 40000),
                   ("1011:1213:1415:1617:1819:1a1b:1c1d:1e1f", 25))
    assert proxy.parse_v2(v2(command=0)) is None                # LOCAL
    assert proxy.parse_v2(v2(command=0, family=0, body=b"")) is None
    assert proxy.parse_v2(v2(family=0, proto=0, body=b"")) is None   # UNSPEC
    assert proxy.parse_v2(v2(family=3, body=bytes(216))) is None    # UNIX
    tlv = b"\x02\x00\x05host1" + b"\x04\x00\x00"                # TLVs skipped
    body = bytes([192, 0, 2, 7, 198, 51, 100, 25]) + struct.pack(">HH", 1, 2) + tlv
    assert proxy.parse_v2(v2(body=body))[0] == ("192.0.2.7", 1)


@pytest.mark.parametrize("header", [
    v2(version=1), v2(command=2), v2(proto=2), v2(family=4),
    v2(body=bytes(11)),                                          # too short for INET
    v2(family=2, body=bytes(35)),
    v2(body=bytes(12), length=13),                               # length mismatch
    v2(body=bytes(12) + b"\x02\x00"),                            # truncated TLV
    v2(body=bytes(12) + b"\x02\x00\x09abc"),                     # TLV past the end
    v2(body=bytes(proxy.LENGTH_MAX + 1)),
    b"\r\n\r\n\x00\r\nQUIx\n!\x11\x00\x0c" + bytes(12),          # bad signature
])
def test_v2_refuses(header):
    with pytest.raises(proxy.ProxyError):
        proxy.parse_v2(header)


def pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    return a, b


@pytest.mark.parametrize("header", [b"PROXY TCP4 192.0.2.7 198.51.100.25 40000 25\r\n",
                                    v2()])
def test_read_takes_exactly_the_header(header):
    ours, theirs = pair()
    theirs.sendall(header + b"EHLO early\r\n")
    assert proxy.read(ours, 2) == (("192.0.2.7", 40000), ("198.51.100.25", 25))
    assert ours.recv(100) == b"EHLO early\r\n"      # left for the pregreet check


def test_read_waits_for_a_header_sent_in_pieces():
    ours, theirs = pair()
    header = v2()

    def trickle():
        for i in range(0, len(header), 3):
            theirs.sendall(header[i:i + 3])
            time.sleep(0.02)
    threading.Thread(target=trickle).start()
    assert proxy.read(ours, 5)[0] == ("192.0.2.7", 40000)


@pytest.mark.parametrize("data,why", [(b"EHLO x\r\n", "no PROXY header"),
                                      (b"PROXY TCP4 192.0.2.7 ", "within 1 seconds"),
                                      (b"", "within 1 seconds"),
                                      (b"PROXY " + b"x" * 200, "longer than 107")])
def test_read_refuses_missing_late_or_long_headers(data, why):
    ours, theirs = pair()
    theirs.sendall(data)
    t0 = time.monotonic()
    with pytest.raises(proxy.ProxyError) as e:
        proxy.read(ours, 1)
    assert why in str(e.value) and time.monotonic() - t0 < 2


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.builds(lambda b: SIG + b, st.binary(max_size=60)),
                 st.builds(lambda b: b"PROXY " + b, st.binary(max_size=120))))
def test_parsers_raise_only_proxy_errors(data):
    for parse in (proxy.parse_v1, proxy.parse_v2):
        try:
            got = parse(data)
        except proxy.ProxyError:
            continue
        assert got is None or (len(got) == 2 and all(0 <= p <= 65535 for _, p in got))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.builds(lambda b: SIG + b, st.binary(max_size=60)),
                 st.builds(lambda b: b"PROXY " + b, st.binary(max_size=120)),
                 st.sampled_from([v2(), v2(command=0), b"PROXY UNKNOWN\r\n"])))
def test_read_never_takes_a_byte_past_the_header(data):
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(data + b"|TAIL")
        theirs.shutdown(socket.SHUT_WR)
        try:
            proxy.read(ours, 0.05)
        except proxy.ProxyError:
            return
        rest = b""
        while not rest.endswith(b"|TAIL"):
            chunk = ours.recv(4096)
            assert chunk, "the reader took bytes past the header"
            rest += chunk
    finally:
        ours.close()
        theirs.close()


# -- smtpd -D with a trusted proxy --

def shut_without_a_word(sock, timeout=5):
    """The server closed (or reset) the connection and sent nothing."""
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def through(d, header, source="127.0.0.1"):
    s = socket.create_connection(("127.0.0.1", d.port), timeout=10,
                                 source_address=(source, 0))
    s.sendall(header)
    return Client(s)


def test_proxied_address_drives_rules_received_log_and_summary(daemon_):
    d = daemon_("noto:192.0.2.66:ALL:ALL:550 no %I\nallow:ALL:ALL:ALL\n", "-q",
                "-X", "127.0.0.1/32").wait_ready()
    c = through(d, b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n")
    assert c.reply()[0] == 220
    c.cmd("EHLO x")
    c.cmd("MAIL FROM:<a@b.example>")
    assert c.cmd("RCPT TO:<c@my.domain>")[0] == 250
    c.cmd("DATA")
    c.send(b"Subject: proxied\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 250
    c.cmd("QUIT")
    bad = through(d, v2(body=bytes([192, 0, 2, 66, 127, 0, 0, 1]) + struct.pack(">HH", 1, 25)))
    bad.reply()
    bad.cmd("EHLO x")
    bad.cmd("MAIL FROM:<a@b.example>")
    assert bad.cmd("RCPT TO:<c@my.domain>") == (550, ["5.7.1 no 192.0.2.66"])
    (name,) = spool_files(d.jail)
    assert b"Received: from x (unknown [192.0.2.7])" in open(os.path.join(d.jail, name), "rb").read()
    assert wait_for(lambda: "relay=UNKNOWN/192.0.2.7 as" in d.log())
    assert "127.0.0.1" not in [l for l in d.log().splitlines() if "relay=" in l][0]


def test_trusted_proxy_without_or_with_a_bad_header_is_refused(daemon_):
    d = daemon_("allow:ALL:ALL:ALL\n", "-X", "127.0.0.0/8", SMTPD_PROXY_TIMEOUT=1).wait_ready()
    for header in (b"", b"EHLO x\r\n", b"PROXY TCP4 999.0.2.7 127.0.0.1 1 25\r\n",
                   v2(family=4)):
        c = through(d, header)
        assert shut_without_a_word(c.sock), header
    for why in ("no complete PROXY header within 1 seconds", "no PROXY header (it began",
                "v1 header: bad address '999.0.2.7'", "v2 header: family 4"):
        assert wait_for(lambda: "refused 127.0.0.1: " + why in d.log()), why
    c = through(d, v2())                        # the worker goes on serving
    assert c.reply()[0] == 220


def test_v2_local_is_a_health_check_answered_by_the_front_stage(daemon_):
    """PROXY LOCAL is the balancer's own connection: greeted and answered
    by the front stage (issue 37), never a session on a worker, nothing
    logged above debug."""
    d = daemon_("allow:ALL:ALL:ALL\n", "-q", "-X", "127.0.0.0/8").wait_ready()
    c = through(d, v2(command=0), source="127.0.0.44")
    assert c.reply()[0] == 220
    assert c.cmd("HELO check")[0] == 250
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 421      # no mail from a balancer
    assert c.closed()
    assert wait_for(lambda: 'health check from 127.0.0.44: HELO "check"' in d.log())
    assert [l for l in d.log().splitlines() if "127.0.0.44" in l and "(debug)" not in l] == []


def test_a_proxy_header_from_an_untrusted_client_is_refused(daemon_):
    d = daemon_("allow:ALL:ALL:ALL\n", "-q", "-X", "127.0.0.5/32").wait_ready()
    c = d.connect("127.0.0.6")
    assert c.reply()[0] == 220
    assert c.cmd("PROXY TCP4 192.0.2.7 127.0.0.1 40000 25")[0] == 500
    c.cmd("HELO x")
    c.cmd("QUIT")
    assert wait_for(lambda: "relay=UNKNOWN/127.0.0.6" in d.log())
    assert "not a trusted proxy" in d.log() and "192.0.2.7" not in d.log().split("refused")[0]


def test_per_address_count_counts_real_clients(daemon_):
    d = daemon_("allow:ALL:ALL:ALL\n", "-X", "127.0.0.1/32", SMTPD_MAX_PER_IP=1).wait_ready()
    a = through(d, b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n")
    assert a.reply()[0] == 220
    again = through(d, b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 25\r\n")
    assert again.reply()[0] == 421
    other = through(d, b"PROXY TCP4 192.0.2.8 127.0.0.1 40002 25\r\n")
    assert other.reply()[0] == 220


def test_no_ident_behind_a_proxy(daemon_, ident_server):
    server = ident_server("127.0.0.1", "someone")
    d = daemon_("deny:someone@ALL:ALL:ALL\nallow:ALL:ALL:ALL\n", "-X",
                "127.0.0.1/32").wait_ready()
    c = through(d, b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 25\r\n")
    c.reply()
    c.cmd("HELO x")
    c.cmd("MAIL FROM:<a@b.example>")
    assert c.cmd("RCPT TO:<c@my.domain>")[0] == 250     # the user is UNKNOWN
    assert server.queries == []


def test_inetd_mode_behind_a_proxy(smtpd):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H", "-X", "127.0.0.1/32")
    s = socket.create_connection((srv.addr, srv.port), timeout=10)
    s.sendall(b"PROXY TCP4 192.0.2.9 127.0.0.1 40000 25\r\n")
    c = Client(s)
    assert c.reply()[0] == 220
    c.cmd("HELO x")
    c.cmd("MAIL FROM:<a@b.example>")
    c.cmd("RCPT TO:<c@my.domain>")
    c.cmd("DATA")
    c.send(b"x\r\n.\r\n")
    assert c.reply()[0] == 250
    (name,) = spool_files(srv.jail)
    assert b"(unknown [192.0.2.9])" in open(os.path.join(srv.jail, name), "rb").read()


def test_inetd_mode_refuses_a_bad_header_without_a_word(smtpd):
    srv = smtpd("allow:ALL:ALL:ALL\n", "-H", "-X", "127.0.0.1/32", SMTPD_PROXY_TIMEOUT=1)
    s = socket.create_connection((srv.addr, srv.port), timeout=10)
    s.sendall(b"HELO x\r\n")
    assert shut_without_a_word(s)
    assert "refused 127.0.0.1: no PROXY header" in srv.log()


def test_a_bad_x_flag_is_a_usage_error(tree_factory):
    import subprocess
    from harness import PYTHON, TEST_CONSTANTS
    tree = tree_factory(**TEST_CONSTANTS)
    p = subprocess.run([PYTHON, os.path.join(tree, "smtpd.py"), "-X", "10/8"],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert p.returncode == 64 and "-X: '10/8' is not an address or network" in p.stderr
