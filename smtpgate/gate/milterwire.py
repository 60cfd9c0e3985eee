"""milterwire - the milter protocol (version 6) on the wire, as Postfix speaks it

DESCRIPTION
    What milter.py sends and reads, and nothing of a session: the command
    and reply octets, the protocol and action flags we offer, the macros
    Postfix sends at each stage, packets (a 4-octet length, a command
    octet, data), NUL-terminated strings, a filter's SMFIR_REPLYCODE made a
    safe SMTP reply (smtp_reply) and its changes at the end of a message
    made the tuples rewrite.py applies (parse_edit).  Broken (and Gone,
    the filter hung up) is every way a filter can break the protocol.
"""

import errno
import re
import struct

VERSION = 6
CHUNK = 65535               # body octets per SMFIC_BODY (Postfix's MILTER_CHUNK_SIZE)
PACKET_MAX = 1 << 20        # the largest packet a filter may send
REPLY_LINES = 10
REPLY_LINE = 512
SYMLIST_MAX = 4096
OUT_MAX = 65536             # octets queued for a filter before they are written

# Commands, MTA to filter.
ABORT, BODY, CONNECT, MACRO, BODYEOB = b"A", b"B", b"C", b"D", b"E"
HELO, HEADER, MAIL, EOH, OPTNEG, QUIT, RCPT, DATA = b"H", b"L", b"M", b"N", b"O", b"Q", b"R", b"T"
QUIT_NC = b"K"              # the end of a session; the connection serves the next
STAGE_NAMES = {CONNECT: "CONNECT", HELO: "HELO", MAIL: "MAIL", RCPT: "RCPT", DATA: "DATA",
               HEADER: "HEADER", EOH: "END-OF-HEADER", BODY: "BODY",
               BODYEOB: "END-OF-MESSAGE"}

# SMFIP_*: events the filter does not want (NO...), will not answer (NR...).
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT = 1 << 0, 1 << 1, 1 << 2, 1 << 3
P_NOBODY, P_NOHDRS, P_NOEOH, P_NR_HDR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
P_NOUNKNOWN, P_NODATA, P_SKIP = 1 << 8, 1 << 9, 1 << 10
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT = 1 << 12, 1 << 13, 1 << 14, 1 << 15
P_NR_DATA, P_NR_UNKN, P_NR_EOH, P_NR_BODY = 1 << 16, 1 << 17, 1 << 18, 1 << 19
P_HDR_LEADSPC = 1 << 20
# What we offer: every event of version 6 may be declined or left
# unanswered, body chunks skipped; rejected RCPTs are never sent (no RCPT_REJ).
PROTOCOL = (P_NOCONNECT | P_NOHELO | P_NOMAIL | P_NORCPT | P_NOBODY | P_NOHDRS | P_NOEOH
            | P_NR_HDR | P_NOUNKNOWN | P_NODATA | P_SKIP | P_NR_CONN | P_NR_HELO | P_NR_MAIL
            | P_NR_RCPT | P_NR_DATA | P_NR_UNKN | P_NR_EOH | P_NR_BODY | P_HDR_LEADSPC)
NOT_SENT = {CONNECT: P_NOCONNECT, HELO: P_NOHELO, MAIL: P_NOMAIL, RCPT: P_NORCPT,
            DATA: P_NODATA, HEADER: P_NOHDRS, EOH: P_NOEOH, BODY: P_NOBODY, BODYEOB: 0}
NO_REPLY = {CONNECT: P_NR_CONN, HELO: P_NR_HELO, MAIL: P_NR_MAIL, RCPT: P_NR_RCPT,
            DATA: P_NR_DATA, HEADER: P_NR_HDR, EOH: P_NR_EOH, BODY: P_NR_BODY, BODYEOB: 0}

# SMFIF_*: the changes a filter may ask for; all of them are offered.
F_ADDHDRS, F_CHGBODY, F_ADDRCPT, F_DELRCPT = 1 << 0, 1 << 1, 1 << 2, 1 << 3
F_CHGHDRS, F_QUARANTINE, F_CHGFROM, F_ADDRCPT_PAR, F_SETSYMLIST = (
    1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8)
ACTIONS = 0x1FF
# The changes (SMFIR_*) at the end of a message, and the action each needs.
EDITS = {b"h": F_ADDHDRS, b"i": F_ADDHDRS, b"m": F_CHGHDRS, b"b": F_CHGBODY,
         b"+": F_ADDRCPT, b"2": F_ADDRCPT_PAR, b"-": F_DELRCPT, b"e": F_CHGFROM}

# Macro stages (SMFIM_*) and the macros sent at each, Postfix's defaults
# (the client's at connect, as the issue of the sender asks); a filter may
# ask for others of these by SMFIR_SETSYMLIST.
STAGE_OF = {CONNECT: 0, HELO: 1, MAIL: 2, RCPT: 3, DATA: 4, BODYEOB: 5, EOH: 6}
MACROS = {
    0: ("j", "{daemon_name}", "{daemon_addr}", "{daemon_port}", "v", "_", "{client_addr}",
        "{client_port}", "{client_name}", "{client_ptr}"),
    1: ("{tls_version}", "{cipher}", "{cipher_bits}"),
    2: ("i", "{mail_addr}"),
    3: ("i", "{rcpt_addr}"),
    4: ("i",),
    5: ("i",),
    6: ("i",),
}

class Broken(Exception):
    """The filter broke the protocol or the connection; str() says how."""


class Gone(Broken):
    """The filter closed the connection (or reset it)."""


# ------------------------------------------------------------- packets ----

LENGTH = struct.Struct("!I")


def packet(cmd, payload=b""):
    return LENGTH.pack(len(payload) + 1) + cmd + payload


def cstrings(*items):
    """NUL-terminated strings; a NUL inside one would end it early, so none is kept."""
    if not items:
        return b""
    data = b"\0".join(items)
    if data.count(b"\0") != len(items) - 1:
        data = b"\0".join([s.replace(b"\0", b"") for s in items])
    return data + b"\0"


def split_strings(data, count, what):
    """Exactly count NUL-terminated strings, all of data; Broken otherwise."""
    parts = data.split(b"\0")
    if len(parts) != count + 1 or parts[-1] != b"":
        raise Broken("malformed %s packet" % what)
    return parts[:-1]


def smtp_reply(data):
    """The lines of a filter's SMFIR_REPLYCODE, made safe, or None if it is
    not a 4xx/5xx SMTP reply (Postfix's test: a space or hyphen after the
    code, and an enhanced code of the same class).  '%%' is '%', a lone
    '%' goes (Sendmail's replies are format strings).  The separators are
    ours; at most REPLY_LINES lines of REPLY_LINE octets, printable ASCII."""
    text = data[:-1] if data.endswith(b"\0") else data
    if b"\0" in text:
        return None
    text = re.sub(rb"%(.?)", rb"\1", text, flags=re.S)
    lines = text.split(b"\r\n")
    if len(lines) > 1 and lines[-1] == b"":
        lines.pop()
    first, code = lines[0], lines[0][:3]
    if (len(first) < 5 or first[:1] not in (b"4", b"5") or not code.isdigit()
            or first[3:4] not in (b" ", b"-") or first[4:5] != first[:1]):
        return None
    if any(line[:3] != code or line[3:4] not in (b" ", b"-") for line in lines):
        return None
    lines = lines[:REPLY_LINES]
    return tuple("%s%s%s" % (code.decode(), " " if i == len(lines) - 1 else "-",
                             "".join(chr(c) if 32 <= c < 127 else "?"
                                     for c in line[4:REPLY_LINE]))
                 for i, line in enumerate(lines))


def lost(what, x):
    """Broken (Gone if the filter reset the connection) for OSError x."""
    cls = Gone if x.errno in (errno.ECONNRESET, errno.EPIPE) else Broken
    return cls("%s: %s" % (what, x.strerror))


def parse_edit(code, data):
    """One change asked at the end of a message -> a tuple rewrite.py applies."""
    if code in (b"h", b"i", b"m"):
        index = None
        if code != b"h":
            if len(data) < 4:
                raise Broken("short header change")
            (index,), data = struct.unpack("!I", data[:4]), data[4:]
        name, value = split_strings(data, 2, "header change")
        return {b"h": ("add", name, value), b"i": ("insert", index, name, value),
                b"m": ("change", index, name, value)}[code]
    if code == b"b":
        return ("body", data)
    if code == b"-":
        return ("delrcpt", split_strings(data, 1, "recipient")[0])
    parts = data.split(b"\0")
    if len(parts) not in (2, 3) or parts[-1] != b"" or not parts[0]:
        raise Broken("malformed address change")
    return ({b"e": "from", b"+": "addrcpt", b"2": "addrcpt"}[code], parts[0],
            parts[1] if len(parts) == 3 else b"")
