"""Shared fixtures: built trees of the programs, DNS and ident servers,
smtpd in inetd and daemon mode.  Everything else is in harness.py, which
never imports this file."""

import os
import pwd
import shutil
import signal
import sys
import tempfile

import pytest

# The helpers (harness, fixtures, fake servers) live in t/lib; every test
# folder imports them by name.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from fixtures import DNSServer, IdentServer  # noqa: E402
from harness import (Agent, build_tree, FWD_CONSTANTS, Fwd, IDENT_PORT, Inetd,  # noqa: E402
                     is_root, make_jail, SmtpdDaemon, smtpd_argv, TEST_CONSTANTS, wait_for)



@pytest.fixture(scope="session")
def tree_factory(tmp_path_factory):
    """tree_factory(**constants) -> a built copy of the programs (cached)."""
    cache = {}

    def make(**constants):
        key = tuple(sorted(constants.items()))
        if key not in cache:
            dest = tmp_path_factory.mktemp("tree")
            cache[key] = build_tree(str(dest), **constants)
        return cache[key]
    return make


@pytest.fixture(scope="session")
def dns_server():
    server = DNSServer()
    yield server
    server.close()


@pytest.fixture
def dnsz(dns_server, monkeypatch):
    """The DNS fixture with an empty zone; SMTPD_NAMESERVER points at it."""
    dns_server.zone.clear()
    dns_server.apexes.clear()
    dns_server.queries.clear()
    monkeypatch.setenv("SMTPD_NAMESERVER", dns_server.spec)
    return dns_server


@pytest.fixture
def ident_server():
    """ident_server(addr, user) -> an RFC 1413 server on addr:IDENT_PORT."""
    servers = []

    def start(addr, user):
        s = IdentServer(addr, IDENT_PORT, user)
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.close()


@pytest.fixture
def smtpd(tree_factory, dnsz):
    """smtpd(rules, *flags, **constants) -> (Inetd, jail): inetd-mode smtpd."""
    started = []

    def start(rules="allow:ALL:ALL:ALL\n", *flags, env=None, **constants):
        tree = tree_factory(**dict(TEST_CONSTANTS, **constants))
        jail = make_jail(rules)
        e = dict(os.environ, SMTPD_NAMESERVER=dnsz.spec, **(env or {}))
        srv = Inetd(smtpd_argv(tree, jail, *flags), env=e)
        srv.jail = jail
        started.append(srv)
        return srv
    yield start
    for srv in started:
        srv.close()
        shutil.rmtree(srv.jail, ignore_errors=True)


@pytest.fixture
def daemon_(tree_factory):
    """daemon_(rules, *flags, **constants) -> SmtpdDaemon: smtpd -D."""
    started = []

    def start(rules="allow:ALL:ALL:ALL\n", *flags, detach=False, port=None, tty=None,
              **constants):
        tree = tree_factory(**dict(TEST_CONSTANTS, **constants))
        jail = make_jail(rules)
        d = SmtpdDaemon(tree, jail, *flags, detach=detach, port=port, tty=tty)
        started.append(d)
        return d
    yield start
    for d in started:
        try:
            pid = d.master_pid()
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            pass
        d.stop()
        # the jail and its log: /tmp as it was (a master that outlived
        # SIGTERM keeps its files, for whoever looks into it)
        if wait_for(lambda: not os.path.exists(d.pidfile), 5):
            shutil.rmtree(d.jail, ignore_errors=True)
            if os.path.exists(d.logpath):
                os.unlink(d.logpath)


@pytest.fixture
def fwd_env(tree_factory):
    """A spool, a recording agent and env.start(*flags, **constants) -> Fwd."""
    spooldir = tempfile.mkdtemp(prefix="spool-", dir="/tmp")
    if is_root:
        pw = pwd.getpwnam("nobody")
        os.chown(spooldir, pw.pw_uid, pw.pw_gid)
    os.chmod(spooldir, 0o700)
    agent = Agent()
    started = []

    class Env:
        pass
    env = Env()
    env.spool, env.agent = spooldir, agent

    def start(*flags, agent_path=None, env=None, **constants):
        tree = tree_factory(**dict(FWD_CONSTANTS, **constants))
        f = Fwd(tree, spooldir, agent_path or agent.path, *flags, env=env)
        started.append(f)
        return f
    env.start = start
    yield env
    for f in started:
        f.stop()
    shutil.rmtree(spooldir, ignore_errors=True)
    shutil.rmtree(agent.dir, ignore_errors=True)
