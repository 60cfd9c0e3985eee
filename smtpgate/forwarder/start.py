"""start - smtpfwdd from its command line to its scanning loop

DESCRIPTION
    run(config) is all the daemon does after its options (with -t: check()
    what a start would, and no more): pre_jail_init()
    as root (the -i pid file, in root's directory, and who to become), then
    enter_jail() (become -u/-g for good, supplementary groups cleared;
    there is no chroot: the agent must run), then the spool lock
    .smtpfwdd.lock, the detach (unless -F), and the Forwarder (daemon.py).
    The lock is flock(2)ed as the original did and holds our pid; after the
    detach it is taken again, so that the kernel names the daemon as its
    holder (smtpq flush asks the kernel, never the file, which the jail
    can write).
"""

import fcntl
import os
import signal
import sys
import time

import daemon

import buildconf
from smtpgate import log, metrics, privileges, process
from smtpgate.forwarder.daemon import Forwarder, LOCKFILE, TITLE
from smtpgate.text import visible

RELOCK_TIME = 10


def run(config):
    """smtpfwdd after its options: the exit status."""
    if config.check:
        return check(config)
    process.set_title(TITLE)
    pid_fd, identity = pre_jail_init(config)
    listener = metrics.bind("SMTPFWDD_METRICS_LISTEN", buildconf.SMTPFWDD_METRICS_LISTEN)
    enter_jail(config, identity)
    lock = take_lock(config.spooldir)
    if config.foreground:
        write_pid(lock, pid_fd)
        return Forwarder(config, lock, pid_fd, listener).run()
    log.log.close()          # DaemonContext closes every descriptor
    kept = [lock] + ([pid_fd] if pid_fd is not None else []) \
        + ([listener.fileno()] if listener is not None else [])
    with daemon.DaemonContext(files_preserve=kept, working_directory=config.spooldir,
                              umask=0o077, signal_map={signal.SIGHUP: None,
                                                       signal.SIGTERM: "terminate"}):
        log.log.open("smtpfwdd", buildconf.LOG_FACILITY, pid=True, path=buildconf.LOG_SOCKET)
        relock(lock)
        write_pid(lock, pid_fd)
        return Forwarder(config, lock, pid_fd, listener).run()


def check(config):
    """-t: what a start checks, and no more: the constants and settings
    (config.build did), who to become, and -- as that user, in a child --
    the spool it must enter and write and the mail agent it must run.
    0, or 78 with each problem on standard error."""
    identity = privileges.resolve_identity(config.user, config.group) \
        if os.geteuid() == 0 else None
    pid = os.fork()
    if pid == 0:
        status = os.EX_SOFTWARE
        try:
            if identity is not None:
                privileges.become(identity[0].pw_uid, identity[1].gr_gid)
            problems = []
            who = identity[0].pw_name if identity else "uid %d" % os.getuid()
            if not os.path.isdir(config.spooldir) or \
                    not os.access(config.spooldir, os.R_OK | os.W_OK | os.X_OK):
                problems.append("the spool %s cannot be entered and written by %s"
                                % (config.spooldir, who))
            if config.agent.startswith("/") and (not os.path.isfile(config.agent)
                                                  or not os.access(config.agent, os.X_OK)):
                problems.append("the mail agent %s is not a program %s may run"
                                % (config.agent, who))
            for p in problems:
                print("smtpfwdd.py: %s" % p, file=sys.stderr)
            if not problems:
                print("smtpfwdd.py: configuration OK: spool %s, mail agent %s"
                      % (config.spooldir, config.agent))
            status = os.EX_CONFIG if problems else os.EX_OK
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def pre_jail_init(config):
    """As root (or whoever we are): (the -i pid file's descriptor or None,
    (pw, gr) to become or None)."""
    pid_fd = open_pidfile(config.pidfile)
    if os.geteuid() != 0:
        log.warn("not started as root: running as uid %d", os.getuid())
        return pid_fd, None
    return pid_fd, privileges.resolve_identity(config.user, config.group)


def enter_jail(config, identity):
    """Become -u/-g for good, then enter the spool."""
    if identity is not None:
        privileges.confine(*identity, None)
    try:
        os.chdir(config.spooldir)
    except OSError as e:
        print("smtpfwdd.py: chdir(%s): %s" % (config.spooldir, e.strerror), file=sys.stderr)
        log.die(os.EX_CONFIG, "chdir(%s): %s", config.spooldir, e.strerror)


def take_lock(spooldir):
    """Open and flock .smtpfwdd.lock; exit 78 if another smtpfwdd has it."""
    path = os.path.join(spooldir, LOCKFILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        log.die(os.EX_CONFIG, "open(%s): %s", path, e.strerror)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if not log.log.stderr:       # else the log line below says it there
            print("smtpfwdd.py: already running (pid %s holds %s)" % (visible(pid), path),
                  file=sys.stderr)
        log.die(os.EX_CONFIG, "already running (pid %s holds %s)", pid, path)
    return fd


def relock(fd):
    """In the detached process: take the lock again, so that the kernel
    names this process as its holder (/proc/locks keeps the pid of the one
    that took it, which has exited)."""
    fcntl.flock(fd, fcntl.LOCK_SH)
    deadline = time.monotonic() + RELOCK_TIME
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                log.die(os.EX_TEMPFAIL, "cannot take back %s: another process holds it",
                        LOCKFILE)
            time.sleep(0.01)


def open_pidfile(path):
    """-i: the pid file, opened now, as root, outside the spool (written
    once we hold the spool lock); None without -i."""
    if path is None:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        print("smtpfwdd.py: pid file %s: %s" % (path, e.strerror), file=sys.stderr)
        log.die(os.EX_CONFIG, "pid file %s: %s", path, e.strerror)


def write_pid(lock, pid_fd):
    """Our pid: in the spool's lock as the original wrote it (%7d), in the
    -i pid file plain, as init scripts and pidof read them."""
    for fd, form in ((lock, b"%7d\n"), (pid_fd, b"%d\n")):
        if fd is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, form % os.getpid(), 0)
