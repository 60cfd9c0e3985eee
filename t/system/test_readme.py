"""The README's commands work as written (issue 13, item 4): every command
of an indented block that runs something of this checkout (bin/..., ./...)
is run literally, with only the system's PATH, from the top of the tree."""

import os
import re
import shutil
import subprocess

import pytest

from harness import ROOT


def readme_commands():
    lines = open(os.path.join(ROOT, "README.md")).read().split("\n")
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        program = line.split()[0] if line.strip() else ""
        path = os.path.join(ROOT, program)
        if line.startswith("    ") and re.match(r"^(bin/|\./)", program) and \
                os.path.isfile(path) and os.access(path, os.X_OK):
            cmd = line.strip()
            while cmd.endswith("\\"):
                i += 1
                cmd = cmd[:-1].rstrip() + " " + lines[i].strip()
            out.append(cmd)
        i += 1
    return out


COMMANDS = readme_commands()


def test_the_readme_has_tester_and_queue_commands():
    assert sum(c.startswith("bin/checkrules") for c in COMMANDS) >= 3
    assert any(c.startswith("bin/smtpq") for c in COMMANDS)


@pytest.fixture
def var_spool():
    """What `make run` leaves: var/spool (made here if missing, then removed)."""
    spool = os.path.join(ROOT, "var", "spool")
    made = not os.path.exists(spool)
    if made:
        os.makedirs(spool)
    yield
    if made:
        shutil.rmtree(spool)
        if not os.listdir(os.path.join(ROOT, "var")):
            os.rmdir(os.path.join(ROOT, "var"))


@pytest.mark.parametrize("cmd", COMMANDS)
def test_readme_command_runs_as_written(cmd, var_spool):
    p = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}, timeout=60)
    assert "Traceback" not in p.stderr and "Error" not in p.stderr, p.stderr
    assert p.returncode in (0, 1, 2, 3), (p.returncode, p.stdout, p.stderr)
    if "-oQ@" in cmd:
        assert p.stdout.startswith("refused 553 ") and p.returncode == 3
