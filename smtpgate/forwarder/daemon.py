#!/usr/bin/env python3
"""smtpfwdd - Obtuse-compatible spool forwarder: one mail agent per message

SYNOPSIS
    smtpfwdd.py [-Fq] [-d spooldir] [-u user] [-g group] [-s mailprog]
                [-M maxchildren] [-P polltime] [-i pidfile]
    smtpfwdd.py [-d spooldir] -Q list [-j] | show ID | requeue ID|all-failed
                | delete ID | flush
DESCRIPTION
    Scans the spool every -P seconds (or on SIGUSR1) and hands each complete
    smtpd* file to one of at most -M long-lived delivery processes, which runs
        mailprog -oi -f <sender> -- <recipient>...
    (never through a shell) with the message on standard input, at most
    MAXARGS arguments per call, marking delivered batches SENT.  Exit status
    0 removes the file; 71 72 74 75 defer it (retried after
    RETRY_DELAY_TIME); 78, a missing agent or a signal defer it and log
    CRIT; anything else, and a message deferred beyond QUEUE_LIFETIME, moves
    it to failed/ with the reason, and the sender gets a delivery status
    notification (delivery.py, bounce.py).  Nothing accepted is deleted
    unless delivered.  -Q is the queue tool (queuetool.py, also `smtpq`).
SECURITY
    Runs as -u/-g (supplementary groups cleared), never as root.  The
    spool lock .smtpfwdd.lock holds our pid as the original's did, but the
    jail can write it: tools find us through the kernel's lock table, init
    scripts through -i, a pid file root opens before we drop privileges.
SIGNALS
    SIGTERM, SIGINT: stop scanning, wait up to SHUTDOWN_TIMEOUT seconds for
    running deliveries, exit 0.  SIGUSR1, SIGHUP: scan now.
"""

import fcntl
import getopt
import os
import select
import signal
import socket
import stat
import sys
import time

import daemon

import buildconf
from smtpgate import log, privileges, process
from smtpgate.text import visible
from smtpgate.forwarder import queuetool
from smtpgate import spool
from smtpgate.forwarder.delivery import Delivery

USAGE = """usage: smtpfwdd.py [-Fq] [-d spooldir] [-u user] [-g group] [-s mailprog]
                   [-M maxchildren] [-P polltime] [-i pidfile]
       smtpfwdd.py [-d spooldir] -Q list [-j] | show ID | requeue ID|all-failed
                   | delete ID | flush"""
LOCKFILE = queuetool.LOCKFILE
TITLE = queuetool.FORWARDER_TITLE.decode()     # what smtpq flush looks for
DELIVERY_TITLE = "smtpfwdd: send"
ALERT_EVERY = 86400
RELOCK_TIME = 10


class Config:
    def __init__(self):
        self.spooldir = os.path.normpath(os.path.join(buildconf.SPOOLDIR,
                                                      buildconf.SPOOLSUBDIR))
        self.user, self.group = buildconf.SMTP_USER, buildconf.SMTP_GROUP
        self.agent = buildconf.MAIL_AGENT
        self.maxchildren = buildconf.MAXCHILDREN
        self.poll = buildconf.POLL_TIME
        self.quiet = self.foreground = False
        self.lock_fd = None
        self.myname = None              # for notifications: this host's name
        self.queue_command = None       # -Q: the queue tool's arguments
        self.pidfile = None             # -i: a pid file outside the spool
        self.pid_fd = None              # its descriptor, opened as root


def usage_error(msg):
    """A bad option: 64 as in smtpd (the original said 78, EX_CONFIG)."""
    log.err("%s", msg)
    if not log.log.stderr:
        print("smtpfwdd.py: %s" % msg, file=sys.stderr)
    print(USAGE, file=sys.stderr)
    sys.exit(os.EX_USAGE)


def bounded(opt, value):
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        usage_error("%s needs a number from 1 to 1000, not %r" % (opt, value))
    return int(value)


def parse_options(argv):
    cfg = Config()
    try:
        opts, args = getopt.getopt(argv, "qFQu:g:d:s:M:P:i:")
    except getopt.GetoptError as e:
        usage_error(str(e))
    if ("-Q", "") in opts:
        cfg.queue_command = args
    elif args:
        usage_error("unexpected argument %r" % args[0])
    for o, v in opts:
        if o in ("-d", "-s", "-i") and not v.startswith("/"):
            usage_error("%s needs an absolute path, not %r" % (o, v))
        if o == "-d":
            cfg.spooldir = v
        elif o == "-s":
            cfg.agent = v
        elif o == "-i":
            cfg.pidfile = v
        elif o == "-u":
            cfg.user = v
        elif o == "-g":
            cfg.group = v
        elif o == "-M":
            cfg.maxchildren = bounded(o, v)
        elif o == "-P":
            cfg.poll = bounded(o, v)
        elif o == "-q":
            cfg.quiet = True
        elif o == "-F":
            cfg.foreground = True
    return cfg


# --------------------------------------------------------------- master ----

class Worker:
    """A long-lived delivery process; the master sends it one name at a time."""

    def __init__(self, pid, sock):
        self.pid, self.sock = pid, sock
        self.name = None            # the file (bytes) it is delivering, or None
        self.stamp = None           # that file's lstat stamp when handed over
        self.dead = False


def worker_loop(cfg, sock):
    """Deliver the files the master names until it closes the socket."""
    process.child_signals(signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD)  # never cut short
    while True:
        try:
            name = sock.recv(4096)
        except OSError:
            return os.EX_OK
        if not name:
            return os.EX_OK
        delivery = Delivery(cfg, name)
        try:
            status = delivery.run()
        except Exception as e:
            log.crit("delivery of %s: %s: %s; deferred", visible(name), type(e).__name__, e)
            delivery.give_up_for_now()
            status = os.EX_SOFTWARE
        finally:
            if delivery.f is not None:
                delivery.f.close()      # releases the lock
        sock.send(bytes([status]))


class Forwarder:
    def __init__(self, cfg):
        self.cfg = cfg
        self.workers = {}           # pid -> Worker
        self.stopping = self.scan_now = False
        self.warned = {}            # name -> when we last warned about it
        self.skipped = {}           # name -> why it was skipped (logged once)
        self.unopened = {}          # name -> its stamp when a worker could not open it
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGTERM, self.on_stop)
        signal.signal(signal.SIGINT, self.on_stop)
        signal.signal(signal.SIGUSR1, self.on_scan)
        signal.signal(signal.SIGHUP, self.on_scan)
        signal.signal(signal.SIGCHLD, lambda *a: None)

    def on_stop(self, *a):
        self.stopping = True

    def on_scan(self, *a):
        self.scan_now = True

    def running(self):
        return {w.name for w in self.workers.values() if w.name is not None}

    def busy(self):
        return sum(1 for w in self.workers.values() if w.name is not None)

    def sleep(self, seconds):
        """Wait for a signal, a worker's answer or the timeout."""
        socks = [w.sock for w in self.workers.values() if w.name is not None]
        r, _, _ = select.select([self.wake_r] + socks, [], [], max(0, seconds))
        for s in r:
            if s == self.wake_r:
                process.drain(self.wake_r)
            else:
                self.answer(next(w for w in self.workers.values() if w.sock is s))
        self.reap()

    def answer(self, w):
        try:
            msg = w.sock.recv(16)
        except OSError:
            msg = b""
        if not msg:
            log.crit("delivery worker %d died delivering %s; it will be retried",
                    w.pid, visible(w.name))
            w.dead = True
        else:
            if msg[0] == os.EX_NOPERM:      # could not open it: until it changes
                self.unopened[w.name] = w.stamp
            if not self.cfg.quiet:
                log.debug("delivery of %s ended with %d", visible(w.name), msg[0])
        w.name = None

    def reap(self):
        for pid, status in process.reaped():
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            w.sock.close()
            if w.name is not None:
                log.crit("delivery worker %d died delivering %s; it will be retried",
                        pid, visible(w.name))

    def run(self):
        log.info("scanning %s every %d seconds with %s", self.cfg.spooldir,
                self.cfg.poll, self.cfg.agent)
        while not self.stopping:
            self.scan()
            deadline = time.monotonic() + self.cfg.poll
            while not (self.stopping or self.scan_now) and time.monotonic() < deadline:
                self.sleep(deadline - time.monotonic())
            self.scan_now = False
        return self.shutdown()

    def scan(self):
        """One pass over the spool.  Every entry is hostile input: one that
        cannot be examined or delivered is logged once and skipped, and
        never stops the delivery of the others."""
        now = time.time()
        try:
            removed, problems = spool.remove_stale_drafts(
                self.cfg.spooldir, buildconf.SESSION_TIMEOUT, now)
            entries = spool.entries(self.cfg.spooldir)
        except OSError as e:
            log.err("scanning %s: %s", self.cfg.spooldir, e.strerror)
            return
        for name in removed:
            log.notice("removed %s: a draft left by an smtpd that died before its 250",
                      visible(name))
        seen = set()
        for name, why in problems:
            seen.add(name)
            self.skip_once(name, why, "draft %s: %s; skipped")
        running = self.running()
        for e in entries:
            if self.stopping:
                return
            seen.add(e.name)
            if e.name not in running and self.eligible(e, now):
                self.dispatch(e.name, self.stamp)
        for d in (self.skipped, self.unopened, self.warned):
            for gone in [n for n in d if n not in seen]:
                del d[gone]
        spool.prune_deferrals(self.cfg.spooldir, seen | running)

    def eligible(self, entry, now):
        """Is this entry (lstat, never followed) a complete message due
        now?  Sets self.stamp to its stamp."""
        name = entry.name
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as e:
            self.skip_once(name, e.strerror, "%s: lstat: %s; skipped")
            return False
        self.stamp = process.stamp_of(st)
        if not stat.S_ISREG(st.st_mode):
            self.skip_once(name, "not a regular file", "%s is %s; skipped")
            return False
        if self.unopened.get(name) == self.stamp:
            return False        # logged when it failed to open; unchanged since
        if st.st_mode & 0o110 != 0o110:
            if now - st.st_mtime > ALERT_EVERY and \
                    now - self.warned.get(name, 0) >= ALERT_EVERY:
                self.warned[name] = now
                log.alert("%s incomplete since %s; investigate", visible(name),
                         time.ctime(st.st_mtime))
            return False
        return spool.eligible(st, now, buildconf.RETRY_DELAY_TIME)

    def skip_once(self, name, why, fmt):
        """Log a skipped entry once (again only if what it says changes)."""
        if self.skipped.get(name) != why:
            self.skipped[name] = why
            log.alert(fmt, visible(name), why)

    def dispatch(self, name, stamp):
        """Hand name to an idle worker, starting one or waiting as needed."""
        while not self.stopping:
            idle = next((w for w in self.workers.values()
                         if w.name is None and not w.dead), None)
            if idle is None and len(self.workers) < self.cfg.maxchildren:
                idle = self.spawn()
            if idle is not None:
                try:
                    idle.sock.send(name)
                    idle.name, idle.stamp = name, stamp
                except OSError as e:
                    log.err("handing %s to worker %d: %s", visible(name), idle.pid, e.strerror)
                return
            self.sleep(1)

    def spawn(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError as e:
            log.err("fork: %s", e.strerror)
            ours.close()
            theirs.close()
            time.sleep(1)
            return None
        if pid == 0:
            status = os.EX_SOFTWARE
            try:
                process.set_title(DELIVERY_TITLE)
                ours.close()
                os.close(self.cfg.lock_fd)  # a new smtpfwdd must not wait for us
                if self.cfg.pid_fd is not None:
                    os.close(self.cfg.pid_fd)
                for w in self.workers.values():
                    w.sock.close()
                os.close(self.wake_r)
                os.close(self.wake_w)
                status = worker_loop(self.cfg, theirs)
            except BaseException as e:
                log.crit("delivery worker: %s: %s", type(e).__name__, e)
            os._exit(status)
        theirs.close()
        w = self.workers[pid] = Worker(pid, ours)
        return w

    def shutdown(self):
        deadline = time.monotonic() + buildconf.SHUTDOWN_TIMEOUT
        if self.busy():
            log.info("stopping: waiting for %d deliveries", self.busy())
        while self.busy() and time.monotonic() < deadline:
            self.sleep(0.2)
        for w in self.workers.values():
            if w.name is not None:
                log.warn("delivery of %s still running; left to finish alone", w.name)
            w.sock.close()          # idle workers see EOF and exit
        process.ignore_stop_signals()
        log.info("stopped")
        return os.EX_OK


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
    that took it, which has exited); smtpq flush asks the kernel."""
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


def write_pid(*fds):
    for fd in fds:
        if fd is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"%7d\n" % os.getpid(), 0)


def main(argv):
    log.log.open("smtpfwdd", buildconf.LOG_FACILITY, pid=True, path=buildconf.LOG_SOCKET)
    cfg = parse_options(argv)
    if cfg.queue_command is not None:
        return queuetool.main(cfg, cfg.queue_command)
    log.log.stderr = cfg.foreground
    log.log.say_if_unheard("smtpfwdd", stays=cfg.foreground)
    process.set_title(TITLE)
    cfg.myname = privileges.own_name()
    cfg.pid_fd = open_pidfile(cfg.pidfile)
    if os.geteuid() == 0:
        pw, gr = privileges.resolve_identity(cfg.user, cfg.group)
        privileges.enter_jail(pw, gr, None)
    else:
        log.warn("not started as root: running as uid %d", os.getuid())
    try:
        os.chdir(cfg.spooldir)
    except OSError as e:
        print("smtpfwdd.py: chdir(%s): %s" % (cfg.spooldir, e.strerror), file=sys.stderr)
        log.die(os.EX_CONFIG, "chdir(%s): %s", cfg.spooldir, e.strerror)
    lock = cfg.lock_fd = take_lock(cfg.spooldir)
    if cfg.foreground:
        write_pid(lock, cfg.pid_fd)
        return Forwarder(cfg).run()
    log.log.close()          # DaemonContext closes every descriptor
    kept = [lock] + ([cfg.pid_fd] if cfg.pid_fd is not None else [])
    with daemon.DaemonContext(files_preserve=kept, working_directory=cfg.spooldir,
                              umask=0o077, signal_map={signal.SIGHUP: None,
                                                       signal.SIGTERM: None}):
        log.log.open("smtpfwdd", buildconf.LOG_FACILITY, pid=True, path=buildconf.LOG_SOCKET)
        relock(lock)
        write_pid(lock, cfg.pid_fd)
        return Forwarder(cfg).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
