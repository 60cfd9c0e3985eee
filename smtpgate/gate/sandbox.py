"""sandbox - a seccomp-bpf filter for every jailed smtpd process

DESCRIPTION
    The jailed processes (the -D workers, the rules watcher, an inetd
    session) run as SMTP_USER, as smtpfwdd and the mail agent it runs do.
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
        open_by_handle_at.
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
OFF_NR, OFF_ARCH, OFF_ARG0 = 0, 4, 16       # struct seccomp_data (little endian)
X32_BIT = 0x40000000

# Calls allowed only when their first argument is the process itself.
SELF_ONLY = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
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
    "settimeofday", "clock_settime", "adjtimex", "sethostname", "setdomainname")

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
        setdomainname=171)),
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
        sethostname=161, setdomainname=162)),
}


class SandboxError(Exception):
    """The filter cannot be loaded here; str() says why."""


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def program(pid, machine=None):
    """The BPF program (bytes) for this process on machine (uname -m)."""
    arch, x32, numbers = ARCHES[machine or os.uname().machine]
    code = []                       # (opcode, jump-if-true label, -if-false label, k)

    def op(opcode, k=0, jt=None, jf=None):
        code.append((opcode, jt, jf, k))
    op(LD_ABS_W, OFF_ARCH)
    op(JEQ_K, arch, None, "kill")
    op(LD_ABS_W, OFF_NR)
    if x32:
        op(JGE_K, X32_BIT, "deny", None)
    for name in SELF_ONLY:
        op(JEQ_K, numbers[name], "self", None)
    for name in DENIED:
        if name in numbers:
            op(JEQ_K, numbers[name], "deny", None)
    op(RET_K, RET_ALLOW)
    labels = {"self": len(code)}
    op(LD_ABS_W, OFF_ARG0)          # the low 32 bits: what the kernel takes as pid_t
    op(JEQ_K, pid, "allow", "deny")
    labels["allow"] = len(code)
    op(RET_K, RET_ALLOW)
    labels["deny"] = len(code)
    op(RET_K, RET_ERRNO | errno.EPERM)
    labels["kill"] = len(code)
    op(RET_K, RET_KILL_PROCESS)
    out = []
    for i, (opcode, jt, jf, k) in enumerate(code):
        rel = [0 if label is None else labels[label] - i - 1 for label in (jt, jf)]
        out.append(struct.pack("=HBBI", opcode, rel[0], rel[1], k))
    return b"".join(out)


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
