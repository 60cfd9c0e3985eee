"""prefork - smtpd -D: the master and its pre-forked, jailed workers

DESCRIPTION
    The master binds the listening socket(s) as root, takes the pid file,
    detaches (unless -F) and keeps a pool of workers: SMTPD_PREFORK spare
    ones, at most -M (SMTPD_MAXCHILDREN) in all.  It accepts connections
    and passes each to an idle worker over a Unix socket; it never reads
    what a client sends.  A client address with SMTPD_MAX_PER_IP sessions
    already gets "421" and is closed.  Each worker chroots to -c and
    becomes -u/-g before its first session, serves SMTPD_MAX_USE sessions,
    then exits.  The master holds the rules: it re-reads them on SIGHUP and
    when the file changes; an invalid new file is logged and the old rules
    stay.  Workers are then replaced so new sessions use the new rules.
SIGNALS
    SIGTERM, SIGINT: stop accepting, let sessions finish for at most
    SHUTDOWN_TIMEOUT seconds, exit 0.  SIGHUP: re-read the rules.
"""

import errno
import gc
import os
import selectors
import signal
import socket
import sys
import time

import daemon
import daemon.pidfile
import lockfile

import buildconf
import checkrules
import daemonlib as dl

REFUSAL = b"421 Too many connections from your address, try again later\r\n"


class FrozenRules:
    """The rules a worker was forked with (the master re-reads them)."""

    def __init__(self, rules):
        self.rules = rules

    def get(self):
        return self.rules


class Worker:
    def __init__(self, pid, ctrl):
        self.pid, self.ctrl = pid, ctrl
        self.ip = None          # the client address while busy
        self.busy = False
        self.retiring = False
        self.idle_since = time.monotonic()


def set_title(title):
    """Name the process (ps, top, /proc/PID/comm) as master or worker."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(title[:15])
    except OSError:
        pass


def master_rules_path(cfg):
    if cfg.root:
        return os.path.join(cfg.chroot, cfg.rules_path.lstrip("/"))
    return cfg.rules_path


def load_rules(cfg):
    """The rules at start: an invalid file stops smtpd with 78."""
    try:
        rules, warnings = checkrules.load(master_rules_path(cfg))
    except checkrules.RuleError as e:
        for p in e.problems:
            dl.err("%s", p)
            if not dl.log.stderr:
                print(p, file=sys.stderr)
        sys.exit(dl.EX_CONFIG)
    for w in warnings:
        dl.warn("%s", w)
    return rules


def bind(cfg):
    """The listening socket: -l address (or all, dual stack) and -p port."""
    addr = cfg.listen
    family = socket.AF_INET6 if addr is None or ":" in addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and addr is None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        s.bind((addr or "::", cfg.port))
    except OSError as e:
        if addr is None and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            s.close()
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            return bind_or_die(s, "0.0.0.0", cfg.port)
        dl.die(dl.EX_OSERR, "bind(%s port %d): %s", addr or "::", cfg.port, e.strerror)
    s.listen(128)
    s.setblocking(False)
    return s


def bind_or_die(s, addr, port):
    try:
        s.bind((addr, port))
    except OSError as e:
        dl.die(dl.EX_OSERR, "bind(%s port %d): %s", addr, port, e.strerror)
    s.listen(128)
    s.setblocking(False)
    return s


def check_pidfile(path):
    """Replace a stale pid file; exit 1 if a live smtpd holds it."""
    try:
        pid = int(open(path).read().split()[0])
    except FileNotFoundError:
        return
    except (OSError, ValueError, IndexError):
        pid = None
    if pid:
        try:
            os.kill(pid, 0)
            dl.err("already running as pid %d (pid file %s)", pid, path)
            if not dl.log.stderr:
                print("smtpd.py: already running as pid %d (%s)" % (pid, path),
                      file=sys.stderr)
            sys.exit(1)
        except ProcessLookupError:
            pass
        except PermissionError:
            sys.exit(1)
    dl.notice("removing stale pid file %s", path)
    os.unlink(path)


class Master:
    def __init__(self, cfg, listener, rules):
        self.cfg, self.listener = cfg, listener
        self.rules = rules
        self.rules_stamp = self.stamp()
        self.workers = {}           # pid -> Worker
        self.idle_workers = {}      # pid -> Worker, ready for a connection
        self.nbusy = 0
        self.pending = []           # (conn, ip, addr) accepted, waiting for a worker
        self.per_ip = {}
        self.stopping = self.hup = False
        self.fork_backoff = 0
        self.next_fork = 0
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        signal.set_wakeup_fd(self.wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_stop)
        signal.signal(signal.SIGHUP, self.on_hup)
        signal.signal(signal.SIGCHLD, self.on_child)
        self.child_exited = False
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        self.listening = False

    def on_stop(self, *a):
        self.stopping = True

    def on_hup(self, *a):
        self.hup = True

    def on_child(self, *a):
        self.child_exited = True

    def stamp(self):
        try:
            st = os.stat(master_rules_path(self.cfg))
            return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            return None

    # -- the pool --

    def idle(self):
        return list(self.idle_workers.values())

    def busy(self):
        return self.nbusy

    def maintain(self):
        want = min(buildconf.SMTPD_PREFORK + len(self.pending),
                   self.cfg.maxchildren - self.nbusy)
        while len(self.idle_workers) < want and len(self.workers) < self.cfg.maxchildren:
            if not self.spawn():
                break
        # Spare workers beyond need go only after a quiet spell: retiring
        # them between the sessions of a busy client means forking anew.
        extra = len(self.idle_workers) - max(2 * buildconf.SMTPD_PREFORK, want)
        now = time.monotonic()
        for w in self.idle()[:max(0, extra)]:
            if now - w.idle_since >= buildconf.SMTPD_IDLE_TIME:
                self.retire(w)

    def spawn(self):
        if time.monotonic() < self.next_fork:
            return False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        gc.freeze()     # the worker's collections then leave our pages shared
        try:
            pid = os.fork()
        except OSError as e:
            self.fork_backoff = min(max(1, self.fork_backoff * 2), 30)
            self.next_fork = time.monotonic() + self.fork_backoff
            dl.err("fork: %s; retrying in %d seconds", e.strerror, self.fork_backoff)
            ours.close()
            theirs.close()
            return False
        if pid == 0:
            ours.close()
            self.become_worker(theirs)
        self.fork_backoff = 0
        theirs.close()
        w = self.workers[pid] = self.idle_workers[pid] = Worker(pid, ours)
        self.sel.register(ours, selectors.EVENT_READ, w)
        return True

    def retire(self, w):
        w.retiring = True
        self.idle_workers.pop(w.pid, None)
        try:
            w.ctrl.send(b"Q")
        except OSError:
            pass

    def reap(self):
        if not self.child_exited:
            return
        self.child_exited = False
        for pid, status in dl.reaped():
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            self.idle_workers.pop(pid, None)
            self.unwatch(w)
            w.ctrl.close()
            if w.busy:
                self.nbusy -= 1
                self.release(w.ip)
            if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) not in (0,):
                dl.warn("worker %d ended with %s", pid, describe(status))

    def release(self, ip):
        n = self.per_ip.get(ip, 1) - 1
        if n <= 0:
            self.per_ip.pop(ip, None)
        else:
            self.per_ip[ip] = n

    # -- connections --

    def can_accept(self):
        return (not self.stopping
                and self.busy() + len(self.pending) < self.cfg.maxchildren)

    def accept(self):
        try:
            conn, addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            dl.err("accept: %s", e.strerror)
            time.sleep(0.1)
            return
        ip = dl.normalize_ip(addr[0])
        if self.per_ip.get(ip, 0) >= buildconf.SMTPD_MAX_PER_IP:
            dl.notice("refused %s: %d sessions already", ip, self.per_ip[ip])
            try:
                conn.send(REFUSAL, socket.MSG_DONTWAIT)
            except OSError:
                pass
            conn.close()
            return
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        self.pending.append((conn, ip, addr))

    def dispatch(self):
        for w in self.idle():
            if not self.pending:
                return
            conn, ip, addr = self.pending.pop(0)
            try:
                # The family and peer travel with the descriptor, so the
                # worker need not ask the kernel for them again.
                socket.send_fds(w.ctrl, [b"S %d %s %d" % (conn.family, addr[0].encode(), addr[1])],
                                [conn.fileno()])
                w.busy, w.ip = True, ip
                self.nbusy += 1
                del self.idle_workers[w.pid]
            except OSError as e:
                dl.err("passing a connection to worker %d: %s", w.pid, e.strerror)
                self.release(ip)
                self.retire(w)
            conn.close()

    def from_worker(self, w):
        try:
            msg = w.ctrl.recv(16)
        except OSError:
            msg = b""
        if msg in (b"D", b"X") and w.busy:
            w.busy = False
            self.nbusy -= 1
            self.release(w.ip)
            w.ip = None
            if not w.retiring:
                self.idle_workers[w.pid] = w
                w.idle_since = time.monotonic()
        if msg in (b"X", b""):
            self.retire(w)
        if not msg:
            self.unwatch(w)                 # gone: reap() will see it

    def unwatch(self, w):
        try:
            self.sel.unregister(w.ctrl)
        except (KeyError, ValueError):
            pass

    # -- rules --

    def reload(self, why):
        self.rules_stamp = self.stamp()
        try:
            rules, warnings = checkrules.load(master_rules_path(self.cfg))
        except checkrules.RuleError as e:
            dl.err("%s: keeping the old rules: %s", why, str(e).replace("\n", "; "))
            return
        dl.info("%s: rules re-read from %s; recycling workers", why,
                master_rules_path(self.cfg))
        self.rules = rules
        for w in list(self.workers.values()):
            self.retire(w)      # a busy one reads the Q after its session

    # -- the loop --

    def run(self):
        dl.info("ready to accept connections on port %d (master pid %d)",
                self.cfg.port, os.getpid())
        next_check = 0
        while not self.stopping:
            self.reap()
            self.maintain()
            self.dispatch()
            self.listen(self.can_accept())
            for key, _ in self.sel.select(1.0):
                if key.data is None:
                    dl.drain(self.wake_r)
                elif key.data == "listen":
                    self.accept()
                else:
                    self.from_worker(key.data)
            if self.hup:
                self.hup = False
                self.reload("SIGHUP")
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 1
                if self.stamp() != self.rules_stamp:
                    self.reload("rules file changed")
        return self.shutdown()

    def listen(self, on):
        """Watch the listening socket only while there is capacity."""
        if on != self.listening:
            if on:
                self.sel.register(self.listener, selectors.EVENT_READ, "listen")
            else:
                self.sel.unregister(self.listener)
            self.listening = on

    def shutdown(self):
        dl.info("stopping: no new connections; waiting up to %d seconds for %d sessions",
                buildconf.SHUTDOWN_TIMEOUT, self.busy())
        self.listen(False)
        self.listener.close()
        for conn, _, _ in self.pending:
            conn.close()
        self.pending = []
        deadline = time.monotonic() + buildconf.SHUTDOWN_TIMEOUT
        while self.workers and time.monotonic() < deadline:
            for w in self.idle():
                self.retire(w)
            for key, _ in self.sel.select(0.2):
                if key.data is None:
                    dl.drain(self.wake_r)
                else:
                    self.from_worker(key.data)
            self.child_exited = True
            self.reap()
        for pid in list(self.workers):
            dl.warn("worker %d still busy after %d seconds; terminating it",
                    pid, buildconf.SHUTDOWN_TIMEOUT)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        dl.ignore_stop_signals()
        dl.info("stopped")
        return dl.EX_OK

    # -- in the child --

    def become_worker(self, ctrl):
        try:
            # The master decides when sessions end: a Ctrl-C or hangup sent to
            # the whole process group must not cut them short.
            for sig in (signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            for sig in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            self.listener.close()
            for conn, _, _ in self.pending:
                conn.close()
            for w in self.workers.values():
                w.ctrl.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            self.sel.close()
            set_title("smtpd: worker")
            dl.log.role = "worker: "
            self.cfg.rules = FrozenRules(self.rules)
            self.cfg.enter_jail(self.cfg)
            status = worker_loop(self.cfg, ctrl)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else dl.EX_SOFTWARE
        except BaseException as e:
            dl.crit("worker: %s", e)
            status = dl.EX_SOFTWARE
        os._exit(status)


def worker_loop(cfg, ctrl):
    """Serve sessions handed over by the master; the exit status."""
    for used in range(1, buildconf.SMTPD_MAX_USE + 1):
        try:
            msg, fds, _, _ = socket.recv_fds(ctrl, 128, 1)
        except OSError:
            return dl.EX_OK
        conn = handed_over(msg, fds)
        if conn is None:
            return dl.EX_OK
        sock, peer = conn
        try:
            local = sock.getsockname()[:2]
        except OSError:
            local = None
        status = cfg.serve(cfg, sock.fileno(), sock.fileno(), local, peer, sock=sock)
        sock.close()
        if status == dl.EX_SOFTWARE:
            return status
        last = used == buildconf.SMTPD_MAX_USE
        try:
            ctrl.send(b"X" if last else b"D")
        except OSError:
            return dl.EX_OK
    return dl.EX_OK


def handed_over(msg, fds):
    """(socket, peer) from the master's b"S family address port" and its
    descriptor; None (descriptors closed) for anything else, e.g. b"Q"."""
    try:
        verb, family, address, port = msg.split()
        if verb != b"S" or len(fds) != 1:
            raise ValueError(msg)
        sock = socket.socket(int(family), socket.SOCK_STREAM, 0, fileno=fds[0])
        return sock, (address.decode(), int(port))
    except (ValueError, OSError):
        for fd in fds:
            os.close(fd)
        return None


def describe(status):
    if os.WIFSIGNALED(status):
        return "signal %d" % os.WTERMSIG(status)
    return "status %d" % os.WEXITSTATUS(status)


def run(cfg):
    """smtpd -D: everything as root first, then detach and serve.

    cfg.serve(cfg, rfd, wfd) runs one session; cfg.enter_jail(cfg) jails."""
    rules = load_rules(cfg)
    listener = bind(cfg)
    check_pidfile(cfg.pidfile)
    pidfile = daemon.pidfile.TimeoutPIDLockFile(cfg.pidfile, acquire_timeout=0)
    if cfg.foreground:
        return serve(cfg, listener, rules, pidfile)
    ctx = daemon.DaemonContext(
        files_preserve=[listener.fileno()], umask=0o077, pidfile=pidfile,
        signal_map={signal.SIGTERM: None, signal.SIGHUP: None, signal.SIGINT: None})
    try:
        ctx.open()
    except lockfile.AlreadyLocked:
        dl.die(1, "already running (pid file %s)", cfg.pidfile)
    dl.log.open("smtpd", buildconf.LOG_FACILITY, pid=cfg.log_pid)
    try:
        return serve(cfg, listener, rules, None)
    finally:
        ctx.close()


def serve(cfg, listener, rules, pidfile):
    if pidfile is not None:
        try:
            pidfile.acquire()
        except lockfile.AlreadyLocked:
            dl.die(1, "already running (pid file %s)", cfg.pidfile)
    set_title("smtpd: master")
    try:
        return Master(cfg, listener, rules).run()
    finally:
        if pidfile is not None:
            pidfile.release()
