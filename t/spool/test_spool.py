"""spool.py: format, commit protocol, locking, parsing, marks (issue 2)."""

import fcntl
import os
import signal
import stat
import subprocess
import textwrap
import time

import pytest

from harness import PYTHON, ROOT
from smtpgate import libc, spool, spooldir

RECEIVED_C = (b'Received: from mail.example.org(192.0.2.10), claiming to be "mailhost"\n'
              b" via SMTP by mx.my.domain, id smtpdA1b2C3; Tue Jul 14 10:00:00 1998\n")
SPEC_EXAMPLE = (b"FROM <alice@example.org>\n"
                b"RCPT <bob@my.domain>\n"
                b"BODY\n" + RECEIVED_C +
                b"Subject: t\n\n.dot\n")


def smtpd_files(d):
    return sorted(n for n in os.listdir(d) if n.startswith("smtpd"))


def write_message(d, sender=b"<alice@example.org>", rcpts=(b"<bob@my.domain>",),
                  body=RECEIVED_C + b"Subject: t\n\n.dot\n"):
    with spool.Draft(str(d), sender, list(rcpts)) as draft:
        draft.write(body)
        return draft.commit()


def test_round_trip_is_byte_exact_against_spec_example(tmp_path):
    name = write_message(tmp_path)
    path = tmp_path / name
    assert path.read_bytes() == SPEC_EXAMPLE
    assert stat.S_IMODE(path.stat().st_mode) == 0o750
    assert name.startswith("smtpd") and len(name) == 11
    with open(path, "rb") as f:
        msg = spool.parse(f)
        assert msg.sender == b"<alice@example.org>"
        assert [r for _, r in msg.recipients] == [b"<bob@my.domain>"]
        f.seek(msg.body_offset)
        assert f.read().startswith(b"Received: from mail.example.org")
    assert msg.arrival == time.mktime((1998, 7, 14, 10, 0, 0, 0, 0, -1))


def test_draft_is_invisible_until_commit(tmp_path):
    draft = spool.Draft(str(tmp_path), b"<a@b>", [b"<c@d>"])
    draft.write(b"Subject: x\n")
    assert smtpd_files(tmp_path) == []
    (only,) = os.listdir(tmp_path)
    assert only.startswith(spool.DRAFT_PREFIX)
    assert stat.S_IMODE((tmp_path / only).stat().st_mode) == 0o600
    name = draft.commit()
    assert os.listdir(tmp_path) == [name]


def test_abort_leaves_nothing(tmp_path):
    with spool.Draft(str(tmp_path), b"<a@b>", [b"<c@d>"]) as draft:
        draft.write(b"x\n")
    assert os.listdir(tmp_path) == []


def test_envelope_line_over_512_bytes_is_refused_before_writing(tmp_path):
    ok = b"<" + b"a" * 504 + b">"          # "RCPT " + 506 + LF = 512
    spool.Draft(str(tmp_path), b"<>", [ok]).abort()
    with pytest.raises(ValueError):
        spool.Draft(str(tmp_path), b"<>", [ok + b"x"])
    with pytest.raises(ValueError):
        spool.Draft(str(tmp_path), ok + b"x", [b"<c@d>"])
    assert os.listdir(tmp_path) == []


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, %r)
    from smtpgate import spool, spooldir
    d = spool.Draft(sys.argv[1], b"<a@b>", [b"<c@d>"])
    d.write(b"Subject: half a message\\n")
    d.flush()
    print("ready", flush=True)
    time.sleep(60)
""" % ROOT)


def test_writer_killed_before_commit_leaves_no_smtpd_file(tmp_path):
    p = subprocess.Popen([PYTHON, "-c", WRITER, str(tmp_path)],
                         stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"ready\n"
    # While the writer lives, its draft is locked and is not stale.
    assert spooldir.remove_stale_drafts(str(tmp_path), 0, time.time() + 10) == ([], [])
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert smtpd_files(tmp_path) == []
    (draft,) = os.listdir(tmp_path)
    # Young drafts stay; old unlocked ones go.
    assert spooldir.remove_stale_drafts(str(tmp_path), 1800, time.time()) == ([], [])
    assert spooldir.remove_stale_drafts(str(tmp_path), 1800,
                                     time.time() + 1801) == ([draft.encode()], [])
    assert os.listdir(tmp_path) == []


def test_c_style_file_is_not_eligible_until_0750(tmp_path):
    path = tmp_path / "smtpdAbCdEf"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, SPEC_EXAMPLE)
    now = time.time()
    assert not spool.eligible(os.stat(path), now, 600)
    assert spool.open_for_delivery(str(path), now, 600) is None
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    assert not spool.eligible(os.stat(path), now, 600)
    os.chmod(path, 0o750)
    assert spool.eligible(os.stat(path), now, 600)
    f = spool.open_for_delivery(str(path), now, 600)
    assert f is not None
    assert spool.parse(f).sender == b"<alice@example.org>"


def test_deferred_file_waits_retry_delay(tmp_path):
    name = write_message(tmp_path)
    path = str(tmp_path / name)
    f = spool.open_for_delivery(path, time.time(), 600)
    spool.defer(f)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert abs(st.st_mtime - time.time()) < 5
    assert not spool.eligible(st, time.time() + 599, 600)
    assert spool.eligible(st, time.time() + 601, 600)
    assert path and open(path, "rb").read() == SPEC_EXAMPLE


RACER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, %r)
    from smtpgate import spool
    start = float(sys.argv[2])
    while time.time() < start:
        pass
    f = spool.open_for_delivery(sys.argv[1], time.time(), 600)
    print("got" if f else "busy", flush=True)
    time.sleep(1.5)
""" % ROOT)


def test_two_processes_racing_for_one_file_exactly_one_gets_it(tmp_path):
    path = str(tmp_path / write_message(tmp_path))
    start = str(time.time() + 1.0)
    procs = [subprocess.Popen([PYTHON, "-c", RACER, path, start],
                              stdout=subprocess.PIPE) for _ in range(2)]
    results = sorted(p.communicate()[0].decode().strip() for p in procs)
    assert results == ["busy", "got"]


def test_open_for_delivery_rechecks_by_name(tmp_path):
    path = str(tmp_path / write_message(tmp_path))
    os.unlink(path)
    assert spool.open_for_delivery(path, time.time(), 600) is None


@pytest.mark.parametrize("content,reason", [
    (b"", "no FROM line"),
    (b"RCPT <a@b>\nBODY\n", "no FROM line"),
    (b"FROM <" + b"a" * 600 + b">\nRCPT <b@c>\nBODY\n", "FROM line too long"),
    (b"FROM <a@b>\nRCPT <" + b"c" * 600 + b">\nBODY\n", "RCPT line too long"),
    (b"FROM <a@b>\nRCPT <c@d>\nbody\nx\n", "no BODY after RCPT"),
    (b"FROM <a@b>\nRCPT <c@d>\n", "unexpected end of file"),
    (b"FROM <a@b>\nRCPT <c@d>", "unexpected end of file"),
    (b"FROM <a@b>\nBODY\nhello\n", "no recipient"),
])
def test_malformed_files_are_refused_with_their_reason(tmp_path, content, reason):
    path = tmp_path / "smtpdBadBad"
    path.write_bytes(content)
    with open(path, "rb") as f, pytest.raises(spool.Malformed) as e:
        spool.parse(f)
    assert reason in str(e.value)


def test_mark_sent_changes_only_the_four_bytes(tmp_path):
    rcpts = [b"<r%d@x>" % i for i in range(3)]
    name = write_message(tmp_path, rcpts=rcpts, body=b"hi\n")
    path = tmp_path / name
    before = path.read_bytes()
    with open(path, "r+b") as f:
        msg = spool.parse(f)
        spool.mark_sent(f, [msg.recipients[0][0], msg.recipients[2][0]])
        f.seek(0)
        again = spool.parse(f)
    after = path.read_bytes()
    assert after == before.replace(b"RCPT <r0@x>", b"SENT <r0@x>").replace(
        b"RCPT <r2@x>", b"SENT <r2@x>")
    assert [r for _, r in again.recipients] == [b"<r1@x>"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o750


def test_quarantine_moves_with_reason(tmp_path):
    name = write_message(tmp_path)
    before = (tmp_path / name).read_bytes()
    dest = spooldir.quarantine(str(tmp_path), name, "agent exited 67")
    assert smtpd_files(tmp_path) == []
    assert open(dest, "rb").read() == before
    assert open(dest + ".reason").read() == "agent exited 67\n"


def test_entries_lists_only_smtpd_names(tmp_path):
    write_message(tmp_path)
    (tmp_path / ".smtpfwdd.lock").write_text("1\n")
    (tmp_path / "smtpdDIR").mkdir()
    names = sorted(e.name for e in spooldir.entries(str(tmp_path)))
    assert len(names) == 2 and b"smtpdDIR" in names


def test_commit_never_replaces_an_existing_message(tmp_path):
    d = spool.Draft(str(tmp_path), b"<a@b>", [b"<c@d>"])
    d.write(b"new\n")
    taken = tmp_path / d.name
    taken.write_bytes(b"an older message with the same name\n")
    name = d.commit()
    assert name != taken.name
    assert taken.read_bytes() == b"an older message with the same name\n"
    assert (tmp_path / name).read_bytes().endswith(b"BODY\nnew\n")


def test_rename_noreplace_falls_back_to_link(tmp_path, monkeypatch):
    monkeypatch.setattr(libc, "RENAMEAT2", None)
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        spool.rename_noreplace(str(tmp_path / "a"), str(tmp_path / "b"))
    spool.rename_noreplace(str(tmp_path / "a"), str(tmp_path / "c"))
    assert sorted(os.listdir(tmp_path)) == ["b", "c"]


# -- anonymous drafts (O_TMPFILE) and group commit (issue 27) --

def test_an_anonymous_draft_has_no_name_until_commit(tmp_path):
    d = spool.Draft(str(tmp_path), b"<a@b>", [b"<c@d>"], anonymous=True)
    assert d.draft is None
    d.write(RECEIVED_C + b"Subject: t\n\nbody\n")
    d.flush()
    assert os.listdir(tmp_path) == []               # nothing to see, nothing to clean up
    name = d.commit()
    assert os.listdir(tmp_path) == [name]
    st = os.stat(tmp_path / name)
    assert stat.S_IMODE(st.st_mode) == spool.MODE_COMPLETE and st.st_nlink == 1
    assert (tmp_path / name).read_bytes() == (b"FROM <a@b>\nRCPT <c@d>\nBODY\n" + RECEIVED_C
                                              + b"Subject: t\n\nbody\n")


def test_an_aborted_anonymous_draft_leaves_nothing(tmp_path):
    d = spool.Draft(str(tmp_path), b"<a@b>", [b"<c@d>"], anonymous=True)
    d.write(b"x" * 100000)
    d.abort()
    assert os.listdir(tmp_path) == []


def test_an_anonymous_commit_never_replaces_a_message(tmp_path):
    d = spool.Draft(str(tmp_path), b"<a@b>", [b"<c@d>"], anonymous=True)
    d.write(b"new\n")
    taken = tmp_path / d.name
    taken.write_bytes(b"older\n")
    name = d.commit()
    assert name != taken.name and taken.read_bytes() == b"older\n"
    assert (tmp_path / name).read_bytes().endswith(b"BODY\nnew\n")


def test_where_the_kernel_refuses_linkat_a_named_copy_is_committed(tmp_path, monkeypatch):
    """Before Linux 6.10 an unprivileged linkat(AT_EMPTY_PATH) is ENOENT:
    the draft is copied to a named one, renamed, and named drafts follow."""
    def refused(fd, dst, dir_fd=libc.AT_FDCWD):
        raise OSError(2, "No such file or directory", dst)
    monkeypatch.setattr(libc, "link_open_file", refused)
    monkeypatch.setattr(spool.Draft, "anonymous_ok", True)
    d = spool.Draft(str(tmp_path), b"<a@b>", [b"<c@d>"], anonymous=True)
    body = b"".join(b"%06d\n" % i for i in range(50000))
    d.write(body)
    name = d.commit()
    assert os.listdir(tmp_path) == [name]
    assert (tmp_path / name).read_bytes() == b"FROM <a@b>\nRCPT <c@d>\nBODY\n" + body
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == spool.MODE_COMPLETE
    assert spool.Draft.anonymous_ok is False
    d2 = spool.Draft(str(tmp_path), b"<a@b>", [b"<c@d>"], anonymous=True)
    assert d2.draft is not None and os.path.exists(d2.draft)
    d2.abort()


def test_group_sync_covers_every_rename_with_fewer_fsyncs(tmp_path):
    """Eight processes commit 40 messages each through one GroupSync whose
    directory fsync is slow: every commit returns after an fsync that began
    after its rename, and they share fsyncs."""
    script = textwrap.dedent('''
        import os, sys, time
        sys.path.insert(0, %r)
        from smtpgate import counters, spool, spooldir
        counters.share(9)                       # a row for each process that counts
        sync = spooldir.GroupSync()
        real = os.fsync
        log = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND)
        def slow(fd):
            start = time.monotonic_ns()
            time.sleep(0.005)
            real(fd)
            os.write(log, b"F %%d %%d\\n" %% (start, time.monotonic_ns()))
        sync.fsync = slow
        kids = []
        for k in range(8):
            pid = os.fork()
            if pid == 0:
                counters.use_row(k + 1)
                for i in range(40):
                    d = spool.Draft(sys.argv[1], b"<a@b>", [b"<c@d>"], anonymous=True)
                    d.write(b"%%d %%d\\n" %% (k, i))
                    d.flush()
                    def timed(p):
                        renamed = time.monotonic_ns()       # the rename is done
                        sync(p)
                        os.write(log, b"C %%d %%d\\n" %% (renamed, time.monotonic_ns()))
                    d.commit(sync=timed)
                os._exit(0)
            kids.append(pid)
        for pid in kids:
            os.waitpid(pid, 0)
        print("%%d %%d" %% (sync.w[sync.NAMED],
                            counters.this.totals()["spool_dir_fsyncs"]))
    ''' % ROOT)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    events = tmp_path / "events"
    events.write_bytes(b"")
    out = subprocess.run([PYTHON, "-c", script, str(spool_dir), str(events)], check=True,
                         capture_output=True, text=True).stdout.split()
    committed, fsyncs = int(out[0]), int(out[1])
    assert committed == 320 and len(os.listdir(spool_dir)) == 320
    assert 1 <= fsyncs < committed / 2, fsyncs
    lines = events.read_text().splitlines()
    fs = [tuple(map(int, l.split()[1:])) for l in lines if l.startswith("F")]
    cs = [tuple(map(int, l.split()[1:])) for l in lines if l.startswith("C")]
    assert len(fs) == fsyncs and len(cs) == committed
    for renamed, returned in cs:        # an fsync began after the rename, ended before
        assert any(renamed <= start and end <= returned for start, end in fs)
