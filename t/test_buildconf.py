"""The Makefile's constants are one table (issues 2 and 23): name, default,
bounds and one line of documentation; `make NAME=value` persists in
config.mk until `make defaults`; the programs check every value at start
and print those in effect (smtpd -n, -N); the man pages, the code and the
installed package follow the table."""

import glob
import os
import re
import shutil
import subprocess

import pytest

from harness import FWD_CONSTANTS, make_jail, MODULES, PYTHON, ROOT, SmtpdDaemon, TEST_CONSTANTS
from smtpgate import params


def read_conf(d):
    ns = {}
    exec(open(os.path.join(d, "buildconf.py")).read(), ns)
    return ns


def make(d, *args):
    return subprocess.run(["make", "-s", "-C", str(d)] + list(args), check=True,
                          capture_output=True, text=True)


@pytest.fixture
def tree(tmp_path):
    shutil.copy(os.path.join(ROOT, "Makefile"), tmp_path)
    shutil.copytree(os.path.join(ROOT, "smtpgate"), tmp_path / "smtpgate",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "smtpd.py"), tmp_path)
    return tmp_path


TABLE = params.table(open(os.path.join(ROOT, "Makefile")).read())


def test_the_table_has_every_constant_with_bounds_and_doc():
    assert len(TABLE) >= 55
    for p in TABLE:
        assert p.doc and p.kind in ("int", "bool", "path", "path?", "name", "text", "nets")
        assert p.problem(p.default) is None, (p.name, p.default)
    conf = read_conf(ROOT)
    assert set(conf["PARAMS"]) == {p.name for p in TABLE}


def test_an_override_persists_until_make_defaults(tree):
    make(tree, "buildconf.py")
    assert read_conf(tree)["NOTO_DELAY"] == 60
    make(tree, "buildconf.py", "NOTO_DELAY=5", "SPOOLDIR=/srv/smtpd", "TLS_CERT=")
    make(tree, "buildconf.py")              # a plain make: still there
    conf = read_conf(tree)
    assert (conf["NOTO_DELAY"], conf["SPOOLDIR"], conf["TLS_CERT"]) == (5, "/srv/smtpd", "")
    assert "NOTO_DELAY = 5\n" in open(tree / "config.mk").read()
    make(tree, "buildconf.py", "NOTO_DELAY=7")          # changed again, the others kept
    conf = read_conf(tree)
    assert (conf["NOTO_DELAY"], conf["SPOOLDIR"]) == (7, "/srv/smtpd")
    make(tree, "defaults")
    conf = read_conf(tree)
    assert (conf["NOTO_DELAY"], conf["SPOOLDIR"]) == (60, "/var/spool/smtpd")
    assert not os.path.exists(tree / "config.mk")
    assert open(tree / "buildconf.py").readline().startswith('"""Generated from Makefile')


def test_smtpd_n_prints_what_differs_and_N_everything(tree):
    make(tree, "buildconf.py")
    run = lambda *a: subprocess.run([PYTHON, str(tree / "smtpd.py")] + list(a),  # noqa: E731
                                    capture_output=True, text=True, timeout=30)
    assert run("-n").stdout == ""
    make(tree, "buildconf.py", "NOTO_DELAY=5", "SMTPD_PROXY_FROM=192.0.2.0/24")
    assert run("-n").stdout == "NOTO_DELAY = 5\nSMTPD_PROXY_FROM = 192.0.2.0/24\n"
    everything = run("-N").stdout
    assert "DENY_DELAY = 60\n" in everything and "NOTO_DELAY = 5\n" in everything
    assert "# seconds a deny_delay rule sleeps before its reply (int; default 60)" in everything
    assert make(tree, "showconf").stdout == run("-n").stdout


@pytest.mark.parametrize("name,value,why", [
    ("NOTO_DELAY", "-1", "must be a number from 0 to 86400"),
    ("SMTPD_V4_PREFIX", "33", "must be a number from 0 to 32"),
    ("SMTPD_FORBID_UNAUTH_PIPELINING", "2", "must be a number from 0 to 1"),
    ("CHECK_FILE", "relative", "must be an absolute path"),
    ("SMTPD_PROXY_FROM", "10/8", "'10/8' is not an address or network")])
def test_a_constant_out_of_bounds_stops_smtpd_with_78(tree_factory, name, value, why):
    tree = tree_factory(**dict(TEST_CONSTANTS, **{name: value}))
    d = SmtpdDaemon(tree, make_jail())
    assert d.proc.wait(20) == 78
    assert "%s = " % name in d.log() and why in d.log()


def test_a_constant_out_of_bounds_stops_smtpfwdd_with_78(tree_factory, tmp_path):
    tree = tree_factory(**dict(FWD_CONSTANTS, MAXARGS=3))
    p = subprocess.run([PYTHON, os.path.join(tree, "smtpfwdd.py"), "-F", "-d", str(tmp_path)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 78 and "MAXARGS = 3: must be a number from 6 to" in p.stderr


def test_the_man_pages_list_every_constant():
    pages = open(os.path.join(ROOT, "man", "smtpd.8")).read() + \
        open(os.path.join(ROOT, "man", "smtpfwdd.8")).read()
    configuration = "".join(re.findall(r"\.Sh CONFIGURATION\n(.*?)\n\.Sh ", pages, re.S))
    missing = [p.name for p in TABLE if not re.search(r"\b%s\b" % p.name, configuration)]
    assert missing == []


def test_the_code_reads_only_constants_of_the_table_and_every_one_is_used():
    names = {p.name for p in TABLE}
    code = ""
    for f in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True):
        if "/t/" not in f and "/.venv" not in f and not f.endswith("buildconf.py"):
            code += open(f).read()
    used = set(re.findall(r"buildconf\.([A-Z][A-Z0-9_]+)", code))
    assert used - names == set()
    makefile = open(os.path.join(ROOT, "Makefile")).read().split("-include config.mk", 1)[1]
    unused = [n for n in names if n not in used and "$(%s)" % n not in makefile]
    assert unused == []


def test_make_install_installs_every_module_git_knows_and_nothing_else():
    if not os.path.isdir(os.path.join(ROOT, ".git")) or not shutil.which("git"):
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "-C", ROOT, "ls-files", "smtpgate/*.py",
                              "smtpgate/**/*.py"], capture_output=True, text=True).stdout.split()
    assert sorted(m + ".py" for m in MODULES) == sorted(f[len("smtpgate/"):] for f in tracked)
