"""worker - smtpd -D: one pre-forked, jailed worker process

DESCRIPTION
    Worker waits for a connection or a word from the master ("Q": leave),
    accepts for itself (idle workers share the listening socket with
    EPOLLEXCLUSIVE, so one connection wakes one worker), reads the PROXY
    header of a connection from a trusted proxy (proxy.py), asks admission.py
    whether the client may have a session (421 if not; a balancer's health
    check always may, uncounted), serves it (connection.serve) with its
    kept filter connections (milter.Keeper), and after SMTPD_MAX_USE
    sessions exits.  It tells the
    master ("N") when spare workers run low.  If the master dies it closes
    its copy of the listener at once (parent-death signal SIGUSR2), so a new
    master can bind while its session ends.  master.py forks it and puts it
    in the jail first.
"""

import errno
import os
import select
import signal
import socket
import time

import buildconf
from smtpgate import libc, log, net
from smtpgate.gate import admission, chat, client, milter
from smtpgate.gate.admission import Scoreboard
from smtpgate.gate.connection import Connection, serve
from smtpgate.net import normalize_ip



class Worker:
    """A jailed worker: wait for a connection or a word from the master,
    accept, check the client's address against SMTPD_MAX_PER_IP, serve."""

    def __init__(self, config, engine, ctrl, listener, adm, slot, master):
        self.config, self.engine = config, engine
        self.ctrl, self.listener = ctrl, listener
        self.adm, self.board, self.slot = adm, adm.board, slot
        self.orphaned = False
        # If the master dies, let go of the listening socket at once, so a
        # new master can bind it while this session ends.  (Set after the
        # jail: a change of credentials clears it.)
        signal.signal(signal.SIGUSR2, self.on_master_death)
        libc.set_parent_death_signal(signal.SIGUSR2)
        if os.getppid() != master:
            self.on_master_death()
        self.poller = select.epoll()
        # EPOLLEXCLUSIVE: one connection wakes one idle worker, not all.
        self.poller.register(listener.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        self.poller.register(ctrl.fileno(), select.EPOLLIN)
        self.keeper = milter.Keeper()   # its filters' connections serve session after session

    def on_master_death(self, *a):
        self.orphaned = True
        self.listener.close()

    def run(self):
        used = 0
        while used < buildconf.SMTPD_MAX_USE and not self.orphaned:
            self.board.set(self.slot, Scoreboard.IDLE)
            conn = self.next_connection()
            if conn is None:
                return os.EX_OK
            sock, addr = conn
            try:
                local = sock.getsockname()[:2]
            except OSError:
                local = None
            local, addr, origin = client.who(self.config, sock, local, addr[:2])
            if addr is None:
                sock.close()
                continue
            if not self.admit(sock, addr, origin == "health"):
                continue
            used += 1
            status = serve(self.config, self.engine, Connection(
                sock.fileno(), sock.fileno(), sock=sock, local=local, peer=addr,
                origin=origin, on_end=self.release, keeper=self.keeper))
            sock.close()
            if status == os.EX_SOFTWARE:
                return status
        return os.EX_OK

    def next_connection(self):
        """(socket, peer address), or None when it is time to leave."""
        ctrl = self.ctrl.fileno()
        while not self.orphaned:
            events = self.poller.poll()
            if any(fd == ctrl for fd, _ in events):
                return None         # "Q", or the master is gone
            try:
                return self.listener.accept()
            except (BlockingIOError, InterruptedError):
                continue            # another worker took it
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.err("accept: %s", e.strerror)
                    time.sleep(0.1)
                    continue
                return None         # the listener was shut down or closed
        return None

    def release(self):
        """The session is over (called before its last reply goes out): the
        client's address no longer counts against SMTPD_MAX_PER_IP, so a
        client that reconnects at once is not refused."""
        self.board.set(self.slot, Scoreboard.ENDING)

    def admit(self, sock, addr, health_check=False):
        """Claim our slot for this client's network, or refuse it with 421:
        over SMTPD_MAX_RATE new sessions (unless its cached DNS lists' score
        allow-lists it), or SMTPD_MAX_PER_IP at once.  A balancer's health
        check (PROXY LOCAL, or no client in its header) is no client: never
        counted against the rate or the cap, whatever its number."""
        if health_check:
            self.board.set(self.slot, Scoreboard.BUSY)
            self.want_spares()
            return True
        ip = normalize_ip(addr[0])
        key = admission.network_key(ip)
        rep = self.engine.reputation
        if self.adm.rates is not None and not net.member(ip, self.adm.exempt) \
                and not (rep is not None and rep.allowlisted(rep.cached(ip))):
            admitted, tell = self.adm.attempt(key)
            if not admitted:
                if tell:
                    log.notice("refused %s: more than %d new sessions from %s in %d seconds",
                              ip, buildconf.SMTPD_MAX_RATE, admission.network_text(key),
                              buildconf.SMTPD_RATE_WINDOW)
                return refuse(sock, chat.RATE)
        n = self.board.claim(self.slot, key, buildconf.SMTPD_MAX_PER_IP)
        if n >= buildconf.SMTPD_MAX_PER_IP:
            log.notice("refused %s: %d sessions from %s already", ip, n,
                      admission.network_text(key))
            return refuse(sock, chat.PER_NETWORK)
        self.want_spares()
        return True

    def want_spares(self):
        """Tell the master when spare workers run low (it forks more)."""
        if self.board.count(Scoreboard.IDLE) < buildconf.SMTPD_PREFORK:
            try:
                self.ctrl.send(b"N", socket.MSG_DONTWAIT)
            except OSError:
                pass


def refuse(sock, reply):
    chat.send(sock, reply)
    sock.close()
    return False
