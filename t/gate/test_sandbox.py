"""The jail's boundary (issue 21, item 1): code running inside a jailed
smtpd process -- a worker, the rules watcher, an inetd session -- reaches no
process outside it: not the mail agent smtpfwdd runs under the same uid
(ptrace, process_vm_readv, pidfd), not smtpfwdd or its delivery process
(signals), and it can neither start a program nor leave through a
namespace.  Proven from inside the real processes: gdb makes each run the
attacker's code, as a takeover would (sandbox.py)."""

import errno
import os
import platform
import signal
import struct

import pytest

from smtpgate.gate import sandbox
from harness import (Agent, children, comm, FWD_CONSTANTS, Fwd, gone, needs_gdb, put,
                     run_inside, status_field, Terminal, terminal_fds, tty_and_session,
                     wait_for)

NUMBERS = {"x86_64": dict(pidfd_open=434, unshare=272, ioprio_set=251),
           "aarch64": dict(pidfd_open=434, unshare=97, ioprio_set=30)}

PROBE = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
def res(r):
    return "ok" if r != -1 else errno.errorcode.get(ctypes.get_errno(), "?")
def call(fn, *args):
    try:
        fn(*args)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, "?")
found["ptrace"] = res(libc.ptrace(16, AGENT, None, None))          # PTRACE_ATTACH
if found["ptrace"] == "ok":
    libc.ptrace(17, AGENT, None, None)                               # PTRACE_DETACH
class Iov(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(8)
mine, theirs = Iov(ctypes.addressof(buf), 8), Iov(0x10000, 8)
found["process_vm_readv"] = res(libc.process_vm_readv(AGENT, ctypes.byref(mine), 1,
                                                      ctypes.byref(theirs), 1, 0))
found["pidfd_open"] = res(libc.syscall(PIDFD_OPEN, AGENT, 0))
for name, pid in (("agent", AGENT), ("smtpfwdd", FWD), ("delivery", DELIVERY)):
    found["kill " + name] = call(os.kill, pid, signal_number)
found["kill self"] = call(os.kill, os.getpid(), 0)
found["kill group"] = call(os.kill, 0, 0)
found["execve"] = call(os.execv, "/nonexistent-program", ["x"])
def fork():
    if os.fork() == 0:
        os._exit(0)
found["fork"] = call(fork)
found["unshare"] = res(libc.syscall(UNSHARE, 0x10000000, 0))       # CLONE_NEWUSER
# Signals without kill(): an owner for O_ASYNC (issue 34, item 2).
import socket
s = socket.socket()
fd = s.fileno()
owner = ctypes.c_int(FWD)
found["F_SETOWN smtpfwdd"] = res(libc.fcntl(fd, 8, ctypes.c_long(FWD)))
found["F_SETOWN its group"] = res(libc.fcntl(fd, 8, ctypes.c_long(-FWD)))
found["F_SETOWN self"] = res(libc.fcntl(fd, 8, ctypes.c_long(os.getpid())))
found["F_SETOWN_EX"] = res(libc.fcntl(fd, 15, ctypes.byref((ctypes.c_int * 2)(1, FWD))))
found["F_SETSIG"] = res(libc.fcntl(fd, 10, ctypes.c_long(9)))
found["FIOSETOWN"] = res(libc.ioctl(fd, 0x8901, ctypes.byref(owner)))
found["SIOCSPGRP"] = res(libc.ioctl(fd, 0x8902, ctypes.byref(owner)))
# Other reach (item 3).
limits = (ctypes.c_ulong * 2)(12, 12)
found["prlimit64 smtpfwdd"] = res(libc.prlimit(FWD, 7, ctypes.byref(limits), None))
found["prlimit64 self"] = res(libc.prlimit(0, 7, None, ctypes.byref(limits)))
found["setpriority smtpfwdd"] = res(libc.setpriority(0, FWD, 19))
found["ioprio_set smtpfwdd"] = res(libc.syscall(IOPRIO_SET, 1, FWD, 7 | 3 << 13))
found["sched_setaffinity smtpfwdd"] = res(libc.sched_setaffinity(
    FWD, 8, ctypes.byref(ctypes.c_ulong(1))))
found["PR_SET_DUMPABLE"] = res(libc.prctl(4, 1, 0, 0, 0))
found["AF_NETLINK"] = res(libc.socket(16, 3, 4))            # NETLINK_SOCK_DIAG
found["AF_VSOCK"] = res(libc.socket(40, 1, 0))
found["AF_INET"] = res(libc.socket(2, 1, 0))
found["AF_UNIX"] = res(libc.socket(1, 2, 0))
# A terminal's input (item 1): refused whatever the descriptor is.
c = ctypes.c_char(b"x")
for name, request in (("TIOCSTI", 0x5412), ("TIOCLINUX", 0x541C), ("TIOCSETD", 0x5423)):
    found[name] = res(libc.ioctl(2, request, ctypes.byref(c)))
"""

BLOCKED = ("ptrace", "process_vm_readv", "pidfd_open", "kill agent", "kill smtpfwdd",
           "kill delivery", "kill group", "execve", "fork", "unshare",
           "F_SETOWN smtpfwdd", "F_SETOWN its group", "F_SETOWN_EX", "F_SETSIG", "FIOSETOWN",
           "SIOCSPGRP", "prlimit64 smtpfwdd", "setpriority smtpfwdd", "ioprio_set smtpfwdd",
           "sched_setaffinity smtpfwdd", "PR_SET_DUMPABLE", "AF_NETLINK", "AF_VSOCK",
           "TIOCSTI", "TIOCLINUX", "TIOCSETD")
ALLOWED = ("kill self", "F_SETOWN self", "prlimit64 self", "AF_INET", "AF_UNIX")


@pytest.fixture
def delivering(tree_factory):
    """A jail where smtpfwdd's mail agent (as nobody, like the workers) is
    busy with a message: (start(jail), the pids of smtpfwdd, the delivery
    process and the agent)."""
    agent = Agent()
    agent.statuses("sleep 120")
    started = []

    def start(jail):
        put(jail)
        fwd = Fwd(tree_factory(**FWD_CONSTANTS), jail, agent.path)
        started.append(fwd)
        pids = {}

        def busy():
            kids = children(fwd.proc.pid)
            agents = [p for k in kids for p in children(k)]
            if kids and agents:
                pids.update(smtpfwdd=fwd.proc.pid, delivery=kids[0], agent=agents[0])
            return bool(pids)
        assert wait_for(busy, 20), fwd.log()
        started.append(pids["agent"])
        return pids
    yield start
    for x in started:
        if isinstance(x, int):
            try:
                os.kill(x, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            x.stop()


def probe(pid, jail, pids):
    nums = NUMBERS[platform.machine()]
    code = ("AGENT, FWD, DELIVERY = %d, %d, %d\nPIDFD_OPEN, UNSHARE, IOPRIO_SET = %d, %d, %d\n"
            "signal_number = 0\n" % (pids["agent"], pids["smtpfwdd"], pids["delivery"],
                                     nums["pidfd_open"], nums["unshare"], nums["ioprio_set"])
            ) + PROBE
    return run_inside(pid, jail, code)


def assert_contained(found, pids=None):
    assert "error" not in found, found
    assert {k: found[k] for k in BLOCKED} == {k: "EPERM" for k in BLOCKED}, found
    assert {k: found[k] for k in ALLOWED} == {k: "ok" for k in ALLOWED}, found
    if pids:        # nothing reached them: all there, none stopped, none cut to 12 files
        for pid in pids.values():
            assert not gone(pid) and status_field(pid, "State")[0] not in "TZ", pid
        assert open("/proc/%d/limits" % pids["smtpfwdd"]).read().count(" 12 ") == 0


def jailed(pid):
    return (status_field(pid, "Uid") or ["0"])[0] != "0"


@needs_gdb
def test_a_jailed_worker_reaches_no_process_outside(daemon_, delivering):
    d = daemon_().wait_ready()
    pids = delivering(d.jail)
    assert wait_for(lambda: any(jailed(p) for p in d.workers()))
    worker = next(p for p in d.workers() if jailed(p))
    assert_contained(probe(worker, d.jail, pids), pids)
    assert comm(worker) == "smtpd: worker"      # and it still serves
    assert status_field(worker, "NoNewPrivs") == ["1"]
    assert status_field(worker, "Seccomp") == ["2"]


@needs_gdb
def test_the_front_stage_reaches_no_process_outside(daemon_, delivering):
    """It holds every connection before a worker does (issue 37): jailed
    and sandboxed as a worker, and still serving after the probe."""
    d = daemon_().wait_ready()
    pids = delivering(d.jail)
    assert wait_for(lambda: d.screen() is not None and jailed(d.screen()))
    screen = d.screen()
    assert status_field(screen, "NoNewPrivs") == ["1"]
    assert status_field(screen, "Seccomp") == ["2"]
    assert os.readlink("/proc/%d/root" % screen) == d.jail
    assert_contained(probe(screen, d.jail, pids), pids)
    assert d.screen() == screen
    c = d.connect()
    assert c.code() == 220
    c.cmd("QUIT")


@needs_gdb
def test_foreground_jailed_processes_hold_no_terminal(daemon_, delivering):
    """smtpd -D -F from root's shell (issue 34, item 1): no worker and no
    rules watcher has the terminal as its controlling tty or as a
    descriptor, so none can type into the shell; their log lines reach the
    terminal through the master, with every control shown, even what a
    compromised worker writes itself."""
    term = Terminal()
    try:
        d = daemon_(tty=term.slave).wait_ready()
        pids = delivering(d.jail)
        master_tty, master_session = tty_and_session(d.master_pid())
        assert master_tty != 0                  # the master's own: the operator's terminal
        assert wait_for(lambda: d.watcher() and all(jailed(p) for p in d.workers())
                        and d.screen() and jailed(d.screen()))
        jailed_ones = d.workers() + d.watcher() + [d.screen()]
        for pid in jailed_ones:
            tty, session = tty_and_session(pid)
            assert (tty, terminal_fds(pid)) == (0, []), (comm(pid), terminal_fds(pid))
            assert session != master_session
        c = d.connect()
        assert c.code() == 220
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250     # on a worker now
        c.cmd("QUIT")
        assert wait_for(lambda: b"worker: EHLO from" in term.text()), term.text()
        worker = d.workers()[0]
        found = run_inside(worker, d.jail, 'os.write(2, b"\\x1b]0;owned\\x07 typed\\n")\n'
                                            'found["wrote"] = 1')
        assert found == {"wrote": 1}
        assert wait_for(lambda: b"\\x1b]0;owned\\x07 typed" in term.text()), term.text()
        assert b"\x1b]0;owned" not in term.text()
        assert_contained(probe(worker, d.jail, pids), pids)
    finally:
        term.close()


@needs_gdb
def test_the_rules_watcher_reaches_no_process_outside(daemon_, delivering):
    d = daemon_().wait_ready()
    pids = delivering(d.jail)
    assert wait_for(lambda: d.watcher() and jailed(d.watcher()[0]))
    assert_contained(probe(d.watcher()[0], d.jail, pids))


@needs_gdb
def test_an_inetd_session_reaches_no_process_outside(smtpd, delivering):
    srv = smtpd()
    pids = delivering(srv.jail)
    c = srv.connect()
    assert c.code() == 220
    assert c.cmd("EHLO there")[0] == 250        # loaded, jailed, sandboxed
    session = srv.procs[-1].pid
    assert_contained(probe(session, srv.jail, pids))
    assert c.cmd("QUIT")[0] == 221


def test_the_filter_denies_by_number_and_allows_the_rest():
    """The program itself: every denied call of each architecture has a
    number, the jumps fit, and a foreign architecture is killed."""
    for machine, (arch, _, numbers) in sandbox.ARCHES.items():
        prog = sandbox.program(4242, machine)
        insns = [struct.unpack("=HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
        assert insns[1] == (0x15, 0, len(insns) - 3, arch)     # else: the kill at the end
        assert insns[-1] == (0x06, 0, 0, sandbox.RET_KILL_PROCESS)
        assert insns[-2] == (0x06, 0, 0, sandbox.RET_ERRNO | errno.EPERM)
        assert (0x15, 0, 0, 4242) in [(c, 0, 0, k) for c, _, _, k in insns]
        wanted = {numbers[n] for n in sandbox.DENIED + sandbox.SELF_ONLY if n in numbers}
        assert wanted <= {k for c, _, _, k in insns if c == 0x15}
        missing = set(sandbox.DENIED) - set(numbers)
        assert missing <= {"fork", "vfork", "iopl", "ioperm"}, (machine, missing)


def test_a_sandboxed_child_keeps_serving_itself(tmp_path):
    """In a forked child: the filter holds for another process of the same
    user, and the child can still signal itself, read and write files."""
    if sandbox.available():
        pytest.skip(sandbox.available())
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            sandbox.enter()
            out = [call(os.kill, os.getppid(), 0), call(os.kill, os.getpid(), 0)]
            (tmp_path / "x").write_text("still works")
            out.append((tmp_path / "x").read_text())
            os.write(w, repr(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 4096).decode()
    os.waitpid(pid, 0)
    assert got == repr(["EPERM", "ok", "still works"])


def call(fn, *args):
    try:
        fn(*args)
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
