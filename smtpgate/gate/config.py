"""config - what smtpd runs with: its options and the Makefile's constants,
built once

DESCRIPTION
    build(flags) makes the one GateConfig every part of smtpd reads, before
    anything is forked: the command line over the Makefile's defaults, the
    identity to become (as root), the jail paths (taken under -c when not
    started as root), the networks of SMTPD_ADMISSION_EXEMPT and -X, the
    verification backend.  It is frozen: nothing changes it later.  What
    does change while smtpd runs -- the rules, the certificate -- lives in
    the Engine (engine.py), which the master replaces and hands down.
    A bad value of the configuration stops smtpd with 78 here, saying why.
"""

import collections
import os
import sys

import buildconf
from smtpgate import log, metrics, net, params, privileges, record
from smtpgate.gate import chat, sandbox


# Every field has the default smtpd would have without options, not started
# as root: GateConfig(spooldir=..., myname=...) is what a session run in the
# same process (the fuzzers, some tests) needs.  (A named tuple: immutable,
# and light to import, for inetd mode greets before it loads the rest.)
FIELDS = (
    ('chroot', buildconf.SPOOLDIR),                         # -c: the jail
    ('spooldir', buildconf.SPOOLSUBDIR),                    # -d, as the jailed process sees it
    ('rules_path', buildconf.CHECK_FILE),                   # as the jailed process sees it
    ('rules_shown', buildconf.CHECK_FILE),                  # the rules file as the operator knows it
    ('identity', None),                                     # (pw, gr) to become, when started as root
    ('myname', "localhost"),                                # -m
    ('maxsize', buildconf.MESSAGE_SIZE_LIMIT),              # -s: 0 for no limit
    ('hostchecks', True),                                   # not -H
    ('paranoid', False),                                    # -P
    ('daemon', False),                                      # -D
    ('foreground', False),                                  # -F
    ('log_pid', True),                                      # not -L
    ('quiet', False),                                       # -q
    ('listen', None),                                       # -l
    ('port', 25),                                           # -p
    ('pidfile', os.path.join(buildconf.PID_DIR, "smtpd.pid")),  # -i
    ('maxchildren', buildconf.SMTPD_MAXCHILDREN),           # -M
    ('tls_cert', buildconf.TLS_CERT),                       # -C
    ('tls_key', buildconf.TLS_KEY),                         # -K
    ('tls_explicit', False),                                # -C or -K given: a pair that fails is fatal
    ('exempt', ()),                                         # SMTPD_ADMISSION_EXEMPT networks
    ('proxy_from', ()),                                     # -X, SMTPD_PROXY_FROM networks
    ('verify_backend', None),                               # -V, SMTPD_VERIFY_BACKEND parsed
    ('verify_cache', ""),                                   # SMTPD_VERIFY_CACHE as the jailed process sees it
    ('milters', ()),                                        # -f, SMTPD_MILTERS: net.Endpoints
    ('dnsbl_sites', ()),                                    # SMTPD_DNSBL_SITES: dnsbl.Sites
    ('shared_store', ""),                                   # SMTPD_SHARED_STORE, checked
    ('milter_default', "tempfail"),                         # SMTPD_MILTER_DEFAULT_ACTION
    ('sandbox_missing', None),                              # why the seccomp sandbox cannot be had
    ('check', False),                                       # -t: check the configuration, no more
    ('flags', ()),                                          # the command line's fields, for a reload
)

# What a SIGHUP cannot change (master.py): what the master made of these at
# start -- the jail, the listener's identity, tables sized or made at start,
# the resolver, the shared store -- stays until the next start.
RESTART_ONLY = frozenset((
    "SPOOLDIR", "SPOOLSUBDIR", "CHECK_FILE", "PID_DIR", "TLS_CERT", "TLS_KEY", "SMTP_USER",
    "SMTP_GROUP", "LOG_FACILITY", "LOG_SOCKET", "DNS_TIMEOUT", "SMTPD_MAXCHILDREN",
    "SMTPD_MAX_RATE", "SMTPD_RATE_WINDOW", "SMTPD_RATE_TABLE", "SMTPD_DNSBL_CACHE",
    "SMTPD_DNSBL_TTL", "SMTPD_SHARED_STORE", "SMTPD_SHARED_STORE_SECRETS",
    "SMTPD_SHARED_STORE_PREFIX", "SMTPD_SHARED_STORE_TIMEOUT", "SMTPD_VERIFY_CACHE",
    "SMTPD_VERIFY_CACHE_SIZE", "SMTPD_SCREEN_MAX", "SMTPD_SCREEN_ALLOW_SIZE",
    "SMTPD_SCREEN_ALLOW_TTL", "SMTPD_METRICS_LISTEN"))


MILTER_ACTIONS = ("tempfail", "reject", "accept")     # milter.DEFAULTS


class GateConfig(collections.namedtuple("GateConfig", [n for n, _ in FIELDS],
                                        defaults=[d for _, d in FIELDS])):
    __slots__ = ()

    @property
    def root(self):
        return self.identity is not None


def defaults():
    """What the command line's fields are without flags (the settings as
    they are now: a reload may have changed them)."""
    return dict(
        chroot=buildconf.SPOOLDIR, spooldir=buildconf.SPOOLSUBDIR, user=buildconf.SMTP_USER,
        group=buildconf.SMTP_GROUP, myname=None, maxsize=buildconf.MESSAGE_SIZE_LIMIT,
        hostchecks=True, paranoid=False, daemon=False, foreground=False, log_pid=True,
        quiet=False, listen=None, port=25, pidfile=os.path.join(buildconf.PID_DIR, "smtpd.pid"),
        maxchildren=buildconf.SMTPD_MAXCHILDREN, tls_cert=buildconf.TLS_CERT,
        tls_key=buildconf.TLS_KEY, proxies=buildconf.SMTPD_PROXY_FROM,
        verify=buildconf.SMTPD_VERIFY_BACKEND, milters=buildconf.SMTPD_MILTERS, check=False)


def build(flags, reloading=False):
    """The GateConfig for the command line's fields (options.parse).  A
    reload builds it again: then a problem is returned as a list (the
    master keeps what it has), and nothing is said twice."""
    o = dict(defaults(), **flags)
    problems = constants()
    exempt = networks(buildconf.SMTPD_ADMISSION_EXEMPT, "SMTPD_ADMISSION_EXEMPT", problems)
    proxy_from = networks(o["proxies"], "SMTPD_PROXY_FROM", problems)
    backend = verify_backend(o["verify"], problems)
    filters = milters(o["milters"], problems)
    sites = dnsbl_sites(buildconf.SMTPD_DNSBL_SITES, problems)
    shared = shared_store(buildconf.SMTPD_SHARED_STORE, problems)
    if problems and reloading:
        return problems
    if problems:
        config_error(problems, inetd=not o["daemon"] and not o["check"])
    identity, spooldir, rules_path, cache = None, o["spooldir"], buildconf.CHECK_FILE, \
        buildconf.SMTPD_VERIFY_CACHE
    if os.geteuid() == 0:
        identity = privileges.resolve_identity(o["user"], o["group"])
    else:
        if not reloading:
            log.warn("not started as root: no chroot to %s, no change of user; "
                     "jail paths are taken under it", o["chroot"])
        spooldir, rules_path = under(o["chroot"], spooldir), under(o["chroot"], rules_path)
        cache = under(o["chroot"], cache) if cache else cache
    missing = sandbox.available()
    if missing and not reloading:       # once here, not in every jailed process
        (log.warn if o["daemon"] else log.debug)(
            "no seccomp sandbox for the jailed processes: %s", missing)
    return GateConfig(
        chroot=o["chroot"], spooldir=spooldir, rules_path=rules_path,
        rules_shown=under(o["chroot"], rules_path) if identity else rules_path,
        identity=identity, myname=o["myname"] or privileges.own_name(),
        maxsize=o["maxsize"], hostchecks=o["hostchecks"], paranoid=o["paranoid"],
        daemon=o["daemon"], foreground=o["foreground"], log_pid=o["log_pid"],
        quiet=o["quiet"], listen=o["listen"], port=o["port"], pidfile=o["pidfile"],
        maxchildren=o["maxchildren"], tls_cert=o["tls_cert"], tls_key=o["tls_key"],
        tls_explicit="tls_cert" in flags or "tls_key" in flags, exempt=tuple(exempt),
        proxy_from=tuple(proxy_from), verify_backend=backend, verify_cache=cache,
        milters=filters, milter_default=buildconf.SMTPD_MILTER_DEFAULT_ACTION,
        dnsbl_sites=sites, shared_store=shared,
        sandbox_missing=missing, check=o["check"], flags=tuple(sorted(flags.items())))


def constants():
    """What is wrong with the Makefile's constants: each against its bounds
    in the Makefile's table (params.py), then how they fit together."""
    problems = params.check(buildconf)
    if buildconf.SMTPD_MILTER_DEFAULT_ACTION not in MILTER_ACTIONS:
        problems.append("SMTPD_MILTER_DEFAULT_ACTION = %s: not one of %s"
                        % (buildconf.SMTPD_MILTER_DEFAULT_ACTION, ", ".join(MILTER_ACTIONS)))
    metrics.check_listen("SMTPD_METRICS_LISTEN", buildconf.SMTPD_METRICS_LISTEN, problems)
    record.check("SMTPD_LOG_FORMAT", buildconf.SMTPD_LOG_FORMAT, problems)
    if buildconf.SMTPD_PREFORK > buildconf.SMTPD_MAXCHILDREN:
        problems.append("SMTPD_PREFORK = %d: more than SMTPD_MAXCHILDREN (%d)"
                        % (buildconf.SMTPD_PREFORK, buildconf.SMTPD_MAXCHILDREN))
    return problems


def under(directory, path):
    return os.path.join(directory, path.lstrip("/"))


def networks(text, what, problems):
    try:
        return net.parse_networks(text, what)
    except net.ConfigError as e:
        problems.append(str(e))
        return []


def verify_backend(text, problems):
    """-V, SMTPD_VERIFY_BACKEND -> (lmtp?, address, port), or None if empty."""
    if not text:
        return None
    try:
        return net.parse_backend(text)
    except ValueError:
        problems.append("verification backend %r: not [lmtp:]address:port with an IP "
                        "address" % text)
        return None


def milters(text, problems):
    """-f, SMTPD_MILTERS -> a tuple of net.Endpoints (empty: no filters)."""
    try:
        return net.parse_milters(text)
    except ValueError as e:
        problems.append(str(e))
        return ()


def dnsbl_sites(text, problems):
    """SMTPD_DNSBL_SITES -> a tuple of dnsbl.Sites (empty: no scoring)."""
    if not text.strip():
        return ()
    from smtpgate.gate import dnsbl     # noqa: dnspython, loaded after an inetd greeting
    try:
        return dnsbl.parse_sites(text)
    except ValueError as e:
        problems.append(str(e))
        return ()


def shared_store(text, problems):
    """SMTPD_SHARED_STORE, its syntax checked (the secrets are read by
    engine.pre_jail_init, as root)."""
    if not text.strip():
        return ""
    from smtpgate import store         # noqa: only when configured
    try:
        store.parse_url(text)
    except store.ConfigError as e:
        problems.append(str(e))
    return text.strip()


def config_error(problems, inetd):
    """A configuration error found at start: logged, on stderr when it is
    not the client, 421 to an inetd client, exit 78."""
    for p in problems:
        log.err("%s", p)
    if not log.log.stderr and not log.stderr_is_socket():
        print("smtpd.py: " + "\nsmtpd.py: ".join(problems), file=sys.stderr)
    if inetd:
        chat.send(1, chat.NOT_AVAILABLE)
    sys.exit(os.EX_CONFIG)
