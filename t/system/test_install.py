"""make run, make install, man pages, etc/ files (issue 7)."""

import glob
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import tempfile
import time

import pytest

from harness import PYTHON, ROOT, wait_for, write_rules

EXAMPLE_RULES = ["etc/smtpd_check_rules.example", "etc/antispam_check_rules.example",
                 "etc/run-local.rules"]


# The copy's daemons log to their standard error only: never to the host's
# syslog daemon, if it runs one.
QUIET_LOG = "LOG_SOCKET=/nonexistent-smtpd-test/log"


def port_busy(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def copy_tree(mode=0o755):
    """A copy of the source tree, sharing our .venv, in a directory of the
    given mode (0755: every user can read it; 0700: only its owner)."""
    d = tempfile.mkdtemp(prefix="smtpd-copy-", dir="/tmp")
    os.chmod(d, mode)
    dest = os.path.join(d, "src")
    shutil.copytree(ROOT, dest, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", "var", ".git", "__pycache__", ".pytest_cache", ".hypothesis", "config.mk"))
    os.symlink(os.path.join(ROOT, ".venv"), os.path.join(dest, ".venv"))
    for dirpath, dirs, files in os.walk(dest):
        os.chmod(dirpath, 0o755)
    return d, dest


@pytest.mark.parametrize("mode", [0o755, 0o700], ids=["open", "closed"])
def test_make_run_delivers_into_var_mail_and_stops_on_sigint(mode):
    if port_busy(2525):
        pytest.skip("127.0.0.1:2525 is in use")
    if mode == 0o700 and os.geteuid() != 0:
        pytest.skip("the 0700 case is about root and user nobody")
    top, src = copy_tree(mode)
    log = open(os.path.join(top, "run.log"), "wb")
    p = subprocess.Popen(["make", "-s", "run", QUIET_LOG], cwd=src, stdin=subprocess.DEVNULL,
                         stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not port_busy(2525):
            assert p.poll() is None, open(os.path.join(top, "run.log")).read()
            assert time.time() < deadline
            time.sleep(0.2)
        with smtplib.SMTP("127.0.0.1", 2525, timeout=30) as s:
            s.sendmail("me@example.org", ["you@localhost"],
                       b"Subject: make run\r\n\r\nIt works.\r\n")
        if shutil.which("openssl"):     # make run made a certificate: STARTTLS
            ctx = ssl.create_default_context(cafile=os.path.join(src, "var", "tls", "cert.pem"))
            ctx.check_hostname = False
            with smtplib.SMTP("127.0.0.1", 2525, timeout=30) as s:
                s.starttls(context=ctx)
                s.sendmail("me@example.org", ["tls@localhost"], b"Subject: tls\r\n\r\nok\r\n")
        box = os.path.join(src, "var", "mail", "you")
        deadline = time.time() + 30
        while not (os.path.exists(box) and b"It works." in open(box, "rb").read()):
            assert time.time() < deadline, open(os.path.join(top, "run.log")).read()
            time.sleep(0.2)
        mail = open(box, "rb").read()
        assert mail.startswith(b"From me@example.org ")
        assert b"\nSubject: make run\n\nIt works.\n\n" in mail
        if shutil.which("openssl"):
            tls = os.path.join(src, "var", "mail", "tls")
            assert wait_for(lambda: os.path.exists(tls) and b"with ESMTPS" in open(tls, "rb").read())
    finally:
        os.killpg(p.pid, signal.SIGINT)             # what Ctrl-C does
        p.wait(60)
        log.close()
    out = open(os.path.join(top, "run.log")).read()
    assert "run-local: smtpd exited 0, smtpfwdd exited 0" in out
    assert "mail lands in %s/var/mail/" % src in out
    assert not port_busy(2525)
    if os.path.islink(os.path.join(src, "var")):
        assert mode == 0o700 and out.count("staged in") == 1
        stage = os.path.dirname(os.path.realpath(os.path.join(src, "var")))
        assert "staged in" not in run_briefly(src)      # said once, when it was made
        subprocess.run(["make", "-s", "clean"], cwd=src, check=True, capture_output=True)
        assert not os.path.lexists(os.path.join(src, "var")) and not os.path.exists(stage)
    shutil.rmtree(top)


def run_briefly(src):
    """make run until it listens, then Ctrl-C; what it said."""
    p = subprocess.Popen(["make", "-s", "run", QUIET_LOG], cwd=src, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        assert wait_for(lambda: port_busy(2525), 60)
    finally:
        os.killpg(p.pid, signal.SIGINT)
        out = p.communicate(timeout=60)[0].decode()
    return out


def test_var_is_ignored_by_git_even_as_a_link():
    if not os.path.isdir(os.path.join(ROOT, ".git")) or not shutil.which("git"):
        pytest.skip("not a git checkout")
    assert subprocess.run(["git", "-C", ROOT, "check-ignore", "-q", "--no-index", "var"]
                          ).returncode == 0


def test_make_run_with_another_mailprog_does_not_promise_var_mail():
    if port_busy(2525):
        pytest.skip("127.0.0.1:2525 is in use")
    top, src = copy_tree()
    p = subprocess.Popen(["make", "-s", "run", "MAILPROG=/bin/true", QUIET_LOG], cwd=src,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not port_busy(2525):
            assert p.poll() is None and time.time() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(p.pid, signal.SIGINT)
        out = p.communicate(timeout=60)[0].decode()
    assert "mail goes to /bin/true" in out and "var/mail" not in out
    shutil.rmtree(top)


@pytest.fixture(scope="module")
def installed():
    """make install PREFIX=/usr into a DESTDIR, from a copy of the tree (so
    that the config.mk of PREFIX=/usr is the copy's)."""
    destdir = tempfile.mkdtemp(prefix="smtpd-install-", dir="/tmp")
    top, src = copy_tree()
    p = subprocess.run(["make", "-s", "install", "DESTDIR=" + destdir, "PREFIX=/usr"],
                       cwd=src, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    yield destdir
    shutil.rmtree(destdir)
    shutil.rmtree(top)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_make_install_tree_and_modes(installed):
    d = installed
    for prog in ("smtpd", "smtpfwdd", "checkrules"):
        wrapper = os.path.join(d, "usr/sbin", prog)
        assert mode(wrapper) == 0o755
        text = open(wrapper).read()
        assert "/usr/lib/smtpd/%s.py" % prog in text and "PYTHONPATH=/usr/lib/smtpd/vendor" in text
    smtpq = os.path.join(d, "usr/sbin/smtpq")
    assert mode(smtpq) == 0o755 and "/usr/lib/smtpd/smtpfwdd.py" in open(smtpq).read()
    for args in ([], ["-d", "/x y"]):       # what the wrapper passes on
        p = subprocess.run(["sh", "-c", open(smtpq).read().replace("exec", "printf '%s|'"),
                            "smtpq"] + args + ["list", "-j"], capture_output=True, text=True)
        assert p.stdout.endswith("smtpfwdd.py|" + "|".join(
            (["-d", "/x y"] if args else []) + ["-Q", "list", "-j"]) + "|"), p.stdout
    for mod in ("smtpd.py", "smtpfwdd.py", "checkrules.py", "buildconf.py",
                "smtpgate/__init__.py", "smtpgate/spool.py", "smtpgate/gate/session.py",
                "smtpgate/forwarder/delivery.py", "smtpgate/rules/ruleset.py"):
        assert mode(os.path.join(d, "usr/lib/smtpd", mod)) == 0o644
    assert "PREFIX = '/usr'" in open(os.path.join(d, "usr/lib/smtpd/buildconf.py")).read()
    for pkg in ("daemon", "lockfile", "dns", "idna"):
        assert os.path.isdir(os.path.join(d, "usr/lib/smtpd/vendor", pkg))
    for page in ("man8/smtpd.8", "man8/smtpfwdd.8", "man8/smtpq.8", "man8/checkrules.8",
                 "man5/smtpd_check_rules.5"):
        assert mode(os.path.join(d, "usr/share/man", page)) == 0o644
    doc = os.path.join(d, "usr/share/doc/smtpd")
    assert mode(os.path.join(doc, "init.d/smtpd")) == 0o755
    assert mode(os.path.join(doc, "smtpd.service")) == 0o644
    assert "ExecStart=/usr/sbin/smtpd -D -F" in open(os.path.join(doc, "smtpd.service")).read()
    assert not glob.glob(doc + "/**/*@SBINDIR@*", recursive=True)
    assert mode(os.path.join(d, "var/spool/smtpd")) == 0o700
    assert os.path.isdir(os.path.join(d, "var/spool/smtpd/etc"))


def test_installed_checkrules_runs_from_its_vendor_dir(installed):
    lib = os.path.join(installed, "usr/lib/smtpd")
    p = subprocess.run(["/usr/bin/python3", "-s", os.path.join(lib, "checkrules.py"), "-t",
                        "-f", os.path.join(installed, "usr/share/doc/smtpd/smtpd_check_rules.example")],
                       env={"PYTHONPATH": os.path.join(lib, "vendor"), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True)
    assert (p.returncode, p.stderr) == (0, "") and p.stdout.endswith(" rules, no errors\n")


def test_make_uninstall(installed):
    d = tempfile.mkdtemp(prefix="smtpd-uninstall-", dir="/tmp")
    shutil.copytree(installed, d, dirs_exist_ok=True, symlinks=True)
    os.makedirs(os.path.join(d, "usr/share/doc/other"))            # not ours: stays
    cache = os.path.join(d, "var/spool/smtpd/verify.db")
    for side in ("", "-wal", "-shm"):
        open(cache + side, "w").close()
    top, src = copy_tree()
    subprocess.run(["make", "-s", "uninstall", "DESTDIR=" + d, "PREFIX=/usr"],
                   cwd=src, check=True, capture_output=True)
    shutil.rmtree(top)
    left = [os.path.relpath(os.path.join(p, f), d) for p, _, fs in os.walk(d) for f in fs]
    assert left == ["etc/smtpd/smtpd.conf"]                         # the operator's settings
    dirs = sorted(os.path.relpath(p, d) for p, _, _ in os.walk(d))
    assert dirs == [".", "etc", "etc/smtpd", "usr", "usr/share", "usr/share/doc",
                    "usr/share/doc/other", "var", "var/spool", "var/spool/smtpd",
                    "var/spool/smtpd/dev", "var/spool/smtpd/etc"]   # the spool stays
    shutil.rmtree(d)


def test_an_upgrade_keeps_the_settings_file(tmp_path):
    """Issue 35, item 4: make install from a fresh copy installs the settings
    file once, then never touches it; the rsyslog snippet is announced
    only when it is new."""
    destdir = str(tmp_path / "root")
    os.makedirs(os.path.join(destdir, "etc/rsyslog.d"))
    top, src = copy_tree()
    try:
        def install():
            p = subprocess.run(["make", "-s", "install", "DESTDIR=" + destdir, "PREFIX=/usr"],
                               cwd=src, capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, p.stderr
            return p.stdout + p.stderr
        out = install()
        conf = os.path.join(destdir, "etc/smtpd/smtpd.conf")
        assert "/etc/smtpd/smtpd.conf: installed" in out and "restart rsyslog once" in out
        assert mode(conf) == 0o644 and open(conf).read() == open(
            os.path.join(ROOT, "etc/smtpd.conf")).read()
        with open(conf, "a") as f:
            f.write("SMTPD_MILTERS = inet:127.0.0.1:11332\nSMTPD_MAX_RATE = 30\n")
        mine = open(conf).read()
        out = install()                 # the upgrade
        assert open(conf).read() == mine
        assert "/etc/smtpd/smtpd.conf: kept as it is" in out
        assert "restart rsyslog" not in out
    finally:
        shutil.rmtree(top)


@pytest.mark.skipif(not shutil.which("mandoc"), reason="mandoc not installed")
@pytest.mark.parametrize("page", ["smtpd.8", "smtpfwdd.8", "smtpq.8", "checkrules.8",
                                  "smtpd_check_rules.5"])
def test_man_page_is_mandoc_lint_clean(page):
    p = subprocess.run(["mandoc", "-Tlint", "-W", "warning", os.path.join(ROOT, "man", page)],
                       capture_output=True, text=True)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


def test_every_flag_is_in_the_man_pages():
    smtpd8 = open(os.path.join(ROOT, "man/smtpd.8")).read()
    for flag in "cdugmslpiMDFHLPqt":
        assert ".It Fl %s" % flag in smtpd8, flag
    fwd8 = open(os.path.join(ROOT, "man/smtpfwdd.8")).read()
    for flag in "dugsMPqFt":
        assert ".It Fl %s" % flag in fwd8, flag
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    pages = smtpd8 + fwd8
    for const in ("NOTO_DELAY", "DENY_DELAY", "READ_TIMEOUT", "SESSION_TIMEOUT",
                  "CHECK_IDENT", "MAX_RCPT", "SMTPD_PREFORK", "SMTPD_MAXCHILDREN",
                  "SMTPD_MAX_PER_IP", "SMTPD_MAX_USE", "SMTPD_IDLE_TIME", "SHUTDOWN_TIMEOUT", "MAXARGS",
                  "RETRY_DELAY_TIME", "QUEUE_LIFETIME", "AGENT_TIMEOUT", "DNS_TIMEOUT",
                  "MAXCHILDREN", "POLL_TIME", "MAIL_AGENT", "CHECK_FILE"):
        assert const in makefile and const in pages, const


@pytest.mark.parametrize("rules", EXAMPLE_RULES)
def test_example_rules_validate(rules):
    p = subprocess.run([PYTHON, os.path.join(ROOT, "checkrules.py"), "-t", "-f",
                        os.path.join(ROOT, rules)], capture_output=True, text=True)
    assert p.returncode == 0 and re.match(r"^\S+: \d+ rules, no errors\n$", p.stdout), p.stdout


def test_example_rules_refuse_relaying_and_allow_the_hub():
    f = os.path.join(ROOT, "etc/smtpd_check_rules.example")

    def check(*args):
        return subprocess.run([PYTHON, os.path.join(ROOT, "checkrules.py"), "-f", f] +
                              list(args), capture_output=True, text=True).returncode
    assert check("-a", "10.0.0.9", "-n", "hub.my.domain", "<a@my.domain>", "<x@far.example>") == 0
    assert check("-a", "192.0.2.7", "-n", "UNKNOWN", "<a@b.example>", "<x@far.example>") == 1
    assert check("-a", "192.0.2.7", "-n", "UNKNOWN", "<a@b.example>", "<bob@my.domain>") == 0
    assert check("-a", "192.0.2.7", "-n", "UNKNOWN", "<a@b.example>",
                 "<x%far.example@my.domain>") == 1


@pytest.mark.parametrize("script", ["etc/init.d/smtpd", "etc/init.d/smtpfwdd",
                                    "etc/rc.d/smtpd", "etc/rc.d/smtpfwdd"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["sh", "-n", os.path.join(ROOT, script)]).returncode == 0


def test_run_local_parses():
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "bin/run-local")]).returncode == 0


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_systemd_units_verify(installed, tmp_path):
    sbin = os.path.join(installed, "usr/sbin")
    names = ["smtpd.service", "smtpfwdd.service", "smtpd.socket", "smtpd@.service"]
    for n in names:
        text = open(os.path.join(ROOT, "etc", n)).read()
        text = text.replace("@SBINDIR@", sbin).replace("@SPOOLDIR@", "/var/spool")
        (tmp_path / n).write_text(text)
    p = subprocess.run(["systemd-analyze", "verify", "--man=no"] + [str(tmp_path / n) for n in names],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    problems = [l for l in p.stderr.splitlines() if "smtpd" in l or "smtpfwdd" in l]
    assert problems == [], p.stderr


# -- the SysV scripts report the daemons' failures (issue 22, item 3) --

def init_script(tmp_path, name, daemon_argv, args):
    """etc/init.d/NAME with DAEMON, its defaults file and pid file of the test's."""
    wrapper = tmp_path / ("run-" + name)
    wrapper.write_text("#!/bin/sh\nexec %s \"$@\"\n" % " ".join(daemon_argv))
    wrapper.chmod(0o755)
    defaults = tmp_path / ("default-" + name)
    defaults.write_text('DAEMON=%s\n%s_ARGS="%s"\nPIDFILE=%s\nSMTPD_TEST_PLAIN=plain-line\n' % (
        wrapper, name.upper(), args, tmp_path / (name + ".pid")))
    script = tmp_path / ("init-" + name)
    text = open(os.path.join(ROOT, "etc", "init.d", name)).read()
    script.write_text(text.replace("DEFAULTS=/etc/default/" + name, "DEFAULTS=%s" % defaults))
    script.chmod(0o755)

    def run(action):
        p = subprocess.run([str(script), action], capture_output=True, text=True, timeout=60)
        return p.returncode, p.stdout + p.stderr
    return run


def test_init_script_smtpd_reports_failure_and_success(tree_factory, tmp_path):
    from harness import make_jail, NOBODY, NOGROUP, TEST_CONSTANTS, free_port
    jail = make_jail()
    ids = " -u %s -g %s" % (NOBODY, NOGROUP) if os.geteuid() == 0 else ""
    args = "-H -c %s -l 127.0.0.1 -p %d -m mx.my.domain%s" % (jail, free_port(), ids)
    run = init_script(tmp_path, "smtpd",
                      [PYTHON, os.path.join(tree_factory(**TEST_CONSTANTS), "smtpd.py")], args)
    rules = os.path.join(jail, "etc", "smtpd_check_rules")
    os.rename(rules, rules + ".away")
    status, out = run("start")
    assert status == 6 and "failed (smtpd exited 78" in out, out
    assert run("status")[0] == 3
    os.rename(rules + ".away", rules)
    status, out = run("start")
    assert status == 0 and "Starting smtpd: smtpd (pid " in out, out
    assert run("status")[0] == 0
    assert run("start")[0] == 0                 # already running: fine
    master = int(open(tmp_path / "smtpd.pid").read())
    # what /etc/default/smtpd sets reaches smtpd, export or not (issue 35, item 5)
    assert b"SMTPD_TEST_PLAIN=plain-line\0" in open("/proc/%d/environ" % master, "rb").read()
    # a configuration that would not start never stops the gate (issue 35, item 3)
    with open(rules, "a") as f:
        f.write("bogus:ALL\n")
    for action in ("restart", "reload", "force-reload"):
        status, out = run(action)
        assert status == 6, (action, status, out)
        assert "%s:2: bad field count" % rules in out, out
        assert "smtpd: the configuration does not pass (smtpd -t exited 78" in out
        assert run("status")[0] == 0 and int(open(tmp_path / "smtpd.pid").read()) == master
    write_rules(jail, "allow:ALL:ALL:ALL\n")
    assert run("reload")[0] == 0
    status, out = run("restart")
    assert status == 0 and "Starting smtpd: smtpd (pid " in out, out
    assert int(open(tmp_path / "smtpd.pid").read()) != master
    assert run("stop")[0] == 0
    assert run("status")[0] == 3                # stopped, its pid file gone
    assert not os.path.exists(tmp_path / "smtpd.pid")
    shutil.rmtree(jail)


def test_init_script_smtpfwdd_reports_failure_and_success(tree_factory, tmp_path):
    from harness import FWD_CONSTANTS, give_to_nobody
    spool_dir = tempfile.mkdtemp(prefix="spool-", dir="/tmp")     # nobody reaches it
    give_to_nobody(spool_dir)
    ids = " -u nobody -g nogroup" if os.geteuid() == 0 else ""
    argv = [PYTHON, os.path.join(tree_factory(**FWD_CONSTANTS), "smtpfwdd.py")]
    run = init_script(tmp_path, "smtpfwdd", argv, "-d %s/nosuch -s /bin/true%s" % (spool_dir, ids))
    status, out = run("start")
    assert status == 6 and "failed (smtpfwdd exited 78" in out, out
    run = init_script(tmp_path, "smtpfwdd", argv, "-d %s -s /bin/true%s" % (spool_dir, ids))
    status, out = run("start")
    assert status == 0 and "Starting smtpfwdd: smtpfwdd (pid " in out, out
    assert run("status")[0] == 0
    pid = int(open(tmp_path / "smtpfwdd.pid").read())
    assert open(tmp_path / "smtpfwdd.pid").read() == "%d\n" % pid      # a plain pid
    assert run("reload")[0] == 0 and run("status")[0] == 0
    assert run("stop")[0] == 0
    assert run("status")[0] == 3                # issue 35, item 9: no pid file left
    assert not os.path.exists(tmp_path / "smtpfwdd.pid")
    shutil.rmtree(spool_dir)


def test_a_stopped_smtpfwdd_leaves_its_pid_file_empty(fwd_env, tmp_path):
    """Without an init script to remove it, the pid file says nobody."""
    import signal
    from harness import wait_for
    pidfile = tmp_path / "smtpfwdd.pid"
    f = fwd_env.start("-i", str(pidfile))
    assert wait_for(lambda: pidfile.exists() and pidfile.read_text() == "%d\n" % f.proc.pid)
    f.proc.send_signal(signal.SIGTERM)
    assert f.proc.wait(30) == 0
    assert pidfile.read_text() == ""
