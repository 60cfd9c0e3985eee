#!/usr/bin/env python3
"""smtpfwdd - Obtuse-compatible spool forwarder: one mail agent per message

SYNOPSIS
    smtpfwdd.py [-Fq] [-d spooldir] [-u user] [-g group] [-s mailprog]
                [-M maxchildren] [-P polltime]
DESCRIPTION
    Scans the spool every -P seconds (or on SIGUSR1) and hands each complete
    smtpd* file to one of at most -M long-lived delivery processes, which runs
        mailprog -oi -f <sender> -- <recipient>...
    (never through a shell) with the message on standard input, at most
    MAXARGS arguments per call, marking delivered batches SENT.  Exit status
    0 removes the file; 71 72 74 75 defer it (retried after
    RETRY_DELAY_TIME); 78, a missing agent or a signal defer it and log
    CRIT; anything else, and a message deferred beyond QUEUE_LIFETIME, moves
    it to failed/ with the reason.  Nothing accepted is deleted unless
    delivered.
SECURITY
    Runs as -u/-g (supplementary groups cleared), never as root.
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
import subprocess
import sys
import time

import daemon

import buildconf
import daemonlib as dl
import spool

USAGE = """usage: smtpfwdd.py [-Fq] [-d spooldir] [-u user] [-g group] [-s mailprog]
                   [-M maxchildren] [-P polltime]"""
LOCKFILE = ".smtpfwdd.lock"
TEMPORARY = (dl.EX_OSERR, dl.EX_OSFILE, dl.EX_IOERR, dl.EX_TEMPFAIL)
STDERR_MAX = 4096
ALERT_EVERY = 86400


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


def config_error(msg):
    """Option errors exit 78, as the original's did."""
    dl.err("%s", msg)
    print("smtpfwdd.py: %s\n%s" % (msg, USAGE), file=sys.stderr)
    sys.exit(dl.EX_CONFIG)


def bounded(opt, value):
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        config_error("%s needs a number from 1 to 1000, not %r" % (opt, value))
    return int(value)


def parse_options(argv):
    cfg = Config()
    try:
        opts, args = getopt.getopt(argv, "qFu:g:d:s:M:P:")
    except getopt.GetoptError as e:
        config_error(str(e))
    if args:
        config_error("unexpected argument %r" % args[0])
    for o, v in opts:
        if o in ("-d", "-s") and not v.startswith("/"):
            config_error("%s needs an absolute path, not %r" % (o, v))
        if o == "-d":
            cfg.spooldir = v
        elif o == "-s":
            cfg.agent = v
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


# ------------------------------------------------------------- delivery ----

def unquoted_comma(addr):
    """A ',' outside "quotes" (where backslash escapes the next character)."""
    quoted = escaped = False
    for ch in addr:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            return True
    return False


def bare(addr):
    """The address without its outer angle brackets ("<>" stays "<>")."""
    if addr.startswith("<") and addr.endswith(">") and addr != "<>":
        return addr[1:-1]
    return addr


def check_recipient(r):
    """Why the C smtpd's recipient r must not reach sendmail, or None."""
    a = bare(r)
    if a.startswith("-"):
        return "recipient %s starts with '-'" % r
    if unquoted_comma(a):
        return "recipient %s has an unquoted ','" % r
    if not a:
        return "empty recipient"
    return None


def shown(name):
    """A spool file name (bytes, whatever they hold) for a log line."""
    return name.decode("ascii", "backslashreplace")


class Delivery:
    """The delivery child's work on one spool file (name: bytes)."""

    def __init__(self, cfg, name):
        self.cfg, self.name = cfg, shown(name)
        self.path = os.path.join(os.fsencode(cfg.spooldir), name)
        self.f = None

    def give_up_for_now(self):
        """After an unexpected error: defer the file so that it is not
        retried before RETRY_DELAY_TIME (a crash loop helps nobody)."""
        if self.f is not None:
            try:
                spool.defer(self.f)
            except OSError as e:
                dl.crit("deferring %s: %s", self.name, e.strerror)

    def run(self):
        try:
            f = spool.open_for_delivery(self.path, time.time(), buildconf.RETRY_DELAY_TIME)
        except spool.Odd as e:
            dl.err("%s: %s; skipped", self.name, e)
            return dl.EX_NOPERM
        if f is None:
            dl.debug("%s: busy or no longer eligible", self.name)
            return dl.EX_TEMPFAIL
        self.f = f
        try:
            msg = spool.parse(f)
        except spool.Malformed as e:
            return self.fail("malformed spool file: %s" % e, "?", [])
        sender = msg.sender.decode("latin-1")
        rcpts = [(off, r.decode("latin-1")) for off, r in msg.recipients]
        self.msg, self.sender = msg, sender
        for _, r in rcpts:
            why = check_recipient(r)
            if why:
                return self.fail(why, sender, [r for _, r in rcpts])
        return self.batches(sender, rcpts)

    def argv(self, sender, batch):
        return [self.cfg.agent, "-oi", "-f", bare(sender) or "<>", "--"] + \
            [bare(r) for _, r in batch]

    def batches(self, sender, rcpts):
        per_call = max(1, buildconf.MAXARGS - 5)
        done = []
        while rcpts:
            batch, rcpts = rcpts[:per_call], rcpts[per_call:]
            status, why = self.call(self.argv(sender, batch))
            names = [r for _, r in batch]
            if status != 0:
                return self.failed_batch(status, why, sender, names, done)
            done += names
            if rcpts:
                spool.mark_sent(self.f, [off for off, _ in batch])
        if not spool.remove(self.path, self.f):
            dl.alert("%s: the name no longer holds the file delivered; left alone",
                     self.name)
        self.outcome("delivered", sender, done)
        return dl.EX_OK

    def call(self, argv):
        """Run the agent on the message, fed from the file we hold locked
        (never reopened by name); (exit status or None, why)."""
        fd = spool.reader(self.f)
        try:
            os.lseek(fd, self.msg.body_offset, os.SEEK_SET)
            p = subprocess.Popen(argv, stdin=fd, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, close_fds=True,
                                 env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        except OSError as e:
            return None, "cannot run %s: %s" % (argv[0], e.strerror)
        finally:
            os.close(fd)
        err = read_bounded(p.stderr, buildconf.AGENT_TIMEOUT)
        try:
            status = p.wait(max(1, buildconf.AGENT_TIMEOUT))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            return None, "%s took more than %d seconds; killed" % (argv[0], buildconf.AGENT_TIMEOUT)
        said = err.decode("latin-1", "replace").strip().replace("\n", " | ")
        if status < 0:
            why = "%s killed by signal %d" % (argv[0], -status)
        else:
            why = "%s exited %d" % (argv[0], status)
        if said and (status != 0 or not self.cfg.quiet):
            why += ", saying: " + said
            if status == 0:
                dl.notice("%s: %s", self.name, why)
        return (None if status < 0 else status), why

    def failed_batch(self, status, why, sender, names, done):
        if done:
            why += " (earlier batches delivered to %s)" % ", ".join(done)
        if status is None or status == dl.EX_CONFIG:
            dl.crit("%s: %s; deferred, fix the mail agent", self.name, why)
            return self.defer(why, sender, names)
        if status in TEMPORARY:
            return self.defer(why, sender, names)
        return self.fail(why, sender, names)

    def defer(self, why, sender, names):
        if self.msg.arrival is None:        # never waits for ever (spool.py ARRIVAL)
            return self.fail("%s; no arrival date: not retried" % why, sender, names)
        age = time.time() - self.msg.arrival
        if age > buildconf.QUEUE_LIFETIME:
            return self.fail("%s; undeliverable for %d days" % (why, age // 86400),
                             sender, names)
        spool.defer(self.f)
        self.outcome("deferred: %s" % why, sender, names)
        return dl.EX_TEMPFAIL

    def fail(self, why, sender, names):
        dest = spool.quarantine(self.cfg.spooldir, os.path.basename(self.path), why)
        self.outcome("failed: %s; moved to %s" % (why, dest), sender, names)
        return dl.EX_DATAERR

    def outcome(self, what, sender, names):
        if self.cfg.quiet:
            dl.info("%s from=%s%s status=%s", self.name, sender,
                    "".join(" to=%s" % n for n in names), what)
        else:
            dl.info("%s from %s to %s: %s", self.name, sender, ", ".join(names) or "-", what)


def read_bounded(pipe, timeout):
    """Read a pipe to EOF keeping at most STDERR_MAX bytes."""
    kept = b""
    deadline = time.monotonic() + max(1, timeout)
    fd = pipe.fileno()
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        kept = (kept + chunk)[:STDERR_MAX]
    pipe.close()
    return kept


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
    # A Ctrl-C to the process group must not cut a delivery short.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    while True:
        try:
            name = sock.recv(4096)
        except OSError:
            return dl.EX_OK
        if not name:
            return dl.EX_OK
        delivery = Delivery(cfg, name)
        try:
            status = delivery.run()
        except Exception as e:
            dl.crit("delivery of %s: %s: %s; deferred", shown(name), type(e).__name__, e)
            delivery.give_up_for_now()
            status = dl.EX_SOFTWARE
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
                dl.drain(self.wake_r)
            else:
                self.answer(next(w for w in self.workers.values() if w.sock is s))
        self.reap()

    def answer(self, w):
        try:
            msg = w.sock.recv(16)
        except OSError:
            msg = b""
        if not msg:
            dl.crit("delivery worker %d died delivering %s; it will be retried",
                    w.pid, shown(w.name))
            w.dead = True
        else:
            if msg[0] == dl.EX_NOPERM:      # could not open it: until it changes
                self.unopened[w.name] = w.stamp
            if not self.cfg.quiet:
                dl.debug("delivery of %s ended with %d", shown(w.name), msg[0])
        w.name = None

    def reap(self):
        for pid, status in dl.reaped():
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            w.sock.close()
            if w.name is not None:
                dl.crit("delivery worker %d died delivering %s; it will be retried",
                        pid, shown(w.name))

    def run(self):
        dl.info("scanning %s every %d seconds with %s", self.cfg.spooldir,
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
            dl.err("scanning %s: %s", self.cfg.spooldir, e.strerror)
            return
        for name in removed:
            dl.notice("removed %s: a draft left by an smtpd that died before its 250",
                      shown(name))
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
        self.stamp = (st.st_dev, st.st_ino, st.st_mode, st.st_ctime_ns, st.st_size)
        if not stat.S_ISREG(st.st_mode):
            self.skip_once(name, "not a regular file", "%s is %s; skipped")
            return False
        if self.unopened.get(name) == self.stamp:
            return False        # logged when it failed to open; unchanged since
        if st.st_mode & 0o110 != 0o110:
            if now - st.st_mtime > ALERT_EVERY and \
                    now - self.warned.get(name, 0) >= ALERT_EVERY:
                self.warned[name] = now
                dl.alert("%s incomplete since %s; investigate", shown(name),
                         time.ctime(st.st_mtime))
            return False
        return spool.eligible(st, now, buildconf.RETRY_DELAY_TIME)

    def skip_once(self, name, why, fmt):
        """Log a skipped entry once (again only if what it says changes)."""
        if self.skipped.get(name) != why:
            self.skipped[name] = why
            dl.alert(fmt, shown(name), why)

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
                    dl.err("handing %s to worker %d: %s", shown(name), idle.pid, e.strerror)
                return
            self.sleep(1)

    def spawn(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError as e:
            dl.err("fork: %s", e.strerror)
            ours.close()
            theirs.close()
            time.sleep(1)
            return None
        if pid == 0:
            status = dl.EX_SOFTWARE
            try:
                ours.close()
                os.close(self.cfg.lock_fd)  # a new smtpfwdd must not wait for us
                for w in self.workers.values():
                    w.sock.close()
                os.close(self.wake_r)
                os.close(self.wake_w)
                status = worker_loop(self.cfg, theirs)
            except BaseException as e:
                dl.crit("delivery worker: %s: %s", type(e).__name__, e)
            os._exit(status)
        theirs.close()
        w = self.workers[pid] = Worker(pid, ours)
        return w

    def shutdown(self):
        deadline = time.monotonic() + buildconf.SHUTDOWN_TIMEOUT
        if self.busy():
            dl.info("stopping: waiting for %d deliveries", self.busy())
        while self.busy() and time.monotonic() < deadline:
            self.sleep(0.2)
        for w in self.workers.values():
            if w.name is not None:
                dl.warn("delivery of %s still running; left to finish alone", w.name)
            w.sock.close()          # idle workers see EOF and exit
        dl.ignore_stop_signals()
        dl.info("stopped")
        return dl.EX_OK


def take_lock(spooldir):
    """Open and flock .smtpfwdd.lock; exit 78 if another smtpfwdd has it."""
    path = os.path.join(spooldir, LOCKFILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        dl.die(dl.EX_CONFIG, "open(%s): %s", path, e.strerror)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        print("smtpfwdd.py: already running (pid %s holds %s)" % (pid, path),
              file=sys.stderr)
        dl.die(dl.EX_CONFIG, "already running (pid %s holds %s)", pid, path)
    return fd


def write_pid(fd):
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"%7d\n" % os.getpid(), 0)


def main(argv):
    dl.log.open("smtpfwdd", buildconf.LOG_FACILITY, pid=True, path=buildconf.LOG_SOCKET)
    cfg = parse_options(argv)
    dl.log.stderr = cfg.foreground
    dl.log.say_if_unheard("smtpfwdd", stays=cfg.foreground)
    if os.geteuid() == 0:
        pw, gr = dl.resolve_identity(cfg.user, cfg.group)
        dl.enter_jail(pw, gr, None)
    else:
        dl.warn("not started as root: running as uid %d", os.getuid())
    try:
        os.chdir(cfg.spooldir)
    except OSError as e:
        print("smtpfwdd.py: chdir(%s): %s" % (cfg.spooldir, e.strerror), file=sys.stderr)
        dl.die(dl.EX_CONFIG, "chdir(%s): %s", cfg.spooldir, e.strerror)
    lock = cfg.lock_fd = take_lock(cfg.spooldir)
    if cfg.foreground:
        write_pid(lock)
        return Forwarder(cfg).run()
    dl.log.close()          # DaemonContext closes every descriptor
    with daemon.DaemonContext(files_preserve=[lock], working_directory=cfg.spooldir,
                              umask=0o077, signal_map={signal.SIGHUP: None,
                                                       signal.SIGTERM: None}):
        dl.log.open("smtpfwdd", buildconf.LOG_FACILITY, pid=True, path=buildconf.LOG_SOCKET)
        write_pid(lock)
        return Forwarder(cfg).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
