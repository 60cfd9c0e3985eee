"""milter - the milter client: filters judge each message before our 250

DESCRIPTION
    SMTPD_MILTERS (smtpd -f) names filters -- rspamd's proxy worker,
    OpenDKIM, OpenDMARC, clamav-milter -- that speak Sendmail's milter
    protocol, version 6, as Postfix speaks it.  A session opens one TCP
    connection to each filter and negotiates (SMFIC_OPTNEG): the changes the
    filter may ask for, the events it does not want or will not answer, its
    own macro lists.  A pre-fork worker keeps that connection for its next
    session (a Keeper) when the session ended straight after a message the
    filter let through: SMFIC_QUIT_NC instead of SMFIC_QUIT, the one point
    where libmilter takes it; the next session starts at SMFIC_CONNECT,
    without a new negotiation.  A kept connection the filter closed or spoke
    on while idle, or older than SMTPD_MILTER_KEEP_IDLE seconds, is not
    used.  One that fails before the session's first MAIL (at CONNECT, also
    one that does not answer within KEPT_WAIT seconds) is replaced by a new
    one at once, and the session's events so far are reported again on it.
    Unless the filter merely closed it, this process then keeps no more of
    that filter's connections after a message it accepted (libmilter takes
    QUIT_NC only after a continue; rspamd accepts every clean message, and
    takes it), or none at all if the message was continued, or if a session
    begun on a kept connection fails later.  Then Milters reports the
    session's events to the filters, in the order configured: connect, HELO,
    MAIL, each RCPT the rules allowed, DATA, and at the end of the message
    its headers (not smtpd's own Received header), the end of the headers,
    the body in chunks of at most CHUNK octets, CRLF line ends, and the end
    of the message, where a filter may ask for changes (rewrite.py applies
    them).  RSET, a new HELO and the end of each transaction send ABORT; the
    end of the session QUIT (or QUIT_NC).  Macros, as Postfix names and
    sends them: MACROS.
VERDICTS
    continue: the next filter, then smtpd's own reply.  accept: this
    filter is done with the message (at connect or HELO: with the
    session).  reject: 550 5.7.1 Command rejected; tempfail: 451 4.7.1
    Service unavailable - try again later; replycode: the filter's own
    reply when it is one (4xx or 5xx, the enhanced code of the same class,
    CRLF between lines of one code), at most REPLY_LINES lines of
    REPLY_LINE octets, printable ASCII; anything else gives 451 4.3.5.
    shutdown: 421, end of the session.  discard: accepted, then dropped.
    quarantine: accepted into hold/ (smtpq release).  A refusal at connect
    or HELO holds for the whole session, as in Postfix.  The first filter
    that refuses or discards decides; the later ones are not asked.
FAILURES
    A filter that cannot be reached, does not answer within its timeout
    (SMTPD_MILTER_CONNECT_TIMEOUT, _COMMAND_TIMEOUT, _CONTENT_TIMEOUT, each
    within the session's deadline), closes, sends a packet over PACKET_MAX
    octets, a reply that is not one, or a change it did not negotiate, is
    logged and closed: for the rest of the session it gives
    SMTPD_MILTER_DEFAULT_ACTION -- tempfail (451 4.7.1), reject (550 5.5.0)
    or accept (it is skipped).  SMFIR_PROGRESS restarts the wait, within
    the session's deadline.
SECURITY
    Runs in the jailed worker; filters are reached over TCP by address.
    Every answer is hostile input: bounded, checked, never a way to let in
    what the rules refused (rewrite.py checks added recipients again).
"""

import collections
import errno
import os
import select
import socket
import struct
import time

import buildconf
from smtpgate import counters, log
from smtpgate.deadline import of as deadline_of
from smtpgate.gate import chat, rewrite
from smtpgate.gate.milterwire import (ABORT, ACTIONS, BODY, BODYEOB, Broken, CHUNK, CONNECT,
    DATA, EDITS, EOH, F_ADDHDRS, F_QUARANTINE, Gone, HEADER, HELO, LENGTH, MACRO, MACROS, MAIL,
    NOT_SENT, NO_REPLY, OPTNEG, OUT_MAX, PACKET_MAX, PROTOCOL, P_HDR_LEADSPC, P_NOBODY,
    P_NOHDRS, QUIT, QUIT_NC, RCPT, REPLY_LINE, REPLY_LINES, STAGE_NAMES, STAGE_OF, SYMLIST_MAX,
    VERSION, cstrings, lost, packet, parse_edit, smtp_reply)  # noqa: F401 (milter.X for the tests)
from smtpgate.text import visible

REJECT, TEMPFAIL, SHUTDOWN = chat.FILTER_REJECT, chat.FILTER_TEMPFAIL, chat.FILTER_SHUTDOWN


def timeout(kind):
    """Seconds a wait of kind may take (the constants of the moment: a
    reload may change them for the next workers)."""
    if kind == "kept":
        return min(KEPT_WAIT, buildconf.SMTPD_MILTER_COMMAND_TIMEOUT)
    return {"connect": buildconf.SMTPD_MILTER_CONNECT_TIMEOUT,
            "command": buildconf.SMTPD_MILTER_COMMAND_TIMEOUT,
            "content": buildconf.SMTPD_MILTER_CONTENT_TIMEOUT}[kind]


DEFAULTS = {"tempfail": TEMPFAIL, "reject": chat.FILTER_DOWN_REJECT, "accept": None}

# Filter states.
READY, ENVELOPE, DONE_MESSAGE, DONE = "ready", "envelope", "done-message", "done"


KEPT_WAIT = 1.0             # seconds a kept connection has to answer CONNECT


class Keeper:
    """A pre-fork worker's filter connections, kept from one session for
    its next (an inetd session's process ends with it: Keeper(False)).
    kept: endpoint text -> (socket, its poller, the negotiated actions,
    events, macro lists and names, how the last message ended ("continue"
    or "accept"), time.monotonic() when kept), one per filter: a worker
    serves one session at a time.  unkept: the endpoints where keeping
    failed, after what."""

    def __init__(self, on=True):
        self.on = on and buildconf.SMTPD_MILTER_KEEP_IDLE > 0
        self.kept = {}
        self.unkept = {"continue": set(), "accept": set()}


NOT_KEEPING = Keeper(False)


# An answer to the session: kind is "continue", "refuse" (reply: lines),
# "discard" or "shutdown"; source names the filter.
Answer = collections.namedtuple("Answer", "kind reply source")
CONTINUE = Answer("continue", None, None)


def verdict(a):
    """An Answer as the metrics and the message's record name it:
    continue, refuse, tempfail (a refusal of class 4), discard, shutdown."""
    if a.kind == "refuse" and a.reply is not None and a.reply.code < 500:
        return "tempfail"
    return a.kind


# -------------------------------------------------------------- filter ----

class Filter:
    """One filter's connection for one session, and where it stands."""

    def __init__(self, endpoint, default_action, deadline, keeper=NOT_KEEPING):
        self.endpoint, self.name = endpoint, endpoint.text
        self.keeper = keeper
        self.default = DEFAULTS[default_action]
        self.default_action = default_action
        self.deadline = deadline_of(deadline)
        self.sock = None
        self.rbuf = bytearray()
        self.out, self.nout = [], 0     # queued packets (queue())
        self.state = READY
        self.sticky = None          # what every event gets once DONE
        self.actions = self.events = 0
        self.lists = {}             # macro stage -> the names the filter asked for
        self.wanted = {}            # command -> [(name, its octets, "{name}")] to send
        self.skip_body = False
        self.held = None            # its quarantine's reason, this message
        self.poller = None
        self.kept = None            # kept from an earlier session: after "continue" or "accept"
        self.replay = None          # on a kept connection, before MAIL: the events answered
        self.reusable = None        # after a message let through, nothing sent since: the same

    # -- transport --

    def wait(self, kind):
        """Seconds the next wait may take: its timeout, within the session's."""
        return self.deadline.within(timeout(kind), Broken)

    def open(self):
        """Connect and negotiate, or take the connection an earlier session
        kept."""
        kept = self.keeper.kept.pop(self.endpoint.text, None)
        if kept is not None:
            sock, poller, *negotiated, how, since = kept
            if time.monotonic() - since <= buildconf.SMTPD_MILTER_KEEP_IDLE \
                    and not poller.poll(0):
                self.sock, self.poller = sock, poller
                self.actions, self.events, self.lists, self.wanted = negotiated
                self.state, self.kept, self.replay = ENVELOPE, how, []
                return
            sock.close()    # closed, spoken on or stale while it waited
        self.connect()

    def connect(self):
        e = self.endpoint
        # non-blocking from the start: every wait is our poll's, bounded by wait()
        sock = socket.socket(e.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            err = sock.connect_ex((e.host, e.port))
            if err == errno.EINPROGRESS:
                p = select.poll()
                p.register(sock, select.POLLOUT)
                if not p.poll(self.wait("connect") * 1000):
                    raise Broken("connect: timed out")
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise Broken("connect: %s" % os.strerror(err))
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self.negotiate()

    def queue(self, data, kind):
        """Packets that want no answer wait for the next that does (one
        write, not one per event), or for OUT_MAX octets."""
        self.out.append(data)
        self.nout += len(data)
        if self.nout >= OUT_MAX:
            self.flush(kind)

    def send(self, data, kind):
        """Write what is queued and data (a packet that wants its answer)."""
        if self.out:
            self.out.append(data)
            data, self.out, self.nout = b"".join(self.out), [], 0
        self.write(data, kind)

    def flush(self, kind):
        data, self.out, self.nout = b"".join(self.out), [], 0
        self.write(data, kind)

    def write(self, data, kind):
        """A filter that sent what nobody asked for (or closed) is out of
        step: Broken.  A round trip is this poll, a send, then recv()'s poll
        and read: no more system calls."""
        self.reusable = None
        if self.rbuf or self.poller.poll(0):
            if not self.rbuf and not self.recv(kind):
                raise Gone("the filter closed the connection")
            raise Broken("a packet nobody asked for")
        while data:
            try:
                n = self.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError as x:
                raise lost("write", x) from None
            data = data[n:]
            if data:
                self.writable(kind)

    def writable(self, kind):
        """Wait until the filter takes more (its window was full)."""
        p = select.poll()
        p.register(self.sock, select.POLLOUT)
        if not p.poll(self.wait(kind) * 1000):
            raise Broken("write: timed out")

    def recv(self, kind):
        while True:
            if not self.poller.poll(self.wait(kind) * 1000):
                raise Broken("timed out")
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                continue        # a wake-up with nothing to read; wait again
            except OSError as x:
                raise lost("read", x) from None
            self.rbuf += chunk
            return chunk

    def read_packet(self, kind):
        """The next packet: (command octet, data)."""
        buf = self.rbuf
        while len(buf) < 4:
            if not self.recv(kind):
                raise Gone("the filter closed the connection")
        (length,) = LENGTH.unpack_from(buf)
        if length < 1 or length > PACKET_MAX:
            raise Broken("packet length %d" % length)
        end = length + 4
        while len(buf) < end:
            if not self.recv(kind):
                raise Gone("the filter closed the connection")
        cmd, data = bytes(buf[4:5]), bytes(buf[5:end])
        del buf[:end]
        return cmd, data

    def close(self, polite=True):
        if self.sock is None:
            return
        how = self.reusable
        unkept = self.keeper.unkept
        if polite and how and self.keeper.on and self.name not in unkept[how] \
                and self.name not in unkept["continue"]:
            try:        # what is queued (an ABORT) is moot after QUIT_NC
                self.sock.send(packet(QUIT_NC))
            except OSError:
                pass
            else:
                self.keeper.kept.setdefault(self.name, (self.sock, self.poller, self.actions,
                                            self.events, self.lists, self.wanted, how,
                                            time.monotonic()))
                self.out, self.nout, self.sock = [], 0, None
                return
        if polite:
            try:       # a few octets, never waited for: the filter may be gone
                self.sock.send(b"".join(self.out) + packet(QUIT))
            except OSError:
                pass
        self.out, self.nout = [], 0
        self.rbuf.clear()
        self.sock.close()
        self.sock = None

    # -- protocol --

    def negotiate(self):
        self.send(packet(OPTNEG, struct.pack("!III", VERSION, ACTIONS, PROTOCOL)), "command")
        cmd, data = self.read_packet("command")
        if cmd != OPTNEG or len(data) < 12:
            raise Broken("no option negotiation (%r)" % cmd)
        version, actions, events = struct.unpack("!III", data[:12])
        if not 2 <= version <= VERSION:
            raise Broken("protocol version %d (we speak %d)" % (version, VERSION))
        if actions & ~ACTIONS:
            raise Broken("actions 0x%x beyond ours (0x%x)" % (actions, ACTIONS))
        self.actions, self.events = actions, events & PROTOCOL
        self.symlists(data[12:])
        self.wanted = {cmd: [(n, n.encode("latin-1"), "{%s}" % n)
                             for n in self.lists.get(stage, MACROS[stage])[:100]]
                       for cmd, stage in STAGE_OF.items()}
        self.state = ENVELOPE

    def symlists(self, data):
        """SMFIR_SETSYMLIST's lists: (stage, names) pairs after the masks."""
        if len(data) > SYMLIST_MAX:
            raise Broken("macro lists of %d octets" % len(data))
        while data:
            if len(data) < 5 or b"\0" not in data[4:]:
                raise Broken("malformed macro list")
            (stage,) = struct.unpack("!I", data[:4])
            names, _, data = data[4:].partition(b"\0")
            if stage in MACROS:
                self.lists[stage] = names.decode("latin-1").split()

    def macros(self, cmd, values):
        """The SMFIC_MACRO packet for cmd, or b"" when there is nothing to say.
        (On every event: the names' octets are made once, at negotiation.)"""
        wanted = self.wanted.get(cmd)
        if not wanted:
            return b""
        pairs = []
        for name, octets, braced in wanted:
            value = values[name] if name in values else values.get(braced)
            if value is not None:
                pairs += (octets, (value if value.__class__ is str else str(value))
                          .encode("latin-1", "replace"))
        return packet(MACRO, cmd + cstrings(*pairs)) if pairs else b""

    def event(self, cmd, payload, values, kind, edits=None):
        """Report one event; the filter's Answer (CONTINUE if it is not asked
        or will not answer).  Broken propagates."""
        if self.state != ENVELOPE:
            if self.state == DONE:
                return self.refusal(self.sticky)
            if self.state == DONE_MESSAGE and cmd not in (CONNECT, HELO):
                return CONTINUE
        if cmd == BODY and self.skip_body:
            return CONTINUE
        data = self.macros(cmd, values)
        events = self.events
        if not events & NOT_SENT[cmd]:
            data += packet(cmd, payload)
        elif not data:
            return CONTINUE
        if events & (NOT_SENT[cmd] | NO_REPLY[cmd]):
            self.queue(data, kind)
            return CONTINUE
        self.send(data, kind)
        return self.answer(cmd, kind, edits)

    def refusal(self, reply):
        return CONTINUE if reply is None else Answer("refuse", reply, self.name)

    def answer(self, cmd, kind, edits):
        """Read packets up to the filter's decision on cmd; changes at the
        end of the message go to edits."""
        while True:
            code, data = self.read_packet(kind)
            if code == b"c" and not data:
                return CONTINUE
            if code in EDITS or code == b"q":
                self.edit(cmd, code, data, edits)
                continue
            if code == b"p" and not data:
                continue                        # progress: wait again
            if code == b"y":
                return self.replied(cmd, data)
            if data:
                raise Broken("reply %r with %d octets of data" % (code, len(data)))
            if code == b"c":
                return CONTINUE
            if code == b"s":
                self.skip_body = cmd == BODY
                return CONTINUE
            if code == b"a":
                self.done_with(cmd, None)
                return CONTINUE
            if code == b"d":
                return self.discarded(cmd)
            if code in (b"r", b"t", b"4"):
                reply = {b"r": REJECT, b"t": TEMPFAIL, b"4": SHUTDOWN}[code]
                self.done_with(cmd, reply, accepted=False)
                return Answer("shutdown" if code == b"4" else "refuse", reply, self.name)
            raise Broken("unexpected reply %r after %s" % (code, STAGE_NAMES[cmd]))

    def edit(self, cmd, code, data, edits):
        if code == b"q":                # at any stage, as in Postfix
            if not self.actions & F_QUARANTINE:
                raise Broken("quarantine it did not negotiate")
            self.held = visible(data.rstrip(b"\0"), 200) or "quarantined"
            return
        if cmd != BODYEOB or edits is None:
            raise Broken("change %r before the end of the message" % code)
        if not self.actions & EDITS[code]:
            raise Broken("change %r it did not negotiate" % code)
        edits.add(parse_edit(code, data))       # checked now: rewrite.Invalid

    def replied(self, cmd, data):
        reply = smtp_reply(data)
        if reply is not None:
            reply = chat.policy(reply)
        else:
            log.warn("milter %s: malformed reply at %s: %s", self.name, STAGE_NAMES[cmd],
                        visible(data, 200))
            reply = chat.FILTER_BAD_REPLY
        self.done_with(cmd, reply, accepted=False)
        return Answer("refuse", reply, self.name)

    def discarded(self, cmd):
        if cmd in (CONNECT, HELO):
            log.warn("milter %s: discard is not a verdict for %s; ignored",
                        self.name, STAGE_NAMES[cmd])
            return CONTINUE
        self.state = DONE_MESSAGE
        return Answer("discard", None, self.name)

    def done_with(self, cmd, reply, accepted=True):
        """After accept or a refusal: at connect or HELO it holds for the
        session (libmilter hangs up); later, accept holds for the message
        and a refusal for that command."""
        if cmd in (CONNECT, HELO):
            self.state, self.sticky = DONE, reply
            self.close(polite=accepted)
        elif accepted:
            self.state = DONE_MESSAGE

    def fail(self, why, stage):
        """Broken: closed for the session; the default action from now on.
        (A session begun on a kept connection: none is kept again.)"""
        log.warn("milter %s: %s at %s; default action: %s", self.name, why,
                    STAGE_NAMES.get(stage, stage), self.default_action)
        counters.count(("smtpd_milter_verdicts", self.name, "failed"))
        if self.kept:
            self.keeper.unkept["continue"].add(self.name)
        self.close(polite=False)
        self.state, self.sticky = DONE, self.default
        return self.refusal(self.default)

    def abort(self):
        self.skip_body, self.held = False, None
        if self.state in (ENVELOPE, DONE_MESSAGE):
            try:
                self.queue(packet(ABORT), "command")
                self.state = ENVELOPE
            except Broken as e:
                self.fail(str(e), "ABORT")


# ------------------------------------------------------------- filters ----

class Milters:
    """A session's filters: each method reports one event to them in turn
    and returns the first Answer that is not CONTINUE (or CONTINUE)."""

    def __init__(self, endpoints, default_action, deadline, values, keeper=NOT_KEEPING):
        self.filters = [Filter(e, default_action, deadline, keeper) for e in endpoints]
        self.values = values            # macro name -> value, kept by the session
        self.in_message = False         # a MAIL was reported, no ABORT since
        self.verdicts = []              # (filter, verdict) at the end of the message

    def each(self, cmd, payload=b"", kind="command"):
        for f in self.filters:
            replay = f.replay
            try:
                a = f.event(cmd, payload, self.values, "kept" if replay == [] else kind)
            except Broken as e:
                a = self.again(f, e, cmd, payload, kind) if replay is not None \
                    else f.fail(str(e), cmd)
            else:
                if replay is not None:
                    replay.append((cmd, payload))
            counters.count(("smtpd_milter_verdicts", f.name, verdict(a)))
            if a.kind != "continue":
                return a
        return CONTINUE

    def connect(self, name, family, port, address):
        """The client: its name (or '[address]'), '4' or '6', port, address."""
        for f in self.filters:
            try:
                f.open()
            except Broken as e:
                f.fail(str(e), "connect")
        return self.each(CONNECT, cstrings(name.encode("latin-1")) + family
                         + struct.pack("!H", port) + cstrings(address.encode("latin-1")))

    def again(self, f, e, cmd, payload, kind):
        """A kept connection failed before the session's first MAIL: a new
        connection is asked the session's events again (a refusal among
        them holds for the session, as ever), then cmd.  Unless the filter
        merely closed it (an idle timeout, a restart), keeping stops for
        that filter: after an accept if it failed at CONNECT after one
        (libmilter ignores QUIT_NC, then CONNECT, there), else at all (a
        stray packet: an answer to QUIT_NC, which wants none)."""
        replay, f.replay = f.replay, None
        if not isinstance(e, Gone):
            how = f.kept if cmd == CONNECT and not replay else "continue"
            f.keeper.unkept[how].add(f.name)
            log.info("milter %s: a connection kept after %s: %s at %s; none kept after %s again",
                     f.name, f.kept, e, STAGE_NAMES[cmd],
                     "an accept" if how == "accept" else "any message")
        f.close(polite=False)
        try:
            f.connect()
            for c, p in replay:
                f.event(c, p, self.values, "command")
            return f.event(cmd, payload, self.values, kind)
        except Broken as e:
            return f.fail(str(e), cmd)

    def helo(self, name):
        return self.each(HELO, cstrings(name.encode("latin-1")))

    def mail(self, args):
        self.in_message = True
        self.verdicts = []
        for f in self.filters:
            f.replay = None         # what was answered so far stands
        return self.each(MAIL, cstrings(*(a.encode("latin-1") for a in args)))

    def rcpt(self, args):
        return self.each(RCPT, cstrings(*(a.encode("latin-1") for a in args)))

    def data(self):
        return self.each(DATA)

    def message(self, msg):
        """The end of the message: each filter in turn sees msg (a
        rewrite.Message, changed by the filters before it) and may change it.
        Returns the Answer."""
        for f in self.filters:
            try:
                a = self.one_filter(f, msg)
            except Broken as e:
                a = f.fail(str(e), BODYEOB)
            except rewrite.Invalid as e:        # a change that would spoil the spool file
                a = f.fail("change refused: %s" % e, BODYEOB)
            counters.count(("smtpd_milter_verdicts", f.name, verdict(a)))
            self.verdicts.append((f.name, "hold" if f.held else verdict(a)))
            if a.kind != "continue":
                return a
        return CONTINUE

    def one_filter(self, f, msg):
        if f.state != ENVELOPE:
            return f.event(BODYEOB, b"", self.values, "content")
        lead = bool(f.events & P_HDR_LEADSPC)
        if not f.events & P_NOHDRS:
            for name, value in msg.fields(lead):
                a = f.event(HEADER, cstrings(name, value), self.values, "content")
                if a.kind != "continue" or f.state != ENVELOPE:
                    return a
        for cmd, payload in [(EOH, b"")] + [(BODY, c) for c in msg.chunks(CHUNK)]:
            if cmd == BODY and (f.skip_body or f.events & P_NOBODY):
                break
            a = f.event(cmd, payload, self.values, "content")
            if a.kind != "continue" or f.state != ENVELOPE:
                return a
        edits = msg.changes()
        try:
            a = f.event(BODYEOB, b"", self.values, "content", edits)
            if a.kind == "continue":        # let through: continue, or accept (DONE_MESSAGE)
                f.reusable = "continue" if f.state == ENVELOPE else "accept"
            if a.kind == "continue" and edits:
                msg.apply(edits, lead)
            return a
        finally:
            edits.close()

    @property
    def held(self):
        """Why a filter quarantined this message, or None."""
        return next((f.held for f in self.filters if f.held), None)

    def abort(self):
        """The transaction is over (RSET, HELO, its end): ABORT, once."""
        if self.in_message:
            self.in_message = False
            for f in self.filters:
                f.abort()

    def close(self):
        for f in self.filters:
            f.close()
