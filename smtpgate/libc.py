"""libc - the system calls Python's os module lacks, through ctypes

DESCRIPTION
    renameat2(): rename without replacing (RENAME_NOREPLACE) or swapping;
    link_open_file(): name an O_TMPFILE (linkat AT_EMPTY_PATH);
    birth_time(): a file's creation time (statx(2) stx_btime);
    prctl(): process controls, for the sandbox (no new privileges, seccomp,
    not dumpable) and the workers' parent-death signal.
    Each is looked up once, at import (before any chroot); where libc lacks
    one, the caller gets None or OSError(ENOSYS) and has a fallback.
"""

import ctypes
import errno
import os

AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_EMPTY_PATH, STATX_BTIME = 0x1000, 0x800
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_GET_SECCOMP = 1, 4, 21
PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 22, 38


def _function(name, argtypes):
    """libc's name, or None where there is none."""
    try:
        f = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError):
        return None
    f.argtypes = argtypes
    return f


class _Statx(ctypes.Structure):
    """The start of struct statx, up to stx_btime."""
    _fields_ = [("mask", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 76),
                ("btime_sec", ctypes.c_int64), ("btime_nsec", ctypes.c_uint32),
                ("rest", ctypes.c_uint8 * 172)]


RENAMEAT2 = _function("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                    ctypes.c_char_p, ctypes.c_uint])
STATX = _function("statx", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                            ctypes.POINTER(_Statx)])
PRCTL = _function("prctl", [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                            ctypes.c_ulong])


def failure(path=None):
    e = ctypes.get_errno()
    return OSError(e, os.strerror(e), path)


def renameat2(src, dst, flags, src_dir_fd=AT_FDCWD, dst_dir_fd=AT_FDCWD):
    """renameat2(2); OSError (ENOSYS where libc has none)."""
    if RENAMEAT2 is None:
        raise OSError(errno.ENOSYS, "no renameat2(2) here", dst)
    if RENAMEAT2(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), flags) != 0:
        raise failure(dst)


LINKAT = _function("linkat", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                              ctypes.c_int])


def link_open_file(fd, dst, dst_dir_fd=AT_FDCWD):
    """Give the open file fd (an O_TMPFILE) the name dst: linkat(2) with
    AT_EMPTY_PATH, never replacing dst (FileExistsError).  OSError: ENOSYS
    where libc has none; ENOENT where the kernel wants CAP_DAC_READ_SEARCH
    for it (before Linux 6.10)."""
    if LINKAT is None:
        raise OSError(errno.ENOSYS, "no linkat(2) here", dst)
    if LINKAT(fd, b"", dst_dir_fd, os.fsencode(dst), AT_EMPTY_PATH) != 0:
        raise failure(dst)


def birth_time(fd):
    """When the open file fd was created (statx(2) stx_btime), or None."""
    if STATX is None:
        return None
    buf = _Statx()
    if STATX(fd, b"", AT_EMPTY_PATH, STATX_BTIME, ctypes.byref(buf)) != 0:
        return None
    return buf.btime_sec if buf.mask & STATX_BTIME and buf.btime_sec > 0 else None


def prctl(option, arg2=0, arg3=None):
    """prctl(2); OSError on failure."""
    if PRCTL is None:
        raise OSError(errno.ENOSYS, "no prctl(2) here")
    if PRCTL(option, arg2, arg3, 0, 0) != 0:
        raise failure()


def set_parent_death_signal(sig):
    """PR_SET_PDEATHSIG: sig when the parent exits (Linux); best effort."""
    try:
        prctl(PR_SET_PDEATHSIG, int(sig))
    except OSError:
        pass
