"""worker - smtpd -D: one pre-forked, jailed worker process

DESCRIPTION
    Worker serves the clients the front stage (screen.py) passes to it:
    it says READY on its hand-over socket, waits for a client (handoff.py),
    a new connection (take()) or a word from the master ("Q": leave).  Idle,
    it waits on the listener ahead of the front stage (EPOLLEXCLUSIVE: one
    connection wakes one waiter, the front stage last): a connection from a
    client that had mail accepted here it serves itself, without the front
    stage's hop (where the front stage would pass it at once: not under
    stress, no PROXY, DNS lists or rate table), and any other it gives the
    front stage unread (GIVEN), or refuses with 421 when the front stage is
    out of descriptors.  The scoreboard settles a race with the front
    stage: a slot it reserved for a hand-over is not claimed for a
    connection accepted meanwhile, which goes to the front stage.

    It checks the client's network against SMTPD_MAX_PER_IP on the
    scoreboard (421 if it has that many sessions already), and runs the
    session (connection.serve) from where the front stage left it --
    greeted, maybe after HELO or EHLO, or not yet greeted (a client passed
    at once) -- with its kept filter connections (milter.Keeper); a
    message accepted puts the client's address in the front stage's
    PassTable (admission.delivered).  After SMTPD_MAX_USE sessions, or
    asked to, it leaves: it says LEAVING, serves any client already on its
    way, and exits once the front stage has closed its end.  It tells the
    master ("N") when spare workers run low.  If the master dies, it serves
    what the front stage still passes on (that one accepts no more), and
    leaves when the front stage ends, accepting nothing more itself (nor
    once a newer front stage was started: Stress.generation).  master.py
    forks it and puts it in the jail first.
"""

import errno
import os
import select
import socket
import time

import buildconf
from smtpgate import counters, log
from smtpgate.gate import admission, chat, handoff, milter
from smtpgate.gate.admission import Scoreboard
from smtpgate.gate.connection import Connection, serve
from smtpgate.net import normalize_ip

LEAVE_WAIT = 2.0        # seconds the front stage has to close our end when we leave
WAITED_LONG = 1.0       # a client that waited this long for a worker is logged
TAKEN = ("smtpd_connections", "accepted", "")       # (the front stage counts those it passes)
CROWDED = ("smtpd_connections", "refused", "descriptors")
LOG_EVERY = 60          # seconds between two lines about connections we could not give
GIVE_WAIT = 2.0         # seconds we wait for the front stage to read what we give it


class Worker:
    """A jailed worker: wait for a client from the front stage or a word
    from the master, check the client's network against SMTPD_MAX_PER_IP,
    serve."""

    def __init__(self, config, engine, ctrl, hand, adm, slot, listener=None):
        self.config, self.engine = config, engine
        self.ctrl, self.hand, self.listener = ctrl, hand, listener
        self.ctrl_fd, self.hand_fd = ctrl.fileno(), hand.fileno()
        self.family = listener.family if listener is not None else None    # its clients'
        self.adm, self.board, self.slot = adm, adm.board, slot
        self.generation = adm.stress.generation()      # our front stage's
        self.poller = select.epoll()
        self.poller.register(ctrl.fileno(), select.EPOLLIN)
        self.poller.register(hand.fileno(), select.EPOLLIN)
        self.listen_fd = -1
        self.gave_up = -LOG_EVERY       # when a connection could not be given (logged)
        if listener is not None and self.may_take():
            self.listen_fd = listener.fileno()
            # (one connection wakes one waiting worker, or the front stage last)
            self.poller.register(self.listen_fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        self.keeper = milter.Keeper()   # its filters' connections serve session after session
        self.used = 0

    def run(self):
        while self.used < buildconf.SMTPD_MAX_USE:
            self.board.set(self.slot, Scoreboard.IDLE)
            got = self.next_client()
            if got is None:
                break
            status = self.serve(*got)
            if status == os.EX_SOFTWARE:
                return status
        return self.leave()

    def next_client(self):
        """(Passed, socket, admitted) of the next client -- admitted: one we
        accepted ourselves, our slot claimed -- or None when it is time to
        leave (the master said so, or it or the front stage is gone)."""
        try:
            self.hand.send(handoff.READY)
        except OSError:
            return None
        while True:
            try:
                events = self.poller.poll()
            except InterruptedError:
                continue
            fds = [fd for fd, _ in events]
            if self.ctrl_fd in fds and self.told_to_leave():
                return None
            if self.hand_fd not in fds:
                if self.listen_fd in fds:
                    got = self.take()
                    if got is not None:
                        return got
                continue
            try:
                passed, sock = handoff.receive(self.hand, self.family)
            except handoff.Bad as e:
                log.err("a hand-over from the front stage: %s", e)
                return self.next_client()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                log.err("a hand-over from the front stage: %s", e.strerror)
                return None
            if passed is None:
                return None         # the front stage is gone: a new one has new workers
            return passed, sock, False

    def may_take(self):
        """Do we accept clients ourselves (those passed at once before,
        postscreen's PASS OLD, without the front stage's hop)?  Only where
        the front stage would pass them at once on its own: not under
        stress (take()), not once a new front stage has its own workers
        (new settings: take()), and never with what only it knows -- a
        PROXY header, DNS lists' scores, the rate table."""
        adm = self.adm
        return (adm.passes_here is not None and adm.rates is None and not self.config.proxy_from
                and self.engine.reputation is None)

    def take(self):
        """A connection the listener woke us for: (Passed, socket, True)
        when it is ours to serve -- a client passed at once before, our
        slot claimed -- else None (it went to the front stage, or was
        refused, or another took it)."""
        try:
            fd, addr = self.listener._accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            if e.errno not in (errno.ECONNABORTED, errno.EPROTO):
                self.stop_taking()      # (EINVAL: the master shut it down; EMFILE...)
            return None
        peer = addr[:2]
        current = self.adm.stress.generation() == self.generation
        if not current:                 # a new front stage, new workers: theirs now
            self.stop_taking()
        try:
            ip = normalize_ip(peer[0])
        except ValueError:
            ip = None
        if ip is None or not current or self.adm.stress.on() \
                or not self.adm.old(admission.address_key(ip)):
            return self.give(fd, peer)
        sock = socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
        passed = handoff.Passed(peer=peer, greeted=False)
        admitted = self.admit(sock, passed, ip, accepted=True)
        if admitted is None:            # the front stage is sending us one: it has this one
            self.give(sock.detach(), peer)
            return None
        if not admitted:
            return None
        counters.count(TAKEN)
        return passed, sock, True

    def give(self, fd, peer):
        """A connection we accepted to the front stage (a new client for
        it); 421 when it is out of descriptors, or has not read our last
        ones for GIVE_WAIT seconds (behind in a storm: meanwhile we accept
        nothing more, and what comes waits in the kernel's queue, as it
        would for the front stage)."""
        try:
            if self.adm.stress.crowded():
                counters.count(CROWDED)
                chat.send(fd, chat.NOT_AVAILABLE)
            else:
                try:
                    handoff.give(self.hand, fd, peer)
                except BlockingIOError:
                    p = select.poll()
                    p.register(self.hand_fd, select.POLLOUT)
                    p.poll(GIVE_WAIT * 1000)
                    handoff.give(self.hand, fd, peer)
        except OSError as e:        # (gone, or still behind: EAGAIN)
            now = time.monotonic()
            if now - self.gave_up >= LOG_EVERY:
                self.gave_up = now
                log.err("giving %s's connection to the front stage: %s; refusing with 421",
                        peer[0], e.strerror)
            counters.count(CROWDED)
            chat.send(fd, chat.NOT_AVAILABLE)
        os.close(fd)

    def stop_taking(self):
        if self.listen_fd >= 0:
            try:
                self.poller.unregister(self.listen_fd)
            except OSError:
                pass
            self.listen_fd = -1
            self.listener.close()       # (a new master may want the port)

    def told_to_leave(self):
        """A word from the master: "Q" (leave).  Its end of file (it died):
        go on serving the front stage, which passes on what it holds, then
        closes our socket (orphaned, it accepts no more)."""
        try:
            word = self.ctrl.recv(16, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            word = b""
        if word:
            return True
        self.poller.unregister(self.ctrl.fileno())
        self.stop_taking()
        return False

    def serve(self, passed, sock, admitted=False):
        if passed.local is None:        # (passed at once: the front stage did not ask)
            try:
                passed.local = sock.getsockname()[:2]
            except OSError:
                self.release()
                sock.close()
                return os.EX_OK
        if not admitted and not self.admit(sock, passed):
            return os.EX_OK
        self.used += 1
        if passed.waited >= WAITED_LONG:
            log.info("%s waited %.1f s in the front stage for a worker", passed.peer[0],
                     passed.waited)
        try:
            return serve(self.config, self.engine, Connection(
                sock.fileno(), sock.fileno(), sock=sock, local=passed.local,
                peer=passed.peer, origin=passed.origin, greeted=passed.greeted, passed=passed,
                stress=self.adm.stress, on_end=self.release, keeper=self.keeper,
                on_message=self.adm.delivered))
        finally:
            sock.close()

    def leave(self):
        """Say LEAVING and serve what the front stage sent before it read
        that, until it closes our end (or LEAVE_WAIT)."""
        self.stop_taking()
        try:
            self.hand.send(handoff.LEAVING)
            self.hand.settimeout(LEAVE_WAIT)
            while True:
                passed, sock = handoff.receive(self.hand, self.family)
                if passed is None:
                    break
                self.board.set(self.slot, Scoreboard.IDLE)
                self.serve(passed, sock)
        except (OSError, handoff.Bad):
            pass
        return os.EX_OK

    def release(self):
        """The session is over (called before its last reply goes out): the
        client's address no longer counts against SMTPD_MAX_PER_IP, so a
        client that reconnects at once is not refused."""
        self.board.set(self.slot, Scoreboard.ENDING)

    def admit(self, sock, passed, ip=None, accepted=False):
        """Claim our slot for this client's network, or refuse it with 421:
        SMTPD_MAX_PER_IP sessions at once.  (The front stage applied the
        rate limit and its own share.)  None: we accepted it ourselves, but
        the front stage has reserved us for one of its own (claim())."""
        if ip is None:
            try:
                ip = normalize_ip(passed.peer[0])
            except (ValueError, TypeError):
                sock.close()
                return False
        key = admission.network_key(ip)
        n = self.board.claim(self.slot, key, buildconf.SMTPD_MAX_PER_IP, accepted)
        if n is None:
            return None
        if n >= buildconf.SMTPD_MAX_PER_IP:
            log.notice("refused %s: %d sessions from %s already", ip, n,
                       admission.network_text(key))
            chat.send(sock, chat.PER_NETWORK, chat.enhanced(passed.esmtp))
            sock.close()
            return False
        self.want_spares()
        return True

    def want_spares(self):
        """Tell the master when spare workers run low (it forks more)."""
        if self.board.count(Scoreboard.IDLE) < buildconf.SMTPD_PREFORK:
            try:
                self.ctrl.send(b"N", socket.MSG_DONTWAIT)
            except OSError:
                pass
