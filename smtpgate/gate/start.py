"""start - smtpd from its command line to its first session

DESCRIPTION
    run(config) is all smtpd does after its options: the pre-jail phase
    (engine.pre_jail_init, as root), then either the -D master (master.py)
    or one inetd session on descriptors 0 and 1 -- or, with -t, the checks
    of a start and nothing more (check()).
    In inetd mode the greeting goes out first, so the client does not wait
    while the rest of smtpd loads (load()) -- unless something must be read
    before it (a PROXY header, an early talker, the DNS lists' score): then
    the process enters the
    jail first, for nothing from the network is read as root, and the
    session greets after its pause, as in -D mode.  This module and what it
    imports are light (client.py, proxy.py): inetd mode greets within ~25 ms.
"""

import os

import buildconf
from smtpgate import log
from smtpgate.gate import chat, client


def load():
    """The rest of smtpd: its rules engine, resolver, TLS, sessions and
    master, about 100 ms of imports.  Always loaded before the jail (the
    jail has no Python library); in inetd mode after the greeting."""
    from smtpgate.gate import connection, engine, master   # noqa: deliberately here
    return connection, engine, master


def run(config):
    """smtpd after its options: the exit status."""
    if config.check:
        return check(config)
    if config.daemon:
        _, engine, master = load()
        return master.run(config, engine.pre_jail_init(config))
    return inetd(config)


def check(config):
    """-t: what a start checks, and no more.  The flags, constants and
    settings, filters' and store's syntax were checked by config.build;
    here the certificate and key and the store's secrets (pre_jail_init, as
    root) and the rules, read in the jail by a one-shot watcher as at
    start.  Each of these says what is wrong and exits 78."""
    _, engine, master = load()
    engine.pre_jail_init(config)
    master.load_rules(config, None)
    settings = buildconf.SETTINGS_FILE
    print("smtpd.py: configuration OK: rules %s, settings %s" % (
        config.rules_shown, settings if settings and os.path.exists(settings) else "(none)"))
    return os.EX_OK


def inetd(config):
    """One session on descriptors 0 and 1."""
    local, peer = client.socket_ends(0)
    early = client.trusted_proxy(config, peer) or buildconf.SMTPD_GREET_PAUSE \
        or config.dnsbl_sites
    if not early:
        if refused(config, local, peer):
            return os.EX_OK
        if not chat.send(1, chat.GREETING % config.myname):
            log.info("write to client failed")
            return os.EX_OSERR
    connection, engine, _ = load()
    ready = engine.pre_jail_init(config)
    engine.enter_jail(config)
    origin = None
    if early:
        sock = client.socket_of(0)
        local, peer, origin = client.who(config, sock, local, peer)
        if sock is not None:
            sock.close()
        if peer is None:
            return os.EX_PROTOCOL
        if refused(config, local, peer):
            return os.EX_OK
    return connection.serve(config, ready, connection.Connection(
        0, 1, local=local, peer=peer, origin=origin, greeted=not early))


def refused(config, local, peer):
    """-l: a connection to another of our addresses gets 521 (the original's
    inetd behaviour); True if so."""
    if not client.refused_by_listen(config, local):
        return False
    log.info("Refused connection attempt to %s from %s", local[0], peer and peer[0])
    chat.send(1, chat.NOT_SPOKEN % config.myname)
    return True
