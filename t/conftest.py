"""Shared fixtures: the source tree, trees built with other Makefile values."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Our smtpd.py shadows the deprecated stdlib module of the same name.
sys.path.insert(0, ROOT)
PYTHON = sys.executable
SOURCES = ["smtpd.py", "smtpfwdd.py", "checkrules.py", "spool.py", "replies.py",
           "daemonlib.py", "lookup.py", "session.py", "channel.py", "prefork.py", "Makefile"]

is_root = os.geteuid() == 0
needs_root = pytest.mark.skipif(not is_root, reason="needs root")


def build_tree(dest, **constants):
    """Copy the programs to dest and `make` them with other constants."""
    os.makedirs(dest, exist_ok=True)
    for name in SOURCES:
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), dest)
    args = ["%s=%s" % kv for kv in constants.items()]
    subprocess.run(["make", "-s", "-C", dest, "buildconf.py"] + args,
                   check=True, stdout=subprocess.DEVNULL)
    return dest


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


IDENT_PORT = 11313      # the test trees are built with this IDENT_PORT


@pytest.fixture(scope="session")
def dns_server():
    from fixtures import DNSServer
    server = DNSServer()
    yield server
    server.close()


@pytest.fixture
def dnsz(dns_server, monkeypatch):
    """The DNS fixture with an empty zone; SMTPD_NAMESERVER points at it."""
    dns_server.zone.clear()
    dns_server.queries.clear()
    monkeypatch.setenv("SMTPD_NAMESERVER", dns_server.spec)
    return dns_server


@pytest.fixture
def ident_server():
    """ident_server(addr, user) -> an RFC 1413 server on addr:IDENT_PORT."""
    from fixtures import IdentServer
    servers = []

    def start(addr, user):
        s = IdentServer(addr, IDENT_PORT, user)
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.close()


TEST_CONSTANTS = dict(IDENT_PORT=IDENT_PORT, DNS_TIMEOUT=2, NOTO_DELAY=1,
                      DENY_DELAY=1)


@pytest.fixture
def smtpd(tree_factory, dnsz):
    """smtpd(rules, *flags, **constants) -> (Inetd, jail): inetd-mode smtpd."""
    from harness import Inetd, make_jail, smtpd_argv
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
