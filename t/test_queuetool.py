"""The queue tool, smtpfwdd -Q (issue 15): list (text and JSON) on a spool
holding a message in every state, show, requeue, delete, flush."""

import json
import os
import subprocess
import time

import pytest

import spool
from harness import FWD_CONSTANTS, is_root, nobody_tree, put, PYTHON, ROOT, wait_for


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
    spool.quarantine(d, ids["failed"], "agent exited 67, saying: no such user")
    with open(os.path.join(d, "smtpdBROKEN"), "wb") as f:
        f.write(b"FROM <x@y>\nnot an envelope\n")
    os.chmod(os.path.join(d, "smtpdBROKEN"), 0o750)
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
    spool.quarantine(fwd_env.spool, name, "agent exited 69")
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
        spool.quarantine(fwd_env.spool, o, "x")
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


@pytest.mark.skipif(not is_root, reason="needs root to run as the spool's user")
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
