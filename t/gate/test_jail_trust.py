"""Root never trusts the jail (issue 12, items 1-3): the rules file is read
by a jailed, unprivileged watcher, never blocking, regular files only and
bounded; any compile error is a rule error; a stale pid file never blocks."""

import os
import signal
import stat
import smtplib
import subprocess
import time

import pytest

from smtpgate.rules import ruleset as engine
from harness import (make_jail, needs_root, send, SmtpdDaemon, TEST_CONSTANTS, wait_for,
                     write_rules)

RULES = os.path.join("etc", "smtpd_check_rules")
DENY_OTHER = "noto:ALL:ALL:*@other.example\nallow:ALL:ALL:ALL\n"


def replace_rules(jail, make):
    """Swap the rules file for what make(path) creates, atomically."""
    path = os.path.join(jail, RULES)
    tmp = path + ".swap"
    make(tmp)
    if os.path.isdir(tmp):
        os.unlink(path)
    os.rename(tmp, path)


def still_serving(d):
    """The old rules still hold and SIGTERM still ends the master."""
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(d.port, "x@other.example")
    assert send(d.port) == {}
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0


@pytest.mark.parametrize("hostile", ["fifo", "zero", "socket", "huge", "directory"])
def test_master_survives_a_hostile_rules_file(daemon_, hostile, tmp_path):
    d = daemon_(DENY_OTHER).wait_ready()
    if hostile == "fifo":
        replace_rules(d.jail, os.mkfifo)
    elif hostile == "zero":
        if os.geteuid() == 0:       # the watcher is chrooted: give the jail its own
            os.mkdir(os.path.join(d.jail, "dev"))
            os.mknod(os.path.join(d.jail, "dev", "zero"), 0o666 | stat.S_IFCHR,
                     os.makedev(1, 5))
        replace_rules(d.jail, lambda p: os.symlink("/dev/zero", p))
    elif hostile == "socket":
        import socket
        s = socket.socket(socket.AF_UNIX)
        replace_rules(d.jail, lambda p: s.bind(p))
    elif hostile == "huge":
        replace_rules(d.jail, lambda p: open(p, "w").write("allow:ALL:ALL:ALL\n" * 300000))
    else:
        replace_rules(d.jail, os.mkdir)
    why = {"huge": "larger than", "directory": "not a regular file"}.get(hostile, "not a regular file")
    assert wait_for(lambda: "keeping the old rules" in d.log()), d.log()
    assert why in d.log()
    still_serving(d)


def test_a_fifo_at_start_exits_78_at_once(tree_factory):
    jail = make_jail()
    path = os.path.join(jail, RULES)
    os.unlink(path)
    os.mkfifo(path)
    d = SmtpdDaemon(tree_factory(**TEST_CONSTANTS), jail)
    assert d.proc.wait(20) == 78
    assert "not a regular file" in d.log()


@needs_root
def test_a_link_to_a_root_only_file_leaks_nothing(daemon_):
    d = daemon_(DENY_OTHER).wait_ready()
    secret = os.path.join(d.jail, "etc", "secret")     # root's, 0600, in the jail
    with open(secret, "w") as f:
        f.write("allow:TOPSECRET-line-1:ALL:ALL\nTOPSECRET line two\n")
    os.chmod(secret, 0o600)
    replace_rules(d.jail, lambda p: os.symlink("/etc/secret", p))
    assert wait_for(lambda: "keeping the old rules" in d.log()), d.log()
    assert "Permission denied" in d.log()
    assert "TOPSECRET" not in d.log()
    still_serving(d)


@needs_root
def test_the_rules_watcher_is_jailed_and_unprivileged(daemon_):
    import pwd
    d = daemon_().wait_ready()
    assert wait_for(lambda: len(d.watcher()) == 1)
    pid = d.watcher()[0]
    assert wait_for(lambda: open("/proc/%d/status" % pid).read().count("\t0\t") == 0)
    uid = pwd.getpwnam("nobody").pw_uid
    assert "Uid:\t%d\t%d\t%d\t%d" % ((uid,) * 4) in open("/proc/%d/status" % pid).read()
    assert os.readlink("/proc/%d/root" % pid) == d.jail


def test_a_killed_watcher_is_restarted_and_changes_still_apply(daemon_):
    d = daemon_().wait_ready()
    assert wait_for(lambda: len(d.watcher()) == 1)
    os.kill(d.watcher()[0], signal.SIGKILL)
    assert wait_for(lambda: "restarting it" in d.log())
    time.sleep(1.5)
    write_rules(d.jail, DENY_OTHER)
    assert wait_for(lambda: "rules re-read" in d.log())
    still_serving(d)


def test_inetd_session_with_a_fifo_rules_file_gets_451_at_once(smtpd):
    srv = smtpd()
    path = os.path.join(srv.jail, RULES)
    os.unlink(path)
    os.mkfifo(path)
    c = srv.connect()
    c.reply()
    c.cmd("HELO x")
    c.cmd("MAIL FROM:<a@b.example>")
    start = time.monotonic()
    code, _ = c.cmd("RCPT TO:<bob@my.domain>")
    assert code == 451 and time.monotonic() - start < 5
    assert c.cmd("QUIT")[0] == 221


# -- any exception while compiling a line is a rule error --

HOSTILE_LINES = [
    "deny:/a{4294967296}/:ALL:ALL",                          # OverflowError
    "deny:/" + "(" * 5000 + "a" + ")" * 5000 + "/:ALL:ALL",   # RecursionError
    "deny:/\\N{nosuchname}/:ALL:ALL",                        # re.error
    "deny:/a{1,99999999999999999999}/:ALL:ALL",
]


@pytest.mark.parametrize("line", HOSTILE_LINES, ids=["overflow", "recursion", "re.error", "bound"])
def test_compile_errors_of_every_type_are_rule_errors(line):
    with pytest.raises(engine.RuleError) as e:
        engine.parse("allow:ALL:ALL:ALL\n" + line + "\n", "f")
    assert e.value.problems[0].startswith("f:2: ")


def test_long_except_chains_do_not_recurse():
    n = 100000     # far beyond the recursion limit
    tokens = " EXCEPT ".join("10.0.%d.%d" % (i // 250 % 250, i % 250) for i in range(n))
    rules, _ = engine.parse("deny:%s:ALL:ALL\nallow:ALL:ALL:ALL\n" % tokens)
    # 10.0.0.0 matches group 0 only: denied; nothing else matches group 0.
    c0 = engine.Client("10.0.0.0", None)
    assert engine.evaluate(rules, c0, "<a@b>", "<c@d>").action == "deny"
    c1 = engine.Client("10.0.0.1", None)
    assert engine.evaluate(rules, c1, "<a@b>", "<c@d>").action == "allow"


def test_except_chain_semantics_by_parity():
    # A EXCEPT B EXCEPT C = A and not (B and not C)
    rules, _ = engine.parse("deny:10.0.0.0/8 EXCEPT 10.1.0.0/16 EXCEPT 10.1.1.0/24"
                                ":ALL:ALL\nallow:ALL:ALL:ALL\n")
    for ip, action in (("10.2.0.1", "deny"), ("10.1.2.1", "allow"), ("10.1.1.1", "deny"),
                       ("192.0.2.1", "allow")):
        c = engine.Client(ip, None)
        assert engine.evaluate(rules, c, "<a@b>", "<c@d>").action == action, ip


@pytest.mark.parametrize("line", HOSTILE_LINES[:2], ids=["overflow", "recursion"])
def test_live_edit_with_a_hostile_line_keeps_the_old_rules(daemon_, line):
    d = daemon_(DENY_OTHER).wait_ready()
    write_rules(d.jail, "allow:ALL:ALL:ALL\n" + line + "\n")
    assert wait_for(lambda: "keeping the old rules" in d.log()), d.log()
    assert "smtpd_check_rules:2: " in d.log()
    still_serving(d)


# -- the pid file --

def test_a_stale_pid_file_naming_another_process_does_not_block(tree_factory):
    jail = make_jail()
    other = subprocess.Popen(["sleep", "60"])
    try:
        with open(jail + ".pid", "w") as f:
            f.write("%d\n" % other.pid)
        d = SmtpdDaemon(tree_factory(**TEST_CONSTANTS), jail).wait_ready()
        assert d.master_pid() == d.proc.pid
        assert "not an smtpd master" in d.log()
        assert d.stop() == 0
    finally:
        other.kill()
        other.wait()


def test_a_pid_file_that_is_a_link_or_fifo_is_refused(tree_factory, tmp_path):
    jail = make_jail()
    target = tmp_path / "elsewhere"
    target.write_text("123\n")
    os.symlink(str(target), jail + ".pid")
    d = SmtpdDaemon(tree_factory(**TEST_CONSTANTS), jail)
    assert d.proc.wait(20) == 78
    assert "pid file %s.pid:" % jail in d.log()
    assert target.read_text() == "123\n"
    fifo_jail = make_jail()
    os.mkfifo(fifo_jail + ".pid")
    d = SmtpdDaemon(tree_factory(**TEST_CONSTANTS), fifo_jail)
    assert d.proc.wait(20) == 78            # at once, not blocked on the FIFO
    assert "is not a regular file" in d.log()


def test_a_key_inside_the_jail_is_refused(tree_factory):
    import certs
    jail = make_jail()
    os.mkdir(os.path.join(jail, "tls"))
    cert, key = certs.make_pair(os.path.join(jail, "tls"))
    d = SmtpdDaemon(tree_factory(**TEST_CONSTANTS), jail, "-C", cert, "-K", key)
    assert d.proc.wait(20) == 78
    assert "is inside the jail" in d.log()
