"""smtpfwdd.py with the recording fake sendmail (issue 6)."""

import fcntl
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time

import pytest

from smtpgate import spool
from harness import (BODY, FWD_CONSTANTS, give_to_nobody, is_root, now_date, put, PYTHON,
                     RECEIVED, wait_for)

def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def failed(spooldir, name):
    return os.path.join(spooldir, "failed", name)


def test_delivered_argv_stdin_and_removal(fwd_env):
    name = put(fwd_env.spool)
    f = fwd_env.start()
    assert wait_for(lambda: not os.path.exists(os.path.join(fwd_env.spool, name)))
    (call,) = fwd_env.agent.calls()
    assert call["argv"] == [fwd_env.agent.path, "-oi", "-f", "alice@example.org",
                            "--", "bob@my.domain"]
    assert call["stdin"].encode("latin-1") == RECEIVED % call["stdin"].split("\n")[2][1:].encode() + BODY
    assert call["stdin"].startswith("Received: from mailhost")
    assert call["env"]["PATH"] == "/usr/sbin:/usr/bin:/sbin:/bin"
    assert set(call["env"]) <= {"PATH", "LC_CTYPE"}     # python adds LC_CTYPE
    if is_root:
        assert call["uid"] == pwd.getpwnam("nobody").pw_uid
    assert f.stop() == 0
    assert "delivered" in f.log()


def test_null_sender_is_passed_as_angle_brackets(fwd_env):
    name = put(fwd_env.spool, sender=b"<>")
    fwd_env.start()
    assert wait_for(lambda: fwd_env.agent.calls())
    assert fwd_env.agent.calls()[0]["argv"][2:4] == ["-f", "<>"]


@pytest.mark.parametrize("status", [71, 72, 74, 75])
def test_temporary_failure_defers(fwd_env, status):
    fwd_env.agent.statuses(status)
    name = put(fwd_env.spool)
    path = os.path.join(fwd_env.spool, name)
    before = open(path, "rb").read()
    f = fwd_env.start(RETRY_DELAY_TIME=600)
    assert wait_for(lambda: mode(path) == 0o755)
    assert abs(os.stat(path).st_mtime - time.time()) < 10
    assert open(path, "rb").read() == before
    time.sleep(2.5)
    assert len(fwd_env.agent.calls()) == 1          # waits RETRY_DELAY_TIME
    assert f.stop() == 0
    assert "deferred: %s exited %d" % (fwd_env.agent.path, status) in f.log()


@pytest.mark.parametrize("status", ["78", "sig"])
def test_config_error_or_signal_defers_with_crit_and_keeps_running(fwd_env, status):
    fwd_env.agent.statuses(status)
    name = put(fwd_env.spool)
    path = os.path.join(fwd_env.spool, name)
    f = fwd_env.start()
    assert wait_for(lambda: os.path.exists(path) and mode(path) == 0o755)
    assert "fix the mail agent" in f.log()
    fwd_env.agent.statuses(0)
    assert wait_for(lambda: not os.path.exists(path))      # retried after 1 s
    assert f.proc.poll() is None
    assert f.stop() == 0


def test_missing_agent_defers_and_daemon_survives(fwd_env):
    name = put(fwd_env.spool)
    path = os.path.join(fwd_env.spool, name)
    f = fwd_env.start(agent_path=fwd_env.agent.dir + "/nonexistent")
    assert wait_for(lambda: mode(path) == 0o755)
    assert "cannot run %s/nonexistent" % fwd_env.agent.dir in f.log()
    assert f.proc.poll() is None
    assert f.stop() == 0


@pytest.mark.parametrize("status", [67, 64, 65, 69, 1])
def test_permanent_failure_is_quarantined_not_deleted(fwd_env, status):
    fwd_env.agent.statuses(status)
    name = put(fwd_env.spool)
    before = open(os.path.join(fwd_env.spool, name), "rb").read()
    f = fwd_env.start()
    assert wait_for(lambda: os.path.exists(failed(fwd_env.spool, name) + ".reason"))
    assert open(failed(fwd_env.spool, name), "rb").read() == before
    assert "exited %d" % status in open(failed(fwd_env.spool, name) + ".reason").read()
    assert not os.path.exists(os.path.join(fwd_env.spool, name))
    assert f.stop() == 0


def test_250_recipients_three_calls_and_retry_of_unsent_only(fwd_env):
    rcpts = [b"<r%03d@my.domain>" % i for i in range(250)]
    fwd_env.agent.statuses(0, 75)
    name = put(fwd_env.spool, rcpts=rcpts)
    path = os.path.join(fwd_env.spool, name)
    f = fwd_env.start(RETRY_DELAY_TIME=600)
    assert wait_for(lambda: mode(path) == 0o755)
    f.stop()
    calls = fwd_env.agent.calls()
    assert [len(c["argv"]) - 5 for c in calls] == [95, 95]
    data = open(path, "rb").read()
    assert data.count(b"\nSENT <r") == 95 and data.count(b"\nRCPT <r") == 155
    assert b"SENT <r094@my.domain>\nRCPT <r095@my.domain>" in data
    fwd_env.agent.reset()
    fwd_env.agent.statuses(0)
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    f = fwd_env.start(RETRY_DELAY_TIME=600)
    assert wait_for(lambda: not os.path.exists(path))
    calls = fwd_env.agent.calls()
    assert [len(c["argv"]) - 5 for c in calls] == [95, 60]
    assert calls[0]["argv"][5] == "r095@my.domain"
    assert calls[1]["argv"][-1] == "r249@my.domain"


def test_c_smtpd_file_untouched_while_written_then_delivered(fwd_env):
    path = os.path.join(fwd_env.spool, "smtpdAb12Cd")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    give_to_nobody(path)
    os.write(fd, b"FROM <alice@example.org>\nRCPT <bob@my.domain>\nBODY\n"
                 b'Received: from mail.example.org(192.0.2.10), claiming to be "mailhost"\n'
                 b" via SMTP by mx.my.domain, id smtpdAb12Cd; Tue Jul 14 10:00:00 2026\n")
    f = fwd_env.start()
    time.sleep(2.5)
    assert fwd_env.agent.calls() == []
    os.write(fd, b"Subject: t\n\n.dot\n")
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    os.chmod(path, 0o750)
    assert wait_for(lambda: not os.path.exists(path))
    (call,) = fwd_env.agent.calls()
    assert call["stdin"].endswith("Subject: t\n\n.dot\n")
    assert call["stdin"].startswith("Received: from mail.example.org(192.0.2.10)")


@pytest.mark.parametrize("rcpt,why", [
    (b"<victim@remote.example>,xmy.domain", "unquoted ','"),
    (b"-oQ/tmp/x@a", "starts with '-'"),
    (b"<-X/tmp/log>", "starts with '-'"),
])
def test_injection_from_c_smtpd_files_is_refused(fwd_env, rcpt, why):
    name = put(fwd_env.spool, rcpts=[b"<ok@my.domain>", rcpt])
    fwd_env.start()
    assert wait_for(lambda: os.path.exists(failed(fwd_env.spool, name) + ".reason"))
    assert why in open(failed(fwd_env.spool, name) + ".reason").read()
    # The unsafe recipient never reaches the agent; the safe one is delivered,
    # and the sender is told (the notification is the second call).
    assert wait_for(lambda: len(fwd_env.agent.calls()) == 2)
    calls = [c["argv"] for c in fwd_env.agent.calls()]
    assert calls[0][-2:] == ["--", "ok@my.domain"]
    assert calls[1][2:] == ["-f", "<>", "--", "alice@example.org"]
    assert not any(rcpt.decode().strip("<>") in a for c in calls for a in c[5:])


def test_quoted_comma_is_fine(fwd_env):
    put(fwd_env.spool, rcpts=[b'<"a,b"@my.domain>'])
    fwd_env.start()
    assert wait_for(lambda: fwd_env.agent.calls())
    assert fwd_env.agent.calls()[0]["argv"][-2:] == ["--", '"a,b"@my.domain']


@pytest.mark.parametrize("content,reason", [
    (b"garbage\n", "no FROM line"),
    (b"FROM <a@b>\nRCPT <c@d>\nbody\n", "no BODY after RCPT"),
    (b"FROM <a@b>\nRCPT <" + b"x" * 600 + b">\nBODY\n", "RCPT line too long"),
])
def test_malformed_files_quarantined_with_reason(fwd_env, content, reason):
    path = os.path.join(fwd_env.spool, "smtpdBadBad")
    with open(path, "wb") as f:
        f.write(content)
    os.chmod(path, 0o750)
    give_to_nobody(path)
    fwd_env.start()
    assert wait_for(lambda: os.path.exists(failed(fwd_env.spool, "smtpdBadBad.reason")))
    assert reason in open(failed(fwd_env.spool, "smtpdBadBad.reason")).read()


def test_directory_named_smtpd_does_not_stop_the_daemon(fwd_env):
    os.mkdir(os.path.join(fwd_env.spool, "smtpdX"))
    f = fwd_env.start()
    time.sleep(1.5)
    name = put(fwd_env.spool)
    assert wait_for(lambda: not os.path.exists(os.path.join(fwd_env.spool, name)))
    assert f.proc.poll() is None
    assert f.log().count("smtpdX is not a regular file") == 1
    assert f.stop() == 0


def test_second_instance_refuses(fwd_env):
    f = fwd_env.start()
    assert wait_for(lambda: os.path.exists(os.path.join(fwd_env.spool, ".smtpfwdd.lock")))
    time.sleep(0.5)
    assert open(os.path.join(fwd_env.spool, ".smtpfwdd.lock")).read() == "%7d\n" % f.proc.pid
    g = fwd_env.start()
    assert g.proc.wait(20) == 78
    assert g.log().count("already running (pid %d" % f.proc.pid) == 1
    assert f.proc.poll() is None


def test_sigterm_waits_for_a_slow_agent(fwd_env):
    fwd_env.agent.statuses("sleep 3")
    name = put(fwd_env.spool)
    f = fwd_env.start()
    assert wait_for(lambda: fwd_env.agent.calls())
    t0 = time.time()
    f.proc.send_signal(signal.SIGTERM)
    assert f.proc.wait(30) == 0
    assert time.time() - t0 > 1.5
    assert not os.path.exists(os.path.join(fwd_env.spool, name))


def test_sigusr1_scans_now(fwd_env):
    f = fwd_env.start()
    time.sleep(1.5)
    name = put(fwd_env.spool)
    f.proc.send_signal(signal.SIGUSR1)
    assert wait_for(lambda: not os.path.exists(os.path.join(fwd_env.spool, name)), 5)


def test_stale_draft_is_removed(fwd_env):
    d = spool.Draft(fwd_env.spool, b"<a@b>", [b"<c@d>"])
    d.write(b"half")
    d.flush()
    draft = d.draft
    os.close(d.fd)                  # the writer died: unlocked
    give_to_nobody(draft)
    os.utime(draft, (time.time() - 10, time.time() - 10))
    f = fwd_env.start()
    assert wait_for(lambda: not os.path.exists(draft))
    assert "died before its 250" in f.log()


def test_deferred_beyond_queue_lifetime_is_quarantined(fwd_env):
    fwd_env.agent.statuses(75)
    old = b"Tue, 14 Jul 1998 10:00:00 +0000"
    name = put(fwd_env.spool, body=RECEIVED % old + BODY)
    fwd_env.start()
    assert wait_for(lambda: os.path.exists(failed(fwd_env.spool, name) + ".reason"))
    assert "undeliverable for" in open(failed(fwd_env.spool, name) + ".reason").read()


def test_quiet_mode_one_line_per_message(fwd_env):
    rcpts = [b"<a@my.domain>", b"<b@my.domain>"]
    name = put(fwd_env.spool, rcpts=rcpts)
    f = fwd_env.start("-q")
    assert wait_for(lambda: not os.path.exists(os.path.join(fwd_env.spool, name)))
    f.stop()
    lines = [l for l in f.log().splitlines() if name in l]
    assert lines == [l for l in lines if "from=<alice@example.org> to=<a@my.domain> "
                     "to=<b@my.domain> size=%d message-id=- status=delivered; the agent "
                     "said: fake-sendmail call 0 exiting 0" % (len(RECEIVED % now_date())
                                                                + len(BODY)) in l]
    assert len(lines) == 1


@pytest.mark.parametrize("args", [["-d", "rel"], ["-s", "sendmail"], ["-M", "0"],
                                  ["-M", "1001"], ["-P", "x"], ["-Z"]])
def test_bad_options_exit_64(tree_factory, args):
    """As in smtpd (the original's 78 is a deliberate difference)."""
    tree = tree_factory(**FWD_CONSTANTS)
    p = subprocess.run([PYTHON, os.path.join(tree, "smtpfwdd.py")] + args,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    assert p.returncode == 64
    assert b"usage: smtpfwdd.py" in p.stderr
    assert p.stderr.count(b"smtpfwdd.py: ") == 1


def test_file_with_unparsable_received_date_is_delivered(fwd_env):
    # time.strptime imports a module lazily: after setuid, from a Python
    # the unprivileged user cannot read, that import used to kill delivery.
    name = put(fwd_env.spool, body=b"Received: from somewhere; not a date\n" + BODY)
    fwd_env.start()
    assert wait_for(lambda: not os.path.exists(os.path.join(fwd_env.spool, name)))
    assert len(fwd_env.agent.calls()) == 1


def test_unexpected_error_in_delivery_defers_instead_of_looping(fwd_env):
    fwd_env.agent.statuses(67)
    with open(os.path.join(fwd_env.spool, "failed"), "w") as f:
        f.write("a file where the failed/ directory should be\n")
    name = put(fwd_env.spool)
    path = os.path.join(fwd_env.spool, name)
    f = fwd_env.start(RETRY_DELAY_TIME=600)
    assert wait_for(lambda: mode(path) == 0o755)
    time.sleep(2.5)
    # One attempt at the message (and one at the notification it queued first).
    assert [c["argv"][3] for c in fwd_env.agent.calls()].count("alice@example.org") == 1
    assert "NotADirectoryError" in f.log() and "deferred" in f.log()
    assert f.proc.poll() is None


def test_killed_delivery_worker_is_replaced_and_file_delivered_later(fwd_env):
    fwd_env.agent.statuses("sleep 2")
    name = put(fwd_env.spool)
    path = os.path.join(fwd_env.spool, name)
    f = fwd_env.start()
    assert wait_for(lambda: fwd_env.agent.calls())
    workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and
               open("/proc/%s/stat" % p).read().rsplit(")", 1)[1].split()[1] == str(f.proc.pid)]
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    assert wait_for(lambda: "delivery worker %d died" % workers[0] in f.log())
    fwd_env.agent.statuses(0)
    assert wait_for(lambda: not os.path.exists(path), 20)
    assert f.proc.poll() is None
    assert f.stop() == 0


def test_sighup_rereads_the_settings(fwd_env):
    """Issue 35, item 4: new deliveries see what changed in the settings
    file; one with a mistake changes nothing; the spool waits for a
    restart.  (smtpfwdd reads it as its own user then: mode 644, in a
    directory all may enter, as make install leaves it.)"""
    import pathlib
    import tempfile
    where = tempfile.mkdtemp(prefix="smtpd-etc-", dir="/tmp")
    os.chmod(where, 0o755)
    settings = pathlib.Path(where) / "smtpd.conf"
    settings.write_text("")
    f = fwd_env.start(SETTINGS_FILE=str(settings))
    rcpts = [b"<r%d@my.domain>" % i for i in range(10)]
    put(fwd_env.spool, rcpts=rcpts)
    assert wait_for(lambda: len(fwd_env.agent.calls()) == 1)
    settings.write_text("MAXARGS = 8\nSPOOLDIR = /elsewhere\n")
    f.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "settings re-read from %s: MAXARGS = 8" % settings in f.log()), \
        f.log()
    assert "these settings take effect at the next start: SPOOLDIR = /elsewhere" in f.log()
    put(fwd_env.spool, rcpts=rcpts)
    assert wait_for(lambda: len(fwd_env.agent.calls()) == 1 + 4)     # 3 + 3 + 3 + 1
    assert max(len(c["argv"]) for c in fwd_env.agent.calls()[1:]) <= 8
    settings.write_text("MAXARGS = 7\nMAXARGS = 9\n")
    f.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "%s:2: MAXARGS set again" % settings in f.log()), f.log()
    assert "SIGHUP: the settings in effect stay" in f.log()
    assert f.stop() == 0
    shutil.rmtree(where)


def test_sighup_during_a_delivery_reaches_the_next_one(fwd_env):
    """A delivery process busy when SIGHUP arrives was forked with the old
    settings: it finishes its file, then leaves; the next file goes to
    one forked with the new settings (CI caught the race: the busy one
    stayed and delivered the next file with the old MAXARGS)."""
    import pathlib
    import tempfile
    where = tempfile.mkdtemp(prefix="smtpd-etc-", dir="/tmp")
    os.chmod(where, 0o755)
    settings = pathlib.Path(where) / "smtpd.conf"
    settings.write_text("")
    fwd_env.agent.statuses("sleep 2")
    f = fwd_env.start(SETTINGS_FILE=str(settings))
    rcpts = [b"<r%d@my.domain>" % i for i in range(10)]
    first = os.path.join(fwd_env.spool, put(fwd_env.spool, rcpts=rcpts))
    assert wait_for(lambda: len(fwd_env.agent.calls()) == 1)
    settings.write_text("MAXARGS = 8\n")
    f.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "settings re-read from %s: MAXARGS = 8" % settings in f.log()), \
        f.log()
    assert os.path.exists(first)                    # still being delivered
    assert wait_for(lambda: not os.path.exists(first))
    time.sleep(0.5)                                 # its process has answered
    fwd_env.agent.statuses(0)
    put(fwd_env.spool, rcpts=rcpts)
    assert wait_for(lambda: len(fwd_env.agent.calls()) == 1 + 4, 20), fwd_env.agent.calls()
    assert [len(c["argv"]) <= 8 for c in fwd_env.agent.calls()[1:]] == [True] * 4
    assert f.stop() == 0
    shutil.rmtree(where)
