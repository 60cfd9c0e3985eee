"""process - what every daemon process here needs: signals, children,
titles, and the stamp by which it sees that a file changed

DESCRIPTION
    child_signals() and ignore_stop_signals() are the signal dispositions
    of a forked child and of a process on its way out; leave_terminal()
    takes a child bound for the jail away from the operator's terminal; reaped() and drain()
    serve a parent's loop; set_title() names the process for ps and for
    tools that look for it (smtpq finds "smtpfwdd" so); stamp() is the one
    way a file is watched (the rules, the certificate, a spool entry).
"""

import os
import signal


def child_signals(*defaults):
    """In a forked child whose parent decides when it ends: a Ctrl-C or a
    hangup sent to the whole process group is ignored, the signals listed
    get their default action back, and the parent's wakeup fd is let go."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    for sig in defaults:
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)


def leave_terminal(stderr=None):
    """In a forked child bound for the jail: a session of its own, so no
    controlling terminal, and no terminal descriptor -- /dev/null on 0 and
    1; on 2 stderr if given (the master's log.Relay), else /dev/null if 2
    is a terminal (a regular file or a socket stays: -F's log)."""
    try:
        os.setsid()
    except OSError:
        pass            # a group leader already: it has none of the parent's
    null = os.open(os.devnull, os.O_RDWR)
    if stderr is None and os.isatty(2):
        stderr = null
    for fd, src in ((0, null), (1, null), (2, stderr)):
        if src is not None and fd != src:
            os.dup2(src, fd)
    if null > 2:
        os.close(null)


def ignore_stop_signals():
    """On the way out: a late SIGTERM/SIGINT/SIGHUP must not turn a clean
    exit into death by signal (Python resets its handlers at exit)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def close_all(things):
    """Close each descriptor or socket-like object, ignoring those already
    closed (a forked child letting go of its parent's)."""
    for x in things:
        try:
            os.close(x if isinstance(x, int) else x.fileno())
        except OSError:
            pass


def drain(fd):
    """Read a non-blocking pipe (a signal wakeup fd) empty."""
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def reaped():
    """Yield (pid, wait status) of every child that has finished, without
    waiting for the others."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def describe(status):
    """A wait status for a log line: "signal 9" or "status 70"."""
    if os.WIFSIGNALED(status):
        return "signal %d" % os.WTERMSIG(status)
    return "status %d" % os.WEXITSTATUS(status)


def set_title(title):
    """Name the process (ps, top, /proc/PID/comm), e.g. "smtpd: worker":
    prctl(PR_SET_NAME), which works after a change of user too (the
    process is then no longer dumpable, and /proc/self/comm is root's)."""
    import ctypes
    from smtpgate import libc
    name = ctypes.create_string_buffer(title.encode()[:15])
    try:
        libc.prctl(PR_SET_NAME, ctypes.addressof(name))
        return
    except OSError:
        pass
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(title[:15])
    except OSError:
        pass


PR_SET_NAME = 15


def stamp_of(st):
    """What changes when a file is replaced, written, chmodded or touched."""
    return st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def stamp(path, follow=True):
    """stamp_of() the file at path, or the errno of why it cannot be had."""
    try:
        return stamp_of(os.stat(path, follow_symlinks=follow))
    except OSError as e:
        return e.errno
