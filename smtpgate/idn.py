"""idn - internationalized addresses (SMTPUTF8): one form for every domain

DESCRIPTION
    An SMTPUTF8 address (RFC 6531) may name its domain by U-labels
    ("exämple.org") or by their A-labels ("xn--exmple-cua.org"); IDNA 2008
    with UTS 46 mapping (the idna package; Python's own codec is IDNA 2003)
    says they are one domain.  The gate keeps the address as the client
    sent it and compares in one canonical form, the A-label one: the rules'
    patterns are put in it when loaded and each address when judged.

    Text here is what the gate handles everywhere: a str whose characters
    are the octets (latin-1), here those of UTF-8.  ascii_domain() checks
    and converts a domain; canonical() an address or a rules pattern (a
    label with a wildcard is left as it is: checkrules says so).
"""

import encodings.punycode  # noqa: F401 (loaded now, before the jail: looked up late)

import idna
import idna.idnadata   # noqa: F401 (likewise)
import idna.uts46data  # noqa: F401

WILDCARDS = "*?[]"


def utf8_text(octets):
    """The Unicode text of an octets-str, or None if it is not UTF-8."""
    try:
        return octets.encode("latin-1").decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return None


def ascii_domain(domain):
    """A domain (Unicode text) in A-labels, or None if IDNA 2008 refuses it."""
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


def canonical(text):
    """An address or pattern (octets-str) with each non-ASCII label of its
    domain in A-label form and a UTF-8 local part in lower case (Unicode's,
    as ASCII's is lowered for every address); unchanged when all ASCII or
    not UTF-8."""
    if text.isascii():
        return text
    local, at, domain = text.rpartition("@")
    if not at:
        local, domain = "", text
    if not local.isascii():
        u = utf8_text(local)
        if u is not None:
            local = u.lower().encode("utf-8").decode("latin-1")
    u = utf8_text(domain)
    if u is None:
        return text
    labels = []
    for label in u.split("."):
        if label.isascii() or any(c in label for c in WILDCARDS):
            labels.append(label.encode("utf-8").decode("latin-1"))
            continue
        a = ascii_domain(label)
        labels.append(a.lower() if a is not None else label.encode("utf-8").decode("latin-1"))
    return local + at + ".".join(labels)


def unconvertible(pattern):
    """A label of pattern's domain that stays in UTF-8 (it has a wildcard
    or IDNA refuses it), for checkrules' warning; or None."""
    if pattern.isascii():
        return None
    u = utf8_text(pattern.rpartition("@")[2])
    for label in (u or "").split("."):
        if not label.isascii() and (any(c in label for c in WILDCARDS)
                                    or ascii_domain(label) is None):
            return label
    return None
