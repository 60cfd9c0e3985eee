"""handoff - a client passed from the front stage to a worker, with what it learned

DESCRIPTION
    The front stage (screen.py) holds every connection until it has earned
    a worker; then it sends the client's socket to an idle worker over
    that worker's own Unix socket (SOCK_SEQPACKET, SCM_RIGHTS), with a
    Passed: the client's ends (the PROXY header's when there was one),
    how we know them, the DNS lists' score, whether it is exempt, the
    HELO or EHLO it already answered, and the octets the client sent that
    the front stage read but did not act on -- or, for a client passed
    before its greeting, that the worker is to greet it.  A worker says
    READY (one octet) when it can take a client: after it starts, and
    after each session; LEAVING when it is about to exit: the front stage
    forgets it and closes its end, and the worker serves any client sent
    before that close (datagrams keep their order) -- none is lost in
    between.  GIVEN (with a descriptor and the peer's address as JSON):
    a connection the worker accepted itself and gives the front stage.
    Nothing in a message is trusted: decode() and given_peer() check
    every field and its bounds (a front stage is as jailed as a worker, no
    more).
FORMAT
    One datagram: JSON of the fields below, at most MESSAGE_MAX octets,
    and the client's descriptor in its ancillary data.
"""

import array
import dataclasses
import json
from json.encoder import c_make_encoder, encode_basestring_ascii
import socket

READY = b"R"                # a worker can take a client
LEAVING = b"L"              # a worker leaves: the front stage closes its end
GIVEN = b"C"                # a worker gives the front stage a connection it accepted
MESSAGE_MAX = 65536
UNREAD_MAX = 16384          # octets of the client the front stage may pass on
ANCILLARY = socket.CMSG_SPACE(4 * array.array("i").itemsize)    # room for 4 descriptors
TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)


class Bad(Exception):
    """A message that is not a Passed; str() says why."""


@dataclasses.dataclass
class Passed:
    local: tuple = None         # (address, port) of our end
    peer: tuple = None          # (address, port) of the client
    origin: str = None          # None (the socket) or "proxy" (its header)
    helo: str = None            # the HELO or EHLO name the front stage answered, or None
    esmtp: bool = False         # it was EHLO
    score: int = None           # the DNS lists' score, when they were asked
    allowlisted: bool = False   # that score allow-lists the client
    unread: bytes = b""         # what the client sent that is still to be read
    waited: float = 0.0         # seconds it waited for a worker
    age: float = 0.0            # seconds since the front stage accepted it
    greeted: bool = True        # False: passed at once (it had mail accepted); the worker greets

    def encode(self):
        # (the dict spelled out and json's C encoder called directly: the
        # front stage encodes one a connection, and dataclasses.asdict, a
        # comprehension of getattr and json.dumps's layers cost more than
        # the hand-over's system calls)
        return "".join(ENCODE({
            "local": self.local, "peer": self.peer, "origin": self.origin, "helo": self.helo,
            "esmtp": self.esmtp, "score": self.score, "allowlisted": self.allowlisted,
            "unread": self.unread.decode("latin-1"), "waited": self.waited, "age": self.age,
            "greeted": self.greeted}, 0)).encode()


def _encoder():
    compact = json.JSONEncoder(separators=(",", ":"), check_circular=False, allow_nan=False)
    if c_make_encoder is None:
        return compact.iterencode
    return c_make_encoder(None, compact.default, encode_basestring_ascii, None, ":", ",",
                          False, False, False)


ENCODE = _encoder()


def pair(value, what):
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2 or not isinstance(value[0], str)
            or len(value[0]) > 64 or not isinstance(value[1], int)
            or not 0 <= value[1] <= 65535):
        raise Bad("%s: not an (address, port)" % what)
    return tuple(value)


def decode(data):
    """The Passed of a message's octets; Bad."""
    try:
        d = json.loads(data.decode("latin-1"))
    except ValueError:
        raise Bad("not JSON") from None
    if not isinstance(d, dict):
        raise Bad("not an object")
    p = Passed(local=pair(d.get("local"), "local"), peer=pair(d.get("peer"), "peer"))
    origin, helo, unread = d.get("origin"), d.get("helo"), d.get("unread", "")
    if origin not in (None, "proxy"):
        raise Bad("origin %r" % origin)
    if helo is not None and (not isinstance(helo, str) or len(helo) > 512):
        raise Bad("helo")
    if not isinstance(unread, str) or len(unread) > UNREAD_MAX:
        raise Bad("unread")
    score = d.get("score")
    if score is not None and (not isinstance(score, int) or abs(score) > 1 << 31):
        raise Bad("score")
    waited, age = d.get("waited", 0.0), d.get("age", 0.0)
    if not isinstance(waited, (int, float)) or not 0 <= waited <= 86400:
        raise Bad("waited")
    if not isinstance(age, (int, float)) or not 0 <= age <= 86400:
        raise Bad("age")
    p.origin, p.helo, p.esmtp = origin, helo, bool(d.get("esmtp"))
    p.score, p.allowlisted, p.unread = score, bool(d.get("allowlisted")), unread.encode("latin-1")
    p.waited, p.age = float(waited), float(age)
    greeted = d.get("greeted", True)
    if not isinstance(greeted, bool) or not greeted and (helo is not None or unread):
        raise Bad("greeted")
    p.greeted = greeted
    return p


def send(sock, passed, fd):
    """Hand fd and passed over sock (the worker's); OSError."""
    sock.sendmsg([passed.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", [fd]))], socket.MSG_DONTWAIT)


def descriptors(anc):
    """The descriptors (SCM_RIGHTS) of recvmsg's ancillary data."""
    fds = array.array("i")
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
    return fds


def give(sock, fd, peer):
    """A worker: the connection fd it accepted (from peer) to the front
    stage, over its hand-over socket; OSError."""
    sock.sendmsg([GIVEN + "".join(ENCODE(peer[:2], 0)).encode()],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                 socket.MSG_DONTWAIT)


def receive_word(sock):
    """The front stage: (octets, [descriptors]) of a worker's next word;
    OSError."""
    data, anc, flags, _ = sock.recvmsg(256, ANCILLARY, socket.MSG_DONTWAIT)
    if flags & TRUNCATED and data[:1] != GIVEN:
        data = b"?"             # (a given connection says so itself: given_peer)
    return data, list(descriptors(anc))


def given_peer(data, fds):
    """The client's (address, port) of a GIVEN word with its one
    descriptor; Bad."""
    if len(fds) != 1:
        raise Bad("%d descriptors with a given connection" % len(fds))
    try:
        peer = pair(json.loads(data[1:].decode("latin-1")), "peer")
    except ValueError:
        raise Bad("a given connection's peer is not JSON") from None
    if peer is None:
        raise Bad("a given connection without its peer")
    return peer


def receive(sock, family=None):
    """(Passed, client socket) of the next message on sock; (None, None) at
    end of file; Bad (its descriptors closed) for anything else.  family:
    the listener's, which spares the socket's three questions to learn it."""
    data, anc, flags, _ = sock.recvmsg(MESSAGE_MAX, ANCILLARY)
    fds = descriptors(anc)
    if not data and not fds:
        return None, None
    try:
        if flags & TRUNCATED or len(fds) != 1:
            raise Bad("%d descriptors, flags 0x%x" % (len(fds), flags))
        client = socket.socket(family, socket.SOCK_STREAM, 0, fds[0]) if family is not None \
            else socket.socket(fileno=fds[0])
    except (Bad, OSError) as e:
        for fd in fds:
            try:
                socket.close(fd)
            except OSError:
                pass
        raise Bad(str(e)) from None
    try:
        return decode(data), client
    except Bad:
        client.close()
        raise
