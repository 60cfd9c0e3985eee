"""address - the one parser of MAIL FROM and RCPT TO arguments

DESCRIPTION
    parse_path(arg, null_ok) -> (stored text, parameters) or AddressError
    with the SMTP reply smtpd gives (code, text).  RFC 5321 paths; angle
    brackets optional; a source route is dropped; "<>" only where null_ok.
    Refused: a leading '-', an unquoted ',', control characters, 8-bit
    ones unless SMTPUTF8 is in force (then UTF-8, the domain valid in IDNA
    2008: idn.py), unbalanced quotes or brackets, a local part over 64
    octets or a path over 256.  smtpd (MAIL, RCPT) and checkrules' tester use it, so the
    tester answers as smtpd would.
"""

import re
import unicodedata

from smtpgate import idn

PATH_MAX = 256
LOCAL_MAX = 64


class AddressError(Exception):
    def __init__(self, code, text, detail=None):
        super().__init__(text)
        self.code, self.text, self.detail = code, text, detail


LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
LITERAL = re.compile(r"^\[(?:IPv6:[0-9A-Fa-f:.]+|[0-9.]+)\]$")
PRINTABLE = re.compile(r"[\x20-\x7e]*")      # no control, DEL or 8-bit character
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
ATEXT_BAD = set('()<>[]:;@\\," ')


def split_path(arg):
    """Split 'path [params]' -> (path, params); brackets or quotes group."""
    if '"' not in arg and arg.startswith("<"):    # the usual '<a@b> PARAMS': no scan
        j = arg.find(">")
        if j > 0 and "<" not in arg[1:j] and arg[j + 1:j + 2] in ("", " "):
            return arg[:j + 1], arg[j + 1:].strip()
    return scan_path(arg)


def scan_path(arg):
    """split_path, a character at a time."""
    depth, quoted, i = 0, False, 0
    while i < len(arg):
        ch = arg[i]
        if ch == "\\" and quoted:
            i += 1
        elif ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">":
            depth -= 1
        elif ch == " " and not quoted and depth == 0:
            break
        i += 1
    if quoted or depth != 0:
        raise AddressError(501, "Unbalanced quotes or angle brackets")
    return arg[:i], arg[i:].strip()


def parse_local(local):
    if local.startswith('"'):
        if len(local) < 2 or not local.endswith('"'):
            raise AddressError(501, "Bad quoted local part")
        body = re.sub(r'\\.', "", local[1:-1])
        if '"' in body:
            raise AddressError(501, "Bad quoted local part")
        return
    if not local or local.startswith(".") or local.endswith(".") or ".." in local:
        raise AddressError(501, "Bad local part")
    if "," in local:
        raise AddressError(553, "Unquoted ',' in address not allowed")
    if ATEXT_BAD & set(local):
        raise AddressError(501, "Bad character in local part")


def valid_domain(domain):
    """A dotted host name (label by label: no backtracking blow-up) or an
    address literal."""
    if domain.startswith("["):
        return LITERAL.match(domain) is not None
    labels = domain[:-1].split(".") if domain.endswith(".") else domain.split(".")
    return all(LABEL.match(label) for label in labels)


def parse_path(arg, null_ok, utf8=False):
    """A MAIL/RCPT argument -> (stored text, params); utf8: SMTPUTF8 is in
    force (RFC 6531 3.3), so the local part and the domain (U-labels) may
    be UTF-8 -- the stored text is then its octets.

    Brackets are optional; a source route is dropped; "<>" only if null_ok.
    The stored text is the address as typed (with its brackets, if any)."""
    if not arg:
        raise AddressError(501, "Address missing")
    if not PRINTABLE.fullmatch(arg):
        if CONTROL.search(arg):
            raise AddressError(501, "Control character in address")
        if not utf8:
            raise AddressError(553, "SMTPUTF8 is required for a UTF-8 address (RFC 6531)",
                               "5.6.7")
        text = idn.utf8_text(arg)
        if text is None or any(unicodedata.category(c) == "Cc" for c in text):
            raise AddressError(553, "Not UTF-8, or a control character, in address", "5.6.7")
    path, params = split_path(arg)
    bracketed = path.startswith("<")
    inner = path[1:-1] if bracketed and path.endswith(">") else path
    if bracketed != path.endswith(">") or "<" in inner or ">" in inner:
        raise AddressError(501, "Unbalanced angle brackets")
    if inner == "":
        if not (null_ok and bracketed):
            raise AddressError(553 if bracketed else 501, "Null address not allowed here")
        return "<>", params
    if inner.startswith("@"):               # source route: @a,@b:mailbox
        route, colon, inner = inner.partition(":")
        if not colon or not inner:
            raise AddressError(501, "Bad source route")
    if len(inner) + 2 > PATH_MAX:
        raise AddressError(553, "Address longer than %d octets" % PATH_MAX)
    if inner.startswith("-"):
        raise AddressError(553, "Address may not start with '-'")
    local, at, domain = inner.rpartition("@") if "@" in inner else (inner, "", "")
    if len(local) > LOCAL_MAX:
        raise AddressError(553, "Local part longer than %d octets" % LOCAL_MAX)
    parse_local(local)
    if at and not valid_domain(domain if domain.isascii()
                               else idn.ascii_domain(idn.utf8_text(domain) or "") or "-"):
        raise AddressError(501, "Bad domain %s" % domain)
    return ("<%s>" % inner if bracketed else inner), params


def mail_params(params, dsn=False, utf8=False):
    """The MAIL FROM parameters -> {"SIZE": n, "RET": "FULL"|"HDRS",
    "ENVID": xtext, "SMTPUTF8": True}; AddressError 555 for one we do not
    know (SIZE=digits, BODY=7BIT|8BITMIME, with dsn RET and ENVID, with
    utf8 SMTPUTF8 are known), 501 for a
    DSN parameter that is malformed or given twice (RFC 3461 4.3, 4.4)."""
    out = {}
    for p in params.split():
        key, _, value = p.partition("=")
        key = key.upper()
        if key == "SIZE" and value.isdigit():
            out["SIZE"] = int(value)
        elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
            pass
        elif key == "SMTPUTF8" and not value and utf8:
            out["SMTPUTF8"] = True
        elif dsn and key in ("RET", "ENVID"):
            if key in out:
                raise AddressError(501, "%s given twice" % key)
            if key == "RET" and value.upper() in ("FULL", "HDRS"):
                out["RET"] = value.upper()
            elif key == "ENVID" and 0 < len(value) <= ENVID_MAX and XTEXT.match(value):
                out["ENVID"] = value
            else:
                raise AddressError(501, "Bad %s parameter" % key)
        else:
            raise AddressError(555, "MAIL FROM/RCPT TO parameters not recognized "
                                    "or not implemented")
    return out


def rcpt_params(params, dsn=False):
    """The RCPT TO parameters -> {"NOTIFY": "NEVER" or a list of SUCCESS,
    FAILURE, DELAY joined by commas, "ORCPT": "type;xtext"}; AddressError
    555 for one we do not know, 501 for a malformed or repeated one."""
    out = {}
    for p in params.split():
        key, _, value = p.partition("=")
        key = key.upper()
        if not dsn or key not in ("NOTIFY", "ORCPT"):
            raise AddressError(555, "MAIL FROM/RCPT TO parameters not recognized "
                                    "or not implemented")
        if key in out:
            raise AddressError(501, "%s given twice" % key)
        if key == "NOTIFY":
            words = value.upper().split(",")
            if not (words == ["NEVER"] or words and len(set(words)) == len(words)
                    and set(words) <= {"SUCCESS", "FAILURE", "DELAY"}):
                raise AddressError(501, "Bad NOTIFY parameter")
            out["NOTIFY"] = ",".join(words)
        else:
            kind, semi, text = value.partition(";")
            if not (semi and ADDR_TYPE.match(kind) and text and len(value) <= ORCPT_MAX
                    and XTEXT.match(text)):
                raise AddressError(501, "Bad ORCPT parameter")
            out["ORCPT"] = value
    return out


def xtext_decode(text):
    """RFC 3461 4: "+XX" is the octet XX."""
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


XTEXT = re.compile(r"^(?:[!-*,-<>-~]|\+[0-9A-F]{2})*$")    # RFC 3461 4
ADDR_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,31}$")
ENVID_MAX = 100         # RFC 3461 4.4
ORCPT_MAX = 400         # RFC 3461 says 500; ours must fit a 512-octet envelope line


def bare(addr):
    """A stored address without its outer angle brackets ("<>" stays "<>"),
    as sendmail's command line and a report's fields want it."""
    if addr.startswith("<") and addr.endswith(">") and addr != "<>":
        return addr[1:-1]
    return addr
