"""master - smtpd -D: the master and its pool of pre-forked, jailed workers

DESCRIPTION
    run(config, engine): the master reads the rules through a one-shot
    watcher, binds the listening socket(s) as root, takes the pid file,
    detaches (unless -F) and keeps a pool of workers: SMTPD_PREFORK spare
    ones, at most -M (SMTPD_MAXCHILDREN) in all; it never reads what a
    client sends.  The workers (worker.py) accept for themselves and ask
    admission.py whether a client may have a session; the master maps the
    shared scoreboard and rate table before forking them, keeps spares
    (a worker says "N" when they run low), retires surplus ones after
    SMTPD_IDLE_TIME, and replaces those that end.  Each worker enters the
    jail (engine.enter_jail) before its first session, with the Engine
    of the moment: a new rules text or certificate makes a new Engine.  The master holds the
    TLS certificate and key (outside the jail) and reloads them on SIGHUP
    and when either file changes.  It holds the rules but never opens
    anything in the jail: a jailed watcher
    (rulewatch.py) reads the file at start, when it changes and on SIGHUP,
    and sends the text.  An invalid new rules text or certificate is logged
    and the old one stays; otherwise workers are replaced (a busy one after
    its session) so new sessions use the new ones.
SIGNALS
    SIGTERM, SIGINT: stop accepting, let sessions finish for at most
    SHUTDOWN_TIMEOUT seconds, exit 0.  SIGHUP: re-read the rules and the
    certificate and key.
"""

import errno
import gc
import os
import selectors
import signal
import socket
import stat
import sys
import time
from dataclasses import replace

import daemon
import daemon.pidfile
import lockfile

import buildconf
from smtpgate import counters, log, metrics, params, process
from smtpgate.gate import admission, rulewatch, screen
from smtpgate.gate.admission import Scoreboard
from smtpgate.gate.config import build as build_config, RESTART_ONLY
from smtpgate.gate.engine import FrozenRules, enter_jail, reloaded
from smtpgate.gate.worker import Worker
from smtpgate.rules.ruleset import parse, RuleError


BACKLOG = 4096          # the kernel's queue of connections (net.core.somaxconn caps it)
SCREEN_QUICK = 10       # seconds: a front stage that ends sooner ended "at its start"
SCREEN_BACKOFF = 30     # seconds between such restarts at most
SCREEN_ROWS = 4         # counters' rows for front stages (one runs, old ones drain)


class WorkerHandle:
    """The master's hold on one worker process: its control socket and
    scoreboard slot.  (The other end of its hand-over socket is the front
    stage's alone.)"""

    def __init__(self, pid, ctrl, slot):
        self.pid, self.ctrl, self.slot = pid, ctrl, slot
        self.retiring = False


def compile_rules(config, frame):
    """(rules, warnings) from what the watcher sent; RuleError."""
    kind, data = frame
    if kind == "E":
        raise RuleError([data])
    return parse(data, config.rules_shown)


def load_rules(config, relay):
    """The rules at start, read in the jail by a one-shot watcher; an
    unreadable or invalid file stops smtpd with 78.  (rules, text)."""
    w = rulewatch.Watcher(config, stderr=relay).start()
    frame = None
    try:
        frame = w.first()
        rules, warnings = compile_rules(config, frame)
        problems = []
    except rulewatch.WatcherError as e:
        problems = [str(e)]
    except RuleError as e:
        problems = e.problems
    finally:
        w.stop()
        os.waitpid(w.pid, 0)
        if relay is not None:
            relay.pump()
    if problems:
        for p in problems:
            log.err("%s", p)
            if not log.log.stderr:
                print(p, file=sys.stderr)
        sys.exit(os.EX_CONFIG)
    for w in warnings:
        log.warn("%s", w)
    return rules, frame[1]


def check_jail_log_socket(config):
    """Warn when the jail has no log socket: the workers could not reach
    the syslog daemon again after it restarts (with -F they also log to
    standard error, so nothing is lost)."""
    if not config.root or config.foreground:
        return
    path = os.path.join(config.chroot, buildconf.LOG_SOCKET.lstrip("/"))
    try:
        ok = stat.S_ISSOCK(os.stat(path, follow_symlinks=False).st_mode)
    except OSError:
        ok = False
    if not ok:
        log.warn("no log socket at %s: when the syslog daemon restarts, workers cannot "
                "reach it until they are replaced (see the rsyslog or syslog-ng "
                "snippet in smtpd(8))", path)


def bind(config):
    """The listening socket: -l address (or all, dual stack) and -p port."""
    addr = config.listen
    family = socket.AF_INET6 if addr is None or ":" in addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and addr is None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        s.bind((addr or "::", config.port))
    except OSError as e:
        if addr is None and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            s.close()
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            return bind_or_die(s, "0.0.0.0", config.port)
        log.die(os.EX_OSERR, "bind(%s port %d): %s", addr or "::", config.port, e.strerror)
    s.listen(BACKLOG)
    s.setblocking(False)
    return s


def bind_or_die(s, addr, port):
    try:
        s.bind((addr, port))
    except OSError as e:
        log.die(os.EX_OSERR, "bind(%s port %d): %s", addr, port, e.strerror)
    s.listen(BACKLOG)
    s.setblocking(False)
    return s


def check_pidfile(path):
    """Replace a stale pid file; exit 1 if a live smtpd master holds it.

    A pid is only ours if that process is an smtpd master of our user
    (/proc/PID/comm and its uid): after a crash and a reboot the pid may
    belong to anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:        # e.g. a link: never followed as root
        log.die(os.EX_CONFIG, "pid file %s: %s", path, e.strerror)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            log.die(os.EX_CONFIG, "pid file %s is not a regular file", path)
        pid = int(os.read(fd, 64).split()[0])
    except (OSError, ValueError, IndexError):
        pid = None
    finally:
        os.close(fd)
    if pid and pid != os.getpid() and is_smtpd_master(pid):
        log.err("already running as pid %d (pid file %s)", pid, path)
        if not log.log.stderr:
            print("smtpd.py: already running as pid %d (%s)" % (pid, path),
                  file=sys.stderr)
        sys.exit(1)
    log.notice("removing stale pid file %s%s", path,
              " (pid %d is not an smtpd master)" % pid if pid else "")
    os.unlink(path)


def is_smtpd_master(pid):
    """Is pid a live "smtpd: master" of our effective uid?  Where /proc
    cannot tell, any live process counts (the safe answer)."""
    if not os.path.isdir("/proc/self"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    try:
        with open("/proc/%d/comm" % pid, "rb") as f:
            comm = f.read().strip()
        with open("/proc/%d/status" % pid, "rb") as f:
            uids = next((line.split()[1:] for line in f if line.startswith(b"Uid:")), [])
    except OSError:
        return False
    return comm == b"smtpd: master" and uids[:1] == [b"%d" % os.geteuid()]


class Master:
    def __init__(self, config, engine, listener, rules, rules_text, relay, metrics_listener=None):
        self.config, self.listener = config, listener
        self.relay = relay          # -F: the jailed processes' stderr (log.Relay), or None
        self.engine = replace(engine, rules=FrozenRules(rules))   # what a new worker gets
        self.rules_text = rules_text
        self.watcher = None
        self.next_watcher = 0
        self.reload_reason = None
        self.workers = {}           # pid -> WorkerHandle
        # Row 0 ours, slot + 1 a worker's, then the front stages'.
        self.counts = counters.share(
            config.maxchildren + 1 + SCREEN_ROWS, gauges=metrics.GAUGES,
            keys=metrics.smtpd_layout([m.text for m in config.milters],
                                      [s.zone for s in config.dnsbl_sites]))
        self.screen_rows = list(range(config.maxchildren + SCREEN_ROWS, config.maxchildren, -1))
        self.metrics = metrics.Handle(metrics_listener, "smtpd: metrics")
        self.admission = admission.Admission(config.maxchildren, config.exempt, engine.shared)
        self.board = self.admission.board
        self.free_slots = list(range(config.maxchildren - 1, -1, -1))
        self.stopping = self.hup = False
        self.fork_backoff = 0
        self.next_fork = 0
        self.screen_deaths = 0      # front stages in a row that ended soon after their start
        self.next_screen = 0        # not started again before (SCREEN_BACKOFF)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        signal.set_wakeup_fd(self.wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_stop)
        signal.signal(signal.SIGHUP, self.on_hup)
        signal.signal(signal.SIGCHLD, self.on_child)
        # Only ever set here, never cleared: a signal between installing
        # our handlers and this line has set the flag itself (CI lost a
        # SIGHUP to "self.hup = bool(HUP_EARLY)" overwriting it).
        if STOPPED_EARLY:
            self.stopping = True
        if HUP_EARLY:
            self.hup = True
        self.child_exited = False
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        if relay is not None:
            self.sel.register(relay, selectors.EVENT_READ, relay)
        self.screen = self.new_screen_handle()
        self.old_screens = {}       # pid -> the Handle of a front stage passing on its last

    def inherited(self):
        """What no child of ours keeps: our ends of everything."""
        return ([self.wake_r, self.wake_w, self.sel]
                + [w.ctrl for w in self.workers.values()]
                + [x for x in (self.relay and self.relay.r, self.screen.sock,
                               self.watcher and self.watcher.sock) if x is not None]
                + [h.sock for h in self.old_screens.values() if h.sock is not None]
                + [x for x in (self.metrics.listener,) if x is not None])

    def new_screen_handle(self):
        h = screen.Handle(self.config, self.inherited, self.relay)
        h.row = self.screen_rows.pop() if self.screen_rows else 0
        return h

    def screen_ended(self, h):
        """A front stage ended: its counts fold into ours, its row is free."""
        if h.row:
            self.counts.retire(h.row)
            self.screen_rows.append(h.row)
            h.row = 0

    def start_metrics(self):
        """The metrics server: jailed and sandboxed as a worker, it reads
        the counters and the scoreboard, never a client's octets."""
        def inherited():
            return [x for x in [self.listener] + self.inherited() if x is not self.metrics.listener]
        self.metrics.start(inherited, lambda: enter_jail(self.config), self.metrics_page,
                           self.relay and self.relay.w)

    def metrics_page(self):
        """(In the metrics process) the exposition text of this moment."""
        board = self.board
        busy = board.count(Scoreboard.BUSY) + board.count(Scoreboard.ENDING)
        extra = [(("smtpd_sessions_active",), busy), (("smtpd_workers", "busy"), busy),
                 (("smtpd_workers", "idle"), board.count(Scoreboard.IDLE))]
        shared = self.engine.shared
        if shared is not None:
            extra.append((("smtpd_shared_store_up",), int(not shared.health.mm[0])))
        return metrics.render(self.counts.totals(), extra, metrics.SMTPD_FIXED)

    def start_screen(self):
        """The front stage; again after it ended or for new settings.  Its
        workers are new ones, so that it knows each one's readiness from its
        first word: the old ones are the old front stage's, and leave when
        it ends (their hand-over socket closes)."""
        self.admission.stress.next_generation()     # (the old workers stop accepting)
        self.admission.stress.set_crowded(False)
        try:
            self.screen.start(self.engine, self.listener, self.admission)
        except OSError as e:
            log.err("fork of the front stage: %s", e.strerror)
            return
        self.sel.register(self.screen.sock, selectors.EVENT_READ, "screen")
        for w in self.workers.values():
            w.retiring = True

    def replace_screen(self):
        """New settings: a new front stage (maintain starts it) takes the
        new connections; the old one passes on those it holds, to its own
        workers, then ends."""
        old = self.screen
        if old.pid is None:
            return
        old.drain()
        self.sel.unregister(old.sock)
        self.old_screens[old.pid] = old
        self.screen = self.new_screen_handle()

    def screen_delay(self):
        """Seconds before the next front stage: none after one that ran a
        while (or the first that did not), then 1, 2, 4 ... SCREEN_BACKOFF
        for each more that ends within SCREEN_QUICK seconds of its start --
        one that cannot start (a broken jail, no memory) is not forked ten
        times a second, with a log line each."""
        if time.monotonic() - self.screen.started >= SCREEN_QUICK:
            self.screen_deaths = 0
        self.screen_deaths += 1
        delay = min(2 ** (self.screen_deaths - 2), SCREEN_BACKOFF) \
            if self.screen_deaths >= 2 else 0
        self.next_screen = time.monotonic() + delay
        return delay

    def from_screen(self):
        """b"N": clients wait and no worker is idle (maintain forks more, up
        to -M); end of file: it ended (reap() starts it again)."""
        if self.screen.words() is None:
            self.sel.unregister(self.screen.sock)
            self.screen.close()

    def screens(self):
        """The pids of the front stages running."""
        return [p for p in [self.screen.pid] + list(self.old_screens) if p is not None]

    def on_stop(self, *a):
        self.stopping = True

    def on_hup(self, *a):
        self.hup = True

    def on_child(self, *a):
        self.child_exited = True

    # -- the pool --

    def idle(self):
        """Workers waiting for a connection and not asked to leave."""
        return [w for w in self.workers.values()
                if not w.retiring and self.board.state(w.slot) == Scoreboard.IDLE]

    def busy(self):
        return self.board.count(Scoreboard.BUSY)

    def maintain(self):
        if self.watcher is None and time.monotonic() >= self.next_watcher:
            self.start_watcher()
        if self.screen.pid is None and time.monotonic() >= max(self.next_fork,
                                                                self.next_screen):
            self.start_screen()
        if self.metrics.due():
            self.start_metrics()
        if self.screen.sock is None:
            return          # no front stage to give a worker's socket to (yet)
        idle = self.idle()
        while len(idle) < buildconf.SMTPD_PREFORK and len(self.workers) < self.config.maxchildren:
            w = self.spawn()
            if w is None:
                break
            idle.append(w)
        # Spare workers beyond need go only after a quiet spell: retiring
        # them between the sessions of a busy client means forking anew.
        extra = len(idle) - 2 * buildconf.SMTPD_PREFORK
        now = time.monotonic()
        for w in idle[:max(0, extra)]:
            if now - self.board.idle_since(w.slot) >= buildconf.SMTPD_IDLE_TIME:
                self.retire(w)

    def spawn(self):
        if time.monotonic() < self.next_fork or not self.free_slots:
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        hand, its_hand = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        slot = self.free_slots.pop()
        self.board.set(slot, Scoreboard.IDLE)
        gc.freeze()     # the worker's collections then leave our pages shared
        try:
            pid = os.fork()
        except OSError as e:
            self.fork_backoff = min(max(1, self.fork_backoff * 2), 30)
            self.next_fork = time.monotonic() + self.fork_backoff
            log.err("fork: %s; retrying in %d seconds", e.strerror, self.fork_backoff)
            for s in (ours, theirs, hand, its_hand):
                s.close()
            self.board.set(slot, Scoreboard.FREE)
            self.free_slots.append(slot)
            return None
        if pid == 0:
            ours.close()
            hand.close()
            self.become_worker(theirs, its_hand, slot)
        self.fork_backoff = 0
        theirs.close()
        its_hand.close()
        w = self.workers[pid] = WorkerHandle(pid, ours, slot)
        self.sel.register(ours, selectors.EVENT_READ, w)
        if not self.screen.add(hand, slot):
            self.retire(w)
        hand.close()        # the front stage's now: when it ends, the worker sees
        return w

    def retire(self, w):
        w.retiring = True
        try:
            w.ctrl.send(b"Q", socket.MSG_DONTWAIT)
        except OSError:
            pass

    def reap(self):
        if not self.child_exited:
            return
        self.child_exited = False
        for pid, status in process.reaped():
            if self.watcher is not None and pid == self.watcher.pid:
                log.warn("rules watcher %d ended with %s; restarting it", pid, process.describe(status))
                self.watcher.pid = None     # reaped: its pid may be anyone's now
                self.stop_watcher()
                continue
            if self.metrics.ended(pid, status, self.stopping):
                continue
            if pid in self.old_screens:
                h = self.old_screens.pop(pid)
                h.close()
                self.screen_ended(h)
                continue
            if pid == self.screen.pid:
                self.screen_ended(self.screen)
                self.screen.row = self.screen_rows.pop() if self.screen_rows else 0
                if not self.stopping:
                    delay = self.screen_delay()
                    log.warn("front stage %d ended with %s; starting it again%s", pid,
                             process.describe(status),
                             " in %d seconds" % delay if delay else "")
                if self.screen.sock is not None:
                    self.sel.unregister(self.screen.sock)
                    self.screen.close()
                self.screen.pid = None      # maintain() starts another
                continue
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            self.unwatch(w)
            w.ctrl.close()
            self.counts.retire(w.slot + 1)
            self.board.set(w.slot, Scoreboard.FREE)
            self.free_slots.append(w.slot)
            if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) not in (0,):
                log.warn("worker %d ended with %s", pid, process.describe(status))

    def from_worker(self, w):
        """b"N": a worker took a connection and spares ran low (the loop
        forks); end of file: it is leaving (reap() will see it)."""
        try:
            msg = w.ctrl.recv(16)
        except OSError:
            msg = b""
        if not msg:
            self.unwatch(w)

    def unwatch(self, w):
        try:
            self.sel.unregister(w.ctrl)
        except (KeyError, ValueError):
            pass

    # -- rules --

    def start_watcher(self):
        """The jailed process that reads the rules file for us."""
        def inherited():
            return [self.listener] + self.inherited()
        try:
            self.watcher = rulewatch.Watcher(self.config, inherited, self.relay).start()
        except OSError as e:
            log.err("fork of the rules watcher: %s", e.strerror)
            self.next_watcher = time.monotonic() + 1
            return
        self.sel.register(self.watcher.sock, selectors.EVENT_READ, "rules")
        if self.reload_reason:
            self.watcher.ask()

    def stop_watcher(self):
        """Drop the watcher (reap() collects it); a new one starts soon."""
        if self.watcher is None:
            return
        if self.watcher.sock is not None:
            self.sel.unregister(self.watcher.sock)
        self.watcher.stop()
        self.watcher = None
        self.next_watcher = time.monotonic() + 1

    def from_watcher(self):
        try:
            frames = self.watcher.frames()
        except rulewatch.WatcherError as e:
            log.err("%s; restarting it", e)
            self.stop_watcher()
            return
        for frame in frames:
            self.new_rules(frame)

    def new_rules(self, frame):
        why, self.reload_reason = self.reload_reason or "rules file changed", None
        if frame == ("T", self.rules_text) and why != "SIGHUP":
            return      # touched, or a new watcher's first reading
        try:
            rules, warnings = compile_rules(self.config, frame)
        except RuleError as e:
            log.err("%s: keeping the old rules: %s", why, "; ".join(e.problems))
            return
        for w in warnings:
            log.warn("%s", w)
        log.info("%s: rules re-read from %s; recycling workers", why, self.config.rules_shown)
        self.engine = replace(self.engine, rules=FrozenRules(rules))
        self.rules_text = frame[1]
        for w in list(self.workers.values()):
            self.retire(w)      # a busy one reads the Q after its session

    def on_sighup(self):
        self.reload_reason = "SIGHUP"
        self.reload_settings()
        if self.watcher is not None:
            self.watcher.ask()
        self.reload_tls("SIGHUP")

    def reload_settings(self):
        """SIGHUP: the settings file again.  Mistakes in it change nothing
        (logged as file:line: message).  What changed takes effect for the
        workers forked from now on (all are replaced), but what was made of
        it at start (RESTART_ONLY), which waits for a restart."""
        settings, changes = params.reread(buildconf)
        if settings.problems:
            log.err("SIGHUP: the settings in effect stay: %s", "; ".join(settings.problems))
            return
        later = {n: v for n, v in changes.items() if n in RESTART_ONLY}
        now = {n: v for n, v in changes.items() if n not in RESTART_ONLY}
        if later:
            log.warn("SIGHUP: these settings take effect at the next start: %s",
                     params.text(later))
        if not now:
            return
        undo = params.apply(buildconf, settings, now)
        new = build_config(dict(self.config.flags), reloading=True)
        if isinstance(new, list):
            params.apply(buildconf, *undo)
            log.err("SIGHUP: the settings in effect stay: %s", "; ".join(new))
            return
        log.info("SIGHUP: settings re-read from %s: %s; recycling workers and the front stage",
                 buildconf.SETTINGS_FILE, params.text(now))
        self.config, self.engine = new, reloaded(self.engine, new)
        self.admission.exempt = new.exempt
        self.replace_screen()

    def reload_tls(self, why):
        """New sessions get a new certificate; running ones keep theirs."""
        certificates = self.engine.certificates
        if certificates.reload(why):
            self.engine = replace(self.engine, tls_context=certificates.context)
            for w in list(self.workers.values()):
                self.retire(w)

    # -- the loop --

    def run(self):
        c = self.config
        spool = os.path.normpath(os.path.join(c.chroot, c.spooldir.lstrip("/")) if c.root
                                 else c.spooldir)
        log.info("ready to accept connections on %s port %d, spool %s (master pid %d)",
                 c.listen or "every address", c.port, spool, os.getpid())
        next_check = time.monotonic() + 1
        while not self.stopping:
            self.reap()
            if not self.stopping:
                self.maintain()
            self.dispatch(1.0)
            if self.hup:
                self.hup = False
                self.on_sighup()
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 1
                if self.engine.certificates.changed():
                    self.reload_tls("certificate or key changed")
        return self.shutdown()

    def dispatch(self, timeout):
        """Wait for a signal, a worker's word or the watcher's text."""
        for key, _ in self.sel.select(timeout):
            if key.data is None:
                process.drain(self.wake_r)
            elif key.data is self.relay:
                self.relay.pump()
            elif key.data == "screen":
                self.from_screen()
            elif key.data == "rules":
                if self.watcher is not None:
                    self.from_watcher()
            else:
                self.from_worker(key.data)

    def shutdown(self):
        log.info("stopping: no new connections; waiting up to %d seconds for %d sessions",
                buildconf.SHUTDOWN_TIMEOUT, self.busy())
        # shutdown(2) on a listening socket stops it for every process that
        # shares it: waiting connections are reset, workers' accept fails.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.stop_watcher()
        for h in [self.screen] + list(self.old_screens.values()):
            h.stop()            # the connections it holds get 421
        self.metrics.stop()
        for w in self.workers.values():
            self.retire(w)
        deadline = time.monotonic() + buildconf.SHUTDOWN_TIMEOUT
        while (self.workers or self.screens() or self.metrics.pid) \
                and time.monotonic() < deadline:
            self.dispatch(0.2)
            self.child_exited = True
            self.reap()
        for pid in list(self.workers) + self.screens():
            log.warn("%s %d still busy after %d seconds; terminating it",
                     "worker" if pid in self.workers else "front stage", pid,
                     buildconf.SHUTDOWN_TIMEOUT)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        process.ignore_stop_signals()
        if self.relay is not None:
            self.relay.pump()
        counted = self.counts.totals()
        log.info("stopped: %d messages committed with %d fsyncs of the spool directory",
                 counted["messages"], counted["spool_dir_fsyncs"])
        return os.EX_OK

    # -- in the child --

    def become_worker(self, ctrl, hand, slot):
        try:
            process.child_signals(signal.SIGTERM, signal.SIGCHLD)   # the master ends sessions
            process.leave_terminal(self.relay and self.relay.w)
            for x in self.inherited():
                close(x)
            process.set_title("smtpd: worker")
            log.log.role = "worker: "
            counters.use_row(slot + 1)
            enter_jail(self.config)
            status = Worker(self.config, self.engine, ctrl, hand, self.admission, slot,
                            self.listener).run()
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else os.EX_SOFTWARE
        except BaseException as e:
            log.crit("worker: %s", e)
            status = os.EX_SOFTWARE
        os._exit(status)


def close(x):
    """Close a descriptor or an object with close(); never fails."""
    try:
        os.close(x) if isinstance(x, int) else x.close()
    except OSError:
        pass


STOPPED_EARLY, HUP_EARLY = [], []


def stop_early(*a):
    STOPPED_EARLY.append(True)


def hup_early(*a):
    HUP_EARLY.append(True)


def run(config, engine):
    """smtpd -D, after the pre-jail phase (engine): the rules, the socket
    and the pid file as root, then detach and serve."""
    process.set_title("smtpd: master")
    if config.foreground:
        # The port listens (and the title says master) before Master takes
        # the signals over: a SIGTERM in between is a stop, a SIGHUP a
        # reload once it can, never a death.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop_early)
        signal.signal(signal.SIGHUP, hup_early)
    relay = log.Relay() if config.foreground and log.Relay.wanted() else None
    rules, text = load_rules(config, relay)
    check_jail_log_socket(config)
    screen.raise_file_limit()
    listener = bind(config)
    metrics_listener = metrics.bind("SMTPD_METRICS_LISTEN", buildconf.SMTPD_METRICS_LISTEN)
    check_pidfile(config.pidfile)
    pidfile = daemon.pidfile.TimeoutPIDLockFile(config.pidfile, acquire_timeout=0)
    if config.foreground:
        return serve(config, engine, listener, rules, text, pidfile, relay, metrics_listener)
    # SIGTERM from the moment the pid file names us until Master takes it
    # over ends us (DaemonContext.terminate): never ignored, or an init
    # script's quick start-then-stop would leave a master running.
    ctx = daemon.DaemonContext(
        files_preserve=[listener.fileno()] + ([metrics_listener.fileno()] if metrics_listener
                                              else []), umask=0o077, pidfile=pidfile,
        signal_map={signal.SIGTERM: "terminate", signal.SIGINT: "terminate",
                    signal.SIGHUP: hup_early})
    log.log.close()          # DaemonContext closes every descriptor
    try:
        ctx.open()
    except lockfile.AlreadyLocked:
        log.die(1, "already running (pid file %s)", config.pidfile)
    log.log.open("smtpd", buildconf.LOG_FACILITY, pid=config.log_pid, path=buildconf.LOG_SOCKET)
    try:
        return serve(config, engine, listener, rules, text, None, None, metrics_listener)
    finally:
        ctx.close()


def serve(config, engine, listener, rules, text, pidfile, relay, metrics_listener=None):
    if pidfile is not None:
        try:
            pidfile.acquire()
        except lockfile.AlreadyLocked:
            log.die(1, "already running (pid file %s)", config.pidfile)
    try:
        return Master(config, engine, listener, rules, text, relay, metrics_listener).run()
    finally:
        if pidfile is not None:
            pidfile.release()
