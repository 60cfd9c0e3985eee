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
SOURCES = ["smtpd.py", "smtpfwdd.py", "checkrules.py", "spool.py",
           "daemonlib.py", "lookup.py", "rules.py", "session.py",
           "prefork.py", "Makefile"]

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
