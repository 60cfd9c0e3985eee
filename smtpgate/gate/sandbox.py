"""sandbox - a seccomp-bpf filter for every jailed smtpd process

DESCRIPTION
    The jailed processes (the -D workers and front stage, the rules
    watcher, an inetd session) run as SMTP_USER, as smtpfwdd and the mail
    agent it runs do.
    A uid alone does not keep them apart: an exec'd agent is dumpable, so a
    compromised worker could ptrace it, outside the chroot.  enter(), called
    last by the jail function, makes the process non-dumpable, sets
    PR_SET_NO_NEW_PRIVS and loads a filter (OpenSSH's sandbox-seccomp-filter
    model, built here with struct) that answers EPERM to:
      - ptrace, process_vm_readv/writev, kcmp, pidfd_open/send_signal/getfd;
      - kill, tkill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo, unless the
        target is the process itself;
      - execve, execveat, fork, vfork, clone, clone3: a worker never starts
        a program or a process;
      - unshare, setns, mount and the new mount API, pivot_root, chroot:
        no way out of the chroot through a namespace;
      - io_uring, bpf, perf_event_open, userfaultfd, keyrings, modules,
        kexec, reboot, swap, clocks, host names, quotas, accounting,
        open_by_handle_at, the kernel's log (syslog);
      - what reaches a neighbour of the same uid without a signal call:
        fcntl F_SETOWN to anyone but itself (or 0), F_SETOWN_EX, F_SETSIG,
        ioctl FIOSETOWN and SIOCSPGRP (with O_ASYNC they signal the owner);
        prlimit64, sched_setaffinity, _setscheduler, _setparam, _setattr
        and their get_ twins, get_robust_list, migrate_pages, move_pages on
        any pid but 0 or itself; setpriority, getpriority, ioprio_set and
        ioprio_get at all (they also take a user or a process group);
        System V IPC and POSIX message queues (shared by every process of a
        uid, chroot or not);
      - a terminal's input and line discipline: ioctl TIOCSTI, TIOCLINUX,
        TIOCSETD, TIOCSCTTY (a worker has no terminal, see master.py; this
        holds anyway);
      - prctl PR_SET_DUMPABLE (it stays non-dumpable) and PR_SET_PTRACER;
      - socket and socketpair of any family but AF_UNIX, AF_INET and
        AF_INET6 (no netlink: SOCK_DIAG lists every socket of the host; no
        vsock, packet, alg...).
    Everything else is allowed: this is a deny list of what a jailed process
    never needs, not a list of what Python happens to call today.  A system
    call of another architecture (i386 on x86_64) kills the process; x32
    calls get EPERM.
SUPPORT
    x86_64 and aarch64.  Where the kernel has no seccomp filters, or the
    machine is another architecture, available() says why and the caller
    logs it once and goes on without a sandbox.
"""

import ctypes
import errno
import os
import struct

from smtpgate import libc
from smtpgate.libc import prctl

SECCOMP_MODE_FILTER = 2
RET_KILL_PROCESS, RET_ERRNO, RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
LD_ABS_W, JEQ_K, JGE_K, RET_K = 0x20, 0x15, 0x35, 0x06
OFF_NR, OFF_ARCH = 0, 4             # struct seccomp_data (little endian)
X32_BIT = 0x40000000


def arg(n):
    """The offset of the low 32 bits of argument n: all the kernel takes of
    an int, a pid_t or an ioctl or fcntl command."""
    return 16 + 8 * n


# Calls allowed only when their first argument is the process itself.
SELF_ONLY = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
# Calls allowed only on the process itself: its pid, or 0 (the caller).
SELF_OR_ZERO = ("prlimit64", "sched_setaffinity", "sched_getaffinity", "sched_setscheduler",
                "sched_getscheduler", "sched_setparam", "sched_getparam", "sched_setattr",
                "sched_getattr", "get_robust_list", "migrate_pages", "move_pages")
DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_open",
    "pidfd_send_signal", "pidfd_getfd", "process_madvise", "process_mrelease",
    "execve", "execveat", "fork", "vfork", "clone", "clone3",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount",
    "open_tree", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open",
    "userfaultfd", "keyctl", "add_key", "request_key", "init_module", "finit_module",
    "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff",
    "iopl", "ioperm", "open_by_handle_at", "name_to_handle_at", "quotactl", "acct",
    "settimeofday", "clock_settime", "adjtimex", "sethostname", "setdomainname",
    "syslog", "setpriority", "getpriority", "ioprio_set", "ioprio_get",
    "shmget", "shmat", "shmctl", "shmdt", "semget", "semop", "semctl", "semtimedop",
    "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend",
    "mq_timedreceive", "mq_notify", "mq_getsetattr")

# The calls a session makes most, allowed first: the filter runs for every
# system call, and each of these would otherwise pass every test below.
HOT = ("read", "write", "poll", "ppoll", "epoll_wait", "epoll_pwait", "close", "pread64",
       "readv", "writev", "fsync", "openat", "linkat", "fchmod", "getpid", "getrandom",
       "getsockname", "accept4", "recvfrom", "sendto", "lseek", "fstat", "newfstatat",
       "futex", "mmap", "munmap", "brk")

# Calls judged by an argument.
TIOCSCTTY, TIOCSTI, TIOCLINUX, TIOCSETD = 0x540E, 0x5412, 0x541C, 0x5423
FIOSETOWN, SIOCSPGRP = 0x8901, 0x8902
F_SETOWN, F_SETSIG, F_SETOWN_EX = 8, 10, 15
PR_SET_DUMPABLE, PR_SET_PTRACER = 4, 0x59616D61
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
IOCTLS_DENIED = (TIOCSCTTY, TIOCSTI, TIOCLINUX, TIOCSETD, FIOSETOWN, SIOCSPGRP)
PRCTLS_DENIED = (PR_SET_DUMPABLE, PR_SET_PTRACER)
FAMILIES = (AF_UNIX, AF_INET, AF_INET6)

# Numbers from <asm/unistd_64.h> (x86_64) and <asm-generic/unistd.h> (aarch64).
ARCHES = {
    "x86_64": (0xC000003E, True, dict(
        ptrace=101, process_vm_readv=310, process_vm_writev=311, kcmp=312,
        pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438, process_madvise=440,
        process_mrelease=448, kill=62, tkill=200, tgkill=234, rt_sigqueueinfo=129,
        rt_tgsigqueueinfo=297, execve=59, execveat=322, fork=57, vfork=58, clone=56,
        clone3=435, unshare=272, setns=308, mount=165, umount2=166, pivot_root=155,
        chroot=161, move_mount=429, open_tree=428, fsopen=430, fsconfig=431,
        fsmount=432, fspick=433, mount_setattr=442, io_uring_setup=425,
        io_uring_enter=426, io_uring_register=427, bpf=321, perf_event_open=298,
        userfaultfd=323, keyctl=250, add_key=248, request_key=249, init_module=175,
        finit_module=313, delete_module=176, kexec_load=246, kexec_file_load=320,
        reboot=169, swapon=167, swapoff=168, iopl=172, ioperm=173,
        open_by_handle_at=304, name_to_handle_at=303, quotactl=179, acct=163,
        settimeofday=164, clock_settime=227, adjtimex=159, sethostname=170,
        setdomainname=171, syslog=103, setpriority=141, getpriority=140, ioprio_set=251,
        ioprio_get=252, shmget=29, shmat=30, shmctl=31, shmdt=67, semget=64, semop=65,
        semctl=66, semtimedop=220, msgget=68, msgsnd=69, msgrcv=70, msgctl=71,
        mq_open=240, mq_unlink=241, mq_timedsend=242, mq_timedreceive=243,
        mq_notify=244, mq_getsetattr=245, prlimit64=302, sched_setaffinity=203,
        sched_getaffinity=204, sched_setscheduler=144, sched_getscheduler=145,
        sched_setparam=142, sched_getparam=143, sched_setattr=314, sched_getattr=315,
        get_robust_list=274, migrate_pages=256, move_pages=279, ioctl=16, fcntl=72,
        prctl=157, socket=41, socketpair=53, read=0, write=1, poll=7, ppoll=271,
        epoll_wait=232, epoll_pwait=281, close=3, pread64=17, readv=19, writev=20, fsync=74,
        openat=257, linkat=265, fchmod=91, getpid=39, getrandom=318, getsockname=51,
        accept4=288, recvfrom=45, sendto=44, lseek=8, fstat=5, newfstatat=262, futex=202,
        mmap=9, munmap=11, brk=12)),
    "aarch64": (0xC00000B7, False, dict(
        ptrace=117, process_vm_readv=270, process_vm_writev=271, kcmp=272,
        pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438, process_madvise=440,
        process_mrelease=448, kill=129, tkill=130, tgkill=131, rt_sigqueueinfo=138,
        rt_tgsigqueueinfo=240, execve=221, execveat=281, clone=220, clone3=435,
        unshare=97, setns=268, mount=40, umount2=39, pivot_root=41, chroot=51,
        move_mount=429, open_tree=428, fsopen=430, fsconfig=431, fsmount=432,
        fspick=433, mount_setattr=442, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, bpf=280, perf_event_open=241, userfaultfd=282,
        keyctl=219, add_key=217, request_key=218, init_module=105, finit_module=273,
        delete_module=106, kexec_load=104, kexec_file_load=294, reboot=142,
        swapon=224, swapoff=225, open_by_handle_at=265, name_to_handle_at=264,
        quotactl=60, acct=89, settimeofday=170, clock_settime=112, adjtimex=171,
        sethostname=161, setdomainname=162, syslog=116, setpriority=140,
        getpriority=141, ioprio_set=30, ioprio_get=31, shmget=194, shmat=196,
        shmctl=195, shmdt=197, semget=190, semop=193, semctl=191, semtimedop=192,
        msgget=186, msgsnd=189, msgrcv=188, msgctl=187, mq_open=180, mq_unlink=181,
        mq_timedsend=182, mq_timedreceive=183, mq_notify=184, mq_getsetattr=185,
        prlimit64=261, sched_setaffinity=122, sched_getaffinity=123,
        sched_setscheduler=119, sched_getscheduler=120, sched_setparam=118,
        sched_getparam=121, sched_setattr=274, sched_getattr=275, get_robust_list=100,
        migrate_pages=238, move_pages=239, ioctl=29, fcntl=25, prctl=167, socket=198,
        socketpair=199, read=63, write=64, ppoll=73, epoll_pwait=22, close=57, pread64=67,
        readv=65, writev=66, fsync=82, openat=56, linkat=37, fchmod=52, getpid=172,
        getrandom=278, getsockname=204, accept4=242, recvfrom=207, sendto=206, lseek=62,
        fstat=80, newfstatat=79, futex=98, mmap=222, munmap=215, brk=214)),
}


class SandboxError(Exception):
    """The filter cannot be loaded here; str() says why."""


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


class Assembler:
    """Classic BPF with named jump targets (a jump reaches 255 ahead)."""

    def __init__(self):
        self.code, self.labels = [], {}

    def op(self, opcode, k=0, jt=None, jf=None):
        self.code.append((opcode, jt, jf, k))

    def label(self, name):
        self.labels[name] = len(self.code)

    def load(self, offset):
        self.op(LD_ABS_W, offset)

    def case(self, value, target):
        """if the accumulator == value: jump to target."""
        self.op(JEQ_K, value, target, None)

    def ret(self, value):
        self.op(RET_K, value)

    def bytes(self):
        out = []
        for i, (opcode, jt, jf, k) in enumerate(self.code):
            rel = [0 if t is None else self.labels[t] - i - 1 for t in (jt, jf)]
            if not all(0 <= r <= 255 for r in rel):
                raise SandboxError("filter jump out of range at %d" % i)
            out.append(struct.pack("=HBBI", opcode, rel[0], rel[1], k))
        return b"".join(out)


def program(pid, machine=None):
    """The BPF program (bytes) for this process on machine (uname -m)."""
    arch, x32, numbers = ARCHES[machine or os.uname().machine]
    a = Assembler()
    a.load(OFF_ARCH)
    a.op(JEQ_K, arch, None, "kill")
    a.load(OFF_NR)
    if x32:
        a.op(JGE_K, X32_BIT, "deny", None)
    for name in HOT:
        if name in numbers:
            a.case(numbers[name], "allow")
    for name in SELF_ONLY:
        a.case(numbers[name], "self")
    for name in SELF_OR_ZERO:
        a.case(numbers[name], "self-or-0")
    for name in ("ioctl", "fcntl", "prctl"):
        a.case(numbers[name], name)
    for name in ("socket", "socketpair"):
        a.case(numbers[name], "family")
    for name in DENIED:
        if name in numbers:
            a.case(numbers[name], "deny")
    a.ret(RET_ALLOW)
    a.label("ioctl")
    a.load(arg(1))
    for request in IOCTLS_DENIED:
        a.case(request, "deny")
    a.ret(RET_ALLOW)
    a.label("fcntl")
    a.load(arg(1))
    a.case(F_SETSIG, "deny")
    a.case(F_SETOWN_EX, "deny")
    a.op(JEQ_K, F_SETOWN, None, "allow")
    a.load(arg(2))                  # F_SETOWN's owner: the process itself, or none
    a.op(JEQ_K, 0, "allow", "self-test")
    a.label("prctl")
    a.load(arg(0))
    for option in PRCTLS_DENIED:
        a.case(option, "deny")
    a.ret(RET_ALLOW)
    a.label("family")
    a.load(arg(0))
    for family in FAMILIES:
        a.case(family, "allow")
    a.ret(RET_ERRNO | errno.EPERM)
    a.label("self-or-0")
    a.load(arg(0))
    a.case(0, "allow")
    a.op(JEQ_K, pid, "allow", "deny")
    a.label("self")
    a.load(arg(0))
    a.label("self-test")
    a.op(JEQ_K, pid, "allow", "deny")
    a.label("allow")
    a.ret(RET_ALLOW)
    a.label("deny")
    a.ret(RET_ERRNO | errno.EPERM)
    a.label("kill")
    a.ret(RET_KILL_PROCESS)
    return a.bytes()


def available():
    """None if enter() can work here, else why not."""
    if os.uname().machine not in ARCHES:
        return "no seccomp filter for %s machines" % os.uname().machine
    try:
        prctl(libc.PR_GET_SECCOMP)
    except OSError as e:
        return "prctl(PR_GET_SECCOMP): %s" % e.strerror
    return None


def enter():
    """Make this process non-dumpable and load the filter (for good: it
    is inherited and cannot be removed).  SandboxError if it cannot."""
    why = available()
    if why:
        raise SandboxError(why)
    data = program(os.getpid())
    prog = _Fprog(len(data) // 8, data)
    try:
        prctl(libc.PR_SET_DUMPABLE, 0)
        prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
        prctl(libc.PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog))
    except OSError as e:
        raise SandboxError("prctl: %s" % e.strerror) from None
