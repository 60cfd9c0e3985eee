#!/usr/bin/env python3
"""smtpd - Obtuse-compatible SMTP storing daemon

SYNOPSIS
    smtpd.py [-DFHLPq] [-c chrootdir] [-d spooldir] [-u user] [-g group]
             [-m myname] [-s maxsize] [-l address] [-p port] [-i pidfile] [-M max]
             [-C certfile] [-K keyfile] [-X proxies] [-V backend]
DESCRIPTION
    Speaks SMTP on stdin (inetd) or on a listening socket (-D) and writes each
    accepted message to the spool for smtpfwdd(8).  Every recipient is checked
    against the smtpd_check_rules file (checkrules.py).  STARTTLS is offered
    with the certificate -C and key -K (TLS_CERT, TLS_KEY).  Behind a load
    balancer, connections from the networks -X (SMTPD_PROXY_FROM) begin with
    a PROXY header naming the real client (proxy.py).  A "verify" rule asks
    the backend MTA -V (SMTPD_VERIFY_BACKEND) whether a recipient exists
    (verify.py).
SECURITY
    Talks to the network.  Sessions run chrooted to -c as -u/-g; only the
    master keeps root, and it never reads network input.  Everything the jail
    lacks (imports, resolver, syslog socket, time zone, own name, the TLS
    certificate and key) is done before the chroot.
EXIT STATUS
    0 QUIT or -l refusal; 1 another -D daemon holds the pid file; 64 usage;
    70 unexpected error in a session; 71 client gone, timeout, I/O error;
    73 a spool file cannot be created; 76 denied by a rule, too many
    errors or a protocol violation; 78 configuration error.
"""

import getopt
import ipaddress
import os
import socket
import sys
import time

import buildconf
from smtpgate import log, privileges
from smtpgate import net
from smtpgate.net import normalize_ip
from smtpgate.gate import proxy
from smtpgate.gate import sandbox
from smtpgate.replies import VANILLA

# checkrules, lookup, prefork, session, tlscert and verify take ~100 ms to
# import: load_engine() imports them after the greeting has gone out, and
# always before the jail.
checkrules = lookup = prefork = session = tlscert = verify = None

USAGE = """usage: smtpd.py [-DFHLPq] [-c chrootdir] [-d spooldir] [-u user] [-g group]
                [-m myname] [-s maxsize] [-l address] [-p port] [-i pidfile] [-M max]
                [-C certfile] [-K keyfile] [-X proxies] [-V backend]"""


class Config:
    """The options of smtpd, with the Makefile's defaults."""

    def __init__(self):
        self.chroot = buildconf.SPOOLDIR
        self.spooldir = buildconf.SPOOLSUBDIR
        self.user, self.group = buildconf.SMTP_USER, buildconf.SMTP_GROUP
        self.myname = None
        self.maxsize = buildconf.MESSAGE_SIZE_LIMIT     # 0: no limit
        self.hostchecks = True
        self.paranoid = False
        self.daemon = False
        self.foreground = False
        self.log_pid = True
        self.quiet = False
        self.listen = None
        self.port = 25
        self.pidfile = os.path.join(buildconf.PID_DIR, "smtpd.pid")
        self.maxchildren = buildconf.SMTPD_MAXCHILDREN
        self.rules = None
        self.rules_path = buildconf.CHECK_FILE
        self.tls_cert, self.tls_key = buildconf.TLS_CERT, buildconf.TLS_KEY
        self.tls_explicit = False       # -C or -K: a pair that fails is fatal
        self.certs = None               # tlscert.Certificates
        self.tls_context = None         # what a session offers STARTTLS with
        self.exempt = []                # SMTPD_ADMISSION_EXEMPT networks
        self.proxy_text = buildconf.SMTPD_PROXY_FROM     # -X: trusted proxies
        self.proxy_from = []
        self.verify_text = buildconf.SMTPD_VERIFY_BACKEND  # -V: [lmtp:]address:port
        self.verify_backend = None
        self.verify_cache = None


def usage_error(msg):
    """Log a bad option and exit 64; stderr only if it is not the client."""
    log.err("%s", msg)
    if not log.stderr_is_socket():
        print(USAGE, file=sys.stderr)
    sys.exit(os.EX_USAGE)


def positive(opt, value):
    if not value.isdigit() or int(value) <= 0:
        usage_error("%s needs a positive number, not %r" % (opt, value))
    return int(value)


def number(opt, value):
    if not value.isdigit():
        usage_error("%s needs a number of bytes (0: no limit), not %r" % (opt, value))
    return int(value)


def absolute(opt, value):
    if not value.startswith("/"):
        usage_error("%s needs an absolute path, not %r" % (opt, value))
    return value


def parse_options(argv):
    cfg = Config()
    try:
        opts, args = getopt.getopt(argv, "c:d:u:g:m:s:l:p:i:M:C:K:X:V:DFHLPq")
    except getopt.GetoptError as e:
        usage_error(str(e))
    if args:
        usage_error("unexpected argument %r" % args[0])
    for o, v in opts:
        if o == "-c":
            cfg.chroot = absolute(o, v)
        elif o == "-d":
            cfg.spooldir = absolute(o, v)
        elif o == "-u":
            cfg.user = v
        elif o == "-g":
            cfg.group = v
        elif o == "-m":
            cfg.myname = v
        elif o == "-s":
            cfg.maxsize = number(o, v)
        elif o == "-l":
            try:
                cfg.listen = str(ipaddress.ip_address(v))
            except ValueError:
                usage_error("-l needs an IPv4 or IPv6 address, not %r" % v)
        elif o == "-p":
            cfg.port = positive(o, v)
            if cfg.port > 65535:
                usage_error("-p %s: no such port" % v)
        elif o == "-i":
            cfg.pidfile = absolute(o, v)
        elif o == "-M":
            cfg.maxchildren = positive(o, v)
        elif o == "-V":
            cfg.verify_text = v
        elif o == "-X":
            try:
                net.parse_networks(v, "-X")
            except net.ConfigError as e:
                usage_error(str(e))
            cfg.proxy_text = v
        elif o in ("-C", "-K"):
            setattr(cfg, "tls_cert" if o == "-C" else "tls_key", absolute(o, v))
            cfg.tls_explicit = True
        else:
            setattr(cfg, {"-D": "daemon", "-F": "foreground", "-q": "quiet",
                          "-P": "paranoid"}.get(o, "_"), True)
            if o == "-H":
                cfg.hostchecks = False
            elif o == "-L":
                cfg.log_pid = False
    return cfg


def load_engine():
    """Import the rules engine, resolver, session and daemon code."""
    global checkrules, lookup, prefork, session, tlscert, verify
    from smtpgate.rules import engine as checkrules
    from smtpgate.rules import lookup
    from smtpgate.gate import master as prefork
    from smtpgate.gate import session
    from smtpgate.gate import tls as tlscert
    from smtpgate.gate import verify


def check_admission(cfg):
    """The admission constants: a bad one is a configuration error (78)."""
    problems = []
    for attr, text, what in (("exempt", buildconf.SMTPD_ADMISSION_EXEMPT,
                              "SMTPD_ADMISSION_EXEMPT"),
                             ("proxy_from", cfg.proxy_text, "SMTPD_PROXY_FROM")):
        try:
            setattr(cfg, attr, net.parse_networks(text, what))
        except net.ConfigError as e:
            problems.append(str(e))
    for name, top in (("SMTPD_V4_PREFIX", 32), ("SMTPD_V6_PREFIX", 128),
                      ("SMTPD_MAX_RATE", 100000), ("SMTPD_RATE_WINDOW", 86400),
                      ("SMTPD_RATE_TABLE", 1 << 20), ("SMTPD_GREET_PAUSE", 600000),
                      ("SMTPD_SOFT_ERRORS", 1000), ("SMTPD_ERROR_SLEEP", 3600),
                      ("SMTPD_PROXY_TIMEOUT", 3600), ("SMTPD_FORBID_UNAUTH_PIPELINING", 1),
                      ("MESSAGE_SIZE_LIMIT", 1 << 40), ("MAX_ERRORS", 1000)):
        value = getattr(buildconf, name)
        if not isinstance(value, int) or not 0 <= value <= top:
            problems.append("%s = %r: must be a number from 0 to %d" % (name, value, top))
    if buildconf.SMTPD_MAX_RATE and not (buildconf.SMTPD_RATE_WINDOW and buildconf.SMTPD_RATE_TABLE):
        problems.append("SMTPD_MAX_RATE needs SMTPD_RATE_WINDOW and SMTPD_RATE_TABLE above 0")
    for p in problems:
        log.err("%s", p)
    if problems:
        if not log.stderr_is_socket() and not log.log.stderr:
            print("smtpd.py: " + "\nsmtpd.py: ".join(problems), file=sys.stderr)
        sys.exit(os.EX_CONFIG)


def prepare(cfg):
    """As the original before its chroot: identity, paths and own name."""
    check_admission(cfg)
    cfg.root = os.geteuid() == 0
    if cfg.root:
        cfg.pw, cfg.gr = privileges.resolve_identity(cfg.user, cfg.group)
    else:
        log.warn("not started as root: no chroot to %s, no change of user; "
                "jail paths are taken under it", cfg.chroot)
        cfg.spooldir = os.path.join(cfg.chroot, cfg.spooldir.lstrip("/"))
        cfg.rules_path = os.path.join(cfg.chroot, cfg.rules_path.lstrip("/"))
    if cfg.myname is None:
        cfg.myname = privileges.own_name()
    cfg.sandbox_missing = sandbox.available()
    if cfg.sandbox_missing:     # once here, not in every jailed process
        (log.warn if cfg.daemon else log.debug)(
            "no seccomp sandbox for the jailed processes: %s", cfg.sandbox_missing)


def prepare_engine(cfg):
    """The rest of what the jail lacks: the engine, rules, resolver, and the
    certificate and key (read here, as root; never from inside the jail).
    A pair that was named with -C/-K, or exists, but cannot be loaded is a
    configuration error: 78."""
    load_engine()
    cfg.rules = checkrules.RulesFile(cfg.rules_path)
    cfg.resolver = lookup.make_resolver()
    prepare_verify(cfg)
    cfg.certs = tlscert.Certificates(cfg.tls_cert, cfg.tls_key, cfg.tls_explicit)
    for path in (cfg.tls_cert, cfg.tls_key):
        if path and inside(path, cfg.chroot):
            fatal_config(cfg, "%s is inside the jail %s: the certificate and key must be "
                              "where the smtpd user cannot reach them" % (path, cfg.chroot))
    try:
        cfg.tls_context = cfg.certs.start(quiet=not cfg.daemon).context
    except tlscert.CertError as e:
        fatal_config(cfg, "cannot load the TLS certificate and key: %s" % e)
    privileges.prepare_jail()


def inside(path, directory):
    """Is path (links resolved) inside directory?"""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def prepare_verify(cfg):
    """The verification backend (-V, SMTPD_VERIFY_BACKEND) and the cache
    inside the jail; the database opens there, at the first verify rule."""
    if cfg.verify_text:
        try:
            cfg.verify_backend = verify.parse_backend(cfg.verify_text)
        except ValueError:
            fatal_config(cfg, "verification backend %r: not [lmtp:]address:port with an IP "
                         "address" % cfg.verify_text)
    path = buildconf.SMTPD_VERIFY_CACHE
    if path and not cfg.root:
        path = os.path.join(cfg.chroot, path.lstrip("/"))
    cfg.verify_cache = verify.Cache(path)


def fatal_config(cfg, msg):
    """A configuration error found while loading: logged, on stderr when it
    is not the client, 421 to an inetd client, exit 78."""
    log.err("%s", msg)
    if not log.log.stderr and not log.stderr_is_socket():
        print("smtpd.py: %s" % msg, file=sys.stderr)
    if not cfg.daemon:
        os.write(1, b"421 %s\r\n" % VANILLA[421].encode())
    sys.exit(os.EX_CONFIG)


def jail(cfg):
    """Enter the chroot and drop privileges (root only), then the seccomp
    sandbox (sandbox.py): from here on the process reaches no other."""
    if cfg.root:
        privileges.enter_jail(cfg.pw, cfg.gr, cfg.chroot)
    if cfg.sandbox_missing:
        return
    try:
        sandbox.enter()
    except sandbox.SandboxError as e:
        log.err("seccomp sandbox: %s; going on without it", e)


def peer_ip(peer):
    """The client's address as an ipaddress object; None when there is none
    (not a socket, a Unix socket, an unparsable name)."""
    try:
        return normalize_ip(peer[0]) if peer and peer[0] else None
    except (ValueError, TypeError):
        return None


def socket_ends(fd):
    """(local, peer) (address, port) pairs of fd, or (None, None)."""
    d = os.dup(fd)
    try:
        s = socket.socket(fileno=d)
    except OSError:
        os.close(d)
        return None, None
    try:
        return s.getsockname()[:2], s.getpeername()[:2]
    except (OSError, TypeError, ValueError):
        return None, None
    finally:
        s.close()


def identify(cfg, local, peer, deadline, proxied=False):
    """The checkrules.Client for a connection: FCrDNS unless -H; no lookup
    outlasts the session deadline; no ident behind a proxy (it cannot reach
    the client: the user is UNKNOWN)."""
    lk = lookup.Lookup(cfg.resolver, deadline)
    ip = peer_ip(peer)
    name, error = None, None
    if cfg.hostchecks and ip is not None:
        try:
            name, why = lk.confirmed_name(ip)
            if why:
                log.info("%s", why)
                if cfg.paranoid and not why.startswith("no reverse"):
                    raise session.Closed(os.EX_PROTOCOL, why)
        except lookup.TempFail as e:
            log.notice("cannot identify %s: %s", ip, e)
            error = str(e)
    def ask_ident():
        try:
            limit = lk.time_left(buildconf.CHECK_IDENT)
        except lookup.TempFail:
            return None
        return lookup.ident_query(local, peer, timeout=limit)
    ident_fn = None
    env_ident = os.environ.get("SMTPD_IDENT")
    if env_ident == "UNKNOWN":
        env_ident = None
    elif env_ident is None and local and peer and not proxied:
        ident_fn = ask_ident
    c = checkrules.Client(ip, name, lk, ident=env_ident, ident_fn=ident_fn,
                          name_error=error)
    c.local, c.peer = local, peer
    c.exempt = net.member(ip, cfg.exempt)
    return c


def serve(cfg, rfd, wfd, local=None, peer=None, greeted=False, sock=None, on_end=None,
          origin=None):
    """One session on rfd/wfd (sock: their socket object, if the caller has
    one); on_end() runs once when it is over, before its last reply goes
    out; origin: None (the socket names the client), "proxy" (a PROXY
    header does) or "health" (the trusted proxy's own connection, LOCAL:
    a health check, whose routine lines are not logged).  Returns the exit
    status.  SESSION_TIMEOUT counts from here."""
    deadline = time.monotonic() + buildconf.SESSION_TIMEOUT
    if local is None:
        local, peer = socket_ends(rfd)
    try:
        client = identify(cfg, local, peer, deadline, origin is not None)
        client.health_check = origin == "health"
    except session.Closed as c:
        log.crit("abandoning session with %s: %s", peer and peer[0], c)
        if on_end is not None:
            on_end()
        os.write(wfd, b"421 %s\r\n" % VANILLA[421].encode())
        return c.status
    return session.Session(cfg, client, rfd, wfd, greeted, sock, deadline, on_end).run()


def proxied_ends(local, peer):
    """inetd mode, from a trusted proxy: (local, peer, health) as its PROXY
    header names them (the socket's for LOCAL, a health check); peer None
    when the header is missing or bad (logged; nothing is sent)."""
    d = os.dup(0)
    try:
        sock = socket.socket(fileno=d)
    except OSError:
        os.close(d)
        return local, None, False
    try:
        return proxy.ends(sock, local, peer, buildconf.SMTPD_PROXY_TIMEOUT)
    finally:
        sock.close()


def refused_by_listen(cfg, local):
    """-l in inetd mode: a connection to another local address gets 521."""
    if cfg.listen is None or local is None:
        return False
    return normalize_ip(local[0]) != normalize_ip(cfg.listen)


def inetd(cfg):
    """One session on fds 0/1.  The greeting goes out first, so the client
    does not wait while the engine loads -- unless something must be read
    before it (a PROXY header, an early talker): then the process enters
    the jail first, for nothing from the network is read as root, and the
    session greets after its pause, as in -D mode."""
    local, peer = socket_ends(0)
    trusted = net.member(peer_ip(peer), cfg.proxy_from)
    early = trusted or buildconf.SMTPD_GREET_PAUSE
    if early:
        prepare_engine(cfg)
        jail(cfg)
    origin = None
    if trusted:
        local, peer, health = proxied_ends(local, peer)
        if peer is None:
            return os.EX_PROTOCOL
        origin = "health" if health else "proxy"
    if refused_by_listen(cfg, local):
        log.info("Refused connection attempt to %s from %s", local[0], peer and peer[0])
        os.write(1, b"521 %s %s\r\n" % (cfg.myname.encode(), VANILLA[521].encode()))
        return os.EX_OK
    if early:
        return serve(cfg, 0, 1, local, peer, origin=origin)
    try:
        os.write(1, b"220 %s %s\r\n" % (cfg.myname.encode(), VANILLA[220].encode()))
    except OSError as e:
        log.info("write to client: %s", e.strerror)
        return os.EX_OSERR
    prepare_engine(cfg)
    jail(cfg)
    return serve(cfg, 0, 1, local, peer, greeted=True)


def main(argv):
    log.log.open("smtpd", buildconf.LOG_FACILITY, pid=True,
                stderr=not log.stderr_is_socket(), path=buildconf.LOG_SOCKET)
    cfg = parse_options(argv)
    if not cfg.log_pid:
        log.log.open("smtpd", buildconf.LOG_FACILITY, pid=False, path=buildconf.LOG_SOCKET,
                    stderr=log.log.stderr)
    if cfg.foreground:
        log.log.stderr = True
    # Detached (-D without -F), standard error is gone: say so if syslog is too.
    log.log.say_if_unheard("smtpd", stays=cfg.foreground or not cfg.daemon)
    prepare(cfg)
    if cfg.daemon:
        prepare_engine(cfg)
        cfg.serve, cfg.enter_jail = serve, jail
        return prefork.run(cfg)
    return inetd(cfg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
