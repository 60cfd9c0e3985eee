"""proxy - the PROXY protocol (HAProxy's, versions 1 and 2), strictly

DESCRIPTION
    Behind a load balancer every client seems to come from the balancer.
    A connection from a network in SMTPD_PROXY_FROM (smtpd -X) must begin
    with a PROXY header, which names the real client; any other connection
    is plain SMTP, where a PROXY line is only a refused command.
    read(sock, timeout) reads exactly the header, never a byte past it (the
    client's own first bytes stay for the early-talker check), and returns
    the (source, destination) (address, port) pairs it names, or None for a
    v2 LOCAL or v1 UNKNOWN connection (a health check, or one the proxy
    made itself), which keeps the socket's own addresses.  Anything else --
    a missing, late, truncated, oversized or malformed header -- raises
    ProxyError, and the connection is closed.  A connection the proxy
    closes without a word (Closed) is a TCP health check: logged at
    LOG_DEBUG, as the PROXY LOCAL ones are.
FORMAT
    v1: "PROXY TCP4|TCP6 src dst sport dport\\r\\n" or "PROXY UNKNOWN...\\r\\n",
        at most 107 octets, single spaces, addresses of the named family,
        ports 0-65535 in decimal without leading zeros.
    v2: the 12-octet signature, version 2 and command LOCAL or PROXY,
        family INET or INET6 (UNSPEC and UNIX: the socket's addresses) over
        STREAM, a length of at most LENGTH_MAX covering the addresses; TLVs
        after them are skipped, but must not run past the header.
"""

import ipaddress
import re
import select
import socket
import struct
import time

from smtpgate import log

V1_MAX = 107
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
LENGTH_MAX = 2048           # octets after the 16-octet v2 prefix
PORT = re.compile(r"^(0|[1-9][0-9]{0,4})$")


class ProxyError(Exception):
    """No acceptable PROXY header; str() says why (for the log)."""


class Closed(ProxyError):
    """The proxy closed without a word: a TCP health check (cloud balancers
    connect and close), logged at LOG_DEBUG only."""


def parse_v1(line):
    """A v1 header line (with its CRLF) -> pairs or None (UNKNOWN)."""
    if len(line) > V1_MAX:
        raise ProxyError("v1 header longer than %d octets" % V1_MAX)
    if not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\n" in line[:-2]:
        raise ProxyError("v1 header not ended by CRLF")
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("v1 header is not ASCII") from None
    words = text.split(" ")
    if words[0] != "PROXY" or len(words) < 2:
        raise ProxyError("not a PROXY header")
    if words[1] == "UNKNOWN":
        return None
    if words[1] not in ("TCP4", "TCP6") or len(words) != 6:
        raise ProxyError("v1 header: bad protocol or field count")
    version = 4 if words[1] == "TCP4" else 6
    src, dst = address(words[2], version), address(words[3], version)
    return (src, port(words[4])), (dst, port(words[5]))


def address(text, version):
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError("v1 header: bad address %r" % text[:45]) from None
    if ip.version != version:
        raise ProxyError("v1 header: %s is not IPv%d" % (text, version))
    return str(ip)


def port(text):
    if not PORT.match(text) or int(text) > 65535:
        raise ProxyError("v1 header: bad port %r" % text[:10])
    return int(text)


def parse_v2(header):
    """A whole v2 header -> pairs or None (LOCAL, UNSPEC, UNIX)."""
    if len(header) < 16 or header[:12] != SIGNATURE:
        raise ProxyError("v2 header: bad signature")
    ver_cmd, fam, length = header[12], header[13], struct.unpack(">H", header[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise ProxyError("v2 header: version %d" % (ver_cmd >> 4))
    command = ver_cmd & 0xF
    if command not in (0, 1):
        raise ProxyError("v2 header: command %d" % command)
    if length > LENGTH_MAX or len(header) != 16 + length:
        raise ProxyError("v2 header: length %d" % length)
    body = header[16:]
    if command == 0:
        return None                 # LOCAL: a health check
    family, proto = fam >> 4, fam & 0xF
    if family in (0, 3):            # UNSPEC, UNIX: no client address
        return None
    if family not in (1, 2) or proto != 1:
        raise ProxyError("v2 header: family %d, protocol %d" % (family, proto))
    n = 4 if family == 1 else 16
    if length < 2 * n + 4:
        raise ProxyError("v2 header: %d octets cannot hold the addresses" % length)
    make = ipaddress.IPv4Address if n == 4 else ipaddress.IPv6Address
    src, dst = make(body[:n]), make(body[n:2 * n])
    sport, dport = struct.unpack(">HH", body[2 * n:2 * n + 4])
    check_tlvs(body[2 * n + 4:])
    return (str(src), sport), (str(dst), dport)


def check_tlvs(data):
    """Skip the TLVs, but they must fit exactly in what is left."""
    i = 0
    while i < len(data):
        if i + 3 > len(data):
            raise ProxyError("v2 header: truncated TLV")
        i += 3 + struct.unpack(">H", data[i + 1:i + 3])[0]
    if i != len(data):
        raise ProxyError("v2 header: a TLV runs past the header")


def ends(sock, local, peer, timeout):
    """(local, peer, health) of a connection from a trusted proxy: what its
    header names, or the socket's own for LOCAL or UNKNOWN -- the proxy's
    own connection, a health check, then health is True; (local, None,
    False) when the header is missing or bad, logged once."""
    try:
        names = read(sock, timeout)
    except (ProxyError, OSError) as e:
        (log.debug if isinstance(e, Closed) else log.notice)("refused %s: %s", peer[0], e)
        return local, None, False
    return (local, peer, True) if names is None else (names[1], names[0], False)


def header_in(data):
    """What a reader that must not block has peeked so far: (its length,
    the pairs or None) once a whole header is there; None while more may
    make one; ProxyError when it cannot be one (the front stage, screen.py)."""
    if len(data) >= 16 and data[:12] == SIGNATURE:
        length = struct.unpack(">H", data[14:16])[0]
        if length > LENGTH_MAX:
            raise ProxyError("v2 header: length %d" % length)
        return (16 + length, parse_v2(data[:16 + length])) if len(data) >= 16 + length \
            else None
    if data.startswith(b"PROXY "):
        end = data.find(b"\n")
        if end < 0:
            if len(data) >= V1_MAX:
                raise ProxyError("v1 header longer than %d octets" % V1_MAX)
            return None
        return end + 1, parse_v1(data[:end + 1])
    if not could_be(data):
        raise ProxyError("no PROXY header (it began %r)" % data[:16])
    return None


def could_be(data):
    """Could data still be the start of a v1 or v2 header?"""
    n = min(len(data), 12)
    return SIGNATURE[:n] == data[:n] or b"PROXY "[:min(len(data), 6)] == data[:6]


def read(sock, timeout):
    """Read and parse the header on sock within timeout seconds."""
    deadline = time.monotonic() + timeout
    head = peek(sock, 16, deadline, timeout, enough=lambda b: not could_be(b)
                or b.startswith(b"PROXY ") or len(b) >= 16)
    if len(head) >= 16 and head[:12] == SIGNATURE:
        length = struct.unpack(">H", head[14:16])[0]
        if length > LENGTH_MAX:
            raise ProxyError("v2 header: length %d" % length)
        return parse_v2(exactly(sock, 16 + length, deadline, timeout))
    if head.startswith(b"PROXY "):
        data = peek(sock, V1_MAX, deadline, timeout, enough=lambda b: b"\n" in b)
        end = data.find(b"\n")
        if end < 0:
            raise ProxyError("v1 header longer than %d octets" % V1_MAX)
        return parse_v1(exactly(sock, end + 1, deadline, timeout))
    raise ProxyError("no PROXY header (it began %r)" % head[:16])


def peek(sock, n, deadline, timeout, enough):
    """Up to n octets waiting on sock, without taking them, once enough()
    says they suffice or n are there."""
    while True:
        wait(sock, deadline, timeout)
        data = sock.recv(n, socket.MSG_PEEK)
        if not data:
            raise Closed("connection closed before the PROXY header")
        if len(data) >= n or enough(data):
            return data
        if time.monotonic() >= deadline:
            raise ProxyError("PROXY header incomplete after %s seconds" % timeout)
        time.sleep(0.005)       # more is on its way: let it arrive


def exactly(sock, n, deadline, timeout):
    out = b""
    while len(out) < n:
        wait(sock, deadline, timeout)
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ProxyError("connection closed inside the PROXY header")
        out += chunk
    return out


def wait(sock, deadline, timeout):
    left = deadline - time.monotonic()
    p = select.poll()
    p.register(sock, select.POLLIN)
    if left <= 0 or not p.poll(left * 1000):
        raise ProxyError("no complete PROXY header within %s seconds" % timeout)
