"""ident - RFC 1413: which user of the client's host opened the connection

DESCRIPTION
    of_client() says how a session learns its client's ident user, for the
    rules' user@host and USER tokens: from SMTPD_IDENT when set (UNKNOWN:
    none), else by query(), asked once, when a rule needs it, within
    CHECK_IDENT seconds and the session's deadline -- never behind a proxy,
    which it could not reach.  The answer comes from the client's host: it
    proves nothing about hosts you do not run, and it is bounded and checked
    (parse_reply) before anything uses it.
ENVIRONMENT
    SMTPD_IDENT         the client's user name (RFC 1413 is then not asked);
                        UNKNOWN means none
"""

import os
import re
import socket
import time

import buildconf
from smtpgate.rules.dnslookup import TempFail

IDENT_USER = re.compile(r"^[\x21-\x7e]{1,80}$")


def of_client(local, peer, lookup, behind_proxy):
    """(user, ask): the ident user when it is known already (SMTPD_IDENT),
    or a function that asks RFC 1413 once; (None, None) when it cannot be
    asked (a proxy in between, no addresses)."""
    known = os.environ.get("SMTPD_IDENT")
    if known == "UNKNOWN":
        return None, None
    if known is not None:
        return known, None
    if behind_proxy or not (local and peer):
        return None, None

    def ask():
        try:
            limit = lookup.time_left(buildconf.CHECK_IDENT)
        except TempFail:
            return None
        return query(local, peer, timeout=limit)
    return None, ask


def query(local, peer, port=None, timeout=None):
    """RFC 1413: the user owning the connection local<->peer, or None.

    local and peer are (address, port) pairs of the SMTP connection."""
    port = port or buildconf.IDENT_PORT
    timeout = timeout if timeout is not None else buildconf.CHECK_IDENT
    if timeout <= 0:
        return None
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((peer[0], port), timeout=timeout,
                                      source_address=(local[0], 0)) as s:
            s.sendall(b"%d , %d\r\n" % (peer[1], local[1]))
            reply = b""
            while b"\n" not in reply and len(reply) < 1023:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(1023 - len(reply))
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return None
    return parse_reply(reply, peer[1], local[1])


def parse_reply(reply, peer_port, local_port):
    """The user id of '<port> , <port> : USERID : <os> :<user>', or None."""
    line = reply.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
    parts = line.split(":", 3)
    if len(parts) != 4 or parts[1].strip().upper() != "USERID":
        return None
    try:
        ports = [int(p) for p in parts[0].split(",")]
    except ValueError:
        return None
    words = parts[3].split()
    if ports != [peer_port, local_port] or not words:
        return None
    user = words[0][:80]
    return user if IDENT_USER.match(user) else None
