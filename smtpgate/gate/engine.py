"""engine - what smtpd's sessions work with, and the two phases around the jail

DESCRIPTION
    pre_jail_init(config) runs as root, before any chroot, and returns the
    Engine: everything a jailed process needs and could not get later --
    the rules (inetd mode reads the file itself when it changes; the -D
    master puts in what its watcher read), the resolver, the verification
    cache, the DNS lists' score cache, the TLS certificate and key (read
    here, from outside the jail, and never again by a jailed process), the
    shared store.  An Engine never changes: the -D master makes a new one
    when the rules, the certificate or the settings change (reloaded()),
    and each worker keeps the one it was forked with.
    enter_jail(config) is the one way into the jail: chroot to -c and
    become -u/-g (as root, privileges.confine), then the seccomp sandbox.
    Nothing read from the network is read before it.
"""

import dataclasses
import os

import buildconf
from smtpgate import log, privileges, spooldir, store
from smtpgate.gate import dnsbl, sandbox, tls, verify
from smtpgate.gate.config import config_error
from smtpgate.rules import dnslookup
from smtpgate.rules.ruleset import RulesFile


@dataclasses.dataclass(frozen=True)
class Engine:
    rules: object               # .get() -> the compiled rules (engine.RuleError)
    resolver: object            # dnspython's, built before the jail
    certificates: object        # tls.Certificates: the files, reloaded by the master
    tls_context: object         # what STARTTLS is offered with, or None
    verify_cache: object        # verify.Cache in the jail, opened at first use
    reputation: object = None   # dnsbl.Reputation (its cache mapped before the fork), or None
    shared: object = None       # store.Redis shared by several gates, or None
    dir_sync: object = None     # spooldir.GroupSync of the -D workers, or None (inetd)


class FrozenRules:
    """The rules a -D worker was forked with (its master re-reads them)."""

    def __init__(self, rules):
        self.rules = rules

    def get(self):
        return self.rules


def pre_jail_init(config):
    """As root, before the jail: the Engine.  A certificate or key that was
    named with -C/-K, or exists, but cannot be loaded -- or lies inside the
    jail -- is a configuration error: 78."""
    certificates = tls.Certificates(config.tls_cert, config.tls_key, config.tls_explicit)
    for path in (config.tls_cert, config.tls_key):
        if path and inside(path, config.chroot):
            config_error(["%s is inside the jail %s: the certificate and key must be where "
                          "the smtpd user cannot reach them" % (path, config.chroot)],
                         inetd=not config.daemon)
    try:
        context = certificates.start(quiet=not config.daemon).context
    except tls.CertError as e:
        config_error(["cannot load the TLS certificate and key: %s" % e],
                     inetd=not config.daemon)
    try:
        shared = store.from_config(config.shared_store, buildconf.SMTPD_SHARED_STORE_SECRETS,
                                   buildconf.SMTPD_SHARED_STORE_PREFIX,
                                   buildconf.SMTPD_SHARED_STORE_TIMEOUT)
    except store.ConfigError as e:
        config_error([str(e)], inetd=not config.daemon)
    privileges.prepare_jail()
    cache = verify.Cache(config.verify_cache)
    return Engine(rules=None if config.daemon else RulesFile(config.rules_path),
                  resolver=dnslookup.make_resolver(), certificates=certificates,
                  tls_context=context,
                  verify_cache=store.Layered(cache, shared, b"verify:", verify.Cache.name,
                                             verify.lifetime) if shared else cache,
                  reputation=dnsbl.Reputation.of(config.dnsbl_sites, config.daemon, shared),
                  shared=shared, dir_sync=spooldir.GroupSync() if config.daemon else None)


def reloaded(engine, config):
    """The Engine after the settings were read again (master.py): the DNS
    lists of config, their thresholds of the moment, over the score cache
    made at start (a new one, mapped now before the next forks, if there
    was none)."""
    rep = engine.reputation
    if not config.dnsbl_sites:
        rep = None
    elif rep is not None:
        rep = dnsbl.Reputation(config.dnsbl_sites, rep.cache)
    else:
        rep = dnsbl.Reputation.of(config.dnsbl_sites, config.daemon, engine.shared)
    return dataclasses.replace(engine, reputation=rep)


def inside(path, directory):
    """Is path (links resolved) inside directory?"""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def enter_jail(config):
    """Enter the chroot and drop privileges (root only), then the seccomp
    sandbox (sandbox.py): from here on the process reaches no other."""
    if config.root:
        privileges.confine(*config.identity, config.chroot)
    if config.sandbox_missing:
        return
    try:
        sandbox.enter()
    except sandbox.SandboxError as e:
        log.err("seccomp sandbox: %s; going on without it", e)


def in_process(rules):
    """An Engine for a session run in this very process, as the fuzzers and
    some tests do: the compiled rules given, no resolver (-H), no TLS, no
    verification cache."""
    return Engine(rules=FrozenRules(rules), resolver=None, certificates=None,
                  tls_context=None, verify_cache=verify.Cache(""))
