"""daemon - smtpfwdd's scanning loop and its delivery processes

DESCRIPTION
    Forwarder.run() scans the spool every -P seconds (or on SIGUSR1; at once
    again while scans find work) and
    hands each complete smtpd* file to one of at most -M long-lived
    delivery processes (delivery_process: one Delivery after another,
    delivery.py), through a socket pair each: the name goes out, the exit
    status comes back.  Every directory entry is hostile input: one that
    cannot be examined or delivered is logged once and skipped, and never
    stops the delivery of the others; drafts a dead smtpd left are removed.
    start.py gets the daemon here; the queue tool (queuetool.py) finds it
    by its title, TITLE, and the lock it holds, LOCKFILE.
SIGNALS
    SIGTERM, SIGINT: stop scanning, wait up to SHUTDOWN_TIMEOUT seconds for
    running deliveries, exit 0.  SIGUSR1: scan now.  SIGHUP: read the
    settings file again (a file with a mistake changes nothing; what the
    spool and identity are waits for a restart), then scan now.
"""

import os
import select
import signal
import socket
import stat
import time

import buildconf
from smtpgate import counters, libc, log, metrics, params, process, spool, spooldir
from smtpgate.forwarder import config as forwarder_config, queuetool, relay
from smtpgate.forwarder.delivery import Delivery
from smtpgate.gate import sandbox
from smtpgate.text import visible

LOCKFILE = queuetool.LOCKFILE
TITLE = queuetool.FORWARDER_TITLE.decode()     # what smtpq flush looks for
DELIVERY_TITLE = "smtpfwdd: send"
ALERT_EVERY = 86400
RESCAN = 0.05           # seconds between scans while they find work


class DeliveryHandle:
    """The Forwarder's hold on one long-lived delivery process: it sends
    the process one name at a time."""

    def __init__(self, pid, sock):
        self.pid, self.sock = pid, sock
        self.name = None            # the file (bytes) it is delivering, or None
        self.stamp = None           # that file's lstat stamp when handed over
        self.dead = False
        self.generation = 0         # the settings it was forked with


def delivery_process(config, sock):
    """Deliver the files the master names until it closes the socket.  With
    an smtp: or lmtp: agent, one connection to the MTA serves them all,
    closed when unused for SMTPFWDD_KEEP_IDLE seconds."""
    process.child_signals(signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD)  # never cut short
    spec = relay.parse(config.agent)
    link = relay.Link(spec, config.myname) if spec is not None else None
    while True:
        if link is not None and link.sock is not None:
            r, _, _ = select.select([sock], [], [], buildconf.SMTPFWDD_KEEP_IDLE)
            if not r:
                link.close()
                continue
        try:
            name = sock.recv(4096)
        except OSError:
            name = b""
        if not name:
            if link is not None:
                link.close()
            return os.EX_OK
        delivery = Delivery(config, name, link)
        try:
            status = delivery.run()
        except Exception as e:
            log.crit("delivery of %s: %s: %s; deferred", visible(name), type(e).__name__, e)
            delivery.give_up_for_now()
            status = os.EX_SOFTWARE
        finally:
            if delivery.f is not None:
                delivery.f.close()      # releases the lock
            if link is not None and not buildconf.SMTPFWDD_KEEP_IDLE:
                link.close()
        # the status, then for the metrics: the outcome, notifications queued
        sock.send(bytes([status, RESULTS.index(delivery.result) if delivery.result in RESULTS
                         else 255, min(255, delivery.bounces["failed"]),
                         min(255, delivery.bounces["delayed"])]))


RESULTS = metrics.DELIVERY_RESULTS


class Forwarder:
    """The scanning loop: config (config.ForwarderConfig), the spool lock
    and the -i pid file, which the delivery processes must not keep."""

    def __init__(self, config, lock_fd, pid_fd, metrics_listener=None):
        self.config, self.lock_fd, self.pid_fd = config, lock_fd, pid_fd
        self.counts = counters.share(1, keys=metrics.smtpfwdd_layout(), gauges=metrics.GAUGES)
        self.metrics = metrics.Handle(metrics_listener, "smtpfwdd: metric")
        self.first_seen = {}        # name -> when the message arrived (the queue's age)
        self.crashed = {}           # name -> not before (monotonic): its delivery process died
        self.workers = {}           # pid -> DeliveryHandle
        self.stopping = self.scan_now = self.hup = False
        self.generation = 0         # counts the SIGHUPs that changed settings
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
        signal.signal(signal.SIGHUP, self.on_hup)
        signal.signal(signal.SIGCHLD, lambda *a: None)

    def on_stop(self, *a):
        self.stopping = True

    def on_scan(self, *a):
        self.scan_now = True

    def on_hup(self, *a):
        self.hup = self.scan_now = True

    def reload_settings(self):
        """SIGHUP: the settings file again; new deliveries see what changed
        (-s, -M and -P on the command line still win)."""
        self.hup = False
        settings, changes = params.reread(buildconf)
        if settings.problems:
            log.err("SIGHUP: the settings in effect stay: %s", "; ".join(settings.problems))
            return
        restart = forwarder_config.RESTART_ONLY
        later = {n: v for n, v in changes.items() if n in restart}
        now = {n: v for n, v in changes.items() if n not in restart}
        if later:
            log.warn("SIGHUP: these settings take effect at the next start: %s",
                     params.text(later))
        if not now:
            return
        undo = params.apply(buildconf, settings, now)
        new = forwarder_config.build(dict(self.config.flags), reloading=True)
        if isinstance(new, list):
            params.apply(buildconf, *undo)
            log.err("SIGHUP: the settings in effect stay: %s", "; ".join(new))
            return
        log.info("SIGHUP: settings re-read from %s: %s", buildconf.SETTINGS_FILE,
                 params.text(now))
        self.config = new
        self.generation += 1
        for w in self.workers.values():
            if w.name is None:
                self.retire(w)      # an idle one leaves now, a busy one when it answers

    def retire(self, w):
        """A delivery process forked with older settings leaves (its socket
        closes); new ones fork with the settings in effect."""
        if not w.dead:
            w.dead = True
            w.sock.close()

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
            self.crashed[w.name] = time.monotonic() + self.config.poll
            w.dead = True
        else:
            if msg[0] == os.EX_NOPERM:      # could not open it: until it changes
                self.unopened[w.name] = w.stamp
            if len(msg) >= 4:
                if msg[1] < len(RESULTS):
                    counters.count(("smtpfwdd_deliveries", RESULTS[msg[1]]))
                counters.count(("smtpfwdd_bounces", "failed"), msg[2])
                counters.count(("smtpfwdd_bounces", "delayed"), msg[3])
            if not self.config.quiet:
                log.debug("delivery of %s ended with %d", visible(w.name), msg[0])
        w.name = None
        if w.generation != self.generation:
            self.retire(w)

    def reap(self):
        for pid, status in process.reaped():
            if self.metrics.ended(pid, status, self.stopping):
                continue
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            w.sock.close()
            if w.name is not None:
                log.crit("delivery worker %d died delivering %s; it will be retried",
                        pid, visible(w.name))
                self.crashed[w.name] = time.monotonic() + self.config.poll

    def run(self):
        log.info("scanning %s every %d seconds with %s", self.config.spooldir,
                self.config.poll, self.config.agent)
        while not self.stopping:
            if self.hup:
                self.reload_settings()
            if self.metrics.due():
                self.start_metrics()
            # A scan that handed out work is followed by another at once (a
            # breath apart): mail that keeps coming is never left a whole
            # poll interval.  An idle spool is scanned every -P seconds.
            handed = self.scan()
            deadline = time.monotonic() + (RESCAN if handed else self.config.poll)
            while not (self.stopping or self.scan_now) and time.monotonic() < deadline:
                self.sleep(deadline - time.monotonic())
            self.scan_now = False
        return self.shutdown()

    def scan(self):
        """One pass over the spool; how many files it handed out.  Every
        entry is hostile input: one that cannot be examined or delivered is
        logged once and skipped, and never stops the delivery of the others."""
        now = time.time()
        try:
            removed, problems = spooldir.remove_stale_drafts(
                self.config.spooldir, buildconf.SESSION_TIMEOUT, now)
            entries = spooldir.entries(self.config.spooldir)
        except OSError as e:
            log.err("scanning %s: %s", self.config.spooldir, e.strerror)
            return
        for name in removed:
            log.notice("removed %s: a draft left by an smtpd that died before its 250",
                      visible(name))
        seen = set()
        for name, why in problems:
            seen.add(name)
            self.skip_once(name, why, "draft %s: %s; skipped")
        running = self.running()
        handed = 0
        for e in entries:
            if self.stopping:
                return handed
            seen.add(e.name)
            if e.name not in running and self.eligible(e, now):
                self.dispatch(e.name, self.stamp)
                handed += 1
        for d in (self.skipped, self.unopened, self.warned, self.first_seen, self.crashed):
            for gone in [n for n in d if n not in seen]:
                del d[gone]
        spooldir.prune_deferrals(self.config.spooldir, seen | running)
        self.count_queue(entries, now)
        return handed

    def count_queue(self, entries, now):
        """The queue's gauges: messages by state, the oldest one's age."""
        states = dict.fromkeys(metrics.QUEUE_STATES, 0)
        oldest = None
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or not spool.is_complete(st.st_mode):
                continue
            states["deferred" if spool.is_deferred(st.st_mode) else "queued"] += 1
            born = self.arrival(e.name, st)
            oldest = born if oldest is None else min(oldest, born)
        for where in (spooldir.HOLD_DIR, spooldir.FAILED_DIR):
            try:
                names = os.listdir(os.path.join(self.config.spooldir, where))
            except OSError:
                names = []
            states["held" if where == spooldir.HOLD_DIR else "failed"] = sum(
                1 for n in names if n.startswith("smtpd") and "." not in n)
        for state, n in states.items():
            counters.set(("smtpfwdd_queue_messages", state), n)
        counters.set(("smtpfwdd_queue_oldest_seconds",), now - oldest if oldest else 0)

    def arrival(self, name, st):
        """When a spool file was made (its birth time, asked once), else
        its time when first seen."""
        born = self.first_seen.get(name)
        if born is None:
            born = min(st.st_mtime, st.st_ctime)
            try:
                fd = os.open(os.path.join(os.fsencode(self.config.spooldir), name),
                             os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    born = libc.birth_time(fd) or born
                finally:
                    os.close(fd)
            except OSError:
                pass
            self.first_seen[name] = born
        return born

    def start_metrics(self):
        """The metrics server: smtpfwdd's user already, in the sandbox."""
        def inherited():
            return [self.lock_fd, self.wake_r, self.wake_w] \
                + ([self.pid_fd] if self.pid_fd is not None else []) \
                + [w.sock for w in self.workers.values()]

        def enter():
            try:
                sandbox.enter()
            except sandbox.SandboxError as e:
                log.err("seccomp sandbox: %s; going on without it", e)

        self.metrics.start(inherited, enter, lambda: metrics.render(self.counts.totals()))

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
        if name in self.crashed:
            if time.monotonic() < self.crashed[name]:
                return False    # a crash is retried a poll interval later, never in a loop
            del self.crashed[name]
        if not spool.is_complete(st.st_mode):
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
            if idle is None and len(self.workers) < self.config.maxchildren:
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
                os.close(self.lock_fd)      # a new smtpfwdd must not wait for us
                if self.pid_fd is not None:
                    os.close(self.pid_fd)
                for w in self.workers.values():
                    w.sock.close()
                if self.metrics.listener is not None:
                    self.metrics.listener.close()
                os.close(self.wake_r)
                os.close(self.wake_w)
                status = delivery_process(self.config, theirs)
            except BaseException as e:
                log.crit("delivery worker: %s: %s", type(e).__name__, e)
            os._exit(status)
        theirs.close()
        w = self.workers[pid] = DeliveryHandle(pid, ours)
        w.generation = self.generation
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
        self.metrics.stop()
        process.ignore_stop_signals()
        if self.pid_fd is not None:
            os.ftruncate(self.pid_fd, 0)    # stopped; root's init script removes it
        log.info("stopped")
        return os.EX_OK
