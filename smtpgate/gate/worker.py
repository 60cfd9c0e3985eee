"""worker - smtpd -D: one pre-forked, jailed worker process

DESCRIPTION
    Worker serves the clients the front stage (screen.py) passes to it:
    it says READY on its hand-over socket, waits for a client (handoff.py)
    or a word from the master ("Q": leave), checks the client's network
    against SMTPD_MAX_PER_IP on the scoreboard (421 if it has that many
    sessions already), and runs the session (connection.serve) from where
    the front stage left it -- greeted, maybe after HELO or EHLO, or not
    yet greeted (a client passed at once) -- with its kept filter
    connections (milter.Keeper); a message accepted puts the client's
    address in the front stage's PassTable (admission.delivered).  After
    SMTPD_MAX_USE sessions, or asked to, it leaves: it says LEAVING, serves any client already on
    its way, and exits once the front stage has closed its end.  It tells
    the master ("N") when spare workers run low.  If the master dies, it
    serves what the front stage still passes on (that one accepts no more),
    and leaves when the front stage ends.  master.py forks it and puts it
    in the jail first; it never accepts a connection itself.
"""

import os
import select
import socket

import buildconf
from smtpgate import log
from smtpgate.gate import admission, chat, handoff, milter
from smtpgate.gate.admission import Scoreboard
from smtpgate.gate.connection import Connection, serve
from smtpgate.net import normalize_ip

LEAVE_WAIT = 2.0        # seconds the front stage has to close our end when we leave
WAITED_LONG = 1.0       # a client that waited this long for a worker is logged


class Worker:
    """A jailed worker: wait for a client from the front stage or a word
    from the master, check the client's network against SMTPD_MAX_PER_IP,
    serve."""

    def __init__(self, config, engine, ctrl, hand, adm, slot, family=None):
        self.config, self.engine = config, engine
        self.ctrl, self.hand = ctrl, hand
        self.ctrl_fd, self.hand_fd = ctrl.fileno(), hand.fileno()
        self.family = family            # the listener's: its clients' sockets
        self.adm, self.board, self.slot = adm, adm.board, slot
        self.poller = select.poll()
        self.poller.register(ctrl.fileno(), select.POLLIN)
        self.poller.register(hand.fileno(), select.POLLIN)
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
        """(Passed, socket) of the next client, or None when it is time to
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
            return passed, sock

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
        return False

    def serve(self, passed, sock):
        if passed.local is None:        # (passed at once: the front stage did not ask)
            try:
                passed.local = sock.getsockname()[:2]
            except OSError:
                sock.close()
                return os.EX_OK
        if not self.admit(sock, passed):
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

    def admit(self, sock, passed):
        """Claim our slot for this client's network, or refuse it with 421:
        SMTPD_MAX_PER_IP sessions at once.  (The front stage applied the
        rate limit and its own share.)"""
        try:
            ip = normalize_ip(passed.peer[0])
        except (ValueError, TypeError):
            sock.close()
            return False
        key = admission.network_key(ip)
        n = self.board.claim(self.slot, key, buildconf.SMTPD_MAX_PER_IP)
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
