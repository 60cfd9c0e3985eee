"""client - who is the client: decided once, before the greeting

DESCRIPTION
    socket_ends() reads both ends of a connection from its descriptor;
    who() then names the client: the socket's peer, or -- from a trusted
    proxy (-X, SMTPD_PROXY_FROM) -- the client its PROXY header names
    (proxy.py).  The answer's origin says which: None (the socket), "proxy"
    (a PROXY header), or "health" (the proxy's own connection, PROXY LOCAL:
    a health check).  From then on that address is the client everywhere:
    rules, limits, Received, logs.  Light to import: inetd mode calls it
    before its greeting.
"""

import os
import socket

import buildconf
from smtpgate import net
from smtpgate.gate import proxy
from smtpgate.net import normalize_ip


def peer_ip(peer):
    """The client's address as an ipaddress object; None when there is none
    (not a socket, a Unix socket, an unparsable name)."""
    try:
        return normalize_ip(peer[0]) if peer and peer[0] else None
    except (ValueError, TypeError):
        return None


def socket_ends(fd):
    """(local, peer) (address, port) pairs of fd, or (None, None)."""
    s = socket_of(fd)
    if s is None:
        return None, None
    try:
        return s.getsockname()[:2], s.getpeername()[:2]
    except (OSError, TypeError, ValueError):
        return None, None
    finally:
        s.close()


def socket_of(fd):
    """A socket object on a dup of fd, or None if fd is not a socket."""
    d = os.dup(fd)
    try:
        return socket.socket(fileno=d)
    except OSError:
        os.close(d)
        return None


def trusted_proxy(config, peer):
    return net.member(peer_ip(peer), config.proxy_from)


def who(config, sock, local, peer):
    """(local, peer, origin) of a connection (see above).  From a trusted
    proxy whose header is missing or bad: peer None (logged once); the
    caller closes the connection without a word."""
    if not trusted_proxy(config, peer):
        return local, peer, None
    local, peer, health = proxy.ends(sock, local, peer, buildconf.SMTPD_PROXY_TIMEOUT)
    return local, peer, "health" if health else "proxy"


def refused_by_listen(config, local):
    """-l in inetd mode: a connection to another of our addresses is refused."""
    if config.listen is None or local is None:
        return False
    return normalize_ip(local[0]) != normalize_ip(config.listen)
