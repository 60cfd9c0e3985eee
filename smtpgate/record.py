"""record - the one structured line per message, per session and per delivery

DESCRIPTION
    SMTPD_LOG_FORMAT chooses how smtpd and smtpfwdd tell what became of a
    message: classic (the original's lines, the default: nothing here is
    used), logfmt (key=value pairs) or json (one object).  text(event,
    fields) writes one record: "event" first, then the fields in the order
    given, those whose value is None left out.  A list is a JSON array, or
    in logfmt its items joined by ","; a dict (a refused recipient, a
    filter's verdict) is a JSON object, or in logfmt its values joined by
    "/".  In logfmt a value with a space, a quote, "=" or nothing in it is
    quoted ("..." with \\" and \\\\).  Control characters are escaped by
    log.py as in every line.  A record is at most LIMIT octets: a longer
    one loses the ends of its longest lists (truncated=true), never its
    syntax.  The field names are stable: smtpd(8) lists
    them, and smtpq show prints a message's record with the same names.
"""

import json

from smtpgate.log import LOG_CONTROLS

FORMATS = ("classic", "logfmt", "json")
LIMIT = 1800        # octets of a record: a syslog line (log.py) is 2048 with its head


def check(name, value, problems):
    if value not in FORMATS:
        problems.append("%s = %s: not one of %s" % (name, value, ", ".join(FORMATS)))


def text(event, fields, form="logfmt", limit=LIMIT):
    """The record, at most limit octets: past it, the longest list is
    halved (or the longest text cut) until it fits, and truncated=true
    says so -- a log line cut by the syslog client would be no JSON."""
    pairs = [("event", event)] + [(k, v) for k, v in fields if v is not None]
    for _ in range(64):
        out = render(pairs, form)
        if len(out.translate(LOG_CONTROLS).encode("utf-8", "backslashreplace")) <= limit:
            return out
        i = max(range(len(pairs)), key=lambda n: len(str(pairs[n][1])))
        k, v = pairs[i]
        if isinstance(v, (list, tuple)) and len(v) > 1:
            pairs[i] = (k, v[:len(v) // 2])
        elif len(str(v)) > 16:
            pairs[i] = (k, str(v)[:len(str(v)) // 2])
        else:
            break
        if pairs[-1] != ("truncated", True):
            pairs.append(("truncated", True))
    return out


def render(pairs, form):
    if form == "json":
        return json.dumps(dict(pairs), ensure_ascii=False, separators=(",", ":"))
    return " ".join("%s=%s" % (k, logfmt_value(v)) for k, v in pairs)


def flat(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "%.3f" % v
    if isinstance(v, dict):
        return "/".join(flat(x) for x in v.values())
    return str(v)


def logfmt_value(v):
    v = ",".join(flat(x) for x in v) if isinstance(v, (list, tuple)) else flat(v)
    if v == "" or any(c in v for c in ' "=\\'):
        return '"%s"' % v.replace("\\", "\\\\").replace('"', '\\"')
    return v
