"""text - the one home of the sanitizers: text someone else wrote, made safe

DESCRIPTION
    Four needs, four functions; nothing else escapes text:
      escape(text)      a client's words as one field of a log line: only
                        printable ASCII but space, quote and backslash stays,
                        the rest is \\xHH, so it cannot forge a field;
      visible(text)     the jail's or another program's bytes for a terminal
                        or a log: printable text stays, even beyond ASCII;
                        controls, bidi overrides, private use are escapes;
      host_chars(name)  a HELO name in a header or a reply: host name
                        characters only, the others '?';
      one_line(text)    a program's words in a header line of a report:
                        printable ASCII, everything else a space.
    Each bounds its output.  (The logger escapes the controls of every line
    again, whatever it is given: log.LOG_CONTROLS.)
"""

import re
import unicodedata

PLAIN = re.compile(r'[!#-\[\]-~]*')      # printable ASCII but space, quote, backslash


def escape(text, limit=255):
    """Client text for a log line: printable ASCII stays, anything else and
    space, quote and backslash become \\xHH, so it cannot forge a field; at
    most limit characters (then "...")."""
    head = text[:limit]
    if PLAIN.fullmatch(head):                   # the usual case, in C
        out = head
    else:
        out = "".join(c if "!" <= c <= "~" and c not in '"\\' else "\\x%02x" % ord(c)
                      for c in head)
    return out + "..." if len(text) > limit else out


def visible(text, limit=None, keep=""):
    """Text someone else wrote (a spool file, a client, the jail) for a
    terminal or a log: what is printable stays, even beyond ASCII; every
    control, format (bidi), private-use or unassigned character becomes
    \\xHH, \\uHHHH or \\UHHHHHHHH, except those in keep (e.g. "\\n\\t").
    Bytes are read as UTF-8 (a bad byte shows as \\xHH).  At most limit
    characters of text (then "...")."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    cut = limit is not None and len(text) > limit
    if cut:
        text = text[:limit]
    if not text.isprintable():
        text = "".join(c if c.isprintable() or c in keep else hidden(c) for c in text)
    return text + "..." if cut else text


def hidden(c):
    n = ord(c)
    if n < 256:
        return "\\x%02x" % n
    if unicodedata.category(c) == "Zs":     # a space beyond ASCII: fine as it is
        return c
    return "\\u%04x" % n if n < 0x10000 else "\\U%08x" % n


HOST_CHARS = re.compile(r"[^A-Za-z0-9.:\[\]_-]")


def host_chars(name):
    """A client's HELO name for a header or a reply: host name characters
    only (others become '?'), at most 255."""
    return HOST_CHARS.sub("?", name[:255])


def one_line(text):
    """Another program's words, safe for one header line: printable ASCII,
    no breaks."""
    return "".join(c if " " <= c <= "~" else " " for c in text.replace("\n", " | ")).strip()
