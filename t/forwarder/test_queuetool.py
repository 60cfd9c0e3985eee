"""The queue tool, smtpfwdd -Q (issue 15): list (text and JSON) on a spool
holding a message in every state, show, requeue, delete, flush."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from smtpgate import libc, spool, spooldir
from harness import (FWD_CONSTANTS, give_to_nobody, gone, is_root, needs_root, nobody_tree,
                     never_ignores_sigterm, pid_as_soon_as_written, put, PYTHON, ROOT, wait_for)


def smtpq(tree, spooldir, *args, prefix=(PYTHON,), env=None):
    argv = list(prefix) + [os.path.join(tree, "smtpfwdd.py"), "-d", spooldir, "-Q"] + list(args)
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture
def tree(tree_factory):
    return tree_factory(**FWD_CONSTANTS)


class Holder:
    """Another process holding a message's flock (as a delivery would)."""

    def __init__(self, path):
        self.p = subprocess.Popen([PYTHON, "-c", "import fcntl, os, sys, time\n"
                                   "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
                                   "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\n"
                                   "time.sleep(60)", path], stdout=subprocess.PIPE)
        assert self.p.stdout.readline() == b"held\n"

    def release(self):
        self.p.kill()
        self.p.wait()


def every_state(d):
    """One message in each state; returns {state: id}."""
    ids = {}
    ids["queued"] = put(d, rcpts=[b"<q@my.domain>"])
    ids["deferred"] = put(d, rcpts=[b"<d@my.domain>"])
    os.chmod(os.path.join(d, ids["deferred"]), 0o755)
    ids["delivering"] = put(d, rcpts=[b"<l@my.domain>"])
    draft = spool.Draft(d, b"<w@b.example>", [b"<w@my.domain>"])      # smtpd writing
    draft.write(b"half a mess")
    draft.flush()
    ids["writing"] = os.path.basename(draft.draft)
    ids["failed"] = put(d, sender=b"<f@b.example>", rcpts=[b"<f@my.domain>"])
    quarantine(d, ids["failed"], "agent exited 67, saying: no such user")
    with open(os.path.join(d, "smtpdBROKEN"), "wb") as f:
        f.write(b"FROM <x@y>\nnot an envelope\n")
    os.chmod(os.path.join(d, "smtpdBROKEN"), 0o750)
    give_to_nobody(os.path.join(d, "smtpdBROKEN"))
    ids["malformed"] = "smtpdBROKEN"
    return ids, draft


def test_list_every_state_in_text_and_json(fwd_env, tree):
    ids, draft = every_state(fwd_env.spool)
    holder = Holder(os.path.join(fwd_env.spool, ids["delivering"]))
    try:
        status, out, err = smtpq(tree, fwd_env.spool, "list", "-j")
        assert status == 0, err
        got = {o["id"]: o for o in map(json.loads, out.splitlines())}
        for state, ident in ids.items():
            assert got[ident]["state"] == state, (state, got[ident])
        assert got[ids["failed"]]["queue"] == "failed"
        assert "no such user" in got[ids["failed"]]["reason"]
        assert got[ids["deferred"]]["next_retry"] >= int(time.time()) - 1
        assert got[ids["queued"]]["recipients"] == {"pending": ["<q@my.domain>"], "sent": []}
        assert got[ids["queued"]]["sender"] == "<alice@example.org>"
        assert got[ids["writing"]]["sender"] is None          # never read half-written
        assert all(set(o) >= {"id", "state", "age", "size", "sender", "recipients",
                              "next_retry", "reason"} for o in got.values())
        status, out, _ = smtpq(tree, fwd_env.spool, "list")
        assert status == 0
        lines = out.splitlines()
        assert lines[0].split() == ["ID", "STATE", "AGE", "SIZE", "SENDER"]
        assert lines[-1].startswith("-- 6 messages: 1 deferred, 1 delivering, 1 failed, "
                                    "1 malformed, 1 queued, 1 writing; oldest ")
        rows = [l for l in lines[1:-1] if l.startswith(("smtpd", "draft."))]
        assert len(rows) == 6 and len({l.index(l.split()[1]) for l in rows}) == 1  # aligned
    finally:
        holder.release()
        draft.abort()


def test_show_prints_envelope_state_and_headers(fwd_env, tree):
    name = put(fwd_env.spool)
    status, out, _ = smtpq(tree, fwd_env.spool, "show", name)
    assert status == 0
    assert "state: queued" in out and "from: <alice@example.org>" in out
    assert "to: <bob@my.domain>" in out and "Subject: test" in out
    assert "Hello." not in out          # headers, not the body


def test_missing_or_bad_id_exits_66(fwd_env, tree):
    for ident in ("smtpdNOSUCH", "../../etc/passwd", "draft.x/y"):
        status, _, err = smtpq(tree, fwd_env.spool, "show", ident)
        assert status == 66 and err.startswith("smtpq: ")


def test_usage_errors_exit_64(fwd_env, tree):
    assert smtpq(tree, fwd_env.spool, "bogus")[0] == 64
    assert smtpq(tree, fwd_env.spool, "show")[0] == 64
    assert smtpq(tree, fwd_env.spool, "list", "extra")[0] == 64


def test_delete_refuses_a_locked_file_and_logs_the_others(fwd_env, tree):
    name = put(fwd_env.spool)
    path = os.path.join(fwd_env.spool, name)
    holder = Holder(path)
    try:
        status, _, err = smtpq(tree, fwd_env.spool, "delete", name)
        assert status == 75 and "being delivered" in err
        assert os.path.exists(path)
    finally:
        holder.release()
    assert smtpq(tree, fwd_env.spool, "delete", name)[0] == 0
    assert not os.path.exists(path)


def test_delete_refuses_a_message_being_written(fwd_env, tree):
    d = spool.Draft(fwd_env.spool, b"<a@b>", [b"<c@d>"])
    try:
        status, _, err = smtpq(tree, fwd_env.spool, "delete", os.path.basename(d.draft))
        assert status == 75 and "being written" in err
        assert os.path.exists(d.draft)
    finally:
        d.abort()


def test_requeue_of_a_failed_message_leads_to_delivery(fwd_env, tree):
    name = put(fwd_env.spool)
    quarantine(fwd_env.spool, name, "agent exited 69")
    fwd_env.start()
    time.sleep(1.5)
    assert fwd_env.agent.calls() == []
    status, out, _ = smtpq(tree, fwd_env.spool, "requeue", name)
    assert status == 0 and "back in the queue" in out
    assert not os.path.exists(os.path.join(fwd_env.spool, "failed", name + ".reason"))
    assert wait_for(lambda: fwd_env.agent.calls())
    assert wait_for(lambda: not os.path.exists(os.path.join(fwd_env.spool, name)))


def test_requeue_makes_a_deferred_message_due_and_all_failed(fwd_env, tree):
    name = put(fwd_env.spool)
    path = os.path.join(fwd_env.spool, name)
    os.chmod(path, 0o755)
    os.utime(path)
    assert smtpq(tree, fwd_env.spool, "requeue", name)[:2] == (0, "%s: due now\n" % name)
    assert os.stat(path).st_mode & 0o777 == 0o750
    others = [put(fwd_env.spool) for _ in range(2)]
    for o in others:
        quarantine(fwd_env.spool, o, "x")
    status, out, _ = smtpq(tree, fwd_env.spool, "requeue", "all-failed")
    assert status == 0 and "2 failed messages requeued" in out
    assert all(os.path.exists(os.path.join(fwd_env.spool, o)) for o in others)


def test_flush_triggers_an_immediate_scan(fwd_env, tree):
    f = fwd_env.start("-P", "1000")
    time.sleep(1.5)                     # its first scan is over
    name = put(fwd_env.spool)
    time.sleep(1)
    assert fwd_env.agent.calls() == []
    status, out, _ = smtpq(tree, fwd_env.spool, "flush")
    assert status == 0 and "asked to scan now" in out
    assert wait_for(lambda: not os.path.exists(os.path.join(fwd_env.spool, name)), 5)
    f.stop()
    status, _, err = smtpq(tree, fwd_env.spool, "flush")
    assert status == 69 and "not running" in err


@needs_root
def test_works_as_the_spools_user(fwd_env):
    tree, env, as_nobody = nobody_tree(**FWD_CONSTANTS)
    name = put(fwd_env.spool)
    status, out, err = smtpq(tree, fwd_env.spool, "list", "-j", prefix=as_nobody, env=env)
    assert status == 0, err
    assert json.loads(out)["id"] == name
    assert smtpq(tree, fwd_env.spool, "delete", name, prefix=as_nobody, env=env)[0] == 0


def test_the_checkouts_smtpq_wrapper(fwd_env):
    name = put(fwd_env.spool)
    p = subprocess.run([os.path.join(ROOT, "bin", "smtpq"), "-d", fwd_env.spool, "list"],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 0 and name in p.stdout, p.stderr


def test_a_failed_directory_that_is_a_link_is_not_followed(fwd_env, tree, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "smtpdVICTIM").write_text("FROM <a@b>\nRCPT <c@d>\nBODY\nx\n")
    os.symlink(str(elsewhere), os.path.join(fwd_env.spool, "failed"))
    status, out, _ = smtpq(tree, fwd_env.spool, "list", "-j")
    assert status == 0 and "smtpdVICTIM" not in out
    assert smtpq(tree, fwd_env.spool, "delete", "smtpdVICTIM")[0] == 66
    assert (elsewhere / "smtpdVICTIM").exists()


# -- root never acts on bytes the jail wrote (issue 21, item 2) --

HOSTILE = b"\x1b]0;pwned\x07\x1b[2J\x1b[1;1Hfake root prompt# \x9b31m\xe2\x80\xae"


def no_raw_controls(text):
    """Nothing a terminal would act on: no C0 control but newline and tab,
    no C1 control, no bidi override."""
    bad = [c for c in text if (ord(c) < 32 and c not in "\n\t") or 0x7f <= ord(c) < 0xa0
           or c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"]
    assert bad == [], repr(text)


def test_show_makes_hostile_headers_visible(fwd_env, tree):
    body = RECEIVED_NOW() + b"Subject: " + HOSTILE + b"\nX-Other: ok\n\nbody\n"
    name = put(fwd_env.spool, sender=b"<a\xc2\x9b@b.example>", body=body)
    status, out, err = smtpq(tree, fwd_env.spool, "show", name)
    assert status == 0, err
    no_raw_controls(out)
    assert "Subject: \\x1b]0;pwned\\x07" in out and "\\u202e" in out
    assert "X-Other: ok" in out


def test_list_makes_hostile_names_and_reasons_visible(fwd_env, tree):
    d = fwd_env.spool
    evil = b"smtpd\x1b]0;pwned\x07\nsmtpdFAKE queued"
    with open(os.path.join(os.fsencode(d), evil), "wb") as f:
        f.write(b"FROM <x@y>\nRCPT <z@w>\nBODY\nx\n")
    os.chmod(os.path.join(os.fsencode(d), evil), 0o750)
    give_to_nobody(os.path.join(os.fsencode(d), evil))
    name = put(d)
    quarantine(d, name, "agent said \x1b[31mred\x1b[0m\r\nforged line")
    status, out, err = smtpq(tree, d, "list")
    assert status == 0, err
    no_raw_controls(out)
    assert "\\x1b]0;pwned\\x07" in out and "\\x1b[31mred" in out
    assert len([l for l in out.splitlines() if "smtpdFAKE" in l]) == 1
    status, out, err = smtpq(tree, d, "list", "-j")
    assert status == 0, err
    no_raw_controls(out)
    got = [json.loads(line) for line in out.splitlines()]
    assert any(o["id"].startswith("smtpd\\x1b]0;pwned\\x07") for o in got)
    assert all("\x1b" not in json.dumps(o, ensure_ascii=False) for o in got)


class LockHolder:
    """What a compromised jail can do: hold .smtpfwdd.lock itself (as the
    spool's user) and write any pid into it, under any process name."""

    def __init__(self, spooldir, pid, title=None, as_nobody=()):
        code = ("import fcntl, os, sys, time\n"
                "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "os.ftruncate(fd, 0); os.write(fd, sys.argv[2].encode())\n"
                "if sys.argv[3]: open('/proc/self/comm', 'w').write(sys.argv[3])\n"
                "print('held', flush=True)\ntime.sleep(60)")
        self.p = subprocess.Popen(list(as_nobody or [PYTHON]) + [
            "-c", code, os.path.join(spooldir, ".smtpfwdd.lock"), "%7d\n" % pid, title or ""],
            stdout=subprocess.PIPE)
        assert self.p.stdout.readline() == b"held\n"

    def release(self):
        self.p.kill()
        self.p.wait()


def victim_process():
    """A process of the spool's user that SIGUSR1 would kill (as it would a
    delivery process or the agent)."""
    argv = ["sleep", "60"]
    if is_root:
        argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] + argv
    return subprocess.Popen(argv)


@pytest.mark.parametrize("title", [None, "smtpfwdd"])
def test_flush_never_signals_a_pid_the_jail_wrote(fwd_env, tree, title):
    victim = victim_process()
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
              "/usr/bin/python3"] if is_root else ()
    holder = LockHolder(fwd_env.spool, victim.pid, title, nobody)
    try:
        status, out, err = smtpq(tree, fwd_env.spool, "flush")
        time.sleep(0.5)
        assert victim.poll() is None, "smtpq signalled the pid written in the lock file"
        if title is None:           # the holder is not an smtpfwdd: nobody is signalled
            assert status == 69 and "not signalled" in err, (status, err)
            assert holder.p.poll() is None
    finally:
        holder.release()
        victim.kill()
        victim.wait()


def test_flush_finds_a_detached_smtpfwdd(fwd_env, tree):
    """Detached, the process holding the lock is not the one that took it."""
    pidfile = fwd_env.spool + ".pid"
    argv = [PYTHON, os.path.join(tree, "smtpfwdd.py"), "-d", fwd_env.spool, "-s",
            fwd_env.agent.path, "-P", "1000", "-i", pidfile]
    if is_root:
        argv += ["-u", "nobody", "-g", "nogroup"]
    assert subprocess.run(argv, timeout=30).returncode == 0
    try:
        assert wait_for(lambda: os.path.exists(pidfile) and open(pidfile).read().strip())
        daemon_pid = int(open(pidfile).read())
        assert wait_for(lambda: smtpq(tree, fwd_env.spool, "flush")[0] == 0, 10)
        status, out, _ = smtpq(tree, fwd_env.spool, "flush")
        assert "(pid %d)" % daemon_pid in out
    finally:
        os.kill(int(open(pidfile).read()), 15)
        os.unlink(pidfile)


@needs_root
def test_as_root_it_becomes_the_spools_owner_first(fwd_env, tree):
    name = put(fwd_env.spool)
    secret = os.path.join(fwd_env.spool, "smtpdROOTONLY")
    with open(secret, "wb") as f:                   # root's, unreadable by nobody
        f.write(b"FROM <root@x>\nRCPT <secret@y>\nBODY\nroot only\n")
    os.chmod(secret, 0o750)
    status, out, err = smtpq(tree, fwd_env.spool, "list", "-j")
    assert status == 0, err
    got = {o["id"]: o for o in map(json.loads, out.splitlines())}
    assert got[name]["state"] == "queued"
    assert got["smtpdROOTONLY"]["state"] == "unreadable"
    assert "secret@y" not in out


def test_requeue_all_failed_takes_only_spool_ids(fwd_env, tree):
    d = fwd_env.spool
    good = put(d)
    quarantine(d, good, "x")
    failed = os.path.join(d, "failed")
    for junk in ("notanid", "smtpd-dash", "smtpdX.reason.tmp"):
        with open(os.path.join(failed, junk), "w") as f:
            f.write("FROM <a@b>\nRCPT <c@d>\nBODY\n")
    status, out, _ = smtpq(tree, d, "requeue", "all-failed")
    assert status == 0 and "1 failed message requeued" in out
    assert os.path.exists(os.path.join(d, good))
    assert sorted(os.listdir(failed)) == ["notanid", "smtpd-dash", "smtpdX.reason.tmp"]


def test_requeue_all_failed_never_follows_a_swapped_failed_dir(fwd_env, tree, tmp_path):
    """The jail swaps failed/ for a link to another directory while root's
    requeue runs: nothing of the other directory is moved or changed."""
    import threading
    d = fwd_env.spool
    names = [put(d) for _ in range(100)]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for n in names:
        (elsewhere / n).write_text("FROM <victim@x>\nRCPT <v@y>\nBODY\nELSEWHERE\n")
        os.chmod(str(elsewhere / n), 0o640)
    os.chmod(str(tmp_path), 0o755)
    os.chmod(str(elsewhere), 0o777)
    failed, link = os.path.join(d, "failed"), os.path.join(d, "failed.link")
    os.symlink(str(elsewhere), link)
    stop, swaps = threading.Event(), []

    def swap():         # renameat2(RENAME_EXCHANGE): failed/ is always there
        while not stop.is_set():
            for _ in range(2):
                libc.renameat2(failed, link, libc.RENAME_EXCHANGE)
                time.sleep(0.0002)
            swaps.append(1)
    for _ in range(8):
        for n in names:
            if os.path.exists(os.path.join(d, n)):
                quarantine(d, n, "x")
        t = threading.Thread(target=swap)
        t.start()
        try:
            smtpq(tree, d, "requeue", "all-failed")
        finally:
            stop.set()
            t.join()
            stop.clear()
        moved = [n for n in names if os.path.exists(os.path.join(d, n))
                 and b"ELSEWHERE" in open(os.path.join(d, n), "rb").read()]
        assert moved == []
        assert sorted(os.listdir(str(elsewhere))) == sorted(names)
        assert all(os.stat(str(elsewhere / n)).st_mode & 0o777 == 0o640 for n in names)
    assert len(swaps) > 100


def RECEIVED_NOW():
    from harness import RECEIVED, now_date
    return RECEIVED % now_date()


def quarantine(d, name, reason):
    """As smtpfwdd would: failed/ and its files belong to the spool's user."""
    spooldir.quarantine(d, name, reason)
    failed = os.path.join(d, "failed")
    give_to_nobody(failed)
    for n in os.listdir(failed):
        give_to_nobody(os.path.join(failed, n))


# -- why a message waits (issue 22, item 5) --

def test_show_and_list_say_why_a_message_is_deferred(fwd_env, tree):
    fwd_env.agent.statuses(75, 0)
    name = put(fwd_env.spool)
    f = fwd_env.start(RETRY_DELAY_TIME=600)
    assert wait_for(lambda: os.stat(os.path.join(fwd_env.spool, name)).st_mode & 0o777 == 0o755)
    status, out, _ = smtpq(tree, fwd_env.spool, "show", name)
    assert status == 0 and "state: deferred" in out
    assert re.search(r"reason: .*sendmail exited 75, saying: fake-sendmail call 0 exiting 75", out)
    status, out, _ = smtpq(tree, fwd_env.spool, "list", "-j")
    assert "exited 75" in json.loads(out)["reason"]
    f.stop()
    assert smtpq(tree, fwd_env.spool, "requeue", name)[0] == 0
    f = fwd_env.start()
    assert wait_for(lambda: not os.path.exists(os.path.join(fwd_env.spool, name)))
    assert os.listdir(os.path.join(fwd_env.spool, "deferred")) == []   # gone with it
    f.stop()


def test_no_spool_is_66_with_a_readable_message(tree):
    status, out, err = smtpq(tree, "/nonexistent-spool", "list")
    assert status == 66 and err == "smtpq: /nonexistent-spool: no such spool directory\n"


@pytest.mark.parametrize("attempt", range(3))
def test_sigterm_the_moment_the_pid_file_appears_stops_smtpfwdd(fwd_env, tree, attempt):
    """As for smtpd (test_daemon.py): a SIGTERM in the instant between the
    pid file and smtpfwdd's own handlers is not ignored."""
    pidfile = fwd_env.spool + ".pid"
    argv = [PYTHON, os.path.join(tree, "smtpfwdd.py"), "-d", fwd_env.spool, "-s",
            fwd_env.agent.path, "-P", "1000", "-i", pidfile]
    if is_root:
        argv += ["-u", "nobody", "-g", "nogroup"]
    parent = subprocess.Popen(argv)
    pid = pid_as_soon_as_written(pidfile)
    if attempt == 0:        # watch the window itself: SIGTERM never ignored
        never_ignores_sigterm(pid)
    os.kill(pid, signal.SIGTERM)
    assert parent.wait(30) == 0
    try:
        assert wait_for(lambda: gone(pid), 20), "smtpfwdd ignored SIGTERM"
    finally:
        if os.path.exists("/proc/%d" % pid):
            os.kill(pid, signal.SIGKILL)
        if os.path.exists(pidfile):
            os.unlink(pidfile)


def test_show_prints_the_messages_record(fwd_env, tree):
    """smtpq show's record line: the field names of smtpd's line for the
    message, from the envelope and smtpd's own Received header (another
    one, first in a forged file, is not believed)."""
    name = put(fwd_env.spool, rcpts=(b"<bob@my.domain>", b"<carol@my.domain>"))
    status, out, _ = smtpq(tree, fwd_env.spool, "show", name)
    assert status == 0
    (line,) = [l for l in out.splitlines() if l.startswith("record: ")]
    assert line.startswith("record: event=message id=%s " % name)
    assert 'to="<bob@my.domain>,<carol@my.domain>"' in line or \
        "to=<bob@my.domain>,<carol@my.domain>" in line
    assert "from=<alice@example.org>" in line and "state=queued" in line
    assert "client_addr" not in line        # the fixture's header names smtpdXXXXXX
    body = (b"Received: from helo.example (mail.example.org [192.0.2.10])\n"
            b"\t(version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384)\n"
            b"\tby mx.my.domain (smtpd) with ESMTPS id %s;\n\tMon, 7 Dec 2026 10:00:00 +0000\n"
            b"Subject: x\n\nbody\n")
    with spool.Draft(fwd_env.spool, b"<alice@example.org>", [b"<bob@my.domain>"]) as d:
        d.write(body % d.name.encode())
        name = d.commit()
    give_to_nobody(os.path.join(fwd_env.spool, name))
    out = smtpq(tree, fwd_env.spool, "show", name)[1]
    line = next(l for l in out.splitlines() if l.startswith("record: "))
    assert "client_addr=192.0.2.10 client_name=mail.example.org helo=helo.example" in line
    assert "tls_version=TLSv1.3 tls_cipher=TLS_AES_256_GCM_SHA384" in line
