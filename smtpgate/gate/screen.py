"""screen - smtpd -D's front stage: one event loop before the workers, as postscreen

DESCRIPTION
    One jailed, sandboxed process ("smtpd: screen") accepts every
    connection and holds it, in one epoll loop, until it has earned a
    worker: a held connection costs a few kilobytes, not a process.  For
    each it reads the PROXY header (from SMTPD_PROXY_FROM), answers a
    balancer's health check itself, applies admission (the rate table, the
    share of held connections a network may have), asks the DNS lists
    (their non-blocking stub, dnsbl.py), waits the greeting pause (who
    talks first gets 554: pregreet), refuses a listed client, greets, and
    answers HELO, EHLO, NOOP and RSET itself under a deadline per command
    -- a bot that says EHLO and idles never takes a worker.  At the first
    command that needs one (MAIL, STARTTLS, anything else) the client
    waits here for an idle worker (SMTPD_SCREEN_WAIT at most, then 421),
    and is passed to it with what was learned (handoff.py).  A client
    that passed the pause is remembered (PassTable, shared through the
    store when configured) and skips the pause next time; one that had a
    message accepted goes to an idle worker at once next time, before
    its greeting (postscreen's PASS OLD: at_once()) -- usually without us:
    idle workers wait on the listener ahead of us (behind_workers()),
    serve such a client themselves and give us every other connection.
LIMITS
    SMTPD_SCREEN_MAX connections held (more get 421), SMTPD_SCREEN_PER_NETWORK
    of them per network; the master raises the open-file limit for them.
    A descriptor shortage at accept gets a 421 through a spare descriptor,
    logged once.  Stress mode -- held connections past three quarters of
    SMTPD_SCREEN_MAX, or nine tenths of the workers busy -- shortens the
    wait for a command and for a worker to SMTPD_STRESS_TIMEOUT (the
    workers read the same word: a command's deadline), logged once per
    episode, until the load falls below half and seven tenths.
PROTOCOL (master)
    The master sends, on the screen's control socket, b"W" with a worker's
    hand-over socket (SCM_RIGHTS) for each worker it forks, b"Q" to stop;
    the screen sends b"N" when clients wait and no worker is idle.  On a
    worker's socket: READY, LEAVING and GIVEN from it, Passed to it
    (handoff.py); before a Passed, Scoreboard.reserve() marks its slot.
"""

import array
import collections
import errno
import heapq
import os
import re
import resource
import select
import signal
import socket
import time

import buildconf
from smtpgate import counters, libc, log, net, process
from smtpgate.gate import chat, handoff, proxy
from smtpgate.gate.engine import enter_jail
from smtpgate.gate.admission import PassTable, address_key, network_key, network_text
from smtpgate.text import escape, host_chars

PROXY_STATE, PAUSE, COMMANDS, WAITING, HEALTH = "PROXY", "PAUSE", "COMMANDS", "WAITING", "HEALTH"
READ = 4096
ANSWERED = (b"HELO", b"EHLO", b"NOOP", b"RSET", b"QUIT")   # the commands answered here
ANSWERED_MAX = 10           # then the next goes to a worker, whatever it is
PRINTABLE = re.compile(rb"[\x20-\x7e]*\Z")   # (else a session refuses it, or -P's HELO check)
LINE_MAX = 512
LISTENING = select.EPOLLIN | select.EPOLLEXCLUSIVE     # (see behind_workers)
ACCEPTS = 256               # connections accepted a turn of the loop
NEAR_LIMIT = 64             # descriptors: from_worker makes sure of room for one
CROWDED_ROOM = 16           # connections fewer than then, and workers give us theirs again
CAP_RECHECK = 0.2           # seconds before a client at SMTPD_MAX_PER_IP is counted again
ASKED_EVERY = 0.1           # seconds between two b"N" to the master
LOG_EVERY = 60
ADDRESSES = 4096            # address texts whose parse is kept
LINGER = 1.0                # seconds a last reply's connection reads before its close
FILES_SPARE = 1024          # descriptors beyond the connections' (workers, DNS, logs)


class Client:
    """One connection the front stage holds."""

    __slots__ = ("sock", "fd", "local", "peer", "origin", "ip", "key", "state",
                 "since", "due", "buf", "scoring", "asking", "score", "allowlisted", "exempt",
                 "helo", "esmtp", "pause_end", "paused", "waiting_since", "answered",
                 "rechecked")

    def __init__(self, fd, peer, now):
        self.fd, self.sock = fd, None       # (sock: once it is held, hold())
        self.local, self.peer, self.origin = None, peer, None
        self.ip = self.key = None
        self.state, self.since, self.due, self.buf = None, now, now, b""
        self.scoring = self.score = None
        self.asking = -1        # the DNS lists' socket while it is in the loop
        self.allowlisted = self.exempt = self.paused = False
        self.helo, self.esmtp = None, False
        self.pause_end = self.waiting_since = 0.0
        self.answered = 0
        self.rechecked = False  # greet() counted its network at the cap once

    @property
    def where(self):
        """The client as the log names it (once its address is known)."""
        return None if self.ip is None else "UNKNOWN(%s)" % self.ip


class Worker:
    __slots__ = ("sock", "slot", "fresh")

    def __init__(self, sock, slot):
        self.sock, self.slot = sock, slot
        self.fresh = True       # it has not said READY yet


class Screen:
    def __init__(self, config, engine, listener, ctl, adm):
        self.config, self.engine, self.listener, self.ctl = config, engine, listener, ctl
        self.adm, self.board = adm, adm.board
        self.ep = select.epoll()
        self.clients = {}               # fd -> Client
        self.by_scoring = {}            # a DNS lists' socket fd -> Client
        self.per_net = collections.Counter()       # network -> connections held
        self.sessions = collections.Counter()      # network -> of them greeted
        self.workers = {}               # hand-over socket fd -> Worker
        self.idle = {}                  # of them, those that said READY: fd -> Worker
        self.addresses = {}             # address text -> (ip, network key, PassTable key)
        self.queue = collections.deque()        # Clients waiting for a worker
        self.timers = []                # (due, fd, since) heap; stale entries skipped
        self.lingering = {}             # fd -> socket: a last reply went out (linger)
        self.linger_queue = collections.deque()     # (due, fd, socket), oldest first
        self.stopping = self.draining = self.orphaned = False
        self.stressed = False
        self.crowded = 0                # connections held when descriptors ran out
        self.asked = 0.0
        self.logged = {}
        self.spare = os.dup(ctl.fileno())       # given up for a moment at EMFILE
        self.fixed_fds = self.spare + 1         # (about what we hold but do not count)
        self.fd_limit, self.limit_read = resource.getrlimit(resource.RLIMIT_NOFILE)[0], 0.0
        self.passes = adm.passes
        self.family = int(listener.family)
        self.listen_fd, self.ctl_fd = listener.fileno(), ctl.fileno()
        self.ep.register(self.listen_fd, LISTENING)
        self.ep.register(self.ctl_fd, select.EPOLLIN)
        signal.signal(signal.SIGUSR2, self.on_master_death)
        libc.set_parent_death_signal(signal.SIGUSR2)

    def on_master_death(self, *a):
        self.orphaned = True

    # -- the loop --

    def run(self):
        log.info("front stage ready: holding at most %d connections (%d per network)",
                 buildconf.SMTPD_SCREEN_MAX, buildconf.SMTPD_SCREEN_PER_NETWORK)
        while not ((self.stopping or self.draining) and not self.clients):
            if self.orphaned and not self.draining:
                self.drain("the master is gone")
            now = time.monotonic()
            wait = max(0.0, min(self.timers[0][0] - now, 1.0)) if self.timers else 1.0
            if self.linger_queue:
                wait = max(0.0, min(wait, self.linger_queue[0][0] - now))
            try:
                events = self.ep.poll(wait)
            except InterruptedError:
                continue
            for fd, ev in events:
                self.event(fd, ev)
            self.expire(time.monotonic())
            self.dispatch()
            self.judge_stress()
            if self.crowded and len(self.clients) < self.crowded - CROWDED_ROOM:
                self.crowded = 0
                self.adm.stress.set_crowded(False)
            counters.set(HELD, len(self.clients))
        return self.close_all()

    def event(self, fd, ev):
        if fd == self.listen_fd:
            self.accept()
        elif fd == self.ctl_fd:
            self.from_master()
        elif fd in self.workers:
            self.from_worker(self.workers[fd])
        elif fd in self.by_scoring:
            c = self.by_scoring[fd]
            c.scoring.receive()
            self.pause_step(c, time.monotonic())
        elif fd in self.clients:
            c = self.clients[fd]
            if c.state == WAITING:      # (its input stays in the socket for the worker)
                self.hangup(c, time.monotonic())
            else:
                self.readable(c)
        elif fd in self.lingering:
            self.discard(fd)

    def schedule(self, c, due):
        c.due = due
        heapq.heappush(self.timers, (due, c.fd, c.since))

    def expire(self, now):
        while self.linger_queue and self.linger_queue[0][0] <= now:
            _, fd, sock = self.linger_queue.popleft()
            if self.lingering.get(fd) is sock:
                self.end_linger(fd)
        while self.timers and self.timers[0][0] <= now:
            due, fd, since = heapq.heappop(self.timers)
            c = self.clients.get(fd)
            if c is None or c.since != since or c.due != due:
                continue            # a timer of a connection gone, or moved since
            self.timeout(c, now)

    # -- the master and the workers --

    def from_master(self):
        try:
            data, anc, _, _ = self.ctl.recvmsg(64, socket.CMSG_SPACE(array.array("i").itemsize))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, anc = b"", []
        fds = handoff.descriptors(anc)
        if not data:
            self.orphaned = True
            self.ep.unregister(self.ctl.fileno())
        elif data[:1] == b"W" and len(fds) == 1:
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
            self.workers[sock.fileno()] = Worker(sock, int(data[1:] or 0))
            self.ep.register(sock.fileno(), select.EPOLLIN)
        elif data == b"Q":
            self.stop()
        elif data == b"D":
            self.drain("a new one takes over")
        else:
            for fd in fds:
                os.close(fd)

    def from_worker(self, w):
        full = self.near_limit() and not self.room()
        try:
            data, fds = handoff.receive_word(w.sock)
        except (BlockingIOError, InterruptedError):
            data, fds = None, []
        except OSError:
            data, fds = b"", []
        if full:                        # (the spare's place took a given connection)
            for x in fds:
                chat.send(x, chat.NOT_AVAILABLE)
                os.close(x)
            self.spare = os.dup(self.ctl_fd)
            if fds:
                return self.no_descriptors(given=True)
        if data is None:
            return
        fd = w.sock.fileno()
        if data[:1] == handoff.GIVEN:
            if not fds:                 # (the kernel found no room for it: it is lost)
                self.limit_read = 0.0   # (the limit was lowered: read it now)
                return self.no_descriptors(given=True)
            return self.given(data, fds)
        for x in fds:
            os.close(x)
        if data == handoff.READY:
            if w.fresh:             # (its wait on the listener is queued now)
                w.fresh = False
                self.behind_workers()
            self.idle[fd] = w
        elif data == handoff.LEAVING or not data:   # it leaves, or has ended
            self.ep.unregister(fd)
            del self.workers[fd]
            self.idle.pop(fd, None)
            w.sock.close()

    def behind_workers(self):
        """Our wait on the listener to the end of its queue, behind every
        worker's: a new connection wakes an idle worker (which serves a
        client passed before at once, and gives us any other), and us only
        when none is waiting (EPOLLEXCLUSIVE)."""
        if self.listen_fd < 0:
            return
        try:
            self.ep.unregister(self.listen_fd)
            self.ep.register(self.listen_fd, LISTENING)
        except OSError as e:
            log.err("front stage: epoll on the listener: %s", e.strerror)

    def given(self, data, fds):
        """A connection a worker accepted and gives us: a new client."""
        try:
            addr = handoff.given_peer(data, fds)
        except handoff.Bad as e:
            for x in fds:
                os.close(x)
            return log.err("a connection from a worker: %s", e)
        if self.stopping:               # (draining, it sees what its workers give through)
            chat.send(fds[0], chat.NOT_AVAILABLE)
            return os.close(fds[0])
        self.new_client(fds[0], addr)

    def dispatch(self):
        """Pass waiting clients to idle workers, oldest first."""
        while self.queue:
            w = self.idle_worker()
            if w is None:
                now = time.monotonic()
                if now - self.asked >= ASKED_EVERY:
                    self.asked = now
                    try:
                        self.ctl.send(b"N", socket.MSG_DONTWAIT)
                    except OSError:
                        pass
                return
            c = self.queue.popleft()
            if c.fd in self.clients and not self.hand(w, c):
                self.queue.appendleft(c)

    def idle_worker(self):
        return next(iter(self.idle.values()), None)

    def hand(self, w, c, greeted=True):
        """Pass c to the idle worker w: False if it cannot take it now."""
        del self.idle[w.sock.fileno()]     # (gone or full if this fails: its end says which)
        if not self.board.reserve(w.slot):
            return False                # it accepted a client itself: READY again after
        try:
            handoff.send(w.sock, self.passed(c, greeted), c.fd)
        except OSError:
            self.board.unreserve(w.slot)
            return False
        counters.count(PASSED)
        self.drop(c)
        return True

    def passed(self, c, greeted):
        now = time.monotonic()
        return handoff.Passed(local=c.local, peer=c.peer, origin=c.origin, helo=c.helo,
                              esmtp=c.esmtp, score=c.score, allowlisted=c.allowlisted,
                              unread=c.buf[:handoff.UNREAD_MAX],
                              waited=round(now - c.waiting_since, 3) if c.waiting_since else 0.0,
                              age=round(now - c.since, 3), greeted=greeted)

    # -- a new connection --

    def accept(self):
        for _ in range(ACCEPTS):
            try:
                # (socket.accept() without its two enum conversions a call)
                fd, addr = self.listener._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    return self.no_descriptors()
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.ENOBUFS, errno.ENOMEM):
                    continue
                # EINVAL: the master shut the socket down (smtpd stops; its
                # word follows) -- not an error to log
                if not (self.stopping or self.draining or e.errno == errno.EINVAL):
                    log.err("front stage: accept: %s; no more connections", e.strerror)
                return self.stop_listening()
            self.new_client(fd, addr)

    def near_limit(self):
        """Might a descriptor a worker gives us not fit?  Counted from what
        we hold, with room for what we do not count; the open-file limit
        is read again once a second (a test lowers it under us)."""
        now = time.monotonic()
        if now - self.limit_read >= 1.0:
            self.limit_read = now
            self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        held = len(self.clients) + len(self.lingering) + len(self.by_scoring) + len(self.workers)
        return held + self.fixed_fds + NEAR_LIMIT >= self.fd_limit

    def room(self):
        """Near the limit, before a worker's word is received (its
        descriptor, if any, needs a place): is there one?  If not, the
        spare is given up for it (from_worker refuses it with 421 and
        takes the spare back)."""
        try:
            os.close(os.dup(self.ctl_fd))
            return True
        except OSError:
            os.close(self.spare)
            return False

    def no_descriptors(self, given=False):
        """The open-file limit: a spare descriptor makes room for one more
        accept, its 421, its close; logged once a minute.  A connection a
        worker gave us was closed by the kernel (no descriptor to receive
        it in): the workers refuse with 421 themselves until we hold fewer
        (Stress.crowded)."""
        self.once("fds", log.err, "front stage: out of file descriptors with %d connections "
                  "held: refusing with 421", len(self.clients))
        counters.count(refused("descriptors"))
        self.crowded = len(self.clients)
        self.adm.stress.set_crowded(True)
        if given:
            return
        os.close(self.spare)
        try:
            sock, _ = self.listener.accept()
            chat.send(sock, chat.NOT_AVAILABLE)
            sock.close()
        except OSError:
            pass
        self.spare = os.dup(self.ctl.fileno())

    def new_client(self, fd, addr):
        """A descriptor accepted: a Client, with no socket object yet (a
        client passed at once never needs one here)."""
        now = time.monotonic()
        c = Client(fd, addr[:2], now)
        if len(self.clients) >= buildconf.SMTPD_SCREEN_MAX:
            self.once("full", log.notice, "refused %s: the front stage holds %d connections "
                      "(SMTPD_SCREEN_MAX)", addr[0], len(self.clients))
            counters.count(refused("full"))
            chat.send(fd, chat.NOT_AVAILABLE)   # (blocking, but into an empty buffer)
            return os.close(fd)
        if self.config.proxy_from and net.member(net.normalize_ip(addr[0]),
                                                 self.config.proxy_from):
            if not self.hold(c):
                return
            self.ep.register(c.fd, select.EPOLLIN | select.EPOLLRDHUP)
            c.state = PROXY_STATE
            self.schedule(c, now + buildconf.SMTPD_PROXY_TIMEOUT)
        else:
            self.admit(c, now)

    def hold(self, c):
        """c stays here a while (or hears a refusal): its socket object, made
        non-blocking, and our end's address; False if it is gone already."""
        try:
            c.sock = socket.socket(self.family, socket.SOCK_STREAM, 0, c.fd)
        except OSError:
            os.close(c.fd)
            return False
        c.sock.setblocking(False)
        try:
            c.local = c.sock.getsockname()[:2]
        except OSError:
            c.sock.close()
            return False
        self.clients[c.fd] = c
        return True

    def read_proxy(self, c, now):
        try:
            data = c.sock.recv(16 + proxy.LENGTH_MAX, socket.MSG_PEEK)
            found = proxy.header_in(data) if data else None
            if not data:
                raise proxy.Closed("connection closed before the PROXY header")
        except (proxy.ProxyError, OSError) as e:
            (log.debug if isinstance(e, proxy.Closed) else log.notice)(
                "refused %s: %s", c.peer[0], e)
            counters.count(refused("proxy"))
            return self.drop(c)
        if found is None:
            return
        length, names = found
        c.sock.recv(length)
        if names is None:               # the balancer's own: a health check
            counters.count(refused("health_check"))
            c.state = HEALTH
            self.say(c, chat.GREETING % self.config.myname)
            return self.schedule(c, now + buildconf.SMTPD_PROXY_TIMEOUT)
        c.peer, c.local, c.origin = names[0], names[1], "proxy"
        self.admit(c, now)

    def address(self, text):
        """(ip, network key, PassTable key) of an address's text, kept for
        the next connection from it (at most ADDRESSES of them); ValueError."""
        got = self.addresses.get(text)
        if got is None:
            ip = net.normalize_ip(text)
            if ip is None:
                raise ValueError("no address")
            got = ip, network_key(ip), address_key(ip)
            if len(self.addresses) >= ADDRESSES:
                self.addresses.clear()
            self.addresses[text] = got
        return got

    def admit(self, c, now):
        """Admission, the DNS lists' questions, the pause: who may stay."""
        try:
            c.ip, key, passkey = self.address(c.peer[0])
        except ValueError:
            return self.drop(c)
        c.exempt = net.member(c.ip, self.adm.exempt)
        held = self.per_net.get(key, 0)
        if held >= buildconf.SMTPD_SCREEN_PER_NETWORK and not c.exempt:
            if c.sock is None and not self.hold(c):
                return
            self.once(key, log.notice, "refused %s: %d connections from %s held already "
                      "(SMTPD_SCREEN_PER_NETWORK)", c.ip, held, network_text(key))
            counters.count(refused("network"))
            return self.refuse(c, chat.PER_NETWORK)
        rep = self.engine.reputation
        cached = rep.cached(c.ip) if rep is not None and not c.exempt else None
        if self.adm.rates is not None and not c.exempt \
                and not (rep is not None and rep.allowlisted(cached)):
            admitted, tell = self.adm.attempt(key)
            if not admitted:
                if c.sock is None and not self.hold(c):
                    return
                if tell:
                    log.notice("refused %s: more than %d new sessions from %s in %d seconds",
                               c.ip, buildconf.SMTPD_MAX_RATE, network_text(key),
                               buildconf.SMTPD_RATE_WINDOW)
                counters.count(refused("rate"))
                return self.refuse(c, chat.RATE)
        if self.at_once(c, passkey, rep, cached) or c.sock is None and not self.hold(c):
            return
        c.key = key                     # (held from here: it counts for its network)
        self.per_net[key] = held + 1
        if c.state is None:             # (one that sent a PROXY header is in the loop)
            self.ep.register(c.fd, select.EPOLLIN | select.EPOLLRDHUP)
        if rep is not None and not c.exempt:
            c.scoring = rep.start(c.ip, self.engine.resolver, None)
            if c.scoring.fileno() >= 0:
                c.asking = c.scoring.fileno()
                self.by_scoring[c.asking] = c
                self.ep.register(c.asking, select.EPOLLIN)
        pause = buildconf.SMTPD_GREET_PAUSE / 1000.0
        if c.exempt or not pause or self.known(c.ip):
            pause = 0.0
        elif self.stressed:
            pause /= 3              # postscreen's 6 s, 2 s under stress
        c.paused = pause > 0
        c.state, c.pause_end = PAUSE, now + pause
        self.pause_step(c, now)

    def at_once(self, c, passkey, rep, cached):
        """postscreen's "PASS OLD": a client that had mail accepted here in
        the last SMTPD_SCREEN_ALLOW_TTL seconds goes to an idle worker before
        its greeting, which the worker sends -- not under stress, not when
        others wait, and with DNS lists only when its score is cached (and
        below the threshold).  The pause and EHLO here would only cost it."""
        if self.stressed or self.queue or not self.adm.old(passkey):
            return False
        if rep is not None and not c.exempt:
            if cached is None or cached >= rep.threshold:
                return False
            c.score, c.allowlisted = cached, rep.allowlisted(cached)
        while True:
            w = self.idle_worker()
            if w is None:
                return False
            if self.hand(w, c, greeted=False):
                return True

    def known(self, ip):
        if self.passes is None or not buildconf.SMTPD_SCREEN_ALLOW_TTL:
            return False
        return self.passes.get(ip, time.time()) is not None

    def pause_step(self, c, now):
        """While paused: greet once the pause is over and the lists are in
        (or silent too long); a score that allow-lists ends the pause."""
        s = c.scoring
        if s is not None and s.done:
            self.forget_scoring(c)          # finish() closes its socket
            if self.engine.reputation.allowlisted(self.engine.reputation.finish(s)):
                c.pause_end = now
        due = s is not None and s.waiting()
        if now < c.pause_end or due:
            if due:
                s.maybe_resend(now)
            return self.schedule(c, min(c.pause_end if now < c.pause_end else s.until,
                                        s.resend_at() if due else c.pause_end))
        self.greet(c, now)

    def greet(self, c, now):
        if c.scoring is not None:
            if not self.judge_reputation(c):
                return
            c.scoring = None            # (judged, its socket closed)
        if buildconf.SMTPD_FORBID_UNAUTH_PIPELINING and self.waiting_input(c):
            return self.out_of_sync(c, "CONNECT")
        n = self.sessions[c.key] + self.board.sessions(c.key)
        if n >= buildconf.SMTPD_MAX_PER_IP:
            if not c.rechecked:
                # One of those counted may have hung up in the event we have
                # not read yet (a client that reconnects at once after its
                # QUIT): ask again after those are read, then refuse.
                c.rechecked = True
                return self.schedule(c, now + CAP_RECHECK)
            log.notice("refused %s: %d sessions from %s already", c.ip, n,
                       network_text(c.key))
            counters.count(refused("sessions"))
            return self.refuse(c, chat.PER_NETWORK)
        if c.paused and self.passes is not None and buildconf.SMTPD_SCREEN_ALLOW_TTL:
            self.passes.put(c.ip, PassTable.PAUSED, ttl=buildconf.SMTPD_SCREEN_ALLOW_TTL,
                            now=time.time())
        c.state = COMMANDS
        self.sessions[c.key] += 1
        self.say(c, chat.GREETING % self.config.myname)
        self.schedule(c, now + self.command_timeout())

    def judge_reputation(self, c):
        rep, s = self.engine.reputation, c.scoring
        self.forget_scoring(c)
        c.score = rep.finish(s)
        if c.score >= rep.threshold:
            log.notice("dnsbl: refused %s: score %d (threshold %d): %s",
                       c.where, c.score, rep.threshold, s.detail())
            counters.count(refused("dnsbl"))
            self.refuse(c, chat.REPUTATION % c.ip)
            return False
        if c.score:
            log.info("dnsbl: %s scores %d: %s%s", c.where, c.score, s.detail(),
                     " (allow-listed)" if rep.allowlisted(c.score) else "")
        c.allowlisted = rep.allowlisted(c.score)
        return True

    # -- what a held client sends --

    def readable(self, c):
        now = time.monotonic()
        if c.state == PROXY_STATE:
            return self.read_proxy(c, now)
        try:
            data = c.sock.recv(READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            return self.hangup(c, now)
        if c.state == PAUSE:
            return self.pregreet(c, data)
        c.buf += data
        if len(c.buf) > handoff.UNREAD_MAX:
            counters.count(refused("too_long"))
            return self.refuse(c, chat.NOT_AVAILABLE)
        if c.state in (COMMANDS, HEALTH):
            self.commands(c, now)

    def hangup(self, c, now):
        log.info("hangup: %s hung up after %.1f s in %s", c.where or c.peer[0],
                 now - c.since, c.state.lower())
        counters.count(HUNG_UP)
        self.drop(c)

    def commands(self, c, now):
        """The commands the front stage answers; the first other one (or a
        line a session refuses) waits for a worker, unread."""
        while c.fd in self.clients and c.state in (COMMANDS, HEALTH):
            end = c.buf.find(b"\r\n")
            if end < 0:
                if len(c.buf) > LINE_MAX:
                    return self.wait_for_worker(c, now)
                return
            line = c.buf[:end]
            verb = line.split(b" ", 1)[0].upper()
            if c.state == HEALTH:
                c.buf = c.buf[end + 2:]
                self.health(c, verb, line)
                continue
            if len(line) + 2 > LINE_MAX or verb not in ANSWERED or c.answered >= ANSWERED_MAX \
                    or not PRINTABLE.match(line) \
                    or verb in (b"HELO", b"EHLO") and (c.helo is not None or (
                        self.config.paranoid and b" " in line[5:].strip())):
                return self.wait_for_worker(c, now)     # the session says what it says
            c.answered += 1
            verb = verb.decode()
            c.buf = c.buf[end + 2:]
            if buildconf.SMTPD_FORBID_UNAUTH_PIPELINING and verb != "QUIT" \
                    and (verb in chat.ENDS_GROUP or not c.esmtp) and self.waiting_input(c):
                return self.out_of_sync(c, verb)
            self.answer(c, verb, line[5:].decode("latin-1").strip())
            if c.fd in self.clients:
                self.schedule(c, now + self.command_timeout())

    def answer(self, c, verb, arg):
        if verb in ("HELO", "EHLO"):
            c.helo, c.esmtp = arg, verb == "EHLO"
            pleased = chat.PLEASED % (self.config.myname, host_chars(arg))
            if c.esmtp:
                pleased = pleased.with_lines(chat.keywords(
                    self.config.maxsize, self.engine.tls_context is not None))
            self.say(c, pleased)
        elif verb == "QUIT":
            log.info("disconnect: %s said %sQUIT after %.1f s, all in the front stage", c.where,
                     '%s "%s", then ' % ("EHLO" if c.esmtp else "HELO", escape(c.helo))
                     if c.helo is not None else "", time.monotonic() - c.since)
            counters.count(QUIT)
            self.say(c, chat.CLOSING)
            self.drop(c)
        else:
            self.say(c, chat.OK)

    def health(self, c, verb, line):
        """A balancer's health check: HELO, EHLO, NOOP, RSET get 250, QUIT
        221; anything else 421 (its connection carries no client).  Logged
        at debug (every few seconds, all day)."""
        if verb in (b"HELO", b"EHLO"):
            log.debug('health check from %s: %s "%s"', c.peer[0], verb.decode(),
                      chat_escape(line[5:].strip()))
        if verb in (b"HELO", b"EHLO", b"NOOP", b"RSET"):
            self.say(c, chat.OK)
        else:
            self.refuse(c, chat.CLOSING if verb == b"QUIT" else chat.NOT_AVAILABLE)

    def wait_for_worker(self, c, now):
        """Into the queue for a worker.  From now on the client's input
        stays in its socket (the worker reads it, whatever its size): only
        its hangup is watched."""
        c.state, c.waiting_since = WAITING, now
        self.ep.modify(c.fd, select.EPOLLRDHUP)
        self.queue.append(c)
        self.schedule(c, now + (min(buildconf.SMTPD_STRESS_TIMEOUT, buildconf.SMTPD_SCREEN_WAIT)
                                if self.stressed else buildconf.SMTPD_SCREEN_WAIT))

    def pregreet(self, c, data):
        log.notice("pregreet: %s talked before the greeting: %s", c.where,
                   chat_escape(data[:60]))
        counters.count(refused("pregreet"))
        self.refuse(c, chat.PREGREET)

    def out_of_sync(self, c, after):
        log.notice("improper command pipelining after %s from %s: %s", after, c.where,
                   chat_escape(c.buf[:60] or self.peek(c)[:60]))
        counters.count(refused("pipelining"))
        self.refuse(c, chat.OUT_OF_SYNC)

    def timeout(self, c, now):
        if c.state == PAUSE:
            return self.pause_step(c, now)
        if c.state == PROXY_STATE:
            log.notice("refused %s: no complete PROXY header within %d seconds", c.peer[0],
                       buildconf.SMTPD_PROXY_TIMEOUT)
            counters.count(refused("proxy"))
            return self.drop(c)
        if c.state != HEALTH:
            counters.count(refused("worker_wait" if c.state == WAITING else "command_timeout"))
            log.info("timeout: %s %s after %.1f s%s", c.where, "waited for a worker"
                     if c.state == WAITING else "sent no command", now - c.since,
                     " (stress)" if self.stressed else "")
        self.refuse(c, chat.NOT_AVAILABLE)

    # -- stress --

    def command_timeout(self):
        return min(buildconf.SMTPD_STRESS_TIMEOUT, buildconf.READ_TIMEOUT) if self.stressed \
            else buildconf.READ_TIMEOUT

    def judge_stress(self):
        held, limit = len(self.clients), buildconf.SMTPD_SCREEN_MAX
        busy, slots = self.board.count(self.board.BUSY), self.config.maxchildren
        if not self.stressed and (held >= 0.75 * limit or busy >= 0.9 * slots):
            self.stressed = True
            self.adm.stress.set(True)
            log.notice("stress: %d connections held (of %d), %d of %d workers busy: "
                       "shorter timeouts", held, limit, busy, slots)
        elif self.stressed and held < 0.5 * limit and busy < 0.7 * slots:
            self.stressed = False
            self.adm.stress.set(False)
            log.notice("stress over: %d connections held, %d workers busy", held, busy)

    # -- plumbing --

    def say(self, c, reply):
        if not chat.send(c.sock, reply, chat.enhanced(c.esmtp)):
            self.drop(c)

    def refuse(self, c, reply):
        """A last reply, then the connection is closed -- after a linger
        when the client sent what we have not read."""
        self.say(c, reply)
        if c.fd in self.clients and self.waiting_input(c):
            return self.linger(c)
        self.drop(c)

    def linger(self, c):
        """Half-close, and read what comes for LINGER seconds: closing with
        unread input resets the connection, and the reset can destroy our
        last reply before the client reads it."""
        self.forget(c)
        try:
            c.sock.shutdown(socket.SHUT_WR)
            self.ep.register(c.fd, select.EPOLLIN | select.EPOLLRDHUP)
        except OSError:
            return c.sock.close()
        self.lingering[c.fd] = c.sock
        self.linger_queue.append((time.monotonic() + LINGER, c.fd, c.sock))

    def discard(self, fd):
        sock = self.lingering[fd]
        try:
            while sock.recv(READ):
                pass
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.end_linger(fd)

    def end_linger(self, fd):
        sock = self.lingering.pop(fd)
        try:
            self.ep.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass
        sock.close()

    def waiting_input(self, c):
        return bool(c.buf) or bool(self.peek(c))

    def peek(self, c):
        try:
            return c.sock.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            return b""

    def forget_scoring(self, c):
        """The DNS lists' socket out of the loop (before it is closed: its
        number is soon another's)."""
        if c.asking >= 0:
            self.by_scoring.pop(c.asking, None)
            try:
                self.ep.unregister(c.asking)
            except (KeyError, ValueError, OSError):
                pass
            c.asking = -1

    def forget(self, c):
        """No longer ours: out of every table (the caller closes or passes it)."""
        if self.clients.pop(c.fd, None) is None:
            return
        if c.state is not None:         # (None: refused at admission, never in the loop)
            try:
                self.ep.unregister(c.fd)
            except (KeyError, ValueError, OSError):
                pass
        if c.scoring is not None:
            self.forget_scoring(c)
            c.scoring.close()
        if c.key is not None:
            count_down(self.per_net, c.key)
            if c.state in (COMMANDS, WAITING):
                count_down(self.sessions, c.key)

    def drop(self, c):
        self.forget(c)
        try:
            if c.sock is None:
                os.close(c.fd)          # (never held: a bare descriptor)
            else:
                c.sock.close()
        except OSError:
            pass

    def once(self, what, fn, fmt, *args):
        now = time.monotonic()
        if now - self.logged.get(what, -LOG_EVERY) >= LOG_EVERY:
            if len(self.logged) > 4096:
                self.logged.clear()
            self.logged[what] = now
            fn(fmt, *args)

    def stop(self):
        """smtpd stops: no more connections; those held get 421."""
        self.stopping = True
        self.stop_listening()
        for c in list(self.clients.values()):
            counters.count(refused("stopping"))
            self.refuse(c, chat.NOT_AVAILABLE)

    def drain(self, why):
        """A new front stage takes over (new settings), or the master is
        gone (a new one may bind the port): stop accepting, see the clients
        held through as ever (with the workers we have), then end."""
        if not self.draining:
            log.info("front stage: %s; no new connections, passing on the %d held",
                     why, len(self.clients))
        self.draining = True
        self.stop_listening()

    def stop_listening(self):
        if self.listen_fd < 0:
            return
        try:
            self.ep.unregister(self.listen_fd)
        except (KeyError, ValueError, OSError):
            pass
        self.listener.close()
        self.listen_fd = -1         # (its number is soon a client's)

    def close_all(self):
        for c in list(self.clients.values()):
            self.refuse(c, chat.NOT_AVAILABLE)
        if self.stressed:
            self.adm.stress.set(False)
        if self.crowded:
            self.adm.stress.set_crowded(False)
        return os.EX_OK


HELD = ("smtpd_front_connections",)
PASSED = ("smtpd_connections", "accepted", "")
HUNG_UP = ("smtpd_connections", "closed", "hangup")
QUIT = ("smtpd_connections", "closed", "quit")


def refused(reason):
    """The counter of connections the front stage refused for reason."""
    return ("smtpd_connections", "refused", reason)


def count_down(counter, key):
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def chat_escape(data):
    return escape(data.decode("latin-1"), 60)


def raise_file_limit():
    """Root, before the jail: an open-file limit for SMTPD_SCREEN_MAX
    connections (two descriptors each while the DNS lists answer) and the
    rest; without root, the hard limit at most (logged)."""
    want = 2 * buildconf.SMTPD_SCREEN_MAX + FILES_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
        return
    except (ValueError, OSError):
        pass
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    log.warn("open-file limit %d (want %d for SMTPD_SCREEN_MAX %d): the front stage "
             "refuses connections with 421 past it", resource.getrlimit(
                 resource.RLIMIT_NOFILE)[0], want, buildconf.SMTPD_SCREEN_MAX)


class Handle:
    """The master's end of the front stage: start() forks it -- into the
    jail, sandboxed, off the terminal, as a worker is -- with the listener;
    add() gives it a worker's hand-over socket; stop() asks it to stop
    accepting.  The master never reads a client's octets: only b"N"."""

    def __init__(self, config, close_in_child, stderr):
        self.config, self.close_in_child, self.stderr = config, close_in_child, stderr
        self.pid = self.sock = None
        self.row = 0            # its row of the counters (the master's choice)
        self.started = 0.0      # time.monotonic() of the last start()

    def start(self, engine, listener, adm):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            status = os.EX_SOFTWARE
            try:
                ours.close()
                process.close_all(self.close_in_child())
                process.child_signals(signal.SIGTERM, signal.SIGCHLD)
                process.leave_terminal(self.stderr and self.stderr.w)
                process.set_title("smtpd: screen")
                log.log.role = "screen: "
                counters.use_row(self.row)
                enter_jail(self.config)
                status = Screen(self.config, engine, listener, theirs, adm).run()
            except BaseException as e:      # noqa: B036 -- a child never returns
                log.crit("front stage: %s: %s", type(e).__name__, e)
            os._exit(status)
        theirs.close()
        ours.setblocking(False)
        self.pid, self.sock, self.started = pid, ours, time.monotonic()
        return self

    def add(self, hand, slot):
        """Give the screen a worker's hand-over socket (the caller then
        closes its copy); False if it could not."""
        if self.sock is None:
            return False
        try:
            self.sock.sendmsg([b"W%d" % slot], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                 array.array("i", [hand.fileno()]))],
                              socket.MSG_DONTWAIT)
            return True
        except OSError as e:
            log.err("handing worker %d's socket to the front stage: %s", slot, e.strerror)
            return False

    def words(self):
        """What the screen said (b"N"...); None once it is gone."""
        out = b""
        while True:
            try:
                data = self.sock.recv(16)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError:
                return None
            if not data:
                return None
            out += data

    def stop(self):
        self.tell(b"Q")

    def drain(self):
        self.tell(b"D")

    def tell(self, word):
        try:
            self.sock.send(word, socket.MSG_DONTWAIT)
        except (OSError, AttributeError):
            pass

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
