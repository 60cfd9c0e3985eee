"""net - client addresses and the networks the configuration names

DESCRIPTION
    normalize_ip() makes every address an ipaddress object, IPv4-mapped
    IPv6 as IPv4, so that one client is one address whichever socket it
    came through; parse_networks() reads a CIDR list of the configuration
    (SMTPD_ADMISSION_EXEMPT, SMTPD_PROXY_FROM, -X); member() asks whether an
    address is in one; parse_backend() and parse_milters() read the
    addresses of the verification backend and of the mail filters.
"""

import collections
import ipaddress
import re
import socket


class ConfigError(Exception):
    """A bad address list in the configuration; str() says which."""


PARSED = {}                 # address text -> normalize_ip's answer (immutable objects)
PARSED_MAX = 1024


def normalize_ip(addr):
    """An ipaddress object; IPv4-mapped IPv6 becomes IPv4; None/"" -> None.
    (Each session asks for its client's a few times: the text's answer is
    kept, at most PARSED_MAX of them.)"""
    if addr is None or addr == "":
        return None
    if isinstance(addr, str):
        ip = PARSED.get(addr)
        if ip is None:
            ip = ipaddress.ip_address(addr)
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if len(PARSED) >= PARSED_MAX:
                PARSED.clear()
            PARSED[addr] = ip
        return ip
    ip = addr
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_networks(text, what):
    """The CIDR list in text -> [ip_network]; ConfigError if one is bad."""
    out = []
    for tok in text.split():
        try:
            out.append(ipaddress.ip_network(tok, strict=False))
        except ValueError as e:
            raise ConfigError("%s: %r is not an address or network: %s" % (what, tok, e)) \
                from None
    return out


def member(ip, networks):
    """Is ip (an ipaddress object, IPv4-mapped already IPv4) in networks?"""
    if not networks or ip is None:
        return False
    return any(ip.version == n.version and ip in n for n in networks)


def parse_backend(text):
    """'[lmtp:]address:port' -> (lmtp?, address, port); ValueError.  The
    address is an IP literal (IPv6 in brackets or not): a jailed process
    cannot resolve names it was not given."""
    lmtp = text.startswith("lmtp:")
    rest = text[5:] if lmtp else text.removeprefix("smtp:")
    host, _, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ip = ipaddress.ip_address(host)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("no port in %r" % text)
    return lmtp, str(ip), int(port)


Endpoint = collections.namedtuple("Endpoint", "text family host port")
INET = re.compile(r"^inet:(?:(?P<host>[0-9.]+):(?P<port>\d+)|(?P<port2>\d+)@(?P<host2>[0-9.]+))$")
INET6 = re.compile(r"^inet6:(?:\[(?P<host>[0-9A-Fa-f:.]+)\]:(?P<port>\d+)"
                   r"|(?P<port2>\d+)@\[?(?P<host2>[0-9A-Fa-f:.]+)\]?)$")


def parse_milters(text):
    """SMTPD_MILTERS, smtpd -f: 'inet:ADDR:PORT' or 'inet6:[ADDR]:PORT' (or
    Sendmail's 'inet:PORT@ADDR'), separated by spaces or commas -> a tuple
    of Endpoints, in order; ValueError naming the one that is not.  IP
    addresses only: the jailed worker resolves no names."""
    out = []
    for tok in text.replace(",", " ").split():
        m = (INET if tok.startswith("inet:") else INET6).match(tok)
        if m is None:
            raise ValueError("milter %r: not inet:address:port or inet6:[address]:port" % tok)
        host, port = m.group("host") or m.group("host2"), int(m.group("port") or m.group("port2"))
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("milter %r: %r is not an IP address" % (tok, host)) from None
        if (ip.version == 4) != tok.startswith("inet:") or not 0 < port < 65536:
            raise ValueError("milter %r: wrong address family or port" % tok)
        out.append(Endpoint(tok, socket.AF_INET if ip.version == 4 else socket.AF_INET6,
                            str(ip), port))
    return tuple(out)
