"""connection - one client connection becomes one session

DESCRIPTION
    serve(config, engine, conn) runs the session of a Connection -- inetd
    mode's descriptors 0 and 1, or a client the front stage passed to a
    worker (with what it learned: handoff.Passed) -- after
    identify() has made the Peer of it (peer.py): the forward-confirmed
    host name (unless -H), ident on demand (never behind a proxy: it cannot
    reach the client), the exemptions.  No lookup outlasts the session's
    deadline, SESSION_TIMEOUT from here; the time the lookups take counts
    towards the greeting pause (session.py), so the greeting comes at most
    max(DNS_TIMEOUT, SMTPD_GREET_PAUSE, SMTPD_DNSBL_TIMEOUT) after the
    connection.
"""

import dataclasses
import os
import time

import buildconf
from smtpgate import log, net
from smtpgate.deadline import Deadline
from smtpgate.gate import chat, session
from smtpgate.gate.client import peer_ip, socket_ends
from smtpgate.gate.peer import Peer
from smtpgate.rules import dnslookup, ident


@dataclasses.dataclass
class Connection:
    """A client's connection, as far as it is known before its session."""
    rfd: int
    wfd: int
    sock: object = None         # the caller's socket object for them, if any
    local: tuple = None         # (address, port) of our end; None: ask the socket
    peer: tuple = None          # (address, port) of the client (client.who)
    origin: str = None          # None, "proxy" or "health" (client.who)
    greeted: bool = False       # inetd mode has sent the 220 already
    on_end: object = None       # called once when the session is over
    accepted: float = None      # time.monotonic() when its session began
    keeper: object = None       # the worker's milter.Keeper; None: keep no filter connection
    passed: object = None       # handoff.Passed: what the front stage did before (-D)
    stress: object = None       # admission.Stress: the front stage's word (-D), or None
    on_message: object = None   # called with the client's address when a message is accepted


def identify(config, engine, conn, deadline, scoring=None):
    """The Peer of a connection, its rules' Client made; session.Closed
    with -P when the name does not confirm."""
    p = Peer.of(conn.local, conn.peer, conn.origin, scoring)
    lk = dnslookup.Lookup(engine.resolver, deadline)
    ip = p.ip
    if config.hostchecks and ip is not None and not p.health_check:    # the balancer itself
        try:
            p.name, why = lk.confirmed_name(ip)
            if why:
                log.info("%s", why)
                if config.paranoid and not why.startswith("no reverse"):
                    raise session.Closed(os.EX_PROTOCOL, why)
        except dnslookup.TempFail as e:
            log.notice("cannot identify %s: %s", ip, e)
            p.name_error = str(e)
    p.ptr = lk.ptr
    p.exempt = net.member(ip, config.exempt)
    user, ask = ident.of_client(conn.local, conn.peer, lk, behind_proxy=conn.origin is not None)
    p.rules_client(lk, user, ask)
    return p


def scoring(config, engine, conn, deadline):
    """The DNS lists' questions about the client, sent now (dnsbl.py), or
    None: no lists, a health check, an exempt network, a client the front
    stage scored."""
    ip = peer_ip(conn.peer)
    if engine.reputation is None or ip is None or conn.origin == "health" \
            or conn.passed is not None or net.member(ip, config.exempt):
        return None
    return engine.reputation.start(ip, engine.resolver, deadline)


def serve(config, engine, conn):
    """The session of conn; its exit status."""
    conn.accepted = time.monotonic()
    deadline = Deadline(conn.accepted + buildconf.SESSION_TIMEOUT)
    if conn.local is None:
        conn.local, conn.peer = socket_ends(conn.rfd)
    asked = scoring(config, engine, conn, deadline)
    try:
        peer = identify(config, engine, conn, deadline, asked)
        if conn.passed is not None:
            if conn.passed.score is not None:
                peer.scored(conn.passed.score)
            peer.exempt |= conn.passed.allowlisted
        return session.Session(config, engine, peer, conn, deadline).run()
    except session.Closed as c:
        log.crit("abandoning session with %s: %s", conn.peer and conn.peer[0], c)
        if conn.on_end is not None:
            conn.on_end()
        chat.send(conn.wfd, chat.NOT_AVAILABLE)
        return c.status
    finally:
        if asked is not None:
            asked.close()
