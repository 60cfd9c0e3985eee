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
    assert run("-n").stdout == ("# set in make NOTO_DELAY=... (config.mk)\nNOTO_DELAY = 5\n"
                                "# set in make SMTPD_PROXY_FROM=... (config.mk)\n"
                                "SMTPD_PROXY_FROM = 192.0.2.0/24\n")
    everything = run("-N").stdout
    assert "DENY_DELAY = 60\n" in everything and "NOTO_DELAY = 5\n" in everything
    assert "# seconds a deny_delay rule sleeps before its reply (int 0..86400; default 60)" \
        in everything
    assert make(tree, "showconf").stdout == run("-n").stdout


@pytest.mark.parametrize("name,value,why", [
    ("NOTO_DELAY", "-1", "must be a number from 0 to 86400"),
    ("SMTPD_V4_PREFIX", "33", "must be a number from 0 to 32"),
    ("SMTPD_FORBID_UNAUTH_PIPELINING", "2", "must be a number from 0 to 1"),
    ("CHECK_FILE", "relative", "must be an absolute path"),
    ("SMTPD_PROXY_FROM", "10/8", "'10/8' is not an address or network")])
def test_a_constant_out_of_bounds_stops_smtpd_with_78(tree_factory, tmp_path, name, value,
                                                      why):
    """make refuses such a value (below); the settings file is where one
    can still be written, and a program that meets it stops."""
    tree, _ = settings_tree(tree_factory, tmp_path, "%s = %s\n" % (name, value))
    d = SmtpdDaemon(tree, make_jail())
    assert d.proc.wait(20) == 78
    assert "%s = " % name in d.log() and why in d.log()


def test_a_constant_out_of_bounds_stops_smtpfwdd_with_78(tree_factory, tmp_path):
    path = tmp_path / "smtpd.conf"
    path.write_text("MAXARGS = 3\n")
    tree = tree_factory(**dict(FWD_CONSTANTS, SETTINGS_FILE=str(path)))
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


# -- the operator's settings file (issue 35, item 4) --

def settings_tree(tree_factory, tmp_path, text, mode=0o644, **constants):
    path = tmp_path / "smtpd.conf"
    path.write_text(text)
    os.chmod(path, mode)
    return tree_factory(**dict(TEST_CONSTANTS, SETTINGS_FILE=str(path), **constants)), path


def run_prog(tree, *args, prog="smtpd.py"):
    return subprocess.run([PYTHON, os.path.join(tree, prog)] + list(args),
                          capture_output=True, text=True, timeout=30)


def test_the_settings_file_is_read_over_the_defaults_and_n_says_where(tree_factory, tmp_path):
    tree, path = settings_tree(tree_factory, tmp_path,
                               "# the gate's settings\nMAX_RCPT = 7\n\nSMTPD_DNSBL_SITES = "
                               "zen.example\n    bl.example*2\nMAX_ERRORS=5\n")
    out = run_prog(tree, "-n").stdout
    assert "# set in %s:2\nMAX_RCPT = 7\n" % path in out, out
    assert "# set in %s:4\nSMTPD_DNSBL_SITES = zen.example bl.example*2\n" % path in out
    assert "# set in %s:6\nMAX_ERRORS = 5\n" % path in out
    assert "# set in make NOTO_DELAY=... (config.mk)\nNOTO_DELAY = 1\n" in out   # the tests'
    everything = run_prog(tree, "-N").stdout
    assert "# most recipients per message; more get 452 (int 1..100000; default 1000)\n" \
           "# set in %s:2\nMAX_RCPT = 7\n" % path in everything


@pytest.mark.parametrize("text,why", [
    ("MAX_RCPT = 0\n", ":1: MAX_RCPT = 0: must be a number from 1 to 100000"),
    ("MAX_RCPT = many\n", ":1: MAX_RCPT = many: must be a number from 1 to 100000"),
    ("NO_SUCH = 1\n", ":1: NO_SUCH is not a setting (smtpd -N lists them)"),
    ("PREFIX = /opt\n", ":1: PREFIX is fixed when the programs are built"),
    ("\n\nMAX_RCPT = 5\nMAX_RCPT = 6\n", ":4: MAX_RCPT set again (first at "),
    ("  MAX_RCPT = 5\n", ":1: a continuation line, but no setting before it"),
    ("MAX_RCPT 5\n", ":1: not NAME = value"),
    ("SMTPD_MILTER_DEFAULT_ACTION = bounce\n", "SMTPD_MILTER_DEFAULT_ACTION = bounce: not "),
    ("SMTPD_PROXY_FROM = 10/8\n", ":1: SMTPD_PROXY_FROM = 10/8: '10/8' is not an address")])
def test_a_mistake_in_the_settings_stops_the_programs_with_78(tree_factory, tmp_path, text,
                                                             why):
    tree, path = settings_tree(tree_factory, tmp_path, text)
    progs = [("smtpd.py", ["-t", "-c", make_jail()])]
    if why.startswith(":"):         # what the table says (not how smtpd uses a value)
        progs.append(("smtpfwdd.py", ["-F", "-d", str(tmp_path)]))
    for prog, args in progs:
        p = run_prog(tree, *args, prog=prog)
        assert p.returncode == 78 and why in p.stderr, (prog, p.stderr)
        if why.startswith(":"):
            assert str(path) + why in p.stderr


def test_settings_others_can_write_are_refused(tree_factory, tmp_path):
    tree, path = settings_tree(tree_factory, tmp_path, "MAX_RCPT = 7\n", mode=0o666)
    p = run_prog(tree, "-t", "-c", make_jail())
    assert p.returncode == 78 and "must be root's and writable by root only" in p.stderr


def test_make_refuses_a_value_out_of_bounds_and_changes_nothing(tree):
    make(tree, "buildconf.py", "NOTO_DELAY=5")
    p = subprocess.run(["make", "-s", "-C", str(tree), "buildconf.py", "NOTO_DELAY=-1",
                        "SMTPD_V4_PREFIX=33"], capture_output=True, text=True)
    assert p.returncode != 0
    assert "NOTO_DELAY = -1: must be a number from 0 to 86400" in p.stderr
    assert "SMTPD_V4_PREFIX = 33: must be a number from 0 to 32" in p.stderr
    assert "NOTO_DELAY = 5\n" in open(tree / "config.mk").read()
    assert read_conf(tree)["NOTO_DELAY"] == 5


def test_smtpd_N_into_a_closed_pipe_ends_quietly(tree):
    make(tree, "buildconf.py")
    p = subprocess.run("%s %s -N | head -2" % (PYTHON, tree / "smtpd.py"), shell=True,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 2
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr


def test_sighup_rereads_the_settings(tree_factory, tmp_path):
    """What changed applies to new sessions; a file with a mistake changes
    nothing; what needs a restart is named."""
    import signal
    from harness import wait_for
    tree, path = settings_tree(tree_factory, tmp_path, "MAX_RCPT = 2\n")
    d = SmtpdDaemon(tree, make_jail()).wait_ready()
    try:
        def rcpts():
            c = d.connect()
            assert c.code() == 220
            c.cmd("HELO client.example")
            c.cmd("MAIL FROM:<a@example.org>")
            codes = [c.cmd("RCPT TO:<r%d@my.domain>" % i)[0] for i in range(3)]
            c.cmd("QUIT")
            return codes
        assert rcpts() == [250, 250, 452]
        path.write_text("MAX_RCPT = 1\nSMTPD_MAXCHILDREN = 7\n")
        os.kill(d.master_pid(), signal.SIGHUP)
        assert wait_for(lambda: "settings re-read" in d.log()), d.log()
        assert "SIGHUP: these settings take effect at the next start: " \
               "SMTPD_MAXCHILDREN = 7" in d.log()
        assert wait_for(lambda: rcpts() == [250, 452, 452])
        path.write_text("MAX_RCPT = 3\nMAX_RCPT = 4\n")
        os.kill(d.master_pid(), signal.SIGHUP)
        assert wait_for(lambda: "%s:2: MAX_RCPT set again" % path in d.log()), d.log()
        assert "SIGHUP: the settings in effect stay" in d.log()
        assert rcpts() == [250, 452, 452]
    finally:
        os.kill(d.master_pid(), signal.SIGTERM)
        d.stop()
