"""chat - what smtpd says, written one way; its verbs and EHLO keywords

DESCRIPTION
    Reply(code, text, status=None, more=(), detail=None) is one SMTP reply:
    its code, the text of its first line, an enhanced status code (RFC
    3463, e.g. "5.7.1") it always carries or None, further lines, and the
    enhanced status it carries only after EHLO when ENHANCEDSTATUSCODES is
    offered (RFC 2034: every reply of class 2, 4 and 5 but the greeting
    and EHLO's own; the original's texts, spoken to HELO, never change).
    encode(enhanced) is the one place a reply becomes octets --
    "CODE[-| ][STATUS ]TEXT" CRLF a line -- and the one place refusals
    are counted (counters.py: temporary and permanent).  Every reply the
    gate makes is named below, with the original's texts where it had
    them (its VANILLA_MESSAGES, spec 3.4);
    the rules file's templates and the filters' replies become Replies
    through parse().  A session writes through its Channel (channel.py,
    which batches and encrypts); what goes to a client before or instead of
    a session -- the inetd greeting, a worker's 421, inetd's 521, a session
    given up -- goes through send().  Light to import: inetd mode greets
    with it before it loads the rest of smtpd.
VERBS
    Each verb with what its dispatch needs to know: whether HELP lists it,
    and whether it ends a pipelining group (RFC 2920 3.1: the client waits
    for our reply before it says more; without PIPELINING every verb does).
    What each verb requires of the session it checks itself (session.py).
KEYWORDS
    keywords(...): what EHLO offers, in order, each with when.
"""

import collections
import os
import re
import socket

import buildconf
from smtpgate import counters


class Reply(collections.namedtuple("Reply", "code text status more detail")):
    __slots__ = ()

    def __new__(cls, code, text, status=None, more=(), detail=None):
        return super().__new__(cls, code, text, status, tuple(more), detail)

    def __mod__(self, args):
        """The reply with its text's %s filled in."""
        return tuple.__new__(Reply, (self.code, self.text % args, self.status, self.more,
                                     self.detail))

    def with_lines(self, more):
        """The reply with these further lines."""
        return tuple.__new__(Reply, (self.code, self.text, self.status, tuple(more),
                                     self.detail))

    def encode(self, enhanced=False):
        """Its octets; enhanced: the client said EHLO and we offer
        ENHANCEDSTATUSCODES, so a reply without a status of its own
        carries its detail."""
        if self.code >= 400:
            counters.add(counters.REFUSALS_TEMPORARY if self.code < 500
                         else counters.REFUSALS_PERMANENT)
        status = self.status or enhanced and self.detail
        if not self.more:
            if status:
                return b"%d %s %s\r\n" % (self.code, status.encode(),
                                          self.text.encode("latin-1"))
            return b"%d %s\r\n" % (self.code, self.text.encode("latin-1"))
        return ("\r\n".join(self.lines(enhanced)) + "\r\n").encode("latin-1")

    def lines(self, enhanced=False):
        """Its lines as a client reads them, without CRLF."""
        texts = [self.text] + list(self.more)
        status = self.status or enhanced and self.detail
        status = status + " " if status else ""
        return ["%d%s%s%s" % (self.code, "-" if i < len(texts) - 1 else " ", status, text)
                for i, text in enumerate(texts)]

    def last_line(self, enhanced=False):
        """Its last line, for a log line."""
        return self.lines(enhanced)[-1]


OWN_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")


def parse(lines, detail=None):
    """A Reply of lines already whole ("550 text", or a filter's "550-..."
    lines, milterwire.smtp_reply): the same octets when encoded.  detail:
    the enhanced status it carries after EHLO if its text has none of its
    own (one of the class of its code; RFC 3463)."""
    if isinstance(lines, str):
        lines = (lines,)
    code = int(lines[0][:3])
    if detail is not None and (OWN_STATUS.match(lines[0][4:])
                               or detail[0] != lines[0][0]):
        detail = None
    return Reply(code, lines[0][4:], None, [line[4:] for line in lines[1:]], detail)


def policy(lines, temporary="4.7.1"):
    """A Reply of a policy's lines (a rule's template, a filter's reply):
    after EHLO, one without a status of its own says 5.7.1 (refused by
    policy), 4.7.1 or temporary (e.g. 4.4.3, a lookup failed), or 2.0.0."""
    lines = (lines,) if isinstance(lines, str) else lines
    c = lines[0][:1]
    return parse(lines, "5.7.1" if c == "5" else temporary if c == "4" else "2.0.0")


def send(where, reply, enhanced=False):
    """The last word to a client on a descriptor or socket, outside a
    session: one write, never waiting; True if it went out."""
    data = reply.encode(enhanced)
    try:
        if isinstance(where, socket.socket):
            where.send(data, socket.MSG_DONTWAIT)
        else:
            os.write(where, data)
        return True
    except OSError:
        return False


# ----------------------------------------------------------- the texts ----

GREETING = Reply(220, "%s Sendmail 4.1/SMI-4.1 ready.")     # % myname
STARTING_TLS = Reply(220, "Ready to start TLS", detail="2.0.0")
CLOSING = Reply(221, "Closing connection", detail="2.0.0")
HELP = Reply(214, "Commands: %s", detail="2.0.0")
OK = Reply(250, "OK", detail="2.0.0")
PLEASED = Reply(250, "%s pleased to meet you, %s")          # % (myname, HELO name)
SENDER_OK = Reply(250, "sender is %s, sender OK", detail="2.1.0")
RECIPIENT_OK = Reply(250, "recipient %s, recipient OK", detail="2.1.5")
ACCEPTED = Reply(250, "Message accepted for delivery", detail="2.0.0")
CHUNK_OK = Reply(250, "%d octets received", detail="2.0.0")    # % BDAT's size
CANNOT_VRFY = Reply(252, "Can not VRFY user", detail="2.5.0")
START_DATA = Reply(354, "OK End with <CRLF>.<CRLF>")
NOT_AVAILABLE = Reply(421, "Service not available, closing transmission channel",
                      detail="4.3.2")
PER_NETWORK = Reply(421, "Too many connections from your address, try again later",
                    detail="4.7.0")
RATE = Reply(421, "Too many connections from your network, slow down", "4.7.0")
LOCAL_ERROR = Reply(451, "Requested action not taken: local error in processing",
                    detail="4.3.0")
RULES_INVALID = Reply(451, "Requested action not taken: rules file invalid", detail="4.3.5")
NO_STORAGE = Reply(452, "Requested action not taken: insufficient system storage",
                   detail="4.3.1")
TOO_MANY_RECIPIENTS = Reply(452, "Too many recipients", detail="4.5.3")
UNRECOGNIZED = Reply(500, "Syntax Error, command unrecognized", detail="5.5.2")
BAD_LINE = Reply(500, "%s", detail="5.5.2")                 # % what channel.command found
SYNTAX = Reply(501, "Syntax Error in parameters or arguments", detail="5.5.4")
SYNTAX_ADDRESS = Reply(501, "Syntax: %s<address>", detail="5.5.4")  # % "FROM:" or "TO:"
STARTTLS_SYNTAX = Reply(501, "Syntax: STARTTLS takes no argument", detail="5.5.4")
NOT_IMPLEMENTED = Reply(502, "Command not implemented", detail="5.5.1")
BAD_SEQUENCE = Reply(503, "Bad sequence of commands", detail="5.5.1")
NOT_SPOKEN = Reply(521, "%s Doesn't talk SMTP, Sorry")      # % myname
TOO_BIG = Reply(552, "Message size exceeds fixed maximum message size", detail="5.3.4")
STORAGE_EXCEEDED = Reply(552, "Requested mail action aborted: exceeded storage allocation",
                         detail="5.3.4")
BARE = Reply(550, "Message refused: %s in line %d; every line must end with CR LF, "
                  "and no NUL (RFC 5321 2.3.8)", "5.5.2")
OUT_OF_SYNC = Reply(554, "Error: SMTP protocol synchronization", "5.5.0")
PREGREET = Reply(554, "Protocol error: you talked before my greeting", "5.5.1")
REPUTATION = Reply(554, "Service unavailable; client [%s] blocked by its network reputation",
                   "5.7.1")                                 # % client address
BAD_DSN = Reply(501, "%s", detail="5.5.4")                  # % what is wrong (RFC 3461)
UNKNOWN_PARAMETER = Reply(555, "MAIL FROM/RCPT TO parameters not recognized or not implemented",
                          detail="5.5.4")

# verification (verify.py), % the address
USER_UNKNOWN = Reply(550, "<%s>: Recipient address rejected: User unknown", "5.1.1")
UNVERIFIED = Reply(450, "<%s>: Recipient address rejected: unverified address, try again later",
                   "4.1.1")
CANNOT_VERIFY = Reply(451, "<%s>: Recipient address rejected: cannot verify it now, "
                           "try again later", "4.4.3")
TOO_MANY_UNVERIFIED = Reply(450, "<%s>: Recipient address rejected: too many unverified "
                                 "recipients", "4.7.1")

# mail filters (milter.py)
FILTER_REJECT = Reply(550, "Command rejected", "5.7.1")
FILTER_TEMPFAIL = Reply(451, "Service unavailable - try again later", "4.7.1")
FILTER_BAD_REPLY = Reply(451, "Server configuration problem - try again later", "4.3.5")
FILTER_SHUTDOWN = Reply(421, "Server closing connection", "4.7.0")
FILTER_DOWN_REJECT = Reply(550, "Service unavailable", "5.5.0")

# What a code alone says (session.py answers some codes with no more).
BY_CODE = {r.code: r for r in (CLOSING, OK, CANNOT_VRFY, START_DATA, NOT_AVAILABLE,
                               LOCAL_ERROR, NO_STORAGE, UNRECOGNIZED, SYNTAX,
                               NOT_IMPLEMENTED, BAD_SEQUENCE, STORAGE_EXCEEDED,
                               UNKNOWN_PARAMETER)}


# -------------------------------------------------------------- verbs ----

Verb = collections.namedtuple("Verb", "listed ends_group")

VERBS = {
    "HELO": Verb(True, True), "EHLO": Verb(True, True), "MAIL": Verb(True, False),
    "RCPT": Verb(True, False), "DATA": Verb(True, True), "BDAT": Verb(False, False), "RSET": Verb(True, False),
    "NOOP": Verb(True, True), "VRFY": Verb(True, True), "EXPN": Verb(False, True),
    "HELP": Verb(True, False), "QUIT": Verb(True, False),
    "STARTTLS": Verb(False, False),     # HELP lists it when it is offered
    "PROXY": Verb(False, False),        # only ever a refused command here (client.py)
}
UNKNOWN_VERB = Verb(False, False)
ENDS_GROUP = frozenset(v for v, f in VERBS.items() if f.ends_group)


def listed(tls_offered):
    """The verbs HELP names."""
    return [v for v, f in VERBS.items() if f.listed] + ["STARTTLS"] * bool(tls_offered)


# ----------------------------------------------------------- keywords ----

def keywords(maxsize, tls_offered):
    """The EHLO keywords, in the order offered."""
    return ["PIPELINING", "8BITMIME", "SIZE %d" % maxsize if maxsize else "SIZE"] \
        + ["ENHANCEDSTATUSCODES"] * bool(buildconf.SMTPD_ENHANCED_STATUS_CODES) \
        + ["DSN"] * bool(buildconf.SMTPD_DSN) \
        + ["SMTPUTF8"] * bool(buildconf.SMTPD_SMTPUTF8) \
        + ["CHUNKING"] * bool(buildconf.SMTPD_CHUNKING) \
        + ["STARTTLS"] * bool(tls_offered)


def enhanced(esmtp):
    """Do replies carry their enhanced status (RFC 2034) in a session that
    said EHLO (esmtp) or HELO?"""
    return esmtp and bool(buildconf.SMTPD_ENHANCED_STATUS_CODES)
